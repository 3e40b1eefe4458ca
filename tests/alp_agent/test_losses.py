"""Losses and advantages against hand-computed values (alp.md "Ratio" and "Loss")."""

import math

import pytest
import torch

from alp_agent.algo.advantages import group_advantages
from alp_agent.algo.config import AlgoConfig, TrainerConfig
from alp_agent.algo.losses import (
    LossBatch,
    aggregate,
    kl_penalty,
    log_ratio,
    mis_mask,
    policy_loss,
    ppo_clip,
    sequence_log_ratio,
    tis_weight,
)

T = torch.tensor


# ------------------------------------------------------------------ ratios
def test_token_ratio_and_masking():
    logp = T([[-1.0, -2.0, -3.0]])
    base = T([[-1.5, -2.0, -2.0]])
    mask = T([[1.0, 1.0, 0.0]])
    assert torch.allclose(log_ratio(logp, base, mask, "token"), T([[0.5, 0.0, 0.0]]))


def test_sequence_and_geometric_ratio_values():
    logp = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    base = T([[-1.5, -2.0, -2.0], [-1.2, -1.3, -1.0]])
    mask = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # S = sum of masked d: row0 0.5 + 0 = 0.5 ; row1 0.2 + 0.3 + 0 = 0.5
    seq = log_ratio(logp, base, mask, "sequence")
    assert torch.allclose(seq, T([[0.5] * 3, [0.5] * 3]))
    geo = log_ratio(logp, base, mask, "geo_sequence")
    assert torch.allclose(geo, T([[0.25] * 3, [0.5 / 3] * 3]))
    assert torch.allclose(sequence_log_ratio(logp, base, mask), T([0.5, 0.5]))
    assert torch.allclose(sequence_log_ratio(logp, base, mask, geometric=True), T([0.25, 0.5 / 3]))


def test_log_ratio_clamp():
    logp = T([[0.0, 0.0]])
    base = T([[-30.0, 30.0]])
    mask = T([[1.0, 1.0]])
    assert torch.equal(log_ratio(logp, base, mask, "token"), T([[20.0, -20.0]]))
    assert torch.equal(log_ratio(logp, T([[-15.0, -15.0]]), mask, "sequence"), T([[20.0, 20.0]]))
    assert torch.equal(log_ratio(logp, base, mask, "token", clamp=5.0), T([[5.0, -5.0]]))


# ------------------------------------------------------------------ clip
def test_ppo_clip_positive_advantage():
    # eps_low 0.5, eps_high 3 -> band [0.5, 4]; A = +1: l = max(-rho, -clip(rho)) = [-0.3, -1, -4]
    rho = T([[0.3, 1.0, 5.0]])
    t = ppo_clip(rho.log(), T([[1.0]]).expand(1, 3), 0.5, 3.0, dual_clip=10.0)
    assert torch.allclose(t.loss, T([[-0.3, -1.0, -4.0]]))
    assert t.clip_upper.tolist() == [[False, False, True]]
    assert t.clip_lower.tolist() == [[False, False, False]]
    assert not t.clip_dual.any()  # dual clip only acts on A < 0


def test_ppo_clip_negative_advantage_and_dual_clip():
    # A = -2: l1 = 2 rho = [0.6, 2, 10, 40]; l2 = 2 clip = [1, 2, 8, 8]; max = [1, 2, 10, 40]; dual c=10: min(., 20)
    rho = T([[0.3, 1.0, 5.0, 20.0]])
    adv = T([[-2.0]]).expand(1, 4)
    t = ppo_clip(rho.log(), adv, 0.5, 3.0, dual_clip=10.0)
    assert torch.allclose(t.loss, T([[1.0, 2.0, 10.0, 20.0]]))
    assert t.clip_lower.tolist() == [[True, False, False, False]]
    assert t.clip_upper.tolist() == [[False, False, False, False]]
    assert t.clip_dual.tolist() == [[False, False, False, True]]
    no_dual = ppo_clip(rho.log(), adv, 0.5, 3.0, dual_clip=None)
    assert torch.allclose(no_dual.loss, T([[1.0, 2.0, 10.0, 40.0]]))


def test_ppo_clip_gradients_zero_where_clipped():
    lr = torch.log(T([[0.3, 1.0, 5.0]])).requires_grad_()
    ppo_clip(lr, T([[1.0, 1.0, 1.0]]), 0.5, 3.0).loss.sum().backward()
    # d(-rho)/dlog rho = -rho where unclipped; 0 on the clipped token
    assert torch.allclose(lr.grad, T([[-0.3, -1.0, 0.0]]))
    lr2 = torch.log(T([[0.3, 20.0]])).requires_grad_()
    ppo_clip(lr2, T([[-1.0, -1.0]]), 0.5, 3.0, dual_clip=3.0).loss.sum().backward()
    assert torch.allclose(lr2.grad, T([[0.0, 0.0]]))  # lower-clipped and dual-clipped: both constant


def test_aggregate_token_and_seq_mean():
    v = T([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert math.isclose(float(aggregate(v, m, "token_mean")), 7 / 3, rel_tol=1e-6)
    assert math.isclose(float(aggregate(v, m, "seq_mean")), (1.5 + 4.0) / 2, rel_tol=1e-6)
    assert math.isclose(float(aggregate(v, m, "token_mean", denom=10.0)), 0.7, rel_tol=1e-6)
    assert math.isclose(float(aggregate(v, m, "seq_mean", denom=4.0)), 5.5 / 4, rel_tol=1e-6)


# ------------------------------------------------------------------ TIS / MIS / KL
def test_tis_weights_token_and_sequence():
    old = T([[-1.0, -1.0]])
    inf = T([[-2.0, -1.5]])
    m = T([[1.0, 1.0]])
    # log w = [1, 0.5] -> [e, e^0.5] truncated at C=2 -> [2, 1.6487]
    assert torch.allclose(tis_weight(old, inf, m, "token", 2.0), T([[2.0, math.exp(0.5)]]))
    # sequence: log w = 1.5 for both -> e^1.5 = 4.48 -> 2
    assert torch.allclose(tis_weight(old, inf, m, "sequence", 2.0), T([[2.0, 2.0]]))
    assert torch.allclose(tis_weight(old, inf, m, "sequence", 5.0), T([[math.exp(1.5)] * 2]))


def test_mis_mask_token_and_sequence():
    old = T([[-1.0, -1.0, -1.0, -1.0]])
    inf = T([[-2.0, -1.5, -0.2, -1.0]])  # log w = [1.0, 0.5, -0.8, 0]; log 2 = 0.693
    m = T([[1.0, 1.0, 1.0, 0.0]])
    assert mis_mask(old, inf, m, "token", 2.0).tolist() == [[False, True, False, False]]
    # sequence log w = 1.0 + 0.5 - 0.8 = 0.7 > log 2 -> whole sequence dropped; C = 3 keeps it
    assert mis_mask(old, inf, m, "sequence", 2.0).tolist() == [[False] * 4]
    assert mis_mask(old, inf, m, "sequence", 3.0).tolist() == [[True, True, True, False]]


def test_kl_estimators():
    logp, ref = T([-1.0]), T([-2.0])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), T([1.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), T([math.exp(-1.0) + 1.0 - 1.0]))
    assert torch.allclose(kl_penalty(logp, logp, "k3"), T([0.0]))


# ------------------------------------------------------------------ every algorithm through policy_loss
def _loss(name, logp, inf, m, adv, old=None, **kw):
    return policy_loss(AlgoConfig(name=name, **kw), LossBatch(logp, inf, m, adv, old))


def test_policy_loss_every_algorithm_by_hand():
    logp = T([[-1.0, -1.0]])
    inf = T([[-1.5, -1.0]])
    old = T([[-1.2, -0.9]])
    m = T([[1.0, 1.0]])
    adv = T([[1.0]])
    # ALP / Bypass, sequence level: S = 0.5 -> rho = e^0.5 = 1.6487 on both tokens, unclipped (band [0.5, 4])
    for name in ("alp", "bypass"):
        t, mk = _loss(name, logp, inf, m, adv)
        assert torch.allclose(t.loss, T([[-math.exp(0.5)] * 2]))
        assert torch.equal(mk, m)
    # ALP token level: rho = [e^0.5, 1]
    t, _ = _loss("alp", logp, inf, m, adv, ratio_level="token")
    assert torch.allclose(t.loss, T([[-math.exp(0.5), -1.0]]))
    # GRPO: token level vs old: d = [0.2, -0.1]
    t, _ = _loss("grpo", logp, inf, m, adv, old=old)
    assert torch.allclose(t.loss, T([[-math.exp(0.2), -math.exp(-0.1)]]))
    with pytest.raises(ValueError):
        _loss("grpo", logp, inf, m, adv)
    grpo = T([[-math.exp(0.2), -math.exp(-0.1)]])
    # TIS default (sequence level, C = 5): w = min(exp(0.3 + 0.1), 5) = e^0.4 on both tokens
    t, mk = _loss("tis", logp, inf, m, adv, old=old)
    assert torch.allclose(t.loss, grpo * math.exp(0.4)) and torch.equal(mk, m)
    # TIS token, C = 1.2: w = [min(e^0.3, 1.2), e^0.1] = [1.2, 1.105]
    t, _ = _loss("tis", logp, inf, m, adv, old=old, is_level="token", is_threshold=1.2)
    assert torch.allclose(t.loss, grpo * T([[1.2, math.exp(0.1)]]))
    # MIS default (sequence, C = 5, lower 0, mask mode keeps the weight): loss x e^0.4, nothing rejected
    t, mk = _loss("mis", logp, inf, m, adv, old=old)
    assert torch.allclose(t.loss, grpo * math.exp(0.4)) and torch.equal(mk, m) and t.kept.all()
    # C = 1.2 < e^0.4 = 1.49: the whole sequence gets weight 0 (the normaliser keeps its tokens)
    t, mk = _loss("mis", logp, inf, m, adv, old=old, is_threshold=1.2)
    assert torch.equal(t.loss, T([[0.0, 0.0]])) and torch.equal(mk, m) and not t.kept.any()
    # Token-MIS: per-token w = [e^0.3, e^0.1] = [1.35, 1.105]; C = 1.2 zeroes token 0 and keeps w on token 1
    t, _ = _loss("mis", logp, inf, m, adv, old=old, is_level="token", is_threshold=1.2)
    assert torch.allclose(t.loss, grpo * T([[0.0, math.exp(0.1)]]))
    # reject variant (the former MIS): 0/1 mask on the band [1/C, C], no weight
    t, mk = _loss("mis", logp, inf, m, adv, old=old, is_mode="reject", is_level="token", is_threshold=1.2)
    assert mk.tolist() == [[0.0, 1.0]] and torch.allclose(t.loss * mk, grpo * mk)
    # GSPO: geometric sequence ratio vs old: (0.2 - 0.1) / 2 = 0.05 -> rho = e^0.05, band [1-3e-4, 1+4e-4] -> clipped;
    # then the sequence rollout weight e^0.4 <= 5 (mask mode keeps it)
    t, _ = _loss("gspo", logp, inf, m, adv, old=old)
    assert torch.allclose(t.loss, T([[-(1 + 4e-4) * math.exp(0.4)] * 2]))
    assert t.clip_upper.all()


def test_config_resolution_and_validation():
    assert AlgoConfig().noise_on and AlgoConfig().level == "sequence"
    assert not AlgoConfig(name="bypass").noise_on
    assert AlgoConfig(name="gspo").level == "geo_sequence" and AlgoConfig(name="gspo").eps_high == 4e-4
    assert AlgoConfig(name="grpo").uses_old_logprobs and not AlgoConfig(name="alp").uses_old_logprobs
    with pytest.raises(ValueError):
        AlgoConfig(bogus=1)
    with pytest.raises(ValueError):
        AlgoConfig(dual_clip=0.5)
    assert AlgoConfig(dual_clip=0).dual_clip_c is None and AlgoConfig().dual_clip_c == 3.0
    g, gs, a = AlgoConfig(name="grpo"), AlgoConfig(name="gspo"), AlgoConfig()
    assert (g.eps_low, g.eps_high, g.dual_clip_c, g.is_correction) == (0.2, 0.28, 3.0, "none")
    assert (gs.eps_low, gs.eps_high, gs.dual_clip_c, gs.is_correction, gs.is_upper) == (3e-4, 4e-4, 100.0, "mask", 5.0)
    assert (a.eps_low, a.eps_high, a.is_correction) == (0.5, 3.0, "none")
    m = AlgoConfig(name="mis")
    assert (m.is_correction, m.is_granularity, m.is_upper, m.is_lower) == ("mask", "sequence", 5.0, 0.0)
    assert AlgoConfig(name="mis", is_mode="reject", is_threshold=2.0).is_lower == 0.5
    with pytest.raises(ValueError):
        AlgoConfig(name="alp", is_mode="mask")
    for name, field in TrainerConfig.model_fields.items():
        assert field.description, name
    for model in (AlgoConfig, TrainerConfig().optim.__class__, TrainerConfig().update.__class__):
        for name, field in model.model_fields.items():
            assert field.description, name


# ------------------------------------------------------------------ gradients of the sequence level
@pytest.mark.parametrize("level", ["sequence", "geo_sequence"])
def test_sequence_level_gradient_equals_analytic(level):
    torch.manual_seed(0)
    logp = (-torch.rand(3, 5)).requires_grad_()
    base = logp.detach() + 0.1 * torch.randn(3, 5)
    mask = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]).float()
    adv = T([[1.0], [-0.5], [2.0]])
    lr = log_ratio(logp, base, mask, level)
    t = ppo_clip(lr, adv.expand(3, 5), 100.0, 100.0, None)  # band wide enough: nothing clipped
    loss = aggregate(t.loss, mask, "token_mean")
    loss.backward()
    # Analytic: every token carries rho_i = exp(S_i) and the gradient of its own logprob, so
    # dL/dlogp_it = -A_i rho_i m_it / N   (N = number of valid tokens); S_i = sum (or mean) of m (logp - base).
    d = ((logp.detach() - base) * mask).sum(-1, keepdim=True)
    if level == "geo_sequence":
        d = d / mask.sum(-1, keepdim=True)
    expected = -adv * d.exp() * mask / mask.sum()
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    # ...which is the gradient of the sequence objective sum_i -A_i exp(S_i) / N for the sequence level
    if level == "sequence":
        lp2 = logp.detach().clone().requires_grad_()
        s = ((lp2 - base) * mask).sum(-1, keepdim=True)
        (-(adv * s.exp()).sum() / mask.sum()).backward()
        assert torch.allclose(lp2.grad, logp.grad, atol=1e-6)


# ------------------------------------------------------------------ advantages
def test_grpo_advantages_and_zero_groups():
    r = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0]
    g = [0, 0, 0, 0, 1, 1, 1, 2]
    adv, st = group_advantages(r, g)
    grp = torch.tensor([1.0, 0.0, 0.0, 1.0])
    exp0 = (grp - grp.mean()) / (grp.std() + 1e-6)
    assert torch.allclose(adv[:4], exp0)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group and single-response group -> 0
    assert st["adv/zero_adv_groups"] == 2 and st["adv/groups"] == 3
    adv_nostd, _ = group_advantages(r, g, std_norm=False)
    assert torch.allclose(adv_nostd[:4], T([0.5, -0.5, -0.5, 0.5]))


def test_rloo_advantages():
    adv, _ = group_advantages([1.0, 0.0, 2.0], [7, 7, 7], estimator="rloo")
    # R_i - mean(others): 1 - 1 = 0 ; 0 - 1.5 = -1.5 ; 2 - 0.5 = 1.5
    assert torch.allclose(adv, T([0.0, -1.5, 1.5]))

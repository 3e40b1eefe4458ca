"""Issue 13 in the trainer: void-turn filter, sigma0 'auto', the sigma group as the reference's, exact noise KL and
the tail panel (docs/method.md)."""

import math

import pytest
import torch
from test_trainer import config, flat, make_batch, tiny

from alp_agent.algo.perturb import LayerPerturbation
from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train.gradients import clip_gradients
from alp_agent.train.tail import tail_metrics, token_tags
from alp_agent.train.trainer import Trainer


# ------------------------------------------------------------------ tail panel
def test_token_tags_turns_and_first_tokens_after_observation():
    # turn 0: 3 model tokens + 1 template; observation of 2; template 1; turn 1: 10 model tokens
    roles = "mmmt" + "oo" + "t" + "m" * 10
    mask = [1 if r == "m" else 0 for r in roles]
    t = Trajectory([5, 6], list(range(3, 3 + len(roles))), mask, [0.0] * len(roles), token_roles=roles)
    t.turn_spans = [(0, 4), (7, 17)]
    tags = token_tags(t)
    assert tags[:4] == [0, 0, 0, -1] and tags[4:7] == [-1, -1, -1]
    assert tags[7:15] == [3] * 8 and tags[15:] == [2, 2]  # turn 1: 8 head tokens (2*1+1), then the rest (2*1)


def test_tail_metrics_values():
    log_r = torch.log(torch.tensor([1.0, 1.0, 1.0, 3.0, 2.0, 2.0], dtype=torch.float64))
    tags = torch.tensor([0, 0, 0, 0, 3, -1])
    m = tail_metrics(log_r, tags)
    assert m["tail/turn_0/max"] == pytest.approx(3.0) and m["tail/turn_0/p50"] == pytest.approx(1.0)
    assert m["tail/turn_0/ess"] == pytest.approx(0.75)  # (1+1+1+3)^2 / (4 * 12)
    assert m["tail/turn_1/tokens"] == 1 and m["tail/after_obs8/max"] == pytest.approx(2.0)
    assert m["tail/rest/tokens"] == 4


# ------------------------------------------------------------------ void turns
def _with_void(seed_tokens: int):
    batch = make_batch(tiny())
    g = torch.Generator().manual_seed(seed_tokens)
    for t in batch[::3]:  # a third of the episodes had a void turn: scramble what they said
        t.num_void_turns = 1
        t.completion_ids = torch.randint(3, 64, (len(t.completion_ids),), generator=g).tolist()
    return batch


@pytest.mark.parametrize("on", [True, False])
def test_void_episodes_get_zero_weight_and_advantages_are_unchanged(on):
    res = []
    for seed in (1, 2):
        m = tiny()
        metrics = Trainer(m, config(algo={"mask_void_turns": on})).update(_with_void(seed))
        res.append((flat(m), metrics))
    (a, ma), (b, mb) = res
    assert torch.equal(a, b) == on  # filtered: what a void episode says cannot move the weights
    n = len(make_batch(tiny()))
    assert ma["void/episode_frac"] == pytest.approx(len(range(0, n, 3)) / n)
    assert ma["void/filtered_frac"] == (ma["void/episode_frac"] if on else 0.0)
    assert 0 < ma["void/filtered_token_frac"] < 1 if on else ma["void/filtered_token_frac"] == 0
    assert ma["adv/zero_adv_groups"] == mb["adv/zero_adv_groups"]  # groups computed before the filter


# ------------------------------------------------------------------ metrics of a step
def test_divergences_noise_kl_and_tail_panel_are_logged():
    metrics = Trainer(tiny(), config()).update(make_batch(tiny(), mismatch=0.1))
    for k in ("k1", "k3", "chi2", "ess_token", "ess_seq"):
        assert math.isfinite(metrics[f"steps_mean/kl_train_infer/clean/{k}"]), k
    assert metrics["steps_mean/kl_train_infer/clean/k3"] > 0
    assert 0 < metrics["steps_mean/kl_train_infer/clean/ess_token"] <= 1
    assert metrics["steps_mean/kl_noise/exact"] > 0  # sigma0 0.05 on a tiny model: a visible noise
    assert metrics["tail/turn_0/p99"] > 0 and "tail/after_obs8/ess" in metrics and "tail/rest/max" in metrics
    bypass = Trainer(tiny(), config(algo={"name": "bypass"})).update(make_batch(tiny()))
    assert "steps_mean/kl_noise/exact" not in bypass
    grpo = Trainer(tiny(), config(algo={"name": "grpo"})).update(make_batch(tiny(), mismatch=0.1))
    assert grpo["kl_old_infer/k3"] > 0 and 0 < grpo["kl_old_infer/ess_seq"] <= 1


# ------------------------------------------------------------------ sigma0 auto
def test_sigma0_auto_matches_noise_kl_to_the_mismatch():
    m = tiny()
    tr = Trainer(m, config(algo={"perturb": {"sigma0": "auto"}}, update={"dtype": "float32"}))
    assert tr.perturbation.scale_aware  # auto sizes the scale-aware noise
    metrics = tr.update(make_batch(tiny(), mismatch=0.1))
    target, got = metrics["calibration/kl_mismatch_k3"], metrics["calibration/kl_noise_exact"]
    assert target > 1e-3 and got == pytest.approx(target, rel=0.05)
    assert metrics["calibration/sigma0"] != pytest.approx(1e-3) and metrics["calibration/at_lower_bound"] == 0
    assert metrics["calibration/kl_noise_at_min_sigma"] < target  # float32 compute: no rounding floor
    assert "calibration/sigma0" not in tr.update(make_batch(tiny(), seed=1))  # first batch only
    with pytest.raises(ValueError):
        config(algo={"perturb": {"sigma0": "auto", "scale_aware": False}})


# ------------------------------------------------------------------ the sigma group as the reference's
def test_sigma_group_weight_decay_and_one_global_clip():
    tr = Trainer(tiny(), config(optim={"weight_decay": 0.05}))
    assert tr.optimizer.param_groups[1]["name"] == "log_sigma" and tr.optimizer.param_groups[1]["weight_decay"] == 0.05
    model = tiny()
    p = LayerPerturbation(model, sigma0=0.1)
    params = list(model.parameters())
    for q in params:
        q.grad = torch.full_like(q, 0.01)
    p.log_sigma.grad = torch.full_like(p.log_sigma, 3.0)
    pol = math.sqrt(sum(float((q.grad**2).sum()) for q in params))
    gn, sgn, _ = clip_gradients(params, p, 1.0, lambda ps, c: float(torch.nn.utils.clip_grad_norm_(ps, c)))
    assert gn == pytest.approx(pol) and sgn == pytest.approx(3.0 * math.sqrt(3))
    after = math.sqrt(sum(float((q.grad**2).sum()) for q in params) + float((p.log_sigma.grad**2).sum()))
    assert after == pytest.approx(1.0, rel=1e-4)  # one norm over both
    ratio = float(params[0].grad.flatten()[0]) / float(p.log_sigma.grad[0])
    assert ratio == pytest.approx(0.01 / 3.0)  # both scaled by the same factor

"""Every baseline's loss and gradient at its default settings against a direct float64 transcription of the
reference formulas (the authors' verl fork: core_algos.py's PPO/GSPO losses with dual clip, rollout_is.py's weights),
under token-mean normalisation over the valid tokens (docs/method.md "Baselines").

The transcriptions below are written from the formulas, independently of alp_agent.algo.losses, in the reference's
own order of operations: ratio, clipped loss, dual clip for A < 0, then x the detached rollout weight."""

import pytest
import torch

from alp_agent.algo.config import AlgoConfig
from alp_agent.algo.losses import LossBatch, aggregate, policy_loss

D = torch.float64


def batch():
    """4 responses x 6 positions with ragged masks, both signs of A, ratios spanning every clip branch and sequence
    weights on both sides of C = 5."""
    g = torch.Generator().manual_seed(7)
    logp = -2.0 * torch.rand(4, 6, generator=g, dtype=D)
    old = logp + 0.5 * torch.randn(4, 6, generator=g, dtype=D)
    infer = old + 0.6 * torch.randn(4, 6, generator=g, dtype=D)
    old[0, 1] = logp[0, 1] - 1.5  # ratio e^1.5 = 4.5 > dual clip 3 with A < 0
    infer[2] = old[2] - 0.5  # sequence w = e^(0.5 x 5 tokens) = 12 > 5: outside the MIS band
    mask = torch.tensor(
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=D
    )  # fmt: skip
    adv = torch.tensor([[-1.3], [0.7], [1.1], [-0.4]], dtype=D)
    return logp, old, infer, mask, adv


# ---------------------------------------------------------------- the reference, transcribed
def ref_ppo_clip(log_prob, old_log_prob, advantages, clip_low, clip_high, clip_c):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    return torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)


def ref_gspo(log_prob, old_log_prob, advantages, response_mask, clip_low, clip_high, clip_c):
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_low, 1 + clip_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    return torch.where(advantages < 0, torch.min(-advantages * clip_c, pg_losses), pg_losses)


def ref_rollout_is_weights(old_log_prob, rollout_log_prob, response_mask, level, mode, upper, lower):
    log_ratio = old_log_prob - rollout_log_prob
    if level == "token":
        log_ratio_for_metrics = log_ratio
    else:
        log_ratio_for_metrics = (log_ratio * response_mask).sum(-1, keepdim=True).expand_as(log_ratio)
    weights = torch.exp(torch.clamp(log_ratio_for_metrics, min=-20.0, max=20.0))
    if mode == "truncate":
        weights = weights.clamp(max=upper)
    elif mode == "mask":
        weights = weights * ((weights >= lower) & (weights <= upper)).to(weights.dtype)
    return (weights * response_mask).detach()


def ref_alp(log_prob, rollout_log_prob, advantages, response_mask, clip_low, clip_high, clip_c):
    """ALP/Bypass (docs/method.md "The ratio"): sequence level, log rho = sg(S) + l - sg(l), clamp +-20."""
    s = ((log_prob - rollout_log_prob) * response_mask).sum(-1, keepdim=True)
    log_rho = torch.clamp(s.detach() + log_prob - log_prob.detach(), -20.0, 20.0)
    return ref_ppo_clip(log_rho, torch.zeros_like(log_rho), advantages, clip_low, clip_high, clip_c)


def reference_loss(name, logp, old, infer, mask, adv):
    adv = adv.expand_as(logp)
    if name in ("alp", "bypass"):
        per_token = ref_alp(logp, infer, adv, mask, 0.5, 3.0, 3.0)
    elif name == "gspo":
        per_token = ref_gspo(logp, old, adv, mask, 3e-4, 4e-4, 100.0)
        per_token = per_token * ref_rollout_is_weights(old, infer, mask, "sequence", "mask", 5.0, 0.0)
    else:
        per_token = ref_ppo_clip(logp, old, adv, 0.2, 0.28, 3.0)
        if name == "tis":
            per_token = per_token * ref_rollout_is_weights(old, infer, mask, "sequence", "truncate", 5.0, 0.0)
        if name == "mis":
            per_token = per_token * ref_rollout_is_weights(old, infer, mask, "sequence", "mask", 5.0, 0.0)
    return (per_token * mask).sum() / mask.sum()  # token-mean over all valid tokens


def ours(name, logp, old, infer, mask, adv):
    terms, m = policy_loss(AlgoConfig(name=name), LossBatch(logp, infer, mask, adv, old))
    return aggregate(terms.loss, m, "token_mean", denom=float(mask.sum())), terms


@pytest.mark.parametrize("name", ["grpo", "tis", "mis", "gspo", "bypass"])
def test_baseline_loss_and_gradient_equal_the_reference(name):
    logp, old, infer, mask, adv = batch()
    lp_ref = logp.clone().requires_grad_()
    lp_ours = logp.clone().requires_grad_()
    ref = reference_loss(name, lp_ref, old, infer, mask, adv)
    mine, terms = ours(name, lp_ours, old, infer, mask, adv)
    ref.backward()
    mine.backward()
    r, o = float(ref.detach()), float(mine.detach())
    assert abs(r - o) <= 1e-6, (name, r, o)
    assert torch.allclose(lp_ours.grad, lp_ref.grad, atol=1e-6, rtol=0), name
    assert lp_ref.grad.abs().sum() > 0  # the batch trains something
    print(f"{name}: reference {r:.10f} ours {o:.10f}")


def test_the_batch_exercises_every_branch():
    logp, old, infer, mask, adv = batch()
    _, grpo = ours("grpo", logp, old, infer, mask, adv)
    valid = mask > 0
    assert (grpo.clip_dual & valid).any() and (grpo.clip_upper & valid).any() and (grpo.clip_lower & valid).any()
    seq_w = ((old - infer) * mask).sum(-1).exp()
    assert (seq_w > 5).any() and (seq_w <= 5).any()  # TIS truncates and MIS rejects some sequence, keeps others
    _, mis = ours("mis", logp, old, infer, mask, adv)
    assert (~mis.kept[valid]).any() and mis.kept[valid].any()

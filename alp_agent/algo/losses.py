"""ALP and every baseline as pure functions of (B, T) tensors; read against docs/method.md "The ratio" and "The loss".

Notation (docs/method.md): logp = l_t (training logprob, perturbed for ALP), infer = l^inf_t (engine logprob, mu),
old = pi_{theta_old} logprob recomputed by the trainer without noise, mask = m_t, adv = A broadcast to tokens.
All functions take right-padded (B, T) tensors; masked positions may hold anything finite.

Aggregation is split from the per-token loss so the trainer can normalise by the *mini-batch* token count while
accumulating gradients over micro-batches: `aggregate(..., denom=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alp_agent.algo.config import AlgoConfig


# ---------------------------------------------------------------- ratios
def log_ratio(
    logp: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, level: str, clamp: float = 20.0
) -> torch.Tensor:
    """log rho_t of logp against base (infer logprobs for ALP/Bypass, old logprobs for GRPO-family).

    token:        log rho_t = d_t,                       d_t = logp_t - base_t
    sequence:     log rho_t = sg(S) + logp_t - sg(logp_t),   S = sum_t m_t d_t
    geo_sequence: same with S = sum_t m_t d_t / sum_t m_t   (GSPO's geometric mean)
    then clamp to [-clamp, clamp] (before exp; reference 20).
    The sequence form has value S on every token and gradient d/dtheta logp_t, so the per-token loss
    -A exp(S) grad(logp_t) sums to the sequence-level policy gradient (checked in tests).
    """
    m = mask.to(logp.dtype)
    d = (logp - base) * m
    if level == "token":
        lr = d
    elif level in ("sequence", "geo_sequence"):
        s = d.sum(-1, keepdim=True)
        if level == "geo_sequence":
            s = s / m.sum(-1, keepdim=True).clamp(min=1.0)
        lr = s.detach() + logp - logp.detach()
    else:
        raise ValueError(f"unknown ratio level {level!r}")
    return lr.clamp(-clamp, clamp)


def sequence_log_ratio(
    logp: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, geometric: bool = False
) -> torch.Tensor:
    """(B,) sum (or mean if geometric) of m_t (logp_t - base_t); for metrics and sequence-level IS weights."""
    m = mask.to(logp.dtype)
    s = ((logp - base) * m).sum(-1)
    return s / m.sum(-1).clamp(min=1.0) if geometric else s


# ---------------------------------------------------------------- the clipped objective
@dataclass
class PGTerms:
    loss: torch.Tensor  # (B, T) per-token loss l_t (unmasked; aggregate with the mask)
    ratio: torch.Tensor  # (B, T) rho_t (detached)
    clip_upper: torch.Tensor  # (B, T) bool: the clipped branch was taken with rho > 1 + eps_high
    clip_lower: torch.Tensor  # (B, T) bool: ... with rho < 1 - eps_low
    clip_dual: torch.Tensor  # (B, T) bool: A < 0 and the dual clip -A c was taken
    kept: torch.Tensor | None = None  # (B, T) bool: tokens a MIS band kept (None: no band, all kept)


def ppo_clip(
    log_rho: torch.Tensor,
    adv: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    is_weight: torch.Tensor | None = None,
) -> PGTerms:
    """l_t = max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)); if A < 0: l_t = min(l_t, -A c).

    is_weight (TIS): a detached per-token factor multiplying l_t (the truncated pi_old/mu weight).
    """
    rho = torch.exp(log_rho)
    l1 = -adv * rho
    l2 = -adv * rho.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    r = rho.detach()
    clip_upper = clipped & (r > 1.0 + eps_high)
    clip_lower = clipped & (r < 1.0 - eps_low)
    clip_dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        l3 = -adv * dual_clip
        neg = adv < 0
        clip_dual = neg & (loss > l3)
        loss = torch.where(neg, torch.minimum(loss, l3), loss)
    if is_weight is not None:
        loss = loss * is_weight.detach()
    return PGTerms(loss, r, clip_upper, clip_lower, clip_dual)


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", denom: float | None = None
) -> torch.Tensor:
    """token_mean: sum_t m_t v_t / sum m (docs/method.md); seq_mean: mean over sequences of per-sequence token means.

    denom overrides the normaliser (total valid tokens, or number of sequences, of the whole mini-batch) so that
    micro-batch losses add up to the mini-batch loss under gradient accumulation.
    """
    m = mask.to(values.dtype)
    if mode == "token_mean":
        total = (values * m).sum()
        return total / (denom if denom is not None else m.sum().clamp(min=1.0))
    if mode == "seq_mean":
        per_seq = (values * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.sum() / (denom if denom is not None else max(per_seq.numel(), 1))
    raise ValueError(f"unknown loss_agg {mode!r}")


# ---------------------------------------------------------------- baselines' rollout correction (TIS / MIS / GSPO)
def is_log_weight(old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log w, w = pi_old / mu, per token (token level) or the sequence's sum broadcast to its tokens (sequence level),
    clamped to [-20, 20] as the reference's rollout_is.py does before exp."""
    m = mask.to(old.dtype)
    d = (old - infer) * m
    lw = d if level == "token" else d.sum(-1, keepdim=True).expand_as(d)
    return lw.clamp(-20.0, 20.0)


def tis_weight(old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, level: str, c: float) -> torch.Tensor:
    """TIS: min(w, C), detached."""
    return torch.exp(is_log_weight(old, infer, mask, level)).clamp(max=c).detach()


def in_band(old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, level: str, upper: float, lower: float):
    """1[lower <= w <= upper] per token (bool), on model tokens only."""
    w = torch.exp(is_log_weight(old, infer, mask, level))
    return mask.bool() & (w >= lower) & (w <= upper)


def mis_weight(
    old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, level: str, upper: float, lower: float = 0.0
) -> torch.Tensor:
    """MIS as the reference's mask mode computes it: w 1[lower <= w <= upper], detached (the weight is kept)."""
    w = torch.exp(is_log_weight(old, infer, mask, level))
    return (w * in_band(old, infer, mask, level, upper, lower).to(w.dtype)).detach()


def mis_mask(old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor, level: str, c: float) -> torch.Tensor:
    """The reject-only variant (is_mode 'reject'): keep tokens (or whole sequences) whose w lies in [1/C, C]; returns
    the new loss mask. Not the reference's MIS (which keeps the weight, see `mis_weight`)."""
    return in_band(old, infer, mask, level, c, 1.0 / c)


def rollout_correction(cfg: AlgoConfig, old: torch.Tensor, infer: torch.Tensor, mask: torch.Tensor):
    """(detached per-token weight or None, loss mask, kept-token mask or None) of `cfg.is_correction`."""
    mode, level, hi, lo = cfg.is_correction, cfg.is_granularity, cfg.is_upper, cfg.is_lower
    if mode == "truncate":
        return tis_weight(old, infer, mask, level, hi), mask, None
    if mode == "mask":
        return mis_weight(old, infer, mask, level, hi, lo), mask, in_band(old, infer, mask, level, hi, lo)
    if mode == "reject":
        keep = in_band(old, infer, mask, level, hi, lo)
        return None, keep.to(mask.dtype), keep
    return None, mask, None


# ---------------------------------------------------------------- regularisers (all off by default)
def kl_penalty(logp: torch.Tensor, ref: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimators on sampled tokens: k1 = logp - ref; k3 = exp(ref - logp) - (ref - logp) - 1."""
    if kind == "k1":
        return logp - ref
    if kind == "k3":
        x = (ref - logp).clamp(-20.0, 20.0)
        return torch.exp(x) - x - 1.0
    raise ValueError(f"unknown kl type {kind!r}")


# ---------------------------------------------------------------- one entry point for every algorithm
@dataclass
class LossBatch:
    """What the loss of one micro-batch sees: right-padded (B, T) tensors (adv may be (B, 1))."""

    logp: torch.Tensor  # l_t: training logprobs (perturbed for ALP), with grad
    infer: torch.Tensor  # l^inf_t: the engine's logprobs (mu), recorded at sampling time
    mask: torch.Tensor  # m_t: 1 on model-generated tokens
    adv: torch.Tensor  # A per sequence (B, 1) or per token (B, T)
    old: torch.Tensor | None = None  # pi_{theta_old} logprobs recomputed by the trainer (GRPO family)


def policy_loss(cfg: AlgoConfig, batch: LossBatch) -> tuple[PGTerms, torch.Tensor]:
    """Per-token PG terms of `cfg.name` and the loss mask (reduced only by is_mode 'reject').

    alp / bypass: rho vs infer (alp's logp comes from the perturbed forward; that is the only difference).
    grpo:         rho vs old.
    tis:          rho vs old, loss x min(w, C), w = pi_old/mu.
    mis:          rho vs old, loss x w 1[lower <= w <= C] (reference mask mode; 'reject' drops without weighting).
    gspo:         geometric-mean sequence rho vs old, tiny clip, dual clip 100, loss x w 1[w <= 5] (sequence w).
    The weight multiplies the clipped (and dual-clipped) loss, as in the reference's core_algos.py.
    """
    name, b = cfg.name, batch
    adv = b.adv.expand_as(b.logp) if b.adv.shape != b.logp.shape else b.adv
    mask, w, kept = b.mask, None, None
    if name in ("alp", "bypass"):
        base = b.infer
    else:
        if b.old is None:
            raise ValueError(f"algorithm {name!r} needs old logprobs recomputed by the trainer")
        base = b.old
        w, mask, kept = rollout_correction(cfg, base, b.infer, mask)
    lr = log_ratio(b.logp, base, mask, cfg.level, cfg.log_ratio_clamp)
    terms = ppo_clip(lr, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c, w)
    terms.kept = kept
    return terms, mask

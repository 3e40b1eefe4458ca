"""Summary statistics for the trainer's metrics (docs/method.md "What to watch").

Everything returns plain floats keyed by name, so one writer (alp_agent.train.logging) can send them to JSONL/TensorBoard.
"""

from __future__ import annotations

from collections import Counter

import torch

from alp_agent.rollout.trajectory import Trajectory

# method.md lists 1,5,25,50,75,95,99,99.9 %; 2 and 98 % add the P2-P98 envelope the paper plots for the sequence ratio.
QUANTILES = (0.01, 0.02, 0.05, 0.25, 0.5, 0.75, 0.95, 0.98, 0.99, 0.999)
_MAX_QUANTILE_N = 1 << 22  # torch.quantile refuses huge inputs; subsample deterministically above this


def _qname(q: float) -> str:
    return f"p{q * 100:g}".replace(".", "_")


def summarize(x: torch.Tensor, prefix: str, quantiles: tuple[float, ...] = QUANTILES) -> dict[str, float]:
    """mean, std, min, max and quantiles of a 1-D tensor (float64). Empty input gives no keys."""
    x = x.detach().flatten().double()
    x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return {}
    out = {
        f"{prefix}/mean": float(x.mean()),
        f"{prefix}/std": float(x.std()) if x.numel() > 1 else 0.0,
        f"{prefix}/min": float(x.min()),
        f"{prefix}/max": float(x.max()),
    }
    xs = x if x.numel() <= _MAX_QUANTILE_N else x[torch.linspace(0, x.numel() - 1, _MAX_QUANTILE_N).long()]
    qs = torch.quantile(xs, torch.tensor(quantiles, dtype=torch.float64))
    for q, v in zip(quantiles, qs.tolist()):
        out[f"{prefix}/{_qname(q)}"] = v
    return out


def kl_stats(logp: torch.Tensor, ref: torch.Tensor, prefix: str) -> dict[str, float]:
    """Token-mean k1 and k3 estimates of KL(pi_logp || pi_ref) over already-masked 1-D tensors of sampled tokens.

    k1 = mean(logp - ref) is unbiased but noisy; k3 = mean(exp(ref-logp) - (ref-logp) - 1) >= 0 per token.
    """
    if logp.numel() == 0:
        return {}
    x = (ref.double() - logp.double()).clamp(-20, 20)
    return {f"{prefix}/k1": float((-x).mean()), f"{prefix}/k3": float((x.exp() - x - 1).mean())}


def mean_over(values: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of several metric dicts (keys missing in some dicts are averaged over those that have them)."""
    acc: dict[str, list[float]] = {}
    for d in values:
        for k, v in d.items():
            acc.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def episode_metrics(trajs: list[Trajectory], policy_version: int) -> dict[str, float]:
    """Reward, lengths, turns, tool calls/errors, token drift, truncation and staleness of a rollout batch."""
    if not trajs:
        return {}
    n = len(trajs)
    r = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
    resp = torch.tensor([float(t.num_model_tokens) for t in trajs])
    calls = sum(t.num_tool_calls for t in trajs)
    m = {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()) if n > 1 else 0.0,
        "reward/min": float(r.min()),
        "reward/max": float(r.max()),
        "length/response_mean": float(resp.mean()),
        "length/response_max": float(resp.max()),
        "length/completion_mean": sum(len(t.completion_ids) for t in trajs) / n,
        "length/prompt_mean": sum(len(t.prompt_ids) for t in trajs) / n,
        "turns/mean": sum(t.num_turns for t in trajs) / n,
        "tools/calls_per_episode": calls / n,
        "tools/error_rate": sum(t.num_tool_errors for t in trajs) / max(calls, 1),
        "token_drift/total": float(sum(t.token_drift for t in trajs)),
        "token_drift/episode_frac": sum(t.token_drift > 0 for t in trajs) / n,
        "truncated_frac": sum(t.truncated for t in trajs) / n,
        "staleness/mean": sum(policy_version - t.policy_version for t in trajs) / n,
        "staleness/max": float(max(policy_version - t.policy_version for t in trajs)),
    }
    for reason, c in Counter(t.finish_reason or "unknown" for t in trajs).items():
        m[f"finish/{reason}"] = c / n
    return m

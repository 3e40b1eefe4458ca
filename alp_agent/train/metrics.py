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
    """mean, std, min, max and quantiles of a 1-D tensor (float64). Empty input gives no keys. Any device: the
    summary runs on the CPU (torch.quantile needs `q` on the input's device; a handful of floats gain nothing there)."""
    x = x.detach().flatten().double().cpu()
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
    """Sound estimators of KL(ref || pi_logp) when the tokens were sampled from `ref` (docs/method.md "Divergence
    estimators"): with r = pi/ref = exp(logp - ref) on ref's samples,

        k1 = mean(-log r)          unbiased for KL(ref || pi), noisy, can read negative on few tokens
        k3 = mean(r - 1 - log r)   unbiased for KL(ref || pi) too (E_ref[r] = 1), >= 0 per token, low variance

    `logp`, `ref`: already-masked 1-D tensors of the sampled tokens' logprobs. The log-ratio is clamped to [-20, 20]
    (like the loss's ratio) so one broken token cannot turn the metric into inf.
    """
    if logp.numel() == 0:
        return {}
    lr = (logp.double() - ref.double()).clamp(-20, 20)
    return {f"{prefix}/k1": float((-lr).mean()), f"{prefix}/k3": float((lr.exp() - 1 - lr).mean())}


def ess(log_w: torch.Tensor) -> float:
    """Normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1] of weights given by their logs (computed
    after subtracting the max, so huge weights stay finite). For w = pi/mu on mu's samples it tends to 1/(1 + chi2)."""
    lw = log_w.detach().double().flatten()
    lw = lw[torch.isfinite(lw)]
    if lw.numel() == 0:
        return float("nan")
    w = (lw - lw.max()).exp()
    return float(w.sum() ** 2 / (lw.numel() * (w * w).sum()))


def divergence_stats(
    logp: torch.Tensor, logmu: torch.Tensor, prefix: str, seq_log_w: torch.Tensor | None = None
) -> dict[str, float]:
    """Everything the spec asks of a policy pi against the sampler mu, on mu's sampled tokens (1-D, masked):
    k1 and k3 of KL(mu || pi) (see `kl_stats`), chi2(pi || mu) = mean(r^2) - 1, and the normalised ESS of the token
    weights r and, when `seq_log_w` (one log-weight per sequence) is given, of the sequence weights."""
    m = kl_stats(logp, logmu, prefix)
    if not m:
        return m
    lr = (logp.double() - logmu.double()).clamp(-20, 20)
    m[f"{prefix}/chi2"] = float((2 * lr).exp().mean() - 1)
    m[f"{prefix}/ess_token"] = ess(lr)
    if seq_log_w is not None and seq_log_w.numel():
        m[f"{prefix}/ess_seq"] = ess(seq_log_w)
    return m


@torch.no_grad()
def exact_kl(
    p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0, chunk: int = 256
) -> torch.Tensor:
    """Exact KL(p || q) over the vocabulary at every position: sum_v p_v (log p_v - log q_v), from (N, V) logits
    (divided by the sampling temperature, softmax in float32), `chunk` positions at a time so only a few (chunk, V)
    float32 tensors are alive. Returns (N,) float64."""
    out = []
    for i in range(0, p_logits.shape[0], chunk):
        lp = torch.log_softmax(p_logits[i : i + chunk].float() / temperature, dim=-1)
        lq = torch.log_softmax(q_logits[i : i + chunk].float() / temperature, dim=-1)
        out.append((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).double())
    return torch.cat(out) if out else p_logits.new_zeros(0, dtype=torch.float64)


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

"""Where the importance-ratio tail lives, from the logged episodes (alp_agent.train.episode_log): per-token ratio
r = pi/mu = exp(trainer logprob - engine logprob) on the model's tokens, grouped by model-turn index and by position
after a tool observation (the first tokens the model writes after reading tool output).

Pure functions over EpisodeLog lists, so the viewer's tail panel and the tests share them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from alp_agent.train.episode_log import EpisodeLog

QUANTILES = (0.01, 0.5, 0.99, 0.999)
FIRST_AFTER_TOOL = 8  # "the first tokens after a tool observation": this many model tokens after each one


@dataclass
class TailRow:
    """Ratio statistics of one group of model tokens."""

    group: str
    tokens: int
    quantiles: dict[str, float]  # "p1", "p50", "p99", "p99.9", "max" of r (the ones known)
    ess: float  # normalised effective sample size (sum r)^2 / (n sum r^2), in (0, 1]; 1 = all ratios equal
    mean_abs_log_ratio: float  # nan where unknown (the trainer's metrics do not carry it)


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted, non-empty sequence (numpy's default method)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def normalized_ess(ratios: Sequence[float]) -> float:
    """(sum w)^2 / (n * sum w^2): 1 when every weight is equal, ~1/n when one weight dominates."""
    s, s2 = sum(ratios), sum(w * w for w in ratios)
    return (s * s) / (len(ratios) * s2) if ratios and s2 > 0 else float("nan")


def tail_row(group: str, log_ratios: Iterable[float]) -> TailRow | None:
    lrs = [x for x in log_ratios if math.isfinite(x)]
    if not lrs:
        return None
    rs = sorted(math.exp(max(min(x, 50.0), -50.0)) for x in lrs)
    qs = {f"p{q * 100:g}": quantile(rs, q) for q in QUANTILES}
    qs["max"] = rs[-1]
    return TailRow(group, len(rs), qs, normalized_ess(rs), sum(abs(x) for x in lrs) / len(lrs))


def model_token_groups(e: EpisodeLog, which: str = "clean") -> dict[str, list[float]]:
    """Log-ratios (trainer `which` - engine) of one episode's model tokens, keyed by 'turn N' and by
    'first K after tool' (the first K model tokens after a tool/env observation, as the trainer's tail metrics
    define them) / 'other model tokens'. Empty when the episode has no trainer logprobs of that kind."""
    train = e.tokens.clean if which == "clean" else e.tokens.noisy
    if train is None:
        return {}
    turn_of = {i: k for k, (a, b) in enumerate(e.turn_spans or [(0, len(e.tokens.ids))], start=1) for i in range(a, b)}
    out: dict[str, list[float]] = {}
    since_obs: int | None = None
    for i, role in enumerate(e.tokens.roles[: len(train)]):
        if role == "tool":
            since_obs = 0
        if role != "model":
            continue
        lr = train[i] - e.tokens.engine[i]
        out.setdefault(f"turn {turn_of.get(i, 1)}", []).append(lr)
        head = since_obs is not None and since_obs < FIRST_AFTER_TOOL
        out.setdefault(f"first {FIRST_AFTER_TOOL} after tool" if head else "other model tokens", []).append(lr)
        if since_obs is not None:
            since_obs += 1
    return out


def tail_table(episodes: Sequence[EpisodeLog], which: str = "clean") -> list[TailRow]:
    """Tail rows by turn index (turn 1, turn 2, ...) then the after-tool split, over every logged episode."""
    acc: dict[str, list[float]] = {}
    for e in episodes:
        for g, lrs in model_token_groups(e, which).items():
            acc.setdefault(g, []).extend(lrs)
    turns = sorted((g for g in acc if g.startswith("turn ")), key=lambda g: int(g.split()[1]))
    rest = [g for g in (f"first {FIRST_AFTER_TOOL} after tool", "other model tokens") if g in acc]
    rows = [tail_row(g, acc[g]) for g in turns + rest]
    return [r for r in rows if r is not None]


def metrics_tail(batch_records: Sequence[dict]) -> tuple[int, list[TailRow]] | None:
    """The trainer's own tail panel (`tail/turn_k/*`, `tail/after_obsK/*`, `tail/rest/*` in metrics.jsonl: every
    model token of the batch, training forward vs engine) of the last batch that has one; None when absent."""
    last = next((r for r in reversed(batch_records) if any(str(k).startswith("tail/") for k in r)), None)
    if last is None:
        return None
    groups = sorted({k.split("/")[1] for k in last if k.startswith("tail/")})
    turns = sorted((g for g in groups if g.startswith("turn_")), key=lambda g: int(g.split("_")[1]))
    rest = [g for g in groups if g.startswith("after_obs")] + [g for g in groups if g == "rest"]
    rows = []
    for g in turns + rest:
        v = {k.split("/", 2)[2]: x for k, x in last.items() if k.startswith(f"tail/{g}/")}
        name = f"turn {int(g.split('_')[1]) + 1}" if g.startswith("turn_") else g.replace("after_obs", "first ")
        name = f"{name} after tool" if g.startswith("after_obs") else ("other model tokens" if g == "rest" else name)
        qs = {q.replace("_", "."): float(v[q]) for q in ("p50", "p99", "p99_9", "max") if q in v}
        rows.append(TailRow(name, int(v.get("tokens", 0)), qs, float(v.get("ess", float("nan"))), float("nan")))
    return int(last.get("step", 0)), rows

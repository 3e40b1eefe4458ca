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
FIRST_AFTER_TOOL = 8  # "the first tokens after a tool observation": this many model tokens of every turn >= 2


@dataclass
class TailRow:
    """Ratio statistics of one group of model tokens."""

    group: str
    tokens: int
    quantiles: dict[str, float]  # "p1", "p50", "p99", "p99.9" of r
    ess: float  # normalised effective sample size (sum r)^2 / (n sum r^2), in (0, 1]; 1 = all ratios equal
    mean_abs_log_ratio: float


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
    return TailRow(group, len(rs), qs, normalized_ess(rs), sum(abs(x) for x in lrs) / len(lrs))


def model_token_groups(e: EpisodeLog, which: str = "clean") -> dict[str, list[float]]:
    """Log-ratios (trainer `which` - engine) of one episode's model tokens, keyed by 'turn N' and by
    'first K after tool' / 'rest'. Empty when the episode has no trainer logprobs of that kind."""
    train = e.tokens.clean if which == "clean" else e.tokens.noisy
    if train is None:
        return {}
    out: dict[str, list[float]] = {}
    spans = e.turn_spans or [(0, len(e.tokens.ids))]
    for k, (a, b) in enumerate(spans, start=1):
        for pos, i in enumerate(range(a, min(b, len(train)))):
            if e.tokens.roles[i] != "model":
                continue
            lr = train[i] - e.tokens.engine[i]
            out.setdefault(f"turn {k}", []).append(lr)
            where = (
                f"first {FIRST_AFTER_TOOL} after tool" if k >= 2 and pos < FIRST_AFTER_TOOL else "other model tokens"
            )
            out.setdefault(where, []).append(lr)
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

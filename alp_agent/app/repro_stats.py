"""Statistics of the repro study (issue 14, item 4): per-arm t intervals over seeds, paired differences against
Seq-Bypass on the same seeds, and a verdict per claim.

Why t intervals on paired differences: runs of different arms with the same seed share the task order, the first
batch's samples and the initial weights, so the seed-to-seed spread (large at this scale) cancels in the difference
arm - reference, and the study has 3-5 seeds, where the normal quantile would overstate the confidence.

Verdict of a claim for an arm: the paper says the arm moves the metric in `direction` (+1: higher, -1: lower) against
Seq-Bypass. Supported if the 95 % interval of the paired difference excludes 0 on that side, refuted if it excludes 0
on the other side, else undecided, with the minimum detectable effect (t_{0.975,n-1} + t_{0.8,n-1}) x SE: the
difference the design would have detected with 80 % power at the 5 % level.

No scipy: the Student-t CDF for integer degrees of freedom has an exact finite series (Abramowitz & Stegun 26.7.3-4),
which `t_quantile` inverts by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with integer `df` >= 1 (exact series in theta = atan(x / sqrt(df)))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"t_cdf: df must be a positive integer, got {df}")
    theta = math.atan(abs(x) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:  # A = (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 powers of cos
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c * c
            total += term
        a = 2 / math.pi * (theta + s * c * total)
    else:  # A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(df-2)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c * c
            total += term
        a = s * total
    return 0.5 + math.copysign(a / 2, x)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`, to ~1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of n values with its two-sided 95 % t interval (lo = hi = nan with fewer than 2 values)."""

    mean: float
    lo: float
    hi: float
    n: int
    se: float

    def excludes_zero(self) -> int:
        """+1 if the interval lies above 0, -1 below, 0 if it contains 0 (or is undefined)."""
        if self.n < 2 or math.isnan(self.lo):
            return 0
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0


def finite_values(records: Sequence[Mapping], key: str) -> list[float]:
    """`key` of every record that has it as a finite number (a metric a step did not log, or logged as NaN, is
    skipped rather than counted)."""
    return [float(r[key]) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and t interval mean +- t_{(1+level)/2, n-1} * s / sqrt(n) (s: sample standard deviation)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    m = sum(v) / n
    if n == 1:
        return Interval(m, math.nan, math.nan, 1, math.nan)
    se = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1) / n)
    h = t_quantile((1 + level) / 2, n - 1) * se
    return Interval(m, m - h, m + h, n, se)


def paired_difference(arm: Mapping[int, float | None], ref: Mapping[int, float | None]) -> Interval:
    """Interval of arm - ref over the seeds both have (a seed missing or None on either side is left out)."""
    seeds = sorted(s for s in arm if s in ref and arm[s] is not None and ref[s] is not None)
    return mean_ci([float(arm[s]) - float(ref[s]) for s in seeds])  # type: ignore[arg-type]


def min_detectable_effect(diff: Interval, power: float = 0.8) -> float:
    """(t_{0.975,n-1} + t_{power,n-1}) x SE of the paired difference: nan with fewer than 2 pairs."""
    if diff.n < 2 or not math.isfinite(diff.se):
        return math.nan
    return (t_quantile(0.975, diff.n - 1) + t_quantile(power, diff.n - 1)) * diff.se


def paired_t_p(diff: Interval) -> float:
    """Two-sided p of the paired t test of `diff` against 0: 2 (1 - F_{n-1}(|mean / se|)); nan with fewer than 2
    pairs or no spread (the interval's own undefined cases)."""
    if diff.n < 2 or not diff.se > 0:
        return math.nan
    return 2 * (1 - t_cdf(abs(diff.mean) / diff.se, diff.n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values (family-wise error), in the input's order; nan stays nan and does not
    count in the family. Why Holm: a report gives one verdict per claim, arm, setting and group, so a single 5 %
    interval that excludes 0 among a dozen is about what chance alone produces; Holm controls that without
    Bonferroni's loss of power and without assumptions on how the claims depend on each other."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    m, out, running = len(finite), [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


@dataclass(frozen=True)
class Verdict:
    label: str  # supported / refuted / undecided / no data
    diff: Interval
    mde: float


def verdict(diff: Interval, direction: int) -> Verdict:
    """The claim 'the arm moves the metric in `direction` against the reference', judged on the paired interval."""
    if diff.n < 2:
        return Verdict("no data" if diff.n == 0 else "undecided (1 seed)", diff, math.nan)
    if not diff.se > 0:  # every pair differs by the same amount (e.g. no run collapsed): no t interval, no MDE
        return Verdict("undecided (no spread: all pairs equal)", diff, math.nan)
    side = diff.excludes_zero()
    label = "supported" if side == direction else "refuted" if side == -direction else "undecided"
    return Verdict(label, diff, min_detectable_effect(diff))


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims about an arm against Seq-Bypass: `key` of the per-run summary, better `direction`."""

    key: str
    name: str
    direction: int  # +1: the paper says higher, -1: lower
    fmt: str = "{:.3g}"


CLAIMS = (
    Claim("seq_width_mean", "P2-P98 width of the noisy sequence ratio vs mu (mean over batches)", -1),
    Claim("kl_peak", "KL(μ‖π) peak over steps", -1, "{:.3g}"),
    Claim("kl_spikes", "KL(μ‖π) spike count", -1, "{:.2f}"),
    Claim("acc_final", "final held-out accuracy", +1, "{:.3f}"),
    Claim("acc_best", "best held-out accuracy", +1, "{:.3f}"),
    Claim("collapsed", "collapse (final held-out accuracy below its start; 0/1)", -1, "{:.2f}"),
)

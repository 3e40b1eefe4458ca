"""Exploratory comparisons of a repro plan (its `exploratory` list): paired differences with t intervals and no
verdict, e.g. staleness 4 minus staleness 8 for the same arm and seed, or one ALP variant minus another.

Why in the report and not in a notebook: such comparisons end up quoted beside the verdicts, so they are computed
from the committed runs by the same code (`paired_difference`, the claims' metrics and spike thresholds) and can be
regenerated. They are labelled exploratory because the plan did not set out to test them: nothing corrects them for
multiplicity, and an interval that excludes 0 here is a lead for a planned comparison, not a finding.
"""

from __future__ import annotations

from collections.abc import Callable

from alp_agent.app.repro import Comparison, RunSpec
from alp_agent.app.repro_stats import CLAIMS, Interval, paired_difference

Summary = dict[str, float | None]


def _label(c: Comparison) -> str:
    (a, sa), (b, sb) = c.terms
    return f"{a} / {sa} - {b} / {sb}"


def _cell(fmt: str, d: Interval) -> str:
    if d.n == 0:
        return "-"
    if d.n == 1:
        return f"{fmt.format(d.mean)} (1 pair)"
    return f"{fmt.format(d.mean)} [{fmt.format(d.lo)}, {fmt.format(d.hi)}]"


def comparison_row(c: Comparison, summary: Callable[[RunSpec], Summary | None]) -> tuple[int, list[Interval]]:
    """(pairs, one interval per claim metric) of `c`; `summary` gives a finished run's numbers, or None."""
    (a, sa), (b, sb) = c.terms
    sides = {s: (summary(RunSpec(a, sa, s)), summary(RunSpec(b, sb, s))) for s in c.seeds}
    pairs = {s: (x, y) for s, (x, y) in sides.items() if x is not None and y is not None}
    diffs = [
        paired_difference(
            {s: x.get(m.key) for s, (x, _) in pairs.items()}, {s: y.get(m.key) for s, (_, y) in pairs.items()}
        )
        for m in CLAIMS
    ]
    return len(pairs), diffs


def exploratory_section(comparisons: list[Comparison], summary: Callable[[RunSpec], Summary | None]) -> list[str]:
    """Markdown: one row per comparison, one column per claim metric, each 'mean [95 % t interval]' over pairs."""
    if not comparisons:
        return []
    lines = [
        "## Exploratory comparisons",
        "",
        "Paired by seed over the seeds where both runs finished: mean [95 % t interval]. Not planned claims: no "
        "verdict, and nothing corrects these for multiplicity.",
        "",
        "| comparison | pairs | " + " | ".join(m.name for m in CLAIMS) + " |",
        "|---|---:|" + "---|" * len(CLAIMS),
    ]
    for c in comparisons:
        n, diffs = comparison_row(c, summary)
        lines.append(f"| {_label(c)} | {n} | " + " | ".join(_cell(m.fmt, d) for m, d in zip(CLAIMS, diffs)) + " |")
    return lines + [""]

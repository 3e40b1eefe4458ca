"""The claims of a repro report (issue 14, item 4): per arm the mean and t interval of each claim's metric over seeds,
each arm minus the reference arm on the same seeds, the verdict for the plan's claim arms, and the paired t test's p
with Holm's adjustment over every verdict the report gives (repro_stats has the statistics themselves).

Why p values beside the verdicts: a report gives a dozen or more verdicts, each from a 95 % interval, so one of them
excluding 0 is roughly what chance gives; the Holm column says which verdicts survive that.
"""

from __future__ import annotations

import math

from alp_agent.app.repro import ReproGroup, ReproPlan, RunSpec
from alp_agent.app.repro_stats import CLAIMS, Interval, holm, mean_ci, paired_difference, paired_t_p, verdict


def _ci(fmt: str, mean: float, lo: float, hi: float) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(lo):
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _done_by_arm(g: ReproGroup, setting: str, per_run: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """Arm -> seed -> numbers of the group's finished runs in `setting`."""
    return {
        a: {s: per_run[n] for s in g.seeds if (n := RunSpec(a, setting, s).name) in per_run and per_run[n]["done"]}
        for a in g.arms
    }


def _difference(done: dict[str, dict[int, dict]], arm: str, ref: str, key: str) -> Interval:
    return paired_difference(
        {s: r.get(key) for s, r in done[arm].items()}, {s: r.get(key) for s, r in done[ref].items()}
    )


def holm_adjusted(plan: ReproPlan, per_run: dict[str, dict]) -> dict[tuple[str, str, str, str], tuple[float, float]]:
    """(group, setting, claim arm, claim key) -> (p, Holm-adjusted p) of every verdict the report gives, the family
    being all of them (repro_stats.holm)."""
    tests = {}
    for g in plan.groups:
        if len(g.seeds) < 2 or plan.reference_arm not in g.arms:
            continue
        for s in g.settings:
            done = _done_by_arm(g, s, per_run)
            for a in (a for a in g.arms if a in plan.claim_arms and a != plan.reference_arm):
                for c in CLAIMS:
                    tests[(g.name, s, a, c.key)] = paired_t_p(_difference(done, a, plan.reference_arm, c.key))
    return dict(zip(tests, zip(tests.values(), holm(list(tests.values())))))


def multiplicity_line(adjusted: dict[tuple[str, str, str, str], tuple[float, float]]) -> list[str]:
    """One sentence: how many verdicts exclude 0 before and after Holm's correction over all of them."""
    ps = [(p, h) for p, h in adjusted.values() if not math.isnan(p)]
    if not ps:
        return []
    raw, kept = sum(p < 0.05 for p, _ in ps), sum(h < 0.05 for _, h in ps)
    return [
        f"Multiplicity: this report gives {len(ps)} verdicts with a p value (claim arm x claim x group x setting; "
        f"groups that share seeds count twice, which makes the correction conservative). {raw} of them "
        f"{'has' if raw == 1 else 'have'} an interval that excludes 0 (p < 0.05); {kept} "
        f"{'stays' if kept == 1 else 'stay'} below 0.05 after Holm's correction over all {len(ps)}.",
        "",
    ]


def _p(p: float | None) -> str:
    return "-" if p is None or math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def claims_tables(
    plan: ReproPlan, g: ReproGroup, setting: str, per_run: dict[str, dict], adjusted: dict | None = None
) -> list[str]:
    """Markdown: per arm mean [95 % t interval] of each claim's metric, then each arm minus the reference arm on the
    same seeds with its interval, and the verdict for the plan's claim arms, with the paired t test's p and its Holm
    adjustment over the report's verdicts (`adjusted`, from holm_adjusted)."""
    done = _done_by_arm(g, setting, per_run)
    lines = ["Per arm: mean [95 % t interval over seeds].", ""]
    lines.append("| arm | seeds | " + " | ".join(c.name for c in CLAIMS) + " |")
    lines.append("|---|---|" + "---:|" * len(CLAIMS))
    for a in g.arms:
        cells = []
        for c in CLAIMS:
            iv = mean_ci([r.get(c.key) for r in done[a].values()])
            cells.append(_ci(c.fmt, iv.mean, iv.lo, iv.hi))
        lines.append(f"| {a} | {len(done[a])} | " + " | ".join(cells) + " |")
    ref = plan.reference_arm
    if ref not in g.arms:
        return lines + [""]
    adjusted = adjusted if adjusted is not None else holm_adjusted(plan, per_run)
    holm_p = {k: h for k, (_, h) in adjusted.items()}
    family = sum(not math.isnan(p) for p, _ in adjusted.values())
    lines += [
        "",
        f"Paired difference arm - {ref} (same seeds): mean [95 % t interval]; verdict for {', '.join(plan.claim_arms)}"
        " (supported / refuted: the interval excludes 0 in / against the paper's direction; undecided: MDE = the "
        "smallest difference this design detects with 80 % power at the 5 % level). p: two-sided paired t test; "
        f"Holm p: adjusted over the {family} verdicts of this report that have a p, so a verdict whose Holm p is above "
        "0.05 may be one of the intervals that exclude 0 by chance among that many.",
        "",
        "| arm | claim | paper's direction | pairs | difference | verdict | MDE | p | Holm p |",
        "|---|---|---|---:|---|---|---:|---:|---:|",
    ]
    for a in (a for a in g.arms if a != ref):
        for c in CLAIMS:
            d = _difference(done, a, ref, c.key)
            v = verdict(d, c.direction)
            claim = a in plan.claim_arms
            mde = "-" if math.isnan(v.mde) else c.fmt.format(v.mde)
            arrow = "higher" if c.direction > 0 else "lower"
            p = _p(paired_t_p(d)) if claim else "-"
            lines.append(
                f"| {a} | {c.name} | {arrow} | {d.n} | {_ci(c.fmt, d.mean, d.lo, d.hi)} | "
                f"{v.label if claim else '-'} | {mde} | {p} | {_p(holm_p.get((g.name, setting, a, c.key)))} |"
            )
    return lines + [""]

"""`alp-agent repro` results: per-run summaries from metrics.jsonl, the per-group tables, the claims with their
t intervals, paired differences, verdicts and p values (repro_claims), the exploratory comparisons (repro_explore)
and the figures (repro_plots).

A run counts once `train` wrote summary.json (after its final eval); a running or crashed run is shown as incomplete,
never as a result. The KL is the clean (noise-free) train-vs-engine KL(mu||pi) by k3 on mu's samples.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alp_agent.app.repro import ReproPlan, RunSpec, load_plan, plan_runs
from alp_agent.app.repro_claims import claims_tables, holm_adjusted, multiplicity_line
from alp_agent.app.repro_course import course_table
from alp_agent.app.repro_explore import exploratory_section
from alp_agent.app.repro_stats import finite_values

KL_KEY = "kl_train_infer/clean/k3"


def _records(run_dir: Path) -> dict[str, list[dict]]:
    from alp_agent.app.plots import read_metrics

    return read_metrics(run_dir)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _width(rec: dict) -> float | None:
    lo, hi = rec.get("ratio_seq_vs_infer/p2"), rec.get("ratio_seq_vs_infer/p98")
    return None if lo is None or hi is None else float(hi) - float(lo)


def _batch_steps(steps: list[dict], batches: list[dict]) -> tuple[list[dict], list[dict]]:
    """The step records of the first and of the last rollout batch. A batch record is written after its steps, so
    the log times split them (batches can have fewer steps than updates_per_batch when void turns empty a
    mini-batch); records without times fall back to an even split."""
    if not steps or not batches:
        return [], []
    if all("time" in r for r in steps) and all("time" in b for b in batches):
        first = [r for r in steps if r["time"] <= batches[0]["time"]]
        last = [r for r in steps if len(batches) < 2 or r["time"] > batches[-2]["time"]]
        return first, last
    n = len(steps) // len(batches)
    return steps[:n], steps[-n:] if n else []


def step0_kl(run_dir: Path) -> float | None:
    """The first optimizer step's clean KL: measured before any update, i.e. the mismatch alone."""
    kl = finite_values(_records(run_dir).get("step", []), KL_KEY)
    return kl[0] if kl else None


def summarize_run(run_dir: Path, kl_threshold: float) -> dict[str, float | None]:
    """The table's numbers for one run (None where the run did not log the metric)."""
    m = _records(run_dir)
    steps, batches, evals = m.get("step", []), m.get("batch", []), m.get("eval", [])
    first, last = _batch_steps(steps, batches)
    kl = finite_values(steps, KL_KEY)
    acc = finite_values(evals, "accuracy")
    reward = finite_values(batches, "reward/mean")
    end = batches[-1] if batches else {}
    widths = [w for w in map(_width, batches) if w is not None]
    b1 = finite_values(first, KL_KEY)

    def mx(key: str) -> float | None:
        v = finite_values(steps, key)
        return max(v) if v else None

    ent = finite_values(last, "entropy")
    tools, zero_adv = (
        finite_values(batches, "tools/calls_per_episode")[-3:],
        finite_values(batches, "adv/zero_adv_group_frac"),
    )
    return {
        "acc_before": acc[0] if acc else None,
        "acc_final": acc[-1] if acc else None,
        "acc_best": max(acc) if acc else None,
        "collapsed": float(acc[-1] < acc[0]) if len(acc) >= 2 else None,
        "reward_first": reward[0] if reward else None,
        "reward_last": reward[-1] if reward else None,
        "tok_ratio_p99_9": mx("ratio_token_vs_infer/p99_9"),
        "tok_ratio_max": mx("ratio_token_vs_infer/max"),
        "seq_width_end": _width(end),
        "seq_width_max": max(widths) if widths else None,
        "seq_width_mean": _mean(widths),
        "kl_step0": kl[0] if kl else None,
        "kl_batch1_end": b1[-1] if b1 else None,
        "kl_batch1_growth": b1[-1] / b1[0] if len(b1) >= 1 and b1[0] > 0 else None,
        "kl_peak": max(kl) if kl else None,
        "kl_mean": _mean(kl),
        "kl_spikes": float(sum(k > kl_threshold for k in kl)) if kl else None,
        "kl_threshold": kl_threshold,
        "skipped": float(end.get("skipped_steps_total", 0.0)) if end else None,
        "entropy_end": _mean(ent),
        # how a run collapses: the policy stops calling the tool, and groups lose their reward signal
        "tools_end": _mean(tools),
        "zero_adv_mean": _mean(zero_adv),
        "sigma_end": end.get("sigma/mean"),
        "steps": float(len(steps)),
    }


def _step0_kls(plan: ReproPlan, setting: str, runs_dir: Path) -> list[float]:
    """The step-0 (mismatch-only) KL of every run of `plan` in `setting` that has logged one."""
    out = []
    for r in plan_runs(plan):
        d = runs_dir / r.name
        if r.setting == setting and (d / "metrics.jsonl").is_file() and (k := step0_kl(d)) is not None:
            out.append(k)
    return out


def spike_thresholds(plan: ReproPlan, runs_dir: Path) -> dict[str, float]:
    """Per setting: the plan's fixed threshold, or kl_spike_factor x the median step-0 (mismatch-only) KL of the
    setting's runs, so a quantized regime with a 10x larger mismatch is not all spikes."""
    return {s: t for s, (t, _) in threshold_sources(plan, runs_dir).items()}


def threshold_sources(plan: ReproPlan, runs_dir: Path) -> dict[str, tuple[float, str]]:
    """Per setting: (spike threshold, where it comes from). The runs are those of `kl_threshold_plan` in the
    setting `kl_threshold_settings` maps it to (default: the same name), where that plan has any; else the plan's
    own runs in the setting; else the fixed kl_spike_threshold."""
    source = load_plan(plan.kl_threshold_plan)[0] if plan.kl_threshold_plan else None
    out = {}
    for s in plan.settings:
        fixed = (plan.kl_spike_threshold, "fixed")
        if plan.kl_spike_factor is None:
            out[s] = fixed
            continue
        theirs = plan.kl_threshold_settings.get(s, s)
        k0 = _step0_kls(source, theirs, runs_dir) if source is not None else []
        where = f"{theirs} in {Path(str(plan.kl_threshold_plan)).name}"
        if not k0:
            k0, where = _step0_kls(plan, s, runs_dir), "this plan's"
        factor = plan.kl_spike_factor
        out[s] = (factor * statistics.median(k0), f"{factor:g} x median of {len(k0)} {where} runs") if k0 else fixed
    return out


COLUMNS = [  # (key, header, format)
    ("acc_before", "acc before", "{:.3f}"),
    ("acc_final", "final acc", "{:.3f}"),
    ("acc_best", "best acc", "{:.3f}"),
    ("reward_last", "reward (last batch)", "{:.2f}"),
    ("tok_ratio_p99_9", "tok ratio P99.9 (max over steps)", "{:.3g}"),
    ("tok_ratio_max", "tok ratio max", "{:.3g}"),
    ("seq_width_mean", "seq ratio P98-P2 (mean over batches)", "{:.3g}"),
    ("kl_step0", "KL step 0", "{:.2e}"),
    ("kl_batch1_growth", "KL end of batch 1 / step 0", "{:.3g}"),
    ("kl_peak", "KL peak", "{:.2e}"),
    ("kl_spikes", "KL spikes", "{:.0f}"),
    ("skipped", "skipped steps", "{:.0f}"),
    ("entropy_end", "entropy (last batch)", "{:.3f}"),
    ("tools_end", "tool calls per episode (last 3 batches)", "{:.2f}"),
    ("zero_adv_mean", "groups without signal (mean over batches)", "{:.2f}"),
]


def _cell(vals: list[float | None], fmt: str) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "-"
    mean = sum(v) / len(v)
    if len(v) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(min(v))}, {fmt.format(max(v))}]"


def _run_info(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "run_info.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _per_run(plan: ReproPlan, runs_dir: Path, thresholds: dict[str, float]) -> dict[str, dict]:
    """Every run of the plan that has logged metrics: its spec, whether it finished, its cost and its numbers."""
    per_run: dict[str, dict] = {}
    for r in plan_runs(plan):
        d = runs_dir / r.name
        if (d / "metrics.jsonl").is_file():
            info = _run_info(d)
            per_run[r.name] = {
                "arm": r.arm,
                "setting": r.setting,
                "seed": r.seed,
                "done": (d / "summary.json").is_file(),  # written after the final eval
                "seconds": info.get("seconds"),
                "cpu": info.get("cpu", {}).get("model"),
                **summarize_run(d, thresholds[r.setting]),
            }
    return per_run


def write_results(plan: ReproPlan, out_dir: Path, command: str | None = None, name: str = "table") -> Path:
    """<name>.md (per group and setting: the metric table, the claims with intervals and verdicts, the figures),
    <name>.json (every run's numbers) and plots/*.png. `name` is the plan file's stem, so several plans can share
    one runs/ folder."""

    runs_dir = out_dir / "runs"
    sources = threshold_sources(plan, runs_dir)
    thresholds = {s: t for s, (t, _) in sources.items()}
    per_run = _per_run(plan, runs_dir, thresholds)
    adjusted = holm_adjusted(plan, per_run)
    lines = ["# Small-scale reproduction: results", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [
        "KL = clean (noise-free) train-vs-engine KL(mu||pi) by k3 = mean(r - 1 - log r), r = pi/mu, on mu's samples, "
        "per optimizer step. A spike is a step whose KL exceeds the setting's threshold ("
        + "; ".join(f"{s}: {t:.3g} = {why}" for s, (t, why) in sources.items())
        + "; a median is of the runs' step-0 (mismatch-only) KL)."
        + " Ratios are the trained policy (with ALP's noise where the arm has it) over the engine's mu, for every "
        "arm. Metric tables: mean [min, max] over finished seeds.",
        "",
        *multiplicity_line(adjusted),
    ]
    if (out_dir / "mismatch.md").is_file():
        lines += [(out_dir / "mismatch.md").read_text(encoding="utf-8"), ""]
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for g in plan.groups:
        for s in g.settings:
            lines += _group_section(plan, g, s, per_run, runs_dir, plots, thresholds, adjusted)
    lines += exploratory_section(plan.exploratory, _finished_summaries(per_run, runs_dir, thresholds))
    lines += _runs_appendix(per_run)
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / f"{name}.json").write_text(json.dumps(per_run, indent=1), encoding="utf-8")
    return out_dir / f"{name}.md"


def _finished_summaries(
    per_run: dict[str, dict], runs_dir: Path, thresholds: dict[str, float]
) -> Callable[[RunSpec], dict | None]:
    """A finished run's numbers by its spec: the plan's own from `per_run`, any other run in the shared runs folder
    (an exploratory comparison's other side) summarized once on first use with its setting's threshold."""
    cache: dict[str, dict | None] = {}

    def summary(r: RunSpec) -> dict | None:
        if r.name in per_run:
            return per_run[r.name] if per_run[r.name]["done"] else None
        if r.name not in cache:
            d = runs_dir / r.name
            done = (d / "summary.json").is_file() and (d / "metrics.jsonl").is_file()
            cache[r.name] = summarize_run(d, thresholds[r.setting]) if done else None
        return cache[r.name]

    return summary


def _group_section(
    plan, g, s, per_run, runs_dir: Path, plots: Path, thresholds: dict[str, float], adjusted: dict
) -> list[str]:
    from alp_agent.app.repro_plots import plot_claims, plot_group

    lines = [f"## {g.name}, {s} ({_describe(plan.settings[s])})", ""]
    lines.append("| arm | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    lines.append("|---|---|" + "---:|" * len(COLUMNS))
    for a in g.arms:
        rows = [per_run.get(RunSpec(a, s, seed).name) for seed in g.seeds]
        got = [x for x in rows if x and x["done"]]  # a running or crashed run is not a result
        partial = sum(1 for x in rows if x and not x["done"])
        seeds = f"{len(got)}/{len(g.seeds)}" + (f" (+{partial} incomplete)" if partial else "")
        lines.append(
            f"| {a} | {seeds} | " + " | ".join(_cell([x.get(k) for x in got], f) for k, _, f in COLUMNS) + " |"
        )
    lines.append("")
    png = plot_group(plan, g, s, runs_dir, plots / f"{g.name}_{s}.png", kl_threshold=thresholds[s])
    if png is not None:
        lines += [f"![{g.name} {s}](plots/{png.name})", ""]
    lines += course_table(g, s, runs_dir)
    if len(g.seeds) < 2:  # one seed (--quick): the mechanism only, no intervals
        return lines
    lines += claims_tables(plan, g, s, per_run, adjusted)
    png = plot_claims(g, s, per_run, plots / f"{g.name}_{s}_claims.png")
    if png is not None:
        lines += [f"![{g.name} {s} claims](plots/{png.name})", ""]
    return lines


def _runs_appendix(per_run: dict[str, dict]) -> list[str]:
    """Every run with its wall time and CPU (from run_info.json)."""
    if not per_run:
        return []
    done = sorted(r["seconds"] / 60 for r in per_run.values() if r["done"] and r.get("seconds"))
    cost = (
        f"What the plan cost: {len(done)} finished runs, median {statistics.median(done):.1f} min per run (range "
        f"{done[0]:.1f}-{done[-1]:.1f}; a run's time includes any wait for cores other work held), "
        f"{sum(done) / 60:.1f} h in all."
        if done
        else "No finished run has a recorded wall time."
    )
    lines = ["## Runs", "", cost, "", "| run | finished | minutes | CPU |", "|---|---|---:|---|"]
    for n, r in sorted(per_run.items()):
        minutes = f"{r['seconds'] / 60:.1f}" if r.get("seconds") else "-"
        lines.append(f"| {n} | {'yes' if r['done'] else 'no'} | {minutes} | {r.get('cpu') or '-'} |")
    return lines + [""]


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items()) or "base"

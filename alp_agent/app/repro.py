"""`alp-agent repro`: the paper's comparison at small scale, as one rerunnable command (issue 8).

A plan (configs/repro/*.yaml) names one shared training config, the arms (ALP, baselines, layer ablations; each a
few dotted overrides), the settings (staleness 4 / 8) and groups of (arms x settings x seeds). Every run is a plain
`alp-agent train` in its own process and run directory, so a run here is exactly what a user would run, one crash
cannot take the others down, and a finished run is never recomputed (rerunning the command resumes the plan).
`report` then reads every run's metrics.jsonl into one markdown table per group and PNG plots comparing arms.

All arms are compared on the same quantity: the trained policy against the engine's sampling logprobs mu (for the
old-logprob baselines the trainer logs it beside their own ratio).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alp_agent.config_io import ConfigError, read_yaml_with_base, validate
from alp_agent.train.checkpoint import latest_checkpoint


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReproGroup(_Strict):
    """One comparison: these arms, in these settings, with these seeds (one table and one figure per setting)."""

    name: str = Field(..., description="Group name (table heading, plot file prefix).")
    arms: list[str] = Field(..., min_length=1, description="Arm names from `arms`.")
    settings: list[str] = Field(..., min_length=1, description="Setting names from `settings`.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="run.seed and noise seed values.")


class ReproPlan(_Strict):
    """What `alp-agent repro` runs. Overrides are `{dotted.key: value}` maps applied over `config`."""

    config: str = Field(..., description="Training config shared by every run (relative to the plan file).")
    out_dir: str = Field("results/repro", description="runs/, <plan>.md, <plan>.json and plots/ go here.")
    kl_spike_threshold: float = Field(
        0.01, gt=0, description="Clean train-inference k3 KL above which a step is a spike."
    )
    arms: dict[str, dict[str, Any]] = Field(..., description="Arm name -> overrides (the algorithm and its options).")
    settings: dict[str, dict[str, Any]] = Field(..., description="Setting name -> overrides (e.g. staleness).")
    groups: list[ReproGroup] = Field(..., min_length=1, description="What to run and compare.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Applied to every run (e.g. a GPU model).")

    @model_validator(mode="after")
    def _known_names(self) -> ReproPlan:
        for g in self.groups:
            for a in g.arms:
                if a not in self.arms:
                    raise ValueError(f"group {g.name!r}: unknown arm {a!r}; arms: {', '.join(self.arms)}")
            for s in g.settings:
                if s not in self.settings:
                    raise ValueError(f"group {g.name!r}: unknown setting {s!r}; settings: {', '.join(self.settings)}")
        return self


@dataclass(frozen=True)
class RunSpec:
    """One training run of the plan; runs shared by several groups (seq_alp in 'main' and 'layers') run once."""

    arm: str
    setting: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}_{self.arm}_s{self.seed}"


def load_plan(path: str | Path, extra: list[str] | None = None) -> tuple[ReproPlan, Path]:
    """The plan and the absolute path of its training config. `extra` are dotted overrides for every run."""
    from alp_agent.config_io import parse_override

    path = Path(path)
    plan = validate(ReproPlan, read_yaml_with_base(path), str(path))
    for item in extra or []:
        keys, value = parse_override(item)
        plan.overrides[".".join(keys)] = value
    cfg = (path.parent / plan.config).resolve()
    if not cfg.is_file():
        raise ConfigError(f"{path}: config: {cfg} not found")
    return plan, cfg


def plan_runs(plan: ReproPlan) -> list[RunSpec]:
    """Every distinct run, ordered by setting, then seed, then group and arm order: a plan cut short still has
    complete comparisons for its first setting and seed."""
    seen: dict[RunSpec, None] = {}
    for g in plan.groups:
        for s in g.settings:
            for seed in g.seeds:
                for a in g.arms:
                    seen.setdefault(RunSpec(a, s, seed))
    order = list(plan.settings)
    return sorted(seen, key=lambda r: (order.index(r.setting), r.seed))  # stable: keeps group/arm order


def run_overrides(plan: ReproPlan, spec: RunSpec, out_dir: Path) -> list[str]:
    """Dotted `key=value` strings (values as JSON, which YAML parses back unchanged) for `alp-agent train`."""
    items = {
        **plan.overrides,
        **plan.settings[spec.setting],
        **plan.arms[spec.arm],
        "run.name": spec.name,
        "run.out_dir": str(out_dir / "runs"),
        "run.seed": spec.seed,
        "trainer.algo.perturb.seed": spec.seed,
        "trainer.update.seed": spec.seed,
    }
    return [f"{k}={json.dumps(v)}" for k, v in items.items()]


def run_state(run_dir: Path, iterations: int, final_eval: bool = True) -> str:
    """'done' (all batches and, when configured, the final eval written), 'resumable' (a checkpoint, e.g. after
    Ctrl-C) or 'todo'."""
    s = run_dir / "summary.json"
    if s.is_file():
        try:
            d = json.loads(s.read_text())
            if (
                not d.get("interrupted")
                and d.get("batches") == iterations
                and (not final_eval or d.get("accuracy_after") is not None)
            ):
                return "done"
        except json.JSONDecodeError:
            pass
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return "resumable"
    return "todo"


def execute(
    plan: ReproPlan, cfg_path: Path, out_dir: Path, only: list[str] | None = None, dry_run: bool = False, log=print
) -> list[dict]:
    """Run every run of the plan that is not done yet, one process at a time. Returns one status record per run."""
    from alp_agent.config import RunConfig
    from alp_agent.config_io import load_config

    runs = [r for r in plan_runs(plan) if not only or any(o in r.name for o in only)]
    # validate every run's config before spending an hour: a typo in one arm fails now, naming the arm
    cfgs = {}
    for r in runs:
        try:
            cfgs[r] = load_config(RunConfig, cfg_path, run_overrides(plan, r, out_dir))
        except ConfigError as e:
            raise ConfigError(f"arm {r.arm!r} / setting {r.setting!r}: {e}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    status = []
    for i, r in enumerate(runs, 1):
        run_dir = out_dir / "runs" / r.name
        c = cfgs[r]
        final_eval = c.eval.before_and_after and c.eval.num_tasks > 0
        state = run_state(run_dir, c.run.iterations, final_eval)
        cmd = [
            sys.executable,
            "-m",
            "alp_agent.app.cli",
            "train",
            "-c",
            str(cfg_path),
            "--quiet",
            *run_overrides(plan, r, out_dir),
        ]
        if state == "done":
            log(f"[{i}/{len(runs)}] {r.name}: done, kept")
            status.append({"run": r.name, "state": "done", "seconds": None})
            continue
        if state == "resumable":
            cmd.insert(cmd.index("--quiet"), "--resume")
        elif run_dir.exists():
            shutil.rmtree(run_dir)  # a crashed run without a checkpoint restarts from scratch
        log(f"[{i}/{len(runs)}] {r.name}: {'resuming' if state == 'resumable' else 'running'}")
        if dry_run:
            log("  " + " ".join(cmd))
            status.append({"run": r.name, "state": "dry-run", "seconds": None})
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(run_dir / "log.txt", "a", encoding="utf-8") as f:
            rc = subprocess.call(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")},
            )
        dt = time.perf_counter() - t0
        ok = rc == 0 and run_state(run_dir, c.run.iterations, final_eval) == "done"
        log_file = run_dir / "log.txt"
        log(f"  {r.name}: {'ok' if ok else f'FAILED (exit {rc}; see {log_file})'} in {dt / 60:.1f} min")
        status.append({"run": r.name, "state": "done" if ok else f"failed (exit {rc})", "seconds": round(dt, 1)})
        if rc in (-2, 130):  # Ctrl-C: the run checkpointed itself; stop the plan, a rerun resumes it
            raise KeyboardInterrupt
    return status


# ---------------------------------------------------------------------- summary of one run
def _records(run_dir: Path) -> dict[str, list[dict]]:
    from alp_agent.app.plots import read_metrics

    return read_metrics(run_dir)


def _vals(recs: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in recs if r.get(key) is not None and math.isfinite(float(r[key]))]


def summarize_run(run_dir: Path, kl_threshold: float) -> dict[str, float | None]:
    """The table's numbers for one run (None where the run did not log the metric)."""
    m = _records(run_dir)
    steps, batches, evals = m.get("step", []), m.get("batch", []), m.get("eval", [])
    last_batch_steps = steps[-len(steps) // max(len(batches), 1) :] if steps else []
    kl = _vals(steps, "kl_train_infer/clean/k3")
    acc = _vals(evals, "accuracy")
    reward = _vals(batches, "reward/mean")
    end = batches[-1] if batches else {}

    def width(rec: dict) -> float | None:
        lo, hi = rec.get("ratio_seq_vs_infer/p2"), rec.get("ratio_seq_vs_infer/p98")
        return None if lo is None or hi is None else hi - lo

    def mx(key: str) -> float | None:
        v = _vals(steps, key)
        return max(v) if v else None

    ent = _vals(last_batch_steps, "entropy")
    return {
        "acc_before": acc[0] if acc else None,
        "acc_final": acc[-1] if acc else None,
        "acc_best": max(acc) if acc else None,
        "reward_first": reward[0] if reward else None,
        "reward_last": reward[-1] if reward else None,
        "tok_ratio_p99_9": mx("ratio_token_vs_infer/p99_9"),
        "tok_ratio_max": mx("ratio_token_vs_infer/max"),
        "seq_width_end": width(end),
        "seq_width_max": max((w for w in map(width, batches) if w is not None), default=None),
        "kl_peak": max(kl) if kl else None,
        "kl_mean": sum(kl) / len(kl) if kl else None,
        "kl_spikes": float(sum(k > kl_threshold for k in kl)) if kl else None,
        "skipped": float(end.get("skipped_steps_total", 0.0)) if end else None,
        "entropy_end": sum(ent) / len(ent) if ent else None,
        "sigma_end": end.get("sigma/mean"),
        "steps": float(len(steps)),
    }


COLUMNS = [  # (key, header, format)
    ("acc_final", "final acc", "{:.3f}"),
    ("acc_best", "best acc", "{:.3f}"),
    ("reward_last", "reward (last batch)", "{:.2f}"),
    ("tok_ratio_p99_9", "tok ratio P99.9 (max over steps)", "{:.3g}"),
    ("tok_ratio_max", "tok ratio max", "{:.3g}"),
    ("seq_width_end", "seq ratio P98-P2 (last batch)", "{:.3g}"),
    ("kl_peak", "KL peak", "{:.2e}"),
    ("kl_mean", "KL mean", "{:.2e}"),
    ("kl_spikes", "KL spikes", "{:.0f}"),
    ("skipped", "skipped steps", "{:.0f}"),
    ("entropy_end", "entropy (last batch)", "{:.3f}"),
]


def _cell(vals: list[float | None], fmt: str) -> str:
    v = [x for x in vals if x is not None]
    if not v:
        return "-"
    mean = sum(v) / len(v)
    if len(v) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(min(v))}, {fmt.format(max(v))}]"


def write_results(plan: ReproPlan, out_dir: Path, command: str | None = None, name: str = "table") -> Path:
    """<name>.md (one table per group and setting; mean [min, max] over seeds), <name>.json and plots/*.png.
    `name` is the plan file's stem, so several plans (default, sweep, seeds) can share one runs/ folder."""
    runs_dir = out_dir / "runs"
    per_run: dict[str, dict] = {}
    for r in plan_runs(plan):
        d = runs_dir / r.name
        if (d / "metrics.jsonl").is_file():
            per_run[r.name] = {
                "arm": r.arm,
                "setting": r.setting,
                "seed": r.seed,
                "state": _state_label(d),
                **summarize_run(d, plan.kl_spike_threshold),
            }
    lines = ["# Small-scale reproduction: results", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [
        (
            f"KL = clean (noise-free) train-inference k3 KL per optimizer step; a spike is a step with KL > "
            f"{plan.kl_spike_threshold:g}. Ratios are the trained policy (with ALP's noise where the arm has it) "
            "over the engine's sampling logprobs mu, for every arm. With several seeds a cell is mean [min, max]."
        ),
        "",
    ]
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for g in plan.groups:
        for s in g.settings:
            lines += [f"## {g.name}, {s} ({_describe(plan.settings[s])})", ""]
            lines.append("| arm | seeds | " + " | ".join(h for _, h, _ in COLUMNS) + " |")
            lines.append("|---|---|" + "---:|" * len(COLUMNS))
            for a in g.arms:
                rows = [per_run.get(RunSpec(a, s, seed).name) for seed in g.seeds]
                got = [x for x in rows if x and x["state"] == "done"]  # a running or crashed run is not a result
                partial = sum(1 for x in rows if x and x["state"] != "done")
                seeds = f"{len(got)}/{len(g.seeds)}" + (f" (+{partial} incomplete)" if partial else "")
                lines.append(
                    f"| {a} | {seeds} | " + " | ".join(_cell([x.get(k) for x in got], f) for k, _, f in COLUMNS) + " |"
                )
            lines.append("")
            png = plot_group(plan, g, s, runs_dir, plots / f"{g.name}_{s}.png")
            if png is not None:
                lines += [f"![{g.name} {s}](plots/{png.name})", ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / f"{name}.json").write_text(json.dumps(per_run, indent=1), encoding="utf-8")
    return out_dir / f"{name}.md"


def _state_label(run_dir: Path) -> str:
    """'done' once `train` wrote summary.json (after its final eval), else 'incomplete' (running or crashed)."""
    s = run_dir / "summary.json"
    return "done" if s.is_file() else "incomplete"


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items()) or "base"


# ---------------------------------------------------------------------- plots
def _step_series(recs: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in recs if r.get(key) is not None and math.isfinite(float(r[key]))}


def _seed_band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over seeds at the steps every seed has."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    mean = [sum(s[x] for s in series) / len(series) for x in common]
    return common, mean, [min(s[x] for s in series) for x in common], [max(s[x] for s in series) for x in common]


def plot_group(plan: ReproPlan, g: ReproGroup, setting: str, runs_dir: Path, out: Path) -> Path | None:
    """Three panels over optimizer steps / batches: sequence-ratio P2-P98 envelope, clean KL, reward and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    drawn = False
    for i, a in enumerate(g.arms):
        color = f"C{i % 10}"
        recs = []
        for seed in g.seeds:
            d = runs_dir / RunSpec(a, setting, seed).name
            if (d / "metrics.jsonl").is_file():
                recs.append(_records(d))
        if not recs:
            continue
        drawn = True
        # (1) envelope of the sequence ratio vs mu over batches (all sequences of the batch), seed 0 shaded
        b = recs[0].get("batch", [])
        lo, hi = _step_series(b, "ratio_seq_vs_infer/p2"), _step_series(b, "ratio_seq_vs_infer/p98")
        xs = sorted(set(lo) & set(hi))
        if xs:
            axes[0].fill_between(xs, [lo[x] for x in xs], [hi[x] for x in xs], color=color, alpha=0.15)
            axes[0].plot(xs, [hi[x] for x in xs], color=color, label=a)
            axes[0].plot(xs, [lo[x] for x in xs], color=color, linestyle="--")
        # (2) clean train-inference KL per optimizer step: mean over seeds, band = min..max
        x, m, mn, mxs = _seed_band([_step_series(r.get("step", []), "kl_train_infer/clean/k3") for r in recs])
        if x:
            axes[1].plot(x, m, color=color, label=a)
            if len(recs) > 1:
                axes[1].fill_between(x, mn, mxs, color=color, alpha=0.15)
        # (3) rollout reward per batch (solid) and held-out accuracy (markers)
        x, m, mn, mxs = _seed_band([_step_series(r.get("batch", []), "reward/mean") for r in recs])
        if x:
            axes[2].plot(x, m, color=color, label=f"{a} reward")
            if len(recs) > 1:
                axes[2].fill_between(x, mn, mxs, color=color, alpha=0.15)
        x, m, _, _ = _seed_band([_step_series(r.get("eval", []), "accuracy") for r in recs])
        if x:
            axes[2].plot(x, m, color=color, marker="o", linestyle=":", label=f"{a} held-out acc")
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(
        title="sequence ratio vs mu: P98 (solid) and P2 (dashed), per batch", xlabel="rollout batch", yscale="log"
    )
    axes[1].axhline(plan.kl_spike_threshold, color="grey", linestyle=":", label="spike threshold")
    axes[1].set(title="clean train-inference KL (k3)", xlabel="optimizer step", yscale="log")
    axes[2].set(title="reward (line) and held-out accuracy (markers)", xlabel="rollout batch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{g.name} / {setting}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

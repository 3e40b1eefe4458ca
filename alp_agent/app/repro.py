"""`alp-agent repro`: the paper's comparison at small scale, as one rerunnable command (issue 8).

A plan (configs/repro/*.yaml) names one shared training config, the arms (ALP, baselines, layer ablations; each a
few dotted overrides), the settings (staleness 4 / 8) and groups of (arms x settings x seeds). Every run is a plain
`alp-agent train` in its own process and run directory, so a run here is exactly what a user would run, one crash
cannot take the others down, and a finished run is never recomputed (rerunning the command resumes the plan).
`report` (repro_report) then reads every run's metrics.jsonl into tables, intervals and verdicts (repro_stats) and
PNG plots (repro_plots).

Pinned conditions (issue 14): `pinned` keys (engine dtype bf16, trainer dtype float32 by default) override every other
source for every run, whatever the CPU, and each run directory gets run_info.json (CPU model and flags, cores, the
pinned dtypes, versions, each attempt's wall time and exit code) before it is launched.

All arms are compared on the same quantity: the trained policy against the engine's sampling logprobs mu (for the
old-logprob baselines the trainer logs it beside their own ratio).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from alp_agent.config_io import ConfigError, read_yaml_with_base, validate
from alp_agent.schema import StrictModel
from alp_agent.train.checkpoint import latest_checkpoint
from alp_agent.train.signals import graceful_termination


class ReproGroup(StrictModel):
    """One comparison: these arms, in these settings, with these seeds (one table and one figure per setting)."""

    name: str = Field(..., description="Group name (table heading, plot file prefix).")
    arms: list[str] = Field(..., min_length=1, description="Arm names from `arms`.")
    settings: list[str] = Field(..., min_length=1, description="Setting names from `settings`.")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="run.seed and noise seed values.")


class Comparison(StrictModel):
    """An exploratory paired difference: `arm` in `setting` minus `minus_arm` in `minus_setting`, over the seeds both
    finished. The report gives it an interval but no verdict, and nothing corrects it for multiplicity: it is a
    question the data raised (e.g. staleness 4 against 8 for the same arm), not a claim the plan set out to test."""

    arm: str = Field(..., description="Arm of the first term.")
    setting: str = Field(..., description="Setting of the first term.")
    minus_arm: str | None = Field(None, description="Arm subtracted (default: `arm`).")
    minus_setting: str | None = Field(None, description="Setting subtracted (default: `setting`).")
    seeds: list[int] = Field(default_factory=lambda: list(range(5)), description="Seeds to pair where both finished.")

    @property
    def terms(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """((arm, setting), (arm, setting)) of the two sides."""
        return (self.arm, self.setting), (self.minus_arm or self.arm, self.minus_setting or self.setting)


class ReproPlan(StrictModel):
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
    pinned: dict[str, Any] = Field(
        default_factory=lambda: {"engine.dtype": "bfloat16", "trainer.update.dtype": "float32"},
        description="Applied last to every run (arms, settings and overrides cannot change them): the engine's bf16 "
        "against the float32 trainer is the paper's mismatch; pinned so the study measures the same thing on every "
        "CPU (trainer.update.dtype 'auto' would pick bf16 on a CPU with native bf16).",
    )
    kl_spike_factor: float | None = Field(
        None,
        gt=0,
        description="When set, a setting's KL spike threshold is this factor x the median step-0 (mismatch-only) "
        "KL(mu||pi) of its runs (overrides kl_spike_threshold, which stays the fallback).",
    )
    kl_threshold_plan: str | None = Field(
        None,
        description="Another plan (path relative to this one) whose runs set the spike threshold of every setting "
        "they share, so a run has the same spike count in every report: the study's extensions use the central "
        "set's runs. A setting that plan lacks uses this plan's own runs.",
    )
    kl_threshold_settings: dict[str, str] = Field(
        default_factory=dict,
        description="Setting of this plan -> the setting of kl_threshold_plan whose runs set its spike threshold. The "
        "step-0 KL is measured before any update, so a setting that differs only in staleness has the same mismatch "
        "regime: staleness 4 takes the central set's staleness-8 runs of its regime (more runs, one threshold).",
    )
    reference_arm: str = Field("seq_bypass", description="Arm every other arm is compared with on the same seeds.")
    claim_arms: list[str] = Field(
        default_factory=lambda: ["seq_alp"], description="Arms whose paired difference gets a verdict per claim."
    )
    exploratory: list[Comparison] = Field(
        default_factory=list,
        description="Further paired differences the report computes from finished runs, with intervals and no verdict "
        "(runs of any plan sharing the runs folder; they are not run by this plan).",
    )

    @model_validator(mode="after")
    def _known_names(self) -> ReproPlan:
        for g in self.groups:
            for a in g.arms:
                if a not in self.arms:
                    raise ValueError(f"group {g.name!r}: unknown arm {a!r}; arms: {', '.join(self.arms)}")
            for s in g.settings:
                if s not in self.settings:
                    raise ValueError(f"group {g.name!r}: unknown setting {s!r}; settings: {', '.join(self.settings)}")
        for c in self.exploratory:
            if c.terms[0] == c.terms[1]:
                raise ValueError(
                    f"exploratory: {c.arm!r} in {c.setting!r} minus itself; set minus_arm or minus_setting"
                )
            for arm, setting in c.terms:
                if arm not in self.arms or setting not in self.settings:
                    raise ValueError(f"exploratory: {arm!r} in {setting!r} is not an arm in a setting of this plan")
        for mine in self.kl_threshold_settings:
            if mine not in self.settings:
                raise ValueError(
                    f"kl_threshold_settings: unknown setting {mine!r}; settings: {', '.join(self.settings)}"
                )
        if self.kl_threshold_settings and self.kl_threshold_plan is None:
            raise ValueError("kl_threshold_settings names settings of kl_threshold_plan, which is not set")
        sources = {"overrides": self.overrides, **{f"setting {k!r}": v for k, v in self.settings.items()}}
        sources.update({f"arm {k!r}": v for k, v in self.arms.items()})
        for where, items in sources.items():
            for k, v in items.items():
                if k in self.pinned and v != self.pinned[k]:
                    raise ValueError(f"{where}: {k}={v!r} conflicts with pinned {k}={self.pinned[k]!r}")
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
        key = ".".join(keys)
        if key in plan.pinned and value != plan.pinned[key]:
            raise ConfigError(f"{item}: {key} is pinned to {plan.pinned[key]!r} by the plan {path} (`pinned`)")
        plan.overrides[key] = value
    cfg = _beside(path, "config", plan.config)
    if plan.kl_threshold_plan is not None:
        plan.kl_threshold_plan = str(_beside(path, "kl_threshold_plan", plan.kl_threshold_plan))
        theirs = load_plan(plan.kl_threshold_plan)[0].settings
        for mine, other in plan.kl_threshold_settings.items():
            if other not in theirs:
                raise ConfigError(
                    f"{path}: kl_threshold_settings: {mine!r} -> {other!r}, which is not a setting of "
                    f"{plan.kl_threshold_plan} ({', '.join(theirs)})"
                )
    return plan, cfg


def _beside(plan_path: Path, key: str, value: str) -> Path:
    """A file the plan names (relative to the plan's folder), resolved; a clear error if it is not there."""
    found = (plan_path.parent / value).resolve()
    if not found.is_file():
        raise ConfigError(f"{plan_path}: {key}: {found} not found")
    return found


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
        **plan.pinned,
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
        rc, dt, stopped = _launch(cmd, run_dir, r, c, log)
        ok = rc == 0 and run_state(run_dir, c.run.iterations, final_eval) == "done"
        # also when someone signalled the run itself (it then exits 0 with a fresh summary that says so)
        stopped = stopped or (rc == 0 and _was_interrupted(run_dir))
        log_file = run_dir / "log.txt"
        outcome = "stopped" if stopped else "ok" if ok else f"FAILED (exit {rc}; see {log_file})"
        log(f"  {r.name}: {outcome} in {dt / 60:.1f} min")
        state = "done" if ok else "stopped" if stopped else f"failed (exit {rc})"
        status.append({"run": r.name, "state": state, "seconds": round(dt, 1)})
        if stopped:  # the run checkpointed its last whole batch: stop the plan, rerunning the command resumes it
            raise KeyboardInterrupt
    return status


def _was_interrupted(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text()).get("interrupted"))
    except (OSError, ValueError):
        return False


def _launch(cmd: list[str], run_dir: Path, spec: RunSpec, cfg, log=print) -> tuple[int, float, bool]:
    """One `alp-agent train` process, its output appended to log.txt, its conditions to run_info.json; (exit
    status, seconds, whether the plan was asked to stop while it ran)."""
    from alp_agent.app.repro_runinfo import finish_attempt, start_attempt

    run_dir.mkdir(parents=True, exist_ok=True)
    info = start_attempt(
        run_dir, {"run": spec.name, "arm": spec.arm, "setting": spec.setting, "seed": spec.seed}, cfg, cmd
    )
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "a", encoding="utf-8") as f:
        rc, stopped = _supervise(cmd, f, log)
    dt = time.perf_counter() - t0
    finish_attempt(run_dir, info, dt, rc)
    return rc, dt, stopped


def _supervise(cmd: list[str], out, log) -> tuple[int, bool]:
    """Run one train process to its end; (exit status, whether this runner was asked to stop meanwhile).

    The run gets its own process group, so a Ctrl-C at the terminal reaches only this runner, which passes it on
    once as SIGTERM: the run finishes its batch and writes a checkpoint (SIGTERM is graceful in a single-process run
    whatever its SIGINT state, train/signals.py). Killing the run at once, as subprocess.call does on Ctrl-C, lost
    the batch in flight and the checkpoint. SIGTERM to this runner is handled the same; a second stop kills it."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, process_group=0)
    stops = 0
    with graceful_termination():
        while True:
            try:
                return proc.wait(), stops > 0
            except KeyboardInterrupt:
                stops += 1
                if stops == 1:
                    log("  stopping: the run finishes its batch and writes a checkpoint (stop again to kill it)")
                    proc.send_signal(signal.SIGTERM)
                else:
                    proc.kill()

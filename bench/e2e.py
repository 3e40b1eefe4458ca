"""End-to-end: full training iterations of the quickstart (rollout -> update -> weight sync), broken down by phase.

What it answers: where does one iteration of `alp-agent train --config configs/quickstart.yaml` spend its time, so
the slowest phase is visible. It builds the same components as `alp_agent.app.job.train` (`build_inference`, then
`load_model` + `Trainer`) and runs the same steps as its loop, timing each one:

  rollout generation   RolloutRunner.run wall time while no env step is running (engine turns, templates, resets)
  tool execution       wall time while at least one env step (parse + sandbox call) is running; env steps overlap
                       the other episodes' generation, so this is the time a tool call was in flight, not time the
                       engine stood idle. Measured by wrapping each env's `step` (and its sandbox session's `run`)
                       in the env factory, from here: nothing in envs/ or alp_agent/ is changed.
  old/ref logprobs     Trainer.update's `time/old_ref_logprobs`: the clean no-grad forward for pi_theta_old (grpo,
                       tis, mis, gspo) and the reference model (kl_coef > 0); 0 for ALP / Bypass, which use the
                       engine's logprobs.
  update               Trainer.update's `time/update` (all optimizer steps: forwards with noise, backward, AdamW).
  update bookkeeping   the rest of Trainer.update (advantages, episode metrics, row building).
  weight sync          Trainer.sync_weights(engine): the new weights loaded into vLLM in place.

The first `--warmup` iterations (first vLLM batch, first backward, AdamW state allocation) are timed but left out of
the table; the table is the mean over the measured iterations. No eval, no checkpoints (not part of an iteration).

    python bench/e2e.py                                  # quickstart, 1 warm-up + 1 measured iteration, 4x4 episodes
    python bench/e2e.py --prompts 6 --samples 6 --algo grpo --iterations 2
    python bench/e2e.py rollout.max_turns=2              # any run-config override

Writes bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from _common import machine_info  # bench/ is sys.path[0] when run as python bench/X.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Recorder:
    """Intervals of env steps and sandbox calls, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: list[tuple[float, float]] = []
        self.sandbox: list[float] = []
        self.resets = 0.0

    def clear(self) -> None:
        with self.lock:
            self.steps.clear()
            self.sandbox.clear()
            self.resets = 0.0

    def add_step(self, t0: float, t1: float) -> None:
        with self.lock:
            self.steps.append((t0, t1))

    def add_sandbox(self, dt: float) -> None:
        with self.lock:
            self.sandbox.append(dt)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Wall time covered by at least one interval."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


class _TimedSession:
    """A sandbox session whose `run` is timed; everything else is the session itself."""

    def __init__(self, session, rec: Recorder):
        self._s, self._rec = session, rec

    def run(self, code, timeout=None):
        t0 = time.perf_counter()
        try:
            return self._s.run(code, timeout)
        finally:
            self._rec.add_sandbox(time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self._s, name)


def timed_env_fn(env_fn, rec: Recorder):
    """Wrap the env factory: each env's `step` (which `astep` runs in a worker thread) and sandbox calls are timed.

    Instance attributes shadow the class methods, so both `env.step` through Gymnasium's wrappers and the base env's
    `astep` (which calls `self.step`) go through the timers."""

    def make():
        env = env_fn()
        base = env.unwrapped
        step, reset, get_session = base.step, base.reset, getattr(base, "_get_session", None)

        def timed_step(action):
            t0 = time.perf_counter()
            try:
                return step(action)
            finally:
                rec.add_step(t0, time.perf_counter())

        def timed_reset(*a, **kw):
            t0 = time.perf_counter()
            try:
                return reset(*a, **kw)
            finally:
                with rec.lock:
                    rec.resets += time.perf_counter() - t0

        base.step, base.reset = timed_step, timed_reset
        if get_session is not None:
            base._get_session = lambda: _TimedSession(get_session(), rec)
        return env

    return make


def machine() -> dict:
    return machine_info("vllm")


PHASES = ["rollout generation", "tool execution", "old/ref logprobs", "update", "update bookkeeping", "weight sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--iterations", type=int, default=1, help="measured iterations (table = their mean)")
    ap.add_argument("--warmup", type=int, default=1, help="iterations run first and left out of the table")
    ap.add_argument("--prompts", type=int, default=4, help="tasks per batch (run.prompts_per_batch)")
    ap.add_argument("--samples", type=int, default=4, help="episodes per task (run.samples_per_prompt)")
    ap.add_argument("--algo", default=None, help="trainer.algo.name (default: the config's, alp in quickstart)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "e2e.json"))
    ap.add_argument("overrides", nargs="*", help="dotted.key=value run-config overrides")
    args = ap.parse_args()

    import torch

    from alp_agent.app.job import build_inference
    from alp_agent.config import RunConfig
    from alp_agent.config_io import load_config
    from alp_agent.models import load_model
    from alp_agent.train.loop import task_cursor
    from alp_agent.train.trainer import Trainer

    overrides = [f"run.prompts_per_batch={args.prompts}", f"run.samples_per_prompt={args.samples}"]
    if args.algo:
        overrides.append(f"trainer.algo.name={args.algo}")
    cfg = load_config(RunConfig, args.config, overrides + list(args.overrides))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)

    t0 = time.perf_counter()
    comps = build_inference(cfg)
    t_build = time.perf_counter() - t0
    rec = Recorder()
    comps.runner.env_fn = timed_env_fn(comps.runner.env_fn, rec)  # envs are created lazily on the first run
    iters = []
    try:
        t0 = time.perf_counter()
        model = load_model(comps.model_dir, dtype=torch.float32)
        trainer = Trainer(model, cfg.trainer)
        t_model = time.perf_counter() - t0
        stream = task_cursor(comps.num_tasks, cfg.run.prompts_per_batch, 0, cfg.run.seed)
        for i in range(args.warmup + args.iterations):
            rec.clear()
            t_it = time.perf_counter()
            cursor, tasks = next(stream)
            t0 = time.perf_counter()
            trajs = comps.runner.run(tasks, cfg.run.samples_per_prompt, trainer.policy_version)
            t_roll = time.perf_counter() - t0
            roll_m = dict(comps.runner.last_metrics)
            with rec.lock:
                steps, sandbox, resets = list(rec.steps), list(rec.sandbox), rec.resets
            tool_wall = union_seconds(steps)
            trainer.data_cursor = cursor
            m = trainer.update(trajs)
            t0 = time.perf_counter()
            trainer.sync_weights(comps.engine)
            t_sync = time.perf_counter() - t0
            t_total = time.perf_counter() - t_it
            upd_total = m.get("time/batch_update_total", 0.0)
            old_ref = m.get("time/old_ref_logprobs", 0.0)
            upd = m.get("time/update", 0.0)
            phases = {
                "rollout generation": t_roll - tool_wall,
                "tool execution": tool_wall,
                "old/ref logprobs": old_ref,
                "update": upd,
                "update bookkeeping": max(upd_total - upd - old_ref, 0.0),
                "weight sync": t_sync,
            }
            trained = float(sum(sum(t.loss_mask) for t in trajs if t.num_model_tokens > 0))
            it = {
                "iteration": i,
                "warmup": i < args.warmup,
                "phases_s": phases,
                "total_s": t_total,
                "rollout_wall_s": t_roll,
                "episodes": len(trajs),
                "env_steps": len(steps),
                "env_step_sum_s": sum(b - a for a, b in steps),
                "sandbox_calls": len(sandbox),
                "sandbox_sum_s": sum(sandbox),
                "env_reset_sum_s": resets,
                "tool_calls": sum(t.num_tool_calls for t in trajs),
                "model_turns": sum(t.num_turns for t in trajs),
                "trained_tokens": trained,
                "sequence_tokens": float(sum(len(t.ids) for t in trajs)),
                "optimizer_steps": m.get("optimizer_steps"),
                "reward_mean": m.get("reward/mean"),
                "rollout_metrics": roll_m,
            }
            iters.append(it)
            tag = "warm-up" if it["warmup"] else "measured"
            print(
                f"iteration {i} ({tag}): total {t_total:.1f} s, rollout {t_roll:.1f} s, update {upd_total:.1f} s, "
                f"sync {t_sync:.2f} s",
                flush=True,
            )
    finally:
        comps.close()

    measured = [it for it in iters if not it["warmup"]] or iters
    n = len(measured)
    mean = {p: sum(it["phases_s"][p] for it in measured) / n for p in PHASES}
    total = sum(mean.values())
    print(
        f"\nalgo {cfg.trainer.algo.name}, {cfg.run.prompts_per_batch} prompts x {cfg.run.samples_per_prompt} samples, "
        f"mean of {n} measured iteration(s) after {args.warmup} warm-up"
    )
    print(f"| {'phase':<20} | {'seconds':>8} | {'share %':>7} |")
    print(f"|{'-' * 22}|{'-' * 9}:|{'-' * 8}:|")
    for p in PHASES:
        print(f"| {p:<20} | {mean[p]:8.2f} | {100 * mean[p] / total:7.1f} |")
    print(f"| {'total':<20} | {total:8.2f} | {100.0:7.1f} |")

    def avg(k: str) -> float:
        return sum(it[k] for it in measured) / n

    print(
        f"\nenv steps {avg('env_steps'):.0f} (sum {avg('env_step_sum_s'):.2f} s), sandbox calls "
        f"{avg('sandbox_calls'):.0f} (sum {avg('sandbox_sum_s'):.2f} s), model turns {avg('model_turns'):.0f}, "
        f"trained tokens {avg('trained_tokens'):.0f}, slowest phase: {max(mean, key=mean.get)}"
    )
    print(f"setup (not in the table): build_inference {t_build:.1f} s, trainer model {t_model:.1f} s")

    out = {
        "config": str(Path(args.config).resolve().relative_to(ROOT))
        if Path(args.config).resolve().is_relative_to(ROOT)
        else args.config,
        "command": "python bench/e2e.py " + " ".join(sys.argv[1:]),
        "algo": cfg.trainer.algo.name,
        "prompts": cfg.run.prompts_per_batch,
        "samples": cfg.run.samples_per_prompt,
        "overrides": list(args.overrides),
        "warmup": args.warmup,
        "measured": n,
        "phases_mean_s": mean,
        "total_mean_s": total,
        "share": {p: mean[p] / total for p in PHASES},
        "slowest": max(mean, key=mean.get),
        "setup_s": {"build_inference": t_build, "trainer_model": t_model},
        "iterations": iters,
        "machine": machine(),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The main job: build every component from a RunConfig and run rollout -> update -> sync -> eval, with a run
directory, a live progress display, checkpoints, Ctrl-C safety and resume.

Data flows one way: env (sandbox) -> RolloutRunner (vLLM ids + logprobs) -> Trainer.update -> engine.load_weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alp_agent.config import RunConfig
from alp_agent.config_io import ConfigError, deep_merge, dump_config
from alp_agent.train.signals import graceful_termination, sigint_ignored

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from alp_agent.engine.base import Engine
    from alp_agent.rollout.runner import RolloutRunner
    from alp_agent.train.logging import MetricsWriter
    from alp_agent.train.trainer import Trainer
    from sandbox.base import Sandbox

log = logging.getLogger(__name__)


def make_env_fn(cfg: RunConfig, sandbox, eval_env: bool = False) -> tuple[Callable[[], Any], int]:
    """A factory of env instances sharing one sandbox, and the env's number of tasks.

    One probe env validates the kwargs here (a clear error instead of a failure inside the rollout) and reports
    `num_tasks`."""
    import gymnasium as gym

    from envs.registration import load_env_modules

    load_env_modules(cfg.env.imports)
    kwargs = dict(cfg.env.kwargs)
    if eval_env:
        kwargs = deep_merge(kwargs, cfg.eval.env_kwargs)
        if cfg.eval.max_turns is not None:
            kwargs["max_turns"] = cfg.eval.max_turns
    if cfg.env.id not in gym.registry:
        known = ", ".join(sorted(k for k in gym.registry if k.startswith("alp/")))
        raise ConfigError(f"env.id: unknown env {cfg.env.id!r}; registered: {known}")

    def env_fn():
        return gym.make(cfg.env.id, sandbox=sandbox, **kwargs)

    try:
        probe = env_fn()
    except Exception as e:  # noqa: BLE001 - any env constructor error is a config problem here
        what = "eval.env_kwargs" if eval_env else "env.kwargs"
        raise ConfigError(f"{what}: {cfg.env.id} rejected its options: {' '.join(str(e).split())}") from None
    try:
        return env_fn, int(probe.unwrapped.num_tasks)
    finally:
        probe.close()


@dataclass
class Components:
    """The inference side of a run, built once by `build_inference`: sandbox, engine, tokenizer, rollout runners."""

    cfg: RunConfig
    sandbox: Sandbox
    engine: Engine
    tokenizer: PreTrainedTokenizerBase
    runner: RolloutRunner
    eval_runner: RolloutRunner
    model_dir: str
    num_tasks: int
    num_eval_tasks: int
    closers: list[Callable[[], None]] = field(default_factory=list)  # called in reverse order by close()
    trainer: Trainer | None = None  # set by train() once built

    def close(self) -> None:
        _close_all(self.closers)


def _close_all(closers: list[Callable[[], None]]) -> None:
    for c in reversed(closers):
        with contextlib.suppress(Exception):
            c()


def build_inference(cfg: RunConfig) -> Components:
    """Sandbox, engine, tokenizer, rollout runners (train and eval). No trainer: `alp-agent eval/rollout` use this."""
    from alp_agent.engine.factory import PlacementError, make_engine
    from alp_agent.models import ModelResolutionError, load_tokenizer, resolve_model
    from alp_agent.rollout.runner import RolloutRunner
    from sandbox import make_sandbox

    try:
        model_dir = resolve_model(cfg.engine.model)
    except ModelResolutionError as e:
        raise ConfigError(f"engine.model: {e}") from None
    engine_cfg = cfg.engine.model_copy(update={"model": model_dir, "seed": cfg.run.seed})
    sandbox = make_sandbox(cfg.sandbox)
    closers: list[Callable[[], None]] = [sandbox.close]
    try:
        env_fn, num_tasks = make_env_fn(cfg, sandbox)
        eval_fn, num_eval_tasks = make_env_fn(cfg, sandbox, eval_env=True)
        tokenizer = load_tokenizer(model_dir)
        try:
            engine = make_engine(engine_cfg)  # one in-process vLLM, a process engine, or a pool of them
        except PlacementError as e:
            raise ConfigError(str(e)) from None
        closers.append(engine.close)
        rcfg = cfg.rollout.model_copy(update={"seed": cfg.run.seed})
        ecfg = rcfg.model_copy(
            update={"temperature": cfg.eval.temperature, "max_turns": cfg.eval.max_turns or rcfg.max_turns}
        )
        runner = RolloutRunner(engine, tokenizer, env_fn, rcfg)
        eval_runner = RolloutRunner(engine, tokenizer, eval_fn, ecfg)
        closers += [runner.close, eval_runner.close]
    except BaseException:
        _close_all(closers)
        raise
    return Components(
        cfg, sandbox, engine, tokenizer, runner, eval_runner, model_dir, num_tasks, num_eval_tasks, closers
    )


def build_trainer(cfg: RunConfig, model_dir: str, writer: MetricsWriter | None = None, device=None) -> Trainer:
    """The float32 policy loaded from `model_dir` on this rank's device (cuda:LOCAL_RANK on a GPU machine, one process:
    cuda:0; else the CPU) and its Trainer: the one place the job, the torchrun followers and the GPU check build it."""
    import torch

    from alp_agent.models import load_model
    from alp_agent.train import distributed as D
    from alp_agent.train.trainer import Trainer

    model = load_model(model_dir, dtype=torch.float32, device=device if device is not None else D.local_device())
    return Trainer(model, cfg.trainer, writer=writer)


def open_writer(cfg: RunConfig, run_dir: Path) -> MetricsWriter:
    """The run's metrics writer (metrics.jsonl, TensorBoard, wandb as configured)."""
    from alp_agent.train.logging import MetricsWriter

    return MetricsWriter(
        run_dir,
        tensorboard=cfg.run.tensorboard,
        wandb_project=cfg.run.wandb_project,
        run_config=cfg.model_dump(mode="json"),
    )


def run_eval(comps: Components, policy_version: int, num_tasks: int | None = None, samples: int | None = None):
    """Held-out evaluation: the first N eval tasks, `samples` each. Returns (metrics, per-problem records)."""
    from alp_agent.app.eval import aggregate, problem_records

    n = min(num_tasks if num_tasks is not None else comps.cfg.eval.num_tasks, comps.num_eval_tasks)
    k = samples or comps.cfg.eval.samples
    if n <= 0:
        return {}, []
    trajs = comps.eval_runner.run(list(range(n)), k, policy_version)
    records = problem_records(trajs)
    return aggregate(records), records


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """The main job. Returns a summary dict (accuracy before/after, last metrics, run dir).

    Under torchrun (several ranks, trainer.dist.strategy ddp or fsdp2) rank 0 runs this whole job (sandbox, vLLM,
    rollout, eval, logs, checkpoints) and the other ranks only train: see `_follow`."""
    from alp_agent.train import distributed as D

    if cfg.rollout.temperature <= 0:
        raise ConfigError(
            "rollout.temperature: training samples from the policy and divides logits by this "
            "temperature, so it must be > 0 (greedy decoding is for eval.temperature)"
        )
    dist_on = _init_distributed(cfg)  # False without torchrun: nothing below changes then
    if dist_on and not D.is_main():
        return _follow(cfg)
    if dist_on and cfg.engine.placement == "inprocess":
        # the trainers' process group is this process's default group, which an in-process vLLM would take for its
        # own (and wait for the other ranks in it): rank 0 runs the engine in a child process instead
        cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"placement": "process"})})
    run_dir = _prepare_run_dir(cfg, resume)
    summary = _lead(cfg, run_dir, resume, dist_on, progress)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _prepare_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """The run directory with the resolved config in it (refusing to overwrite checkpoints without --resume);
    torch threads and seed set."""
    import torch

    from alp_agent.train.checkpoint import latest_checkpoint

    run_dir = run_dir_of(cfg)
    if run_dir.exists() and latest_checkpoint(run_dir / "checkpoints") is not None and not resume:
        raise ConfigError(f"run directory {run_dir} already holds checkpoints: pass --resume, or set run.name=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    return run_dir


def _lead(cfg: RunConfig, run_dir: Path, resume: bool, dist_on: bool, progress: bool) -> dict[str, Any]:
    """Rank 0 (or the only process): build everything, resume if asked, run the loop, release the followers."""
    from alp_agent.app.progress import Progress
    from alp_agent.train import distributed as D
    from alp_agent.train import ranks
    from alp_agent.train.checkpoint import latest_checkpoint, load_checkpoint
    from alp_agent.train.hardware import keep_freed_memory, startup_lines
    from alp_agent.train.ranks import Command

    ckpt_dir = run_dir / "checkpoints"
    ui = Progress(enabled=progress, total=cfg.run.iterations)
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    with ui:
        ui.phase("starting: sandbox, vLLM, model")
        with D.launcher_env_hidden():  # a no-op without torchrun; under it, also with a single rank
            comps = build_inference(cfg)
        writer = open_writer(cfg, run_dir)
        comps.closers.append(writer.close)
        try:
            ckpt = latest_checkpoint(ckpt_dir) if resume else None
            if dist_on:  # the other ranks build their trainer (and load the checkpoint) with ours
                ranks.announce(Command.START, (comps.model_dir, str(ckpt) if ckpt is not None else None))
            trainer = comps.trainer = build_trainer(cfg, comps.model_dir, writer)
            for line in [keep_freed_memory(), *startup_lines(trainer, cfg.engine)]:  # dtype, floor (issue 15)
                ui.note(line)
            if ckpt is not None:
                load_checkpoint(trainer, ckpt)
                trainer.sync_weights(comps.engine)  # the engine must sample with the resumed weights
                ui.note(f"resumed from {ckpt} (batch {trainer.batch})")
            with contextlib.nullcontext(False) if dist_on else graceful_termination() as on_term:
                _note_stop_signals(ui, on_term)
                summary.update(_loop(cfg, comps, trainer, writer, ui, run_dir, ckpt_dir))
            if dist_on:
                trainer.release_followers()
        finally:
            comps.close()
    return summary


def _init_distributed(cfg: RunConfig) -> bool:
    """Join torchrun's process group when launched by it (refusing a config that would train one model per rank)."""
    from alp_agent.train import distributed as D

    if not D.launched_by_torchrun():
        return False
    if cfg.trainer.dist.strategy == "none":
        raise ConfigError(
            f"trainer.dist.strategy: torchrun started {os.environ.get('WORLD_SIZE')} ranks; set it to "
            "ddp or fsdp2 (or run without torchrun)"
        )
    return D.init_distributed(cfg.trainer.dist)


def _note_stop_signals(ui, on_term: bool) -> None:
    """Say how to stop the run cleanly when Ctrl-C cannot (a background job started with SIGINT ignored)."""
    if sigint_ignored():
        how = f"kill -TERM {os.getpid()}" if on_term else "the launcher"
        ui.note(f"Ctrl-C is ignored by this process (started in the background): stop it with {how}")


def _follow(cfg: RunConfig) -> dict[str, Any]:
    """Ranks > 0 under torchrun: no sandbox, engine, logs or progress display; wait for rank 0's start (and the
    checkpoint it resumes from), build the same trainer on this rank's device, then run what rank 0 announces
    (updates on its broadcast batch, weight gathers, checkpoint writes) until it releases us.

    If rank 0 fails, torchrun stops this process; Ctrl-C is left to rank 0, which finishes the batch and writes
    the checkpoint with our help (this rank ignores SIGINT)."""
    import signal

    import torch

    from alp_agent.train import distributed as D
    from alp_agent.train import ranks
    from alp_agent.train.checkpoint import load_checkpoint
    from alp_agent.train.ranks import Command

    with contextlib.suppress(ValueError):  # not the main thread (tests): keep the default handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    summary = {"run_dir": str(run_dir_of(cfg)), "rank": D.rank()}
    command, payload = ranks.receive()
    if command is not Command.START:  # rank 0 finished before training started
        return summary
    model_dir, ckpt = payload  # rank 0 resolved (and downloaded) the model already
    trainer = build_trainer(cfg, model_dir)
    if ckpt is not None:
        load_checkpoint(trainer, ckpt)
    trainer.follow()
    return summary


class _HeldOut:
    """The job's held-out evaluation: per-problem records to eval_batchNNNN.jsonl, accuracy to the progress display,
    metrics (when asked) to the writer."""

    def __init__(self, cfg: RunConfig, comps: Components, trainer: Trainer, writer, ui, run_dir: Path) -> None:
        self.cfg, self.comps, self.trainer, self.writer, self.ui, self.run_dir = (
            cfg,
            comps,
            trainer,
            writer,
            ui,
            run_dir,
        )

    def __call__(self, tag: str) -> dict[str, float] | None:
        if self.cfg.eval.num_tasks <= 0:
            return None
        self.ui.phase(f"eval ({tag})")
        m, records = run_eval(self.comps, self.trainer.policy_version)
        with open(self.run_dir / f"eval_batch{self.trainer.batch:04d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        self.ui.update(eval_acc=m.get("accuracy"))
        return m

    def logged(self, tag: str) -> float | None:
        """Evaluate, write the metrics as kind='eval', return the accuracy."""
        m = self(tag)
        if m is None:
            return None
        self.writer.write("eval", self.trainer.batch, m)
        return m.get("accuracy")

    def before(self) -> dict[str, Any]:
        """Accuracy before training: measured on a fresh run, read back on a resumed one."""
        path = self.run_dir / "summary_before.json"
        out: dict[str, Any] = {}
        if self.cfg.eval.before_and_after and self.trainer.batch == 0:
            out["accuracy_before"] = self.logged("before")
        elif path.is_file():
            out.update(json.loads(path.read_text()))
        path.write_text(json.dumps({"accuracy_before": out.get("accuracy_before")}))
        return out


def _loop(cfg, comps, trainer, writer, ui, run_dir, ckpt_dir) -> dict[str, Any]:
    """The CLI's job around `run_training` (the one outer loop): held-out eval before/after, sample episodes, the
    progress display, and a whole-batch checkpoint on Ctrl-C."""
    from alp_agent.app import samples
    from alp_agent.train.checkpoint import save_checkpoint
    from alp_agent.train.episode_log import log_sampled_episodes
    from alp_agent.train.loop import LoopConfig, LoopHooks, run_training

    held_out = _HeldOut(cfg, comps, trainer, writer, ui, run_dir)
    summary: dict[str, Any] = held_out.before()
    last: dict[str, float] = {}

    def after_batch(batch: int, metrics: dict) -> None:
        last.clear()
        last.update(metrics)
        ui.update(batch=batch, metrics=metrics)

    hooks = LoopHooks(
        phase=ui.phase,
        after_rollout=lambda batch, trajs: (
            samples.write_samples(run_dir, batch, trajs, comps.tokenizer, cfg.run.sample_episodes),
            log_sampled_episodes(run_dir, batch, trajs, comps.tokenizer, trainer, cfg.run.sample_episodes),
        ),
        after_batch=after_batch,
        # the last batch is evaluated once, as "after", below
        evaluate=lambda _v: held_out(f"batch {trainer.batch}") if trainer.batch < cfg.run.iterations else None,
    )
    interrupted = False
    try:
        run_training(
            trainer, comps.runner, comps.engine, LoopConfig.from_run_config(cfg, comps.num_tasks, str(ckpt_dir)), hooks
        )
    except KeyboardInterrupt:
        interrupted = True
        ui.note("interrupted: writing a checkpoint, then exiting (continue with --resume)")
        save_checkpoint(trainer, ckpt_dir, keep_last=cfg.run.keep_checkpoints)
    writer.flush()
    summary.update(interrupted=interrupted, batches=trainer.batch, last_metrics=last)
    if not interrupted:
        if cfg.run.checkpoint_at_end:
            save_checkpoint(trainer, ckpt_dir, keep_last=cfg.run.keep_checkpoints)
        if cfg.eval.before_and_after:
            summary["accuracy_after"] = held_out.logged("after")
    return summary

"""The outer loop: rollout -> `Trainer.update` -> weight sync -> eval -> checkpoint, over any rollout callable.

Kept apart from the trainer (which owns one update) so the loop, its task stream, Ctrl-C handling and the optional
asynchronous rollout read in one place. The CLI's job (`alp_agent.app.job`) and the GPU check call `run_training` with
`LoopHooks` instead of keeping their own copy.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train.signals import deferred_interrupt
from alp_agent.train.trainer import Trainer

if TYPE_CHECKING:
    from alp_agent.config import RunConfig

RolloutFn = Callable[[list[int], int, int], list[Trajectory]]  # (task_indices, n_per_task, policy_version)


class Sampler(Protocol):
    """What the loop samples with (alp_agent.rollout.runner.RolloutRunner is one): a batch of episodes for the given
    tasks with the engine's current weights (recorded as `policy_version`), and the metrics of the last run."""

    last_metrics: dict[str, float]

    def run(self, task_indices: list[int], n_per_task: int, policy_version: int) -> list[Trajectory]: ...


class FunctionSampler:
    """A plain function (task_indices, n_per_task, policy_version) -> trajectories as a Sampler without metrics."""

    def __init__(self, fn: RolloutFn) -> None:
        self.run = fn
        self.last_metrics: dict[str, float] = {}


@dataclass
class LoopConfig:
    """The outer loop's schedule (the CLI fills it from RunConfig with `from_run_config`)."""

    num_tasks: int  # size of the training task set (the stream draws seeded permutations of it)
    num_batches: int  # stop when trainer.batch reaches this (a resume continues up to it)
    prompts_per_batch: int
    n_per_task: int  # episodes per task: the GRPO group size
    seed: int = 0  # seed of the task stream
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # batches; 0 = never inside the loop
    keep_checkpoints: int | None = None
    eval_every: int = 0  # batches; 0 = never (needs hooks.evaluate)
    async_rollout: bool = False  # sample batch k+1 while the trainer updates on batch k
    max_staleness: int = 1  # async: most policy versions between sampling weights and the update that consumes them
    release_kv_cache: bool = False  # before an update with no rollout in flight: the engine's KV cache memory to the OS

    @classmethod
    def from_run_config(cls, cfg: RunConfig, num_tasks: int, checkpoint_dir: str | None = None) -> LoopConfig:
        r = cfg.run
        return cls(
            num_tasks,
            r.iterations,
            r.prompts_per_batch,
            r.samples_per_prompt,
            seed=r.seed,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=r.checkpoint_every,
            keep_checkpoints=r.keep_checkpoints,
            eval_every=cfg.eval.every,
            async_rollout=r.async_rollout,
            max_staleness=r.max_staleness,
            release_kv_cache=cfg.engine.release_kv_cache,
        )


def task_cursor(num_tasks: int, per_batch: int, start: int = 0, seed: int = 0) -> Iterator[tuple[int, list[int]]]:
    """Deterministic stream of task indices: epochs of seeded permutations; yields (cursor_after, indices)."""
    cursor = start
    while True:
        out = []
        for _ in range(per_batch):
            epoch, pos = divmod(cursor, num_tasks)
            perm = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed + epoch))
            out.append(int(perm[pos]))
            cursor += 1
        yield cursor, out


def _no_op(*_args) -> None:
    return None


@dataclass
class LoopHooks:
    """What a caller (the CLI's job) adds around the loop without a second copy of it."""

    phase: Callable[[str], None] = _no_op  # "rollout", "update", "weight sync", "checkpoint"
    after_rollout: Callable[[int, list[Trajectory]], None] = _no_op  # (batch, trajs), e.g. write sample episodes
    after_batch: Callable[[int, dict], None] = _no_op  # (batch, metrics incl. timing)
    # evaluate(policy_version) -> metrics written as kind='eval' every `eval_every` batches (None: nothing to write)
    evaluate: Callable[[int], dict[str, float] | None] | None = None


@dataclass
class _Rollout:
    """One rollout batch, running (async mode: in a background thread) or done."""

    cursor: int  # task-stream position after this batch (saved as trainer.data_cursor once it is consumed)
    version: int  # policy version of the weights the engine holds for this whole rollout (recorded per trajectory)
    future: concurrent.futures.Future  # -> (trajectories, rollout metrics, seconds)


def _start_rollout(sampler: Sampler, stream, n_per_task: int, version: int, background: bool) -> _Rollout:
    """Draw the next tasks and sample them with the engine's current weights (`version`), here or in a thread."""
    cursor, tasks = next(stream)
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def work() -> None:
        t0 = time.perf_counter()
        try:
            trajs = sampler.run(tasks, n_per_task, version)
            # copy the sampler's metrics now, before the next rollout overwrites them
            fut.set_result((trajs, dict(sampler.last_metrics or {}), time.perf_counter() - t0))
        except BaseException as exc:  # noqa: BLE001 - re-raised where the loop takes the result
            fut.set_exception(exc)

    if background:
        threading.Thread(target=work, name="alp-rollout", daemon=True).start()
    else:
        work()
    return _Rollout(cursor, version, fut)


class _Loop:
    """The state of one `run_training` call: the task stream, the engine's weight version, the rollout in flight."""

    def __init__(self, trainer: Trainer, sampler: Sampler, engine, cfg: LoopConfig, hooks: LoopHooks) -> None:
        self.trainer, self.sampler, self.engine, self.cfg, self.hooks = trainer, sampler, engine, cfg, hooks
        self.stream = task_cursor(cfg.num_tasks, cfg.prompts_per_batch, trainer.data_cursor, cfg.seed)
        self.engine_version = trainer.policy_version  # the weights the engine holds
        self.pending: _Rollout | None = None

    def sync(self) -> float:
        """Bring the engine to the trainer's weights; only ever called with no rollout in flight."""
        if self.engine is None or self.engine_version == self.trainer.policy_version:
            return 0.0
        assert self.pending is None or self.pending.future.done(), "weight sync while a rollout is in flight"
        self.hooks.phase("weight sync")
        t0 = time.perf_counter()
        self.trainer.sync_weights(self.engine)
        self.engine_version = self.trainer.policy_version
        return time.perf_counter() - t0

    def start(self, background: bool) -> _Rollout:
        version = self.engine_version if self.engine is not None else self.trainer.policy_version
        return _start_rollout(self.sampler, self.stream, self.cfg.n_per_task, version, background)

    def batch(self) -> dict[str, float]:
        """Take this batch's rollout (start the next one in async mode), update, sync; metrics with timing."""
        tr, cfg = self.trainer, self.cfg
        self.hooks.phase("rollout")
        t0 = time.perf_counter()
        current, self.pending = self.pending or self.start(background=False), None
        trajs, roll_m, t_roll = current.future.result()
        t_wait = time.perf_counter() - t0
        self.hooks.after_rollout(tr.batch, trajs)
        t_sync = 0.0
        if cfg.async_rollout and tr.batch + 1 < cfg.num_batches:
            # the next batch is consumed after this update, at version policy_version + 1
            if tr.policy_version + 1 - self.engine_version > cfg.max_staleness:
                with deferred_interrupt():
                    t_sync += self.sync()
            self.pending = self.start(background=True)
        if self.engine is not None and cfg.release_kv_cache and self.pending is None:
            roll_m["engine/kv_released_gib"] = self.engine.release_kv_cache() / 2**30
        self.hooks.phase("update")
        with deferred_interrupt():
            tr.data_cursor = current.cursor
            m = tr.update(trajs)
            if not cfg.async_rollout:
                t_sync += self.sync()
        timing = {"time/rollout": t_roll, "time/sync": t_sync}
        if cfg.async_rollout:
            timing["time/rollout_wait"] = t_wait  # how long the loop waited for its batch (0: fully overlapped)
        tr.log("rollout", tr.batch, {**roll_m, **timing})
        m.update(timing)
        m.update(roll_m)
        return m

    def after(self) -> None:
        """Eval and checkpoint when their schedule says so."""
        tr, cfg = self.trainer, self.cfg
        if self.hooks.evaluate is not None and cfg.eval_every > 0 and tr.batch % cfg.eval_every == 0:
            if self.pending is not None:  # the engine must sample eval with the current weights: finish it first
                concurrent.futures.wait([self.pending.future])
            with deferred_interrupt():
                self.sync()
            em = self.hooks.evaluate(tr.policy_version)
            if em:
                tr.log("eval", tr.batch, em)
        if cfg.checkpoint_dir and cfg.checkpoint_every > 0 and tr.batch % cfg.checkpoint_every == 0:
            from alp_agent.train.checkpoint import save_checkpoint

            self.hooks.phase("checkpoint")
            with deferred_interrupt():
                save_checkpoint(tr, cfg.checkpoint_dir, keep_last=cfg.keep_checkpoints)


def run_training(
    trainer: Trainer, sampler: Sampler, engine, cfg: LoopConfig, hooks: LoopHooks | None = None
) -> list[dict[str, float]]:
    """rollout -> update -> sync -> (eval) -> (checkpoint), until `trainer.batch == cfg.num_batches` (resumes from it).

    `sampler` is e.g. a `RolloutRunner(engine, tokenizer, env_fn, cfg)`; `engine` gets the new weights after every
    update (pass None to skip syncing, e.g. an HF engine sharing the trainer's model). The data cursor is saved in
    checkpoints so a resume continues the stream. Update, sync and checkpoint run with Ctrl-C held
    (`deferred_interrupt`), so a KeyboardInterrupt only ever leaves the trainer between whole batches. The engine
    must hold the trainer's current weights when this starts (a resume syncs them first).

    async_rollout: the rollout of batch k+1 runs in a background thread while the trainer updates on batch k, so
    the sampler and the trainer work at the same time. Weights are loaded into the engine only between rollouts
    (never while a request is in flight), so every trajectory's `policy_version` is exactly the version of the
    weights that sampled all of its tokens. Before starting a rollout the loop syncs the newest weights if, without
    them, the batch would be consumed more than `max_staleness` versions after the weights that sample it; so
    staleness (trainer version at update - sampling version, logged as staleness/mean and /max) is 1 from the
    second batch on with max_staleness=1, and alternates 1, 2 with 2 (half the syncs). The first batch has
    staleness 0. Checkpoints save the cursor of the last consumed batch: a batch sampled ahead is re-sampled after
    a resume. The engine gets the final weights before this returns. Needs an engine (the versions are its own).
    """
    if cfg.async_rollout and (engine is None or cfg.max_staleness < 1):
        raise ValueError("async_rollout needs an engine to load weights into and max_staleness >= 1")
    hooks = hooks or LoopHooks()
    loop = _Loop(trainer, sampler, engine, cfg, hooks)
    history = []
    while trainer.batch < cfg.num_batches:
        m = loop.batch()
        hooks.after_batch(trainer.batch, m)
        loop.after()
        history.append(m)
    with deferred_interrupt():
        loop.sync()  # async mode: the last update's weights were not synced yet
    return history

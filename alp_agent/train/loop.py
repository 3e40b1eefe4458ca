"""The outer loop: rollout -> `Trainer.update` -> weight sync -> eval -> checkpoint, over any rollout callable.

Kept apart from the trainer (which owns one update) so the loop, its task stream, Ctrl-C handling and the optional
asynchronous rollout read in one place. The CLI's job (`alp_agent.app.job`) and the GPU check call `run_training` with
`LoopHooks` instead of keeping their own copy.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train.trainer import Trainer

RolloutFn = Callable[[list[int], int, int], list[Trajectory]]  # (task_indices, n_per_task, policy_version)


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


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C until the block ends, so an update is never cut between optimizer steps (a checkpoint written
    after it is then consistent); the interrupt is re-raised when the block exits."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    old = signal.signal(signal.SIGINT, lambda *_: pending.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending:
        raise KeyboardInterrupt


def _no_op(*_args) -> None:
    return None


@dataclass
class LoopHooks:
    """What a caller (the CLI's job) adds around the loop without a second copy of it."""

    phase: Callable[[str], None] = _no_op  # "rollout", "update", "weight sync", "checkpoint"
    after_rollout: Callable[[int, list[Trajectory]], None] = _no_op  # (batch, trajs), e.g. write sample episodes
    after_batch: Callable[[int, dict], None] = _no_op  # (batch, metrics incl. timing)


@dataclass
class _Rollout:
    """One rollout batch, running (async mode: in a background thread) or done."""

    cursor: int  # task-stream position after this batch (saved as trainer.data_cursor once it is consumed)
    version: int  # policy version of the weights the engine holds for this whole rollout (recorded per trajectory)
    future: object  # concurrent.futures.Future -> (trajectories, rollout metrics, seconds)


def _start_rollout(rollout: RolloutFn, stream, n_per_task: int, version: int, background: bool) -> _Rollout:
    """Draw the next tasks and sample them with the engine's current weights (`version`), here or in a thread."""
    import concurrent.futures as cf
    import threading

    cursor, tasks = next(stream)
    fut: cf.Future = cf.Future()

    def work() -> None:
        t0 = time.perf_counter()
        try:
            trajs = rollout(tasks, n_per_task, version)
            # RolloutRunner.run keeps its metrics (throughput, drift, finish reasons) on the runner: copy them now,
            # before the next rollout overwrites them
            roll_m = dict(getattr(getattr(rollout, "__self__", None), "last_metrics", None) or {})
            fut.set_result((trajs, roll_m, time.perf_counter() - t0))
        except BaseException as exc:  # noqa: BLE001 - re-raised where the loop takes the result
            fut.set_exception(exc)

    if background:
        threading.Thread(target=work, name="alp-rollout", daemon=True).start()
    else:
        work()
    return _Rollout(cursor, version, fut)


def run_training(
    trainer: Trainer,
    rollout: RolloutFn,
    engine,
    num_tasks: int,
    num_batches: int,
    prompts_per_batch: int,
    n_per_task: int,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    eval_fn: Callable[[int], dict[str, float] | None] | None = None,
    eval_every: int = 0,
    seed: int = 0,
    keep_checkpoints: int | None = None,
    hooks: LoopHooks | None = None,
    async_rollout: bool = False,
    max_staleness: int = 1,
) -> list[dict[str, float]]:
    """rollout -> update -> sync -> (eval) -> (checkpoint), until `trainer.batch == num_batches` (resumes from it).

    `rollout` is e.g. `RolloutRunner(engine, tokenizer, env_fn, cfg).run`; `engine` gets the new weights after
    every update (pass None to skip syncing, e.g. an HF engine sharing the trainer's model). eval_fn(policy_version)
    returns metrics written as kind='eval' (None: nothing to write). The data cursor is saved in checkpoints so a
    resume continues the stream. Update, sync and checkpoint run with Ctrl-C held (`deferred_interrupt`), so a
    KeyboardInterrupt only ever leaves the trainer between whole batches. The engine must hold the trainer's
    current weights when this starts (a resume syncs them first).

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
    from alp_agent.train.checkpoint import save_checkpoint

    if async_rollout and (engine is None or max_staleness < 1):
        raise ValueError("async_rollout needs an engine to load weights into and max_staleness >= 1")
    hooks = hooks or LoopHooks()
    history = []
    stream = task_cursor(num_tasks, prompts_per_batch, trainer.data_cursor, seed)
    engine_version = trainer.policy_version  # the weights the engine holds
    pending: _Rollout | None = None

    def sync() -> float:
        """Bring the engine to the trainer's weights; only ever called with no rollout in flight."""
        nonlocal engine_version
        if engine is None or engine_version == trainer.policy_version:
            return 0.0
        assert pending is None or pending.future.done(), "weight sync while a rollout is in flight"
        hooks.phase("weight sync")
        t0 = time.perf_counter()
        trainer.sync_weights(engine)
        engine_version = trainer.policy_version
        return time.perf_counter() - t0

    def start(background: bool) -> _Rollout:
        version = engine_version if engine is not None else trainer.policy_version
        return _start_rollout(rollout, stream, n_per_task, version, background)

    while trainer.batch < num_batches:
        hooks.phase("rollout")
        t0 = time.perf_counter()
        current, pending = pending or start(background=False), None
        trajs, roll_m, t_roll = current.future.result()
        t_wait = time.perf_counter() - t0
        hooks.after_rollout(trainer.batch, trajs)
        t_sync = 0.0
        if async_rollout and trainer.batch + 1 < num_batches:
            # the next batch is consumed after this update, at version policy_version + 1
            if trainer.policy_version + 1 - engine_version > max_staleness:
                with deferred_interrupt():
                    t_sync += sync()
            pending = start(background=True)
        hooks.phase("update")
        with deferred_interrupt():
            trainer.data_cursor = current.cursor
            m = trainer.update(trajs)
            if not async_rollout:
                t_sync += sync()
        timing = {"time/rollout": t_roll, "time/sync": t_sync}
        if async_rollout:
            timing["time/rollout_wait"] = t_wait  # how long the loop waited for its batch (0: fully overlapped)
        trainer._write("rollout", trainer.batch, {**roll_m, **timing})
        timing.update(roll_m)
        m.update(timing)
        hooks.after_batch(trainer.batch, m)
        if eval_fn is not None and eval_every > 0 and trainer.batch % eval_every == 0:
            if pending is not None:  # the engine must sample eval with the current weights: finish the rollout first
                import concurrent.futures as cf

                cf.wait([pending.future])
            with deferred_interrupt():
                sync()
            em = eval_fn(trainer.policy_version)
            if em:
                trainer._write("eval", trainer.batch, em)
        if checkpoint_dir and checkpoint_every > 0 and trainer.batch % checkpoint_every == 0:
            hooks.phase("checkpoint")
            with deferred_interrupt():
                save_checkpoint(trainer, checkpoint_dir, keep_last=keep_checkpoints)
        history.append(m)
    with deferred_interrupt():
        sync()  # async mode: the last update's weights were not synced yet
    return history

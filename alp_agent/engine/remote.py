"""ProcessEngine: a VLLMEngine in its own child process, behind the same Engine interface.

Why a process: an engine can then own its GPU(s) or CPU cores (CUDA_VISIBLE_DEVICES / OpenMP binding are
per-process), several engines can serve one trainer (pool.py), and a vLLM crash ends one child, not the training
run. The price is that weights must cross the process boundary; they do so through shared memory
(shared_weights.py): one memcpy into buffers the child already maps, then a one-line "load" message. Nothing goes
through disk and no tensor is pickled by value.

Protocol (two one-way pipes, messages are small tuples):
    parent -> child  ("generate", rid, prompt_ids, SamplingConfig) | ("weights", SharedWeights) | ("load", rid)
                     | ("close",)
    child -> parent  ("ready", info) | ("failed", text) | ("result", rid, Generation) | ("error", rid, exception)
                     | ("loaded", rid) | ("closed",)
The child drives a normal VLLMEngine, so continuous batching, logprob semantics and "weights change only between
requests" are exactly the in-process engine's.

Start-up is spawn (never fork: the parent holds torch/OpenMP threads and maybe a CUDA context).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import threading
import traceback
import weakref
from collections.abc import Callable, Mapping
from functools import partial

import torch

from alp_agent.engine.base import FutureEngine, SamplingConfig
from alp_agent.engine.config import EngineConfig
from alp_agent.engine.shared_weights import SharedWeights

log = logging.getLogger(__name__)


class EngineProcessError(RuntimeError):
    """The engine's child process failed to start or exited while requests were waiting."""


# ---------------------------------------------------------------------------------------------- the child side
def _picklable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (NonFiniteLogprobsError, ValueError), else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure: send the text instead
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _load(engine, weights: SharedWeights | None) -> None:
    """Load the weights last sent in the shared buffers (the parent always sends them before the first load)."""
    if weights is None:
        raise RuntimeError("weight load requested before any shared weights were sent")
    engine.load_weights(weights.views())


def _serve(config: dict, env: dict[str, str], cmd, res) -> None:
    """Child main: build the VLLMEngine, then turn pipe messages into engine calls until told to close."""
    os.environ.update(env)  # before vLLM (and CUDA) initialise: device visibility and OpenMP binding are per process
    from alp_agent.engine.vllm_engine import VLLMEngine

    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        with send_lock:
            res.send(msg)

    try:
        engine = VLLMEngine(EngineConfig.model_validate(config))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        send(("failed", traceback.format_exc()))
        return
    send(("ready", {"pid": os.getpid(), "max_model_len": engine.max_model_len}))

    def reply(rid: int, fut: cf.Future) -> None:
        exc = fut.exception()
        send(("error", rid, _picklable(exc)) if exc is not None else ("result", rid, fut.result()))

    def control(rid: int, fn: Callable[[], object]) -> None:
        """A control call (weight load, KV release): VLLMEngine runs it when no request is in flight, so it runs
        off the reading thread, which keeps taking requests meanwhile."""
        try:
            send(("result", rid, fn()))
        except Exception as exc:  # noqa: BLE001 - forwarded to the parent's future
            send(("error", rid, _picklable(exc)))

    weights: SharedWeights | None = None
    try:
        while True:
            try:
                msg = cmd.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            kind = msg[0]
            if kind == "generate":
                _, rid, prompt, sampling = msg
                try:
                    engine.submit(prompt, sampling).add_done_callback(lambda f, rid=rid: reply(rid, f))
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone, on its future
                    send(("error", rid, _picklable(exc)))
            elif kind == "weights":
                weights = msg[1]
            elif kind in ("load", "release"):
                fn = partial(_load, engine, weights) if kind == "load" else engine.release_kv_cache
                threading.Thread(target=control, args=(msg[1], fn), daemon=True).start()
            elif kind == "close":
                break
    finally:
        engine.close()
        with contextlib.suppress(BrokenPipeError, OSError):
            send(("closed",))


# ---------------------------------------------------------------------------------------------- the parent side
_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """A forgotten engine must not keep the interpreter waiting on its (non-daemon) child at exit."""
    for eng in list(_live):
        eng.close()


class ProcessEngine(FutureEngine):
    """`ProcessEngine(EngineConfig(...), env={...})`: same behaviour as `VLLMEngine(config)`, in a child process.

    env: variables set in the child before vLLM starts (e.g. CUDA_VISIBLE_DEVICES, VLLM_CPU_OMP_THREADS_BIND);
    they override the parent's. wait=False returns at once; call `wait_ready()` before use (lets a pool start
    several engines in parallel).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        start_timeout_s: float = 900.0,
        **overrides,
    ):
        from alp_agent.models import resolve_model

        config = EngineConfig.model_validate({**(config or EngineConfig()).model_dump(), **overrides})
        # resolve (and maybe download/convert) once, here: the child gets a plain folder
        self.config = config.model_copy(update={"model": resolve_model(config.model)})
        self.model_path = self.config.model
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        ctx = mp.get_context("spawn")
        cmd_r, self._cmd = ctx.Pipe(duplex=False)
        self._res, res_w = ctx.Pipe(duplex=False)
        # not a daemon: vLLM with tensor_parallel_size > 1 starts worker processes of its own
        self._proc = ctx.Process(
            target=_serve, args=(self.config.model_dump(), self.env, cmd_r, res_w), name="alp-vllm-engine"
        )
        self._proc.start()
        cmd_r.close()
        res_w.close()
        self._send_lock = threading.Lock()
        self._pending: dict[int, cf.Future] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        self._dead = False  # the child is gone (set by the reader): new requests fail at once
        self._ready = False
        self._weights: SharedWeights | None = None  # buffers this engine last filled itself
        self._sent_weights: SharedWeights | None = None  # buffers the child holds
        self.pid = self._proc.pid
        self.max_model_len = self.config.max_model_len
        _live.add(self)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the child's vLLM is up; raises EngineProcessError with the child's traceback if it failed."""
        if self._ready:
            return
        try:
            if not self._res.poll(self.start_timeout_s):
                raise EngineProcessError(f"vLLM engine process did not start within {self.start_timeout_s:.0f} s")
            msg = self._res.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            raise EngineProcessError(
                f"vLLM engine process exited during start-up (code {self._proc.exitcode})"
            ) from None
        except EngineProcessError:
            self.close()
            raise
        if msg[0] != "ready":
            self.close()
            raise EngineProcessError(f"vLLM engine process failed to start:\n{msg[1]}")
        self.max_model_len = int(msg[1]["max_model_len"])
        self._ready = True
        self._reader = threading.Thread(target=self._read, name="alp-engine-reader", daemon=True)
        self._reader.start()

    # --- requests -----------------------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._cmd.send(msg)
        except (BrokenPipeError, OSError):
            raise EngineProcessError(f"vLLM engine process {self.pid} is gone (code {self._proc.exitcode})") from None

    def _new_future(self) -> tuple[int, cf.Future]:
        if self._closed:
            raise RuntimeError("ProcessEngine is closed")
        if not self._ready:
            self.wait_ready()
        rid, fut = next(self._ids), cf.Future()
        with self._pending_lock:
            if self._dead:
                raise EngineProcessError(f"vLLM engine process {self.pid} exited (code {self._proc.exitcode})")
            self._pending[rid] = fut
        return rid, fut

    def submit(self, prompt: list[int], sampling: SamplingConfig) -> cf.Future:
        """Queue one request in the child; the future resolves to its Generation."""
        rid, fut = self._new_future()
        self._send(("generate", rid, list(prompt), sampling))
        return fut

    def _read(self) -> None:
        """Resolve futures from the child's replies; when the child goes away, fail whatever still waits."""
        while True:
            try:
                msg = self._res.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "closed":
                break
            with self._pending_lock:
                fut = self._pending.pop(msg[1], None)
            if fut is None:
                continue
            if msg[0] == "error":
                fut.set_exception(msg[2])
            else:
                fut.set_result(msg[2] if msg[0] == "result" else None)
        self._fail_pending()

    def _fail_pending(self) -> None:
        with self._pending_lock:
            self._dead = True
            waiting, self._pending = list(self._pending.values()), {}
        if waiting:
            self._proc.join(1)
            err = EngineProcessError(f"vLLM engine process {self.pid} exited (code {self._proc.exitcode})")
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(err)

    # --- weights ------------------------------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype | None:
        from alp_agent.engine.vllm_engine import weight_dtype

        return weight_dtype(self.config)

    def load_shared(self, weights: SharedWeights) -> cf.Future:
        """Tell the child to load from `weights` (sent once per buffer set); resolves when the child has loaded.
        The caller must not refill the buffers before that."""
        rid, fut = self._new_future()
        if weights is not self._sent_weights:
            self._send(("weights", weights))
            self._sent_weights = weights
        self._send(("load", rid))
        return fut

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy the weights into this engine's shared buffers (cast to the engine's dtype) and load them there."""
        if self._weights is None or not self._weights.matches(state_dict):
            self._weights = SharedWeights.for_state_dict(state_dict, self.weight_dtype)
        self._weights.fill(state_dict)
        self.load_shared(self._weights).result()

    def release_kv_cache(self) -> int:
        """The child's `VLLMEngine.release_kv_cache` (bytes released in the child)."""
        rid, fut = self._new_future()
        self._send(("release", rid))
        return int(fut.result())

    def close(self) -> None:
        """Ask the child to shut vLLM down; terminate it if it does not within 30 s."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        with contextlib.suppress(EngineProcessError):
            self._send(("close",))
        self._proc.join(30)
        if self._proc.is_alive():
            log.warning("vLLM engine process %s did not stop; terminating it", self.pid)
            self._proc.terminate()
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        if self._ready:
            self._reader.join(5)
        self._fail_pending()
        for conn in (self._cmd, self._res):
            conn.close()

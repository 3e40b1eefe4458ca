"""Host side of the session protocol, shared by both backends.

A `Worker` is one running session server (a bwrap jail or a container) reached through a byte channel. A
`WorkerSession` turns a sequence of workers into one persistent `Session`: when a worker dies or times out it is
killed, and the next run() gets a fresh worker and `state_lost=True`.
"""

from __future__ import annotations

import abc
import json
import logging
import signal
import threading
import time
from collections.abc import Callable

from sandbox.base import ExecResult, ExecStatus, Sandbox, Session
from sandbox.config import SandboxConfig
from sandbox.pool import SessionLimiter, WarmPool
from sandbox.server import HEADER, MAGIC, decode_response, encode_frame

log = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
START_TIMEOUT_S = 30.0


class WorkerDied(Exception):
    """The server process is gone (or spoke garbage); `reason` says why, for the model and the logs."""

    def __init__(self, reason: str, status: ExecStatus = ExecStatus.CRASHED, exit_code: int | None = None):
        super().__init__(reason)
        self.reason, self.status, self.exit_code = reason, status, exit_code


class WorkerTimeout(Exception):
    pass


class Worker(abc.ABC):
    """One session server behind a byte channel. Not thread-safe: a WorkerSession serialises calls."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.hello: dict = {}
        self._killed = False
        self._kill_lock = threading.Lock()

    # transport, implemented by backends ---------------------------------------------------------------------
    @abc.abstractmethod
    def _send(self, data: bytes) -> None:
        """Write all bytes to the server's stdin; raise WorkerDied if the channel is closed."""

    @abc.abstractmethod
    def _recv(self, deadline: float) -> bytes:
        """Return the next chunk of server stdout (non-empty), b'' at EOF; raise WorkerTimeout at the deadline."""

    def kill(self) -> None:
        """Kill every process of this worker and release its resources. Idempotent (the first call wins, from any
        thread), never raises."""
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
        self._terminate()

    @abc.abstractmethod
    def _terminate(self) -> None:
        """Backend-specific kill and clean-up; `kill` guarantees it runs once."""

    def death_reason(self) -> WorkerDied:
        """Called after EOF / a broken frame: explain how the server ended (exit code, signal, OOM)."""
        return WorkerDied("the Python process died")

    # framing --------------------------------------------------------------------------------------------------
    def _read_frame(self, deadline: float) -> tuple[dict, bytes, bytes]:
        while True:
            if len(self._buf) >= HEADER.size:
                magic, n = HEADER.unpack_from(self._buf)
                if magic != MAGIC or n > MAX_RESPONSE_BYTES:
                    raise WorkerDied("protocol corrupted (cell wrote to the server's channel)")
                if len(self._buf) >= HEADER.size + n:
                    body = bytes(self._buf[HEADER.size : HEADER.size + n])
                    del self._buf[: HEADER.size + n]
                    try:
                        return decode_response(body)
                    except (ValueError, KeyError) as e:
                        raise WorkerDied(f"protocol corrupted: {e}") from None
            chunk = self._recv(deadline)
            if not chunk:
                raise self.death_reason()
            self._buf += chunk

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        meta, _, _ = self._read_frame(time.monotonic() + timeout)
        if not meta.get("ready"):
            raise WorkerDied(f"unexpected hello from server: {meta}", ExecStatus.SANDBOX_ERROR)
        self.hello = meta

    def call(self, code: str, timeout: float) -> tuple[dict, bytes, bytes]:
        self._send(encode_frame(json.dumps({"op": "run", "code": code}).encode("utf-8", "surrogatepass")))
        return self._read_frame(time.monotonic() + timeout)


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def died_from_returncode(rc: int | None) -> WorkerDied:
    """Map a server's exit status (negative or 128+N for signals, as bwrap reports) to a clear reason."""
    if rc is None:
        return WorkerDied("the Python process closed its channel")
    sig = -rc if rc < 0 else (rc - 128 if rc > 128 else 0)
    if sig == signal.SIGXCPU:
        return WorkerDied("CPU time limit exceeded; the process was killed", ExecStatus.TIMEOUT, rc)
    if sig == signal.SIGKILL:
        return WorkerDied("the Python process was killed (SIGKILL; out of memory or killed by the cell)", exit_code=rc)
    if sig:
        return WorkerDied(f"the Python process died from {signal_name(sig)}", exit_code=rc)
    return WorkerDied(f"the Python process exited with code {rc} (os._exit or similar)", exit_code=rc)


class WorkerSession(Session):
    """A persistent session over replaceable workers. Thread-safe (calls are serialised)."""

    def __init__(self, get_worker: Callable[[], Worker], default_timeout: float, on_close: Callable[[], None]):
        self._get_worker = get_worker
        self._default_timeout = default_timeout
        self._on_close = on_close
        self._lock = threading.Lock()
        self._worker: Worker | None = None
        self._state_lost = False
        self._closed = False
        self._lost_reason = ""

    @property
    def worker(self) -> Worker | None:
        return self._worker

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        timeout = self._default_timeout if timeout is None else timeout
        with self._lock:
            if self._closed:
                return ExecResult(ExecStatus.SANDBOX_ERROR, stderr="session is closed")
            start = time.perf_counter()
            state_lost = self._state_lost
            info: dict = {}
            if self._worker is None:
                try:
                    self._worker = self._get_worker()
                except Exception as e:  # noqa: BLE001 - backend failure: report, do not raise into the env
                    return ExecResult(ExecStatus.SANDBOX_ERROR, stderr=f"sandbox failed to start: {e}")
            if state_lost:
                info["state_lost_reason"] = self._lost_reason
                self._state_lost = False
            try:
                meta, out, err = self._worker.call(code, timeout)
            except WorkerTimeout:
                self._discard_worker(f"the previous call timed out after {timeout:g}s")
                return ExecResult(
                    ExecStatus.TIMEOUT,
                    stderr=f"TimeoutError: execution exceeded {timeout:g}s; the session was restarted",
                    duration_s=time.perf_counter() - start,
                    state_lost=state_lost,
                    info=info,
                )
            except WorkerDied as e:
                self._discard_worker(f"the previous call crashed: {e.reason}")
                return ExecResult(
                    e.status,
                    stderr=f"{e.reason}; the session was restarted",
                    duration_s=time.perf_counter() - start,
                    state_lost=state_lost,
                    exit_code=e.exit_code,
                    info=info,
                )
            status = ExecStatus(meta["status"])
            if status == ExecStatus.OK and meta.get("truncated"):
                status = ExecStatus.OUTPUT_LIMIT
            return ExecResult(
                status,
                stdout=out.decode("utf-8", "replace"),
                stderr=err.decode("utf-8", "replace"),
                duration_s=time.perf_counter() - start,
                truncated=bool(meta.get("truncated")),
                state_lost=state_lost,
                exit_code=meta.get("exit_code"),
                info=info,
            )

    def _discard_worker(self, reason: str) -> None:
        if self._worker is not None:
            self._worker.kill()
        self._worker = None
        self._state_lost = True
        self._lost_reason = reason

    def close(self) -> None:
        """Kill the worker at once (a cell still running in another thread then returns `crashed`), then free."""
        if self._closed:
            return
        self._closed = True
        w = self._worker
        if w is not None:
            w.kill()  # idempotent and thread-safe; do not wait for a running call's lock
        with self._lock:
            self._worker = None
        self._on_close()


class PooledSandbox(Sandbox):
    """A Sandbox whose sessions run on single-use workers taken from a warm pool, at most max_sessions at once."""

    def __init__(self, config: SandboxConfig | None = None):
        super().__init__(config)
        self._limiter = SessionLimiter(self.config.max_sessions)
        self._sessions: set[WorkerSession] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._warm = WarmPool(self._start_worker, self._kill_worker, self.config.pool_size, type(self).__name__)

    @abc.abstractmethod
    def _start_worker(self) -> Worker:
        """Start one server and wait until it said hello (raise on failure)."""

    @staticmethod
    def _kill_worker(w: Worker) -> None:
        w.kill()

    def session(self, timeout: float | None = None) -> WorkerSession:
        """A new persistent session. Blocks (up to `timeout`) while max_sessions sessions are open."""
        if self._closed:
            raise RuntimeError("sandbox is closed")
        self._limiter.acquire(timeout)
        s = WorkerSession(self._warm.take, self.config.timeout_s, on_close=lambda: self._forget(s))
        with self._lock:
            self._sessions.add(s)
        try:
            s._worker = self._warm.take()
        except Exception as e:  # noqa: BLE001 - reported by the first run() as sandbox_error (it retries the start)
            log.warning("sandbox session start failed: %s", e)
        return s

    def _forget(self, s: WorkerSession) -> None:
        with self._lock:
            if s not in self._sessions:
                return
            self._sessions.discard(s)
        self._limiter.release()

    def close(self) -> None:
        self._closed = True
        self._warm.close()
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.close()

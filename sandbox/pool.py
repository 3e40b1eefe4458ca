"""Concurrency for sandboxes: warm workers, a bound on open sessions, and a wide executor for asyncio.

A leaf module (nothing from `sandbox` is imported here), so base classes, workers and the factory can all use it.

Why: an episode should not wait for an interpreter (or container) to boot, hundreds of episodes must be able to
wait on their tool calls at once, and asyncio's default executor (min(32, cores + 4) = 6 threads here) would let
six slow cells block every other coroutine. Calls mostly wait on a pipe or socket, so threads are the cheap answer.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
W = TypeVar("W")
R = TypeVar("R")

_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()
EXECUTOR_THREADS = 1024  # threads are created lazily; each waits on one session's pipe/socket


def executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide executor used by Session.arun (wide enough that waiting calls never queue)."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix="sandbox")
        return _EXECUTOR


async def to_thread(fn: Callable[..., R], *args) -> R:
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)


class WarmPool(Generic[W]):
    """Keeps up to `size` ready workers, refilled by one background thread.

    take() hands out a warm worker at once, or starts one in the caller's thread when the pool is empty (so a
    burst of episodes degrades to cold starts, never to deadlock). Workers are used once: a session's state must
    not leak into the next episode.
    """

    def __init__(self, start: Callable[[], W], kill: Callable[[W], None], size: int, name: str = "warm-pool"):
        self._start, self._kill, self.size = start, kill, size
        self._ready: collections.deque[W] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._failures = 0
        self._thread = threading.Thread(target=self._fill, name=name, daemon=True)
        self._thread.start()

    def take(self) -> W:
        with self._cond:
            if self._ready:
                w = self._ready.popleft()
                self._cond.notify_all()
                return w
            self._cond.notify_all()
        return self._start()

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._ready) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                w = self._start()
                self._failures = 0
            except Exception as e:  # noqa: BLE001 - keep serving cold starts; back off so a broken backend does not spin
                self._failures += 1
                log.warning("sandbox warm start failed (%s); retrying", e)
                with self._cond:
                    self._cond.wait(min(30.0, 0.5 * 2**self._failures))
                continue
            with self._cond:
                if self._closed:
                    self._kill(w)
                    return
                self._ready.append(w)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            ready, self._ready = list(self._ready), collections.deque()
            self._cond.notify_all()
        for w in ready:
            self._kill(w)
        self._thread.join(timeout=30)


class SessionLimiter:
    """Bounds open sessions to max_sessions (asyncio callers wait for it in the wide executor, see asession)."""

    def __init__(self, max_sessions: int):
        self._sem = threading.BoundedSemaphore(max_sessions)

    def acquire(self, timeout: float | None = None) -> None:
        if not self._sem.acquire(timeout=timeout):
            raise TimeoutError("too many open sandbox sessions (max_sessions reached)")

    def release(self) -> None:
        self._sem.release()


@contextlib.asynccontextmanager
async def asession(sandbox) -> AsyncIterator:
    """`async with asession(sb) as s: await s.arun(code)` — opens the session off the event loop."""
    s = await to_thread(sandbox.session)
    try:
        yield s
    finally:
        await to_thread(s.close)

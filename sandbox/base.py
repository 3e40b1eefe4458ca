"""The sandbox contract shared by every backend: a Sandbox hands out persistent Sessions that run code.

Data flow: env --code--> Session.run --ExecResult--> env. Nothing here knows about models or tokens. The factory
(`make_sandbox`, `shared_sandbox`) lives in sandbox.factory, above the backends, so no module here imports a backend.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import Self

from sandbox.config import SandboxConfig
from sandbox.pool import asession, to_thread


class ExecStatus(enum.StrEnum):
    """How one run() call ended. Each value is a well-defined observation, never an exception."""

    OK = "ok"  # ran to the end
    ERROR = "error"  # raised; the traceback is in stderr
    TIMEOUT = "timeout"  # wall-clock or CPU limit; session state is lost
    MEMORY = "memory"  # MemoryError / OOM kill; session state is lost if the process died
    OUTPUT_LIMIT = "output_limit"  # printed more than max_output_bytes; output truncated
    CRASHED = "crashed"  # interpreter died (segfault, os._exit, kill); session state is lost
    EXITED = "exited"  # code called sys.exit()/exit(); session state is kept
    SANDBOX_ERROR = "sandbox_error"  # the backend itself failed (e.g. cannot start); nothing ran


@dataclass
class ExecResult:
    """Outcome of one Session.run(). stdout/stderr are str, decoded with errors='replace'."""

    status: ExecStatus
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    truncated: bool = False  # output was cut at max_output_bytes
    state_lost: bool = False  # the interpreter was (re)started: earlier variables are gone
    exit_code: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == ExecStatus.OK


class Session(abc.ABC):
    """One persistent Python interpreter for one episode (notebook semantics).

    Variables and imports survive between run() calls. A trailing expression's repr is printed, as in a REPL.
    After a timeout or crash the backend kills the interpreter; the next run() starts a fresh one and
    sets ExecResult.state_lost=True so the model can be told.
    """

    @abc.abstractmethod
    def run(self, code: str, timeout: float | None = None) -> ExecResult: ...

    async def arun(self, code: str, timeout: float | None = None) -> ExecResult:
        """Async variant: the blocking call runs on the sandbox's wide executor (a call mostly waits on a pipe),
        not asyncio's default one, which has only cores+4 threads and would let a few slow cells block the rest."""
        return await to_thread(self.run, code, timeout)

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Sandbox(abc.ABC):
    """A backend that creates sessions. Thread-safe; close() ends every session it made."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()

    @abc.abstractmethod
    def session(self) -> Session: ...

    def asession(self):
        """`async with sandbox.asession() as s: await s.arun(code)`; waits for a free slot off the event loop."""
        return asession(self)

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

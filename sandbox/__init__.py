"""Sandboxed, persistent Python sessions for model-written tool calls.

One Sandbox per process, shared by every env (thread-safe; it owns the warm pool and the max_sessions bound)::

    sb = make_sandbox(SandboxConfig(backend="local"))       # or backend="docker"
    with sb.session() as s:                                  # one episode = one session
        r = s.run("x = 2\nx ** 10")                          # r.status == ExecStatus.OK, r.stdout == "1024\n"
    async with sb.asession() as s:                           # from asyncio
        r = await s.arun("x = 1", timeout=5)
    sb.close()                                               # kills every session and warm worker

Envs should not each build a Sandbox (each would start its own warm pool): `shared_sandbox(config)` returns the
process-wide one for that config, closed at exit.
"""

from sandbox.base import ExecResult, ExecStatus, Sandbox, Session
from sandbox.config import SandboxConfig
from sandbox.factory import make_sandbox, shared_sandbox

__all__ = ["ExecResult", "ExecStatus", "Sandbox", "SandboxConfig", "Session", "make_sandbox", "shared_sandbox"]

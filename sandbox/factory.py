"""Choosing a backend: `make_sandbox(config)` builds one, `shared_sandbox(config)` returns the process-wide one.

The top of the sandbox import graph (config, pool <- base <- worker <- local/docker <- factory): backends never
import this module, so there is no cycle.
"""

from __future__ import annotations

import atexit
import logging
import threading

from sandbox.base import Sandbox
from sandbox.config import SandboxConfig
from sandbox.docker import DockerSandbox
from sandbox.local import LocalSandbox

log = logging.getLogger(__name__)


def make_sandbox(config: SandboxConfig | None = None) -> Sandbox:
    """Build the backend named by config.backend."""
    config = config or SandboxConfig()
    if config.backend == "docker":
        return DockerSandbox(config)
    return LocalSandbox(config)


_SHARED: dict[str, Sandbox] = {}
_SHARED_LOCK = threading.Lock()


def shared_sandbox(config: SandboxConfig | None = None) -> Sandbox:
    """The process-wide Sandbox for `config` (one per distinct config), created on first use, closed at exit.

    Why: every env instance asking for its own Sandbox would start its own warm pool (pool_size jails or
    containers each); envs should share one and open one session per episode:

        s = shared_sandbox(cfg).session()   # in reset(); s.run(code) per tool call; s.close() at episode end
    """
    config = config or SandboxConfig()
    key = config.model_dump_json()
    with _SHARED_LOCK:
        sb = _SHARED.get(key)
        if sb is None or getattr(sb, "_closed", False):
            sb = make_sandbox(config)
            _SHARED[key] = sb
            if len(_SHARED) == 1:
                atexit.register(_close_shared)
        return sb


def _close_shared() -> None:
    with _SHARED_LOCK:
        boxes = list(_SHARED.values())
        _SHARED.clear()
    for sb in boxes:
        try:
            sb.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            log.debug("closing shared sandbox failed", exc_info=True)

"""The options every session server gets, built in one place for both backends.

The server (sandbox/server.py) applies `rlimits` with setrlimit before it runs any cell, and drops to `uid` when
started as root. RLIMIT_NPROC counts every process of a uid on the whole host, so it is only set where each session
has its own uid (the local backend); Docker containers share uid 65534 and rely on the engine's pids limit.
"""

from __future__ import annotations

from sandbox.config import SandboxConfig

MIB = 1024 * 1024


def rlimits(config: SandboxConfig, *, nproc: bool) -> dict[str, int | list[int]]:
    """Resource limits of one session: address space, CPU seconds (SIGXCPU one second before the kill), largest
    file, open files, no core dumps; and the process count when the session has a uid of its own."""
    limits: dict[str, int | list[int]] = {
        "as": config.memory_mb * MIB,
        "cpu": [config.cpu_s, config.cpu_s + 1],
        "fsize": config.tmp_size_mb * MIB,
        "nofile": config.max_open_files,
        "core": 0,
    }
    if nproc:
        limits["nproc"] = config.max_processes
    return limits


def server_opts(config: SandboxConfig, *, cwd: str, uid: int | None = None, nproc: bool = True) -> dict:
    """The JSON options the session server is started with (see sandbox.server.Server)."""
    return {
        "max_output_bytes": config.max_output_bytes,
        "uid": uid,
        "gid": uid,
        "cwd": cwd,
        "rlimits": rlimits(config, nproc=nproc),
    }

"""Limits and backend choice for running untrusted, model-written Python.

Every knob has a default that is safe for tool-integrated reasoning on a small machine: a model's
tool call should finish in seconds, print kilobytes, and never need the network.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SandboxConfig(BaseModel):
    """Resource limits of one sandbox session and the backend that enforces them."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "docker"] = Field(
        "local", description="'local' (bubblewrap/namespaces + rlimits) or 'docker' (warm container pool)."
    )
    timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit of one run() call, seconds.")
    cpu_s: int = Field(30, gt=0, description="CPU seconds a session's interpreter may use in total (RLIMIT_CPU).")
    memory_mb: int = Field(512, gt=0, description="Address-space / container memory limit, MiB.")
    max_processes: int = Field(32, gt=0, description="Max processes/threads inside one session (pids limit).")
    max_output_bytes: int = Field(
        64 * 1024, gt=0, description="stdout+stderr bytes kept per call; the rest is dropped and flagged."
    )
    tmp_size_mb: int = Field(64, gt=0, description="Size of the private writable /tmp of a session, MiB.")
    max_open_files: int = Field(256, gt=0, description="RLIMIT_NOFILE inside the session.")
    network: bool = Field(False, description="Allow network access. Off unless explicitly turned on.")
    pool_size: int = Field(
        8, gt=0, description="Warm sessions kept ready (docker: containers) so a new episode does not wait."
    )
    max_sessions: int = Field(256, gt=0, description="Upper bound on concurrently open sessions.")
    docker_image: str = Field("alp-agent-sandbox:latest", description="Image used by the docker backend.")
    python: str | None = Field(
        None,
        description="Interpreter used inside the local sandbox; default: the host's sys.executable (its real binary "
        "and standard library are bound into the jail, not the virtualenv).",
    )
    packages: list[str] = Field(
        ["numpy", "sympy"],
        description="Python distributions a session can import, with their dependencies (sympy brings mpmath). "
        "local: each one's installed directories are bound read-only, one by one, at a neutral path on PYTHONPATH "
        "(never the whole virtualenv); docker: baked into the image by sandbox/image/build_offline.sh.",
    )
    extra_ro_paths: list[str] = Field(
        [],
        description="Host paths a session may read, mounted read-only at the same path (both backends). Nothing "
        "else of the host's files is visible: no checkout, virtualenv, data, /home, /srv or /root.",
    )
    allow_unisolated: bool = Field(
        False,
        description="local: when bubblewrap cannot run, run sessions as plain processes with rlimits only (NO "
        "filesystem or network isolation) instead of refusing to start. Only for trusted code or debugging.",
    )

"""Fixtures: one sandbox per backend per test module (starting them is the slow part), plus leak checks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sandbox import SandboxConfig
from sandbox.docker import docker_unavailable_reason
from tests.procs import descendants

SECRET_NAME, SECRET_VALUE = "ALP_TEST_HOST_SECRET", "hunter2-do-not-leak"
os.environ[SECRET_NAME] = SECRET_VALUE  # set before any sandbox starts: it must never be visible inside

TEST_CONFIG = {
    "timeout_s": 10,
    "memory_mb": 256,
    "max_processes": 16,
    "max_output_bytes": 4096,
    "pool_size": 2,
    "cpu_s": 20,
}


def make_backend(backend: str, **overrides):
    """A sandbox of `backend` with the test limits (skips when Docker is unavailable)."""
    config = SandboxConfig(backend=backend, **{**TEST_CONFIG, **overrides})
    if backend == "docker":
        reason = docker_unavailable_reason()
        if reason:
            pytest.skip(f"docker backend: {reason}")
        from sandbox.docker import DockerSandbox

        return DockerSandbox(config)
    from sandbox.local import LocalSandbox

    return LocalSandbox(config)


BACKENDS = [pytest.param("local"), pytest.param("docker", marks=pytest.mark.docker)]


def _server_procs() -> set[int]:
    """Our descendants that are session servers or anything started inside a jail."""
    out = set()
    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"Server(opts).serve()" in cmd or b"bwrap" in cmd or b"sleep" in cmd:  # the server's source is argv
            out.add(pid)
    return out


def _our_containers() -> list:
    import docker

    from sandbox.docker import LABEL, OWNER_LABEL, _owner

    client = docker.from_env()
    try:
        return [
            c.id
            for c in client.containers.list(all=True, filters={"label": LABEL})
            if c.labels.get(OWNER_LABEL) == _owner()
        ]
    finally:
        client.close()


@pytest.fixture(scope="module", params=BACKENDS)
def sb(request):
    box = make_backend(request.param)
    box.backend = request.param
    yield box
    box.close()
    # Closing the sandbox must leave nothing behind: no jail/server process, no container.
    t = time.monotonic()
    while _server_procs() and time.monotonic() < t + 5:
        time.sleep(0.05)
    assert not _server_procs(), "leaked sandbox processes"
    if request.param == "docker":
        assert not _our_containers(), "leaked sandbox containers"


@pytest.fixture
def session(sb):
    with sb.session() as s:
        yield s

"""Docker-backend specifics: container hardening and clean-up of containers left by dead processes."""

from __future__ import annotations

import socket

import pytest

from sandbox import SandboxConfig
from sandbox.docker import LABEL, OWNER_LABEL, docker_unavailable_reason

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def client():
    reason = docker_unavailable_reason()
    if reason:
        pytest.skip(f"docker backend: {reason}")
    import docker

    c = docker.from_env()
    yield c
    c.close()


def test_stale_containers_are_removed(client):
    from sandbox.docker import DockerSandbox

    stale = client.containers.create(
        "alp-agent-sandbox:latest",
        command=["sleep", "300"],
        labels={LABEL: "1", OWNER_LABEL: f"{socket.gethostname()}:999999999"},
    )
    with DockerSandbox(SandboxConfig(backend="docker", pool_size=1)):
        ids = [c.id for c in client.containers.list(all=True, filters={"label": LABEL})]
        assert stale.id not in ids


def test_container_is_locked_down(client):
    from sandbox.docker import DockerSandbox

    with DockerSandbox(SandboxConfig(backend="docker", pool_size=1, memory_mb=200, max_processes=20)) as sb:
        with sb.session() as s:
            assert s.run("import os\nos.getuid()").stdout == "65534\n"
            cid = s.worker.container.id
            hc = client.api.inspect_container(cid)["HostConfig"]
            assert hc["NetworkMode"] == "none" and hc["ReadonlyRootfs"] and hc["Init"]
            assert hc["PidsLimit"] == 22 and hc["CapDrop"] == ["ALL"]
        assert not client.containers.list(all=True, filters={"id": cid})

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
            assert not hc.get("Binds") and not hc.get("Mounts")  # no host path at all unless extra_ro_paths names it
        assert not client.containers.list(all=True, filters={"id": cid})


def test_only_extra_ro_paths_are_mounted(client, tmp_path):
    from sandbox.docker import DockerSandbox

    config = SandboxConfig(backend="docker", pool_size=1, extra_ro_paths=[str(tmp_path)])
    with DockerSandbox(config) as sb, sb.session() as s:
        hc = client.api.inspect_container(s.worker.container.id)["HostConfig"]
        assert hc["Binds"] == [f"{tmp_path}:{tmp_path}:ro"]

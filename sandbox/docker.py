"""DockerSandbox: each session is one warm container running the session server, reached over an attached stream.

Why this shape (measured on the development machine): `docker run` costs ~250 ms and `docker exec` ~65 ms
per call, while a message over the container's attached stdin/stdout costs about a millisecond. So containers are
started ahead of time (a warm pool), each runs the same `server.py` as the local backend (sent with `python3 -c`, so
the image holds no project code and never goes stale), and one container serves one session for its whole life.

Limits come from the engine: `--network none`, memory (+swap) limit, pids limit, one CPU, read-only root with a
size-limited tmpfs /tmp, uid 65534 with every capability dropped and no-new-privileges, `--init` so the server is
not PID 1, and no host mount except `config.extra_ro_paths` (read-only). The image holds python3 and the tool
packages (numpy, sympy: sandbox/image/build_offline.sh copies them in). The server adds the same rlimits as locally
(sandbox.limits). A timeout or crash removes the container; the session's next call gets a fresh one. Every container carries the label `alp-agent-sandbox`; containers left by dead host
processes are removed when a DockerSandbox starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path

from sandbox.base import ExecStatus
from sandbox.config import SandboxConfig
from sandbox.limits import server_opts
from sandbox.worker import PooledSandbox, Worker, WorkerDied, WorkerTimeout, died_from_returncode

log = logging.getLogger(__name__)
LABEL = "alp-agent-sandbox"
OWNER_LABEL = "alp-agent-sandbox.owner"
PACKAGES_LABEL = "alp-agent-sandbox.packages"  # set by sandbox/image/build_offline.sh and the Dockerfile
SERVER_SOURCE = Path(__file__).with_name("server.py").read_text()
ENV = {"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
_MUX = struct.Struct(">BxxxI")  # docker's stdout/stderr multiplexing header (non-tty attach)


def docker_unavailable_reason(image: str = "alp-agent-sandbox:latest") -> str:
    """'' when an engine answers and the image exists, else why not (for test skips and error messages)."""
    try:
        import docker
    except ImportError:
        return "the docker Python SDK is not installed"
    try:
        client = docker.from_env(timeout=5)
        client.ping()
    except Exception as e:  # noqa: BLE001 - any failure means "no engine"
        return f"no Docker engine reachable ({type(e).__name__}); run scripts/ci_docker.sh"
    try:
        client.images.get(image)
    except Exception:  # noqa: BLE001
        return f"image {image} missing; build it with sandbox/image/build_offline.sh"
    finally:
        client.close()
    return ""


def extra_mounts(paths: list[str]) -> dict[str, dict[str, str]]:
    """The only host paths a container sees: sandbox.extra_ro_paths, read-only at the same path."""
    return {os.path.realpath(p): {"bind": os.path.abspath(p), "mode": "ro"} for p in paths}


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DockerWorker(Worker):
    """One container with the server in it and the attached (multiplexed) stdin/stdout socket."""

    def __init__(self, client, config: SandboxConfig):
        super().__init__()
        self.client = client
        c = config
        opts = server_opts(c, cwd="/tmp", nproc=False)  # uid 65534 is shared: the pids limit counts
        self.container = client.containers.create(
            c.docker_image,
            command=["python3", "-s", "-B", "-c", SERVER_SOURCE, json.dumps(opts)],
            stdin_open=True,
            tty=False,
            detach=True,
            network_mode="none" if not c.network else None,
            mem_limit=f"{c.memory_mb + 64}m",  # the server's RLIMIT_AS trips first: MemoryError, not an OOM kill
            memswap_limit=f"{c.memory_mb + 64}m",
            pids_limit=c.max_processes + 2,
            nano_cpus=1_000_000_000,
            read_only=True,
            tmpfs={"/tmp": f"size={c.tmp_size_mb}m,mode=1777"},
            user="65534:65534",
            init=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            environment=ENV,
            working_dir="/tmp",
            labels={LABEL: "1", OWNER_LABEL: _owner()},
            volumes=extra_mounts(c.extra_ro_paths),
        )
        try:
            self._sock_io = client.api.attach_socket(
                self.container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
            )
            self.sock: socket.socket = self._sock_io._sock
            self.container.start()
            self._raw = bytearray()
            self.wait_ready()
        except Exception as e:  # noqa: BLE001 - any start failure: clean up, report one error
            self.kill()
            raise RuntimeError(f"container failed to start: {e}") from None

    def _send(self, data: bytes) -> None:
        try:
            self.sock.settimeout(30)
            self.sock.sendall(data)
        except OSError:
            raise self.death_reason() from None

    def _recv(self, deadline: float) -> bytes:
        """Demultiplex docker's frames; return the next stdout payload (stderr is unused by the server)."""
        while True:
            if len(self._raw) >= _MUX.size:
                kind, n = _MUX.unpack_from(self._raw)
                if len(self._raw) >= _MUX.size + n:
                    payload = bytes(self._raw[_MUX.size : _MUX.size + n])
                    del self._raw[: _MUX.size + n]
                    if kind == 1 and payload:
                        return payload
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout()
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                raise WorkerTimeout() from None
            except OSError:
                return b""
            if not chunk:
                return b""
            self._raw += chunk

    def death_reason(self) -> WorkerDied:
        try:
            state = self.client.api.wait(self.container.id, timeout=5)
            self.container.reload()
            st = self.container.attrs["State"]
        except Exception:  # noqa: BLE001
            return WorkerDied("the container stopped")
        if st.get("OOMKilled"):
            return WorkerDied("out of memory: the container was killed", ExecStatus.MEMORY, st.get("ExitCode"))
        return died_from_returncode(state.get("StatusCode", st.get("ExitCode")))

    def _terminate(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead stream
            self._sock_io.close()
        try:
            self.container.remove(force=True)
        except Exception as e:  # noqa: BLE001 - already gone, or the engine is down; nothing else to do
            log.debug("removing container %s: %s", self.container.short_id, e)


class DockerSandbox(PooledSandbox):
    """Sessions in warm, locked-down containers (see the module docstring)."""

    def __init__(self, config: SandboxConfig | None = None):
        import docker

        config = config or SandboxConfig(backend="docker")
        reason = docker_unavailable_reason(config.docker_image)
        if reason:
            raise RuntimeError(f"DockerSandbox: {reason}")
        self.client = docker.from_env(timeout=60, max_pool_size=max(10, config.max_sessions))
        self._check_packages(config)
        self.remove_stale()
        super().__init__(config)

    def _check_packages(self, config: SandboxConfig) -> None:
        """Warn when the image was built without some of config.packages (its label lists what it holds)."""
        labels = self.client.images.get(config.docker_image).labels or {}
        have = labels.get(PACKAGES_LABEL)
        missing = [p for p in config.packages if have is not None and p not in have.split()]
        if missing:
            log.warning(
                "DockerSandbox: image %s lacks %s; rebuild it: PACKAGES=%r FORCE=1 sandbox/image/build_offline.sh",
                config.docker_image,
                missing,
                " ".join(config.packages),
            )

    def remove_stale(self) -> int:
        """Remove labelled containers whose owning process (on this host) is gone."""
        n = 0
        host = socket.gethostname()
        for ctr in self.client.containers.list(all=True, filters={"label": LABEL}):
            owner = ctr.labels.get(OWNER_LABEL, "")
            h, _, pid = owner.partition(":")
            if h == host and pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue
            try:
                ctr.remove(force=True)
                n += 1
            except Exception:  # noqa: BLE001, S110 - raced with another cleaner
                pass
        return n

    def _start_worker(self) -> DockerWorker:
        return DockerWorker(self.client, self.config)

    def close(self) -> None:
        super().close()
        self.client.close()

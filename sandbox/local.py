"""LocalSandbox: each session is one session server in a bubblewrap jail, reached over two pipes.

Isolation, layer by layer (each one measured by tests/sandbox):
* bubblewrap: new pid/net/ipc/uts namespaces (no network unless config.network), an allowlisted read-only
  filesystem (system libraries, the interpreter and its standard library, the tool packages of config.packages,
  config.extra_ro_paths; nothing of /home, /root, /srv, /work, the checkout or the virtualenv: see sandbox.jail), a
  private size-limited tmpfs on /tmp, an empty environment (no host secrets). The server's source is sent with
  `python -c`, as for Docker.
* the server drops to a distinct non-root uid per session (so root-only files are unreadable, and no capability
  survives) after setting rlimits (sandbox.limits): address space, CPU seconds, file size, open files, processes.
* process count: each session gets its own pids cgroup with pids.max, plus its own uid (sandbox.cgroups).
* timeouts kill the whole jail: bwrap's outer process and, through --die-with-parent, its pid namespace; the
  cgroup is then swept so nothing survives.

Without a working bubblewrap the backend refuses to start (one-line RuntimeError), unless
`config.allow_unisolated` is set: then the server runs as a plain child process with the same rlimits, uid and
cgroup, and a warning is logged: no namespaces, so NO network or filesystem isolation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandbox import jail
from sandbox.base import ExecStatus
from sandbox.cgroups import UIDS, PidsCgroup
from sandbox.config import SandboxConfig
from sandbox.jail import bwrap_path, bwrap_works
from sandbox.limits import server_opts
from sandbox.worker import PooledSandbox, Worker, WorkerDied, WorkerTimeout, died_from_returncode

log = logging.getLogger(__name__)
SERVER_SOURCE = Path(__file__).with_name("server.py").read_text()
SYSTEM_PYTHON = "/usr/bin/python3"
SAFE_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _unreachable(path: str) -> bool:
    """True when an unprivileged uid cannot traverse to `path` (e.g. pyenv under /root, mode 0700)."""
    return any(a.exists() and not os.stat(a).st_mode & 0o001 for a in Path(path).parents if str(a) != "/")


# --------------------------------------------------------------------------------------------- the worker
class LocalWorker(Worker):
    """One server process (in a bwrap jail when possible) with its pipes, uid and cgroup."""

    def __init__(self, cmd: list[str], cgroup: PidsCgroup | None, uid: int, release_uid, cwd: str | None = None):
        super().__init__()
        self.cgroup, self.uid, self._release_uid, self._cwd = cgroup, uid, release_uid, cwd
        if cgroup is not None:  # join the cgroup before bwrap forks, so every descendant is counted
            cmd = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup.procs), *cmd]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            env=SAFE_ENV,
            cwd=cwd or "/",
        )
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        try:
            self.wait_ready()
        except (WorkerDied, WorkerTimeout) as e:
            err = self._stderr_text()
            self.kill()
            raise RuntimeError(f"session server did not start: {e} {err}".strip()) from None

    def _stderr_text(self) -> str:
        try:
            os.set_blocking(self.proc.stderr.fileno(), False)
            return (self.proc.stderr.read() or b"").decode(errors="replace")[-2000:]
        except Exception:  # noqa: BLE001 - best-effort diagnostics only
            return ""

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._in, view) :]
        except (BrokenPipeError, OSError):
            raise self.death_reason() from None

    def _recv(self, deadline: float) -> bytes:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout()
            r, _, _ = select.select([self._out], [], [], left)
            if r:
                try:
                    return os.read(self._out, 1 << 20)
                except OSError:
                    return b""

    def death_reason(self) -> WorkerDied:
        try:
            rc = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return WorkerDied("the Python process closed its channel")
        return died_from_returncode(rc)

    def _terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill_all()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("sandbox worker %d did not die", self.proc.pid)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
        if self.cgroup is not None:
            self.cgroup.remove()
        if self._cwd:
            shutil.rmtree(self._cwd, ignore_errors=True)
        self._release_uid(self.uid)


class LocalSandbox(PooledSandbox):
    """Sessions in bubblewrap jails on this machine (see the module docstring for the layers)."""

    def __init__(self, config: SandboxConfig | None = None):
        config = config or SandboxConfig()
        missing = [p for p in config.extra_ro_paths if not os.path.exists(p)]
        if missing:
            raise RuntimeError(f"LocalSandbox: sandbox.extra_ro_paths do not exist: {', '.join(missing)}")
        self.python = config.python or sys.executable
        self.bwrap = bwrap_path()
        reason = bwrap_works(self.bwrap)
        if reason and not config.allow_unisolated:
            raise RuntimeError(
                f"LocalSandbox: bubblewrap unavailable ({reason}); use backend 'docker', or set "
                "sandbox.allow_unisolated: true to run cells with rlimits only (no filesystem or network isolation)"
            )
        self.isolation = "rlimits" if reason else "bwrap"
        self.use_cgroup = PidsCgroup.root() is not None
        self.drop_uid = os.getuid() == 0
        self._etc_dir = None
        if reason:
            log.warning(
                "LocalSandbox: %s; allow_unisolated: falling back to plain processes with rlimits (NO isolation)",
                reason,
            )
            self._pick_unisolated_python(config)
        else:
            interp = jail.probe(self.python, tuple(config.packages))
            self.python = interp.executable
            self._etc_dir = jail.write_etc()
            tmp_size = config.tmp_size_mb * 1024 * 1024
            self._jail = jail.mounts(interp, self._etc_dir, tmp_size, config.extra_ro_paths, config.network)
        if not self.use_cgroup:
            log.warning("LocalSandbox: no writable pids cgroup; process limits rely on RLIMIT_NPROC per-session uids")
        super().__init__(config)

    def _pick_unisolated_python(self, config: SandboxConfig) -> None:
        """Without namespaces a root cell could kill(-1) the whole host: cells must run as a dropped uid, so the
        interpreter must be reachable by it; fall back to the system python when the default one is not."""
        if not (self.drop_uid and _unreachable(os.path.realpath(self.python))):
            return
        if config.python is None and os.path.exists(SYSTEM_PYTHON) and not _unreachable(SYSTEM_PYTHON):
            log.warning(
                "LocalSandbox: %s is unreachable by an unprivileged uid; cells use %s", self.python, SYSTEM_PYTHON
            )
            self.python = SYSTEM_PYTHON
            return
        raise RuntimeError(
            f"LocalSandbox: bwrap unavailable and {self.python} is not readable by an unprivileged user; "
            "refusing to run untrusted cells as root (set sandbox.python or use the docker backend)"
        )

    def describe(self) -> dict:
        return {"isolation": self.isolation, "pids_cgroup": self.use_cgroup, "uid_drop": self.drop_uid}

    def _bwrap_cmd(self) -> list[str]:
        cmd = [self.bwrap, *self._jail, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not self.config.network:
            cmd.append("--unshare-net")
        cmd += ["--die-with-parent", "--new-session", "--clearenv"]
        for k, v in {**SAFE_ENV, "PYTHONPATH": jail.SITE_DIR}.items():
            cmd += ["--setenv", k, v]
        return [*cmd, "--chdir", "/tmp", "--"]

    def _command(self, uid: int) -> tuple[list[str], str | None]:
        """The command that starts one server, and the host working directory it owns (unisolated mode only)."""
        run_as = uid if self.drop_uid else None
        if self.isolation == "bwrap":
            opts = server_opts(self.config, cwd="/tmp", uid=run_as)
            return [*self._bwrap_cmd(), self.python, "-s", "-B", "-c", SERVER_SOURCE, json.dumps(opts)], None
        cwd = tempfile.mkdtemp(prefix="alp-sandbox-")
        if self.drop_uid:
            os.chown(cwd, uid, uid)
        opts = server_opts(self.config, cwd=cwd, uid=run_as)
        return [self.python, "-s", "-B", "-c", SERVER_SOURCE, json.dumps(opts)], cwd

    def _start_worker(self) -> LocalWorker:
        uid = UIDS.take() if self.drop_uid else os.getuid()
        cgroup = None
        try:
            if self.use_cgroup:
                cgroup = PidsCgroup(self.config.max_processes + 3)  # + bwrap, its pid-1 reaper, the server
            cmd, cwd = self._command(uid)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            if self.drop_uid:
                UIDS.give(uid)
            raise
        # From here the worker owns uid, cgroup and cwd, and releases them itself (also when it fails to start).
        return LocalWorker(cmd, cgroup, uid, UIDS.give if self.drop_uid else (lambda u: None), cwd)

    def close(self) -> None:
        super().close()
        if self._etc_dir:
            shutil.rmtree(self._etc_dir, ignore_errors=True)


__all__ = ["ExecStatus", "LocalSandbox", "LocalWorker"]

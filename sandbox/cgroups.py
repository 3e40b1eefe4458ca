"""Per-session process accounting for the local backend: a pids cgroup and a distinct uid per session.

Why: RLIMIT_NPROC does nothing for root and counts per uid, so a shared uid would let one session's fork bomb starve
the others. Each session gets its own pids cgroup (v1 here; v2 when delegated) with pids.max, which also lets a
timeout kill every member, and its own uid above every regular account.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
CGROUP_V1 = Path("/sys/fs/cgroup/pids")
CGROUP_V2 = Path("/sys/fs/cgroup")
UID_BASE = 200_000  # per-session uids live above every regular account


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
                if base.parent == CGROUP_V2:  # v2 enables a controller level by level: the sessions sit one below
                    (root / "cgroup.subtree_control").write_text("+pids")
                _probe(root)
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


def _probe(root: Path) -> None:
    """Make and remove one session cgroup with a pids.max, so a hierarchy that accepts mkdir but has no pids controller
    where the sessions live (seen on a cgroup v2 GPU machine: EACCES on pids.max) is found once, here, and the
    sandbox falls back to per-uid limits instead of failing every session start."""
    probe = root / "probe"
    probe.mkdir(exist_ok=True)
    try:
        (probe / "pids.max").write_text("8")
    finally:
        _rmdir_quiet(probe)


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


UIDS = UidAllocator(UID_BASE + (os.getpid() % 400) * 2000)

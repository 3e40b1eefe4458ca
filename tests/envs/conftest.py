"""Fixtures for env tests: one real LocalSandbox per module (starting sessions is the slow part), data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import envs  # noqa: F401  (registers the alp/ ids)
from sandbox import SandboxConfig

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
FAST_SANDBOX = {
    "timeout_s": 10,
    "memory_mb": 512,
    "max_processes": 16,
    "max_output_bytes": 64 * 1024,
    "pool_size": 2,
    "cpu_s": 30,
}


def descendants(pid: int = 0) -> set[int]:
    """Every live process below `pid` (default: this process), via /proc ppid links."""
    pid = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if stat.rsplit(")", 1)[1].split()[0] == "Z":  # zombies are not leaks of a live process
                continue
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


@pytest.fixture(scope="module")
def sandbox():
    """A real LocalSandbox shared by a test module's envs."""
    from sandbox.local import LocalSandbox

    box = LocalSandbox(SandboxConfig(backend="local", **FAST_SANDBOX))
    yield box
    box.close()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"benchmark copies not found at {DATA_DIR} (see shared/data/README.md)")
    return DATA_DIR.resolve()

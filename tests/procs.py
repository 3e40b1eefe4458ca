"""Process-tree helpers for leak checks (shared by the sandbox and env tests)."""

from __future__ import annotations

import os
from pathlib import Path


def descendants(pid: int = 0) -> set[int]:
    """Every live process below `pid` (default: this process), via /proc ppid links. Zombies are not counted: they
    hold no resources but an exit status, and are not leaks of a live process."""
    pid = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            ppid = int(fields[1])
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


# The CLI as a foreground job would run it: Python's own Ctrl-C handler, whatever this suite inherited (a suite
# started in the background has SIGINT ignored, and children inherit that).
_FOREGROUND_CLI = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'alp-agent'; runpy.run_module('alp_agent.app.cli', run_name='__main__')"
)


def foreground_cli(*args: str) -> list[str]:
    """The command line of `alp-agent ARGS` with a foreground job's Ctrl-C handling."""
    import sys

    return [sys.executable, "-c", _FOREGROUND_CLI, *args]


def wait_for_first_batch(proc, metrics: Path, timeout: float = 300) -> None:
    """Wait until the run writing `metrics` (metrics.jsonl) has logged a whole batch; fail if `proc` ends first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and '"kind": "batch"' in metrics.read_text():
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode


def output_after_stop(proc, what: str, timeout: float = 300) -> str:
    """The output of `proc` once a stop signal (`what`, for the message) has ended it. If it has not ended within
    `timeout` the signal was lost: kill it, rather than leave it to take the cores from the rest of the suite, and
    fail with its output."""
    import subprocess

    import pytest

    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        pytest.fail(f"{what} did not stop it within {timeout:g} s; its output:\n{out[-3000:]}")

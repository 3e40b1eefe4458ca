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

"""Small pieces `ToolEnv` builds on: live objects kept by reference in `env.spec`, the thread pool behind `astep`,
cutting over-long tool output, and the per-episode running totals."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class EpisodeTotals:
    """Running totals of one episode (reported in every info)."""

    turn: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    parse_errors: int = 0
    void_turns: int = 0
    observation_truncated: int = 0
    successful_calls: int = 0
    done: bool = False

    def as_info(self) -> dict[str, int]:
        return {
            "turn": self.turn,
            "total_tool_calls": self.tool_calls,
            "total_tool_errors": self.tool_errors,
            "total_parse_errors": self.parse_errors,
            "total_void_turns": self.void_turns,
            "total_observation_truncated": self.observation_truncated,
        }


class ByReference:
    """A constructor argument that `EnvSpec.make` passes on as is instead of deep-copying it.

    `gymnasium.make` records the kwargs in `env.spec`, and `spec.make()` (used by `check_env` and by users to clone an
    env) deep-copies them; a live Sandbox (threads, locks, processes) must be shared, not copied.
    """

    def __init__(self, obj: Any):
        self.obj = obj

    def __deepcopy__(self, memo: dict) -> ByReference:
        return self

    def __repr__(self) -> str:
        return f"ByReference({self.obj!r})"


def unwrap_reference(obj: Any) -> Any:
    return obj.obj if isinstance(obj, ByReference) else obj


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def step_executor() -> ThreadPoolExecutor:
    """The thread pool behind `astep` (size: $ALP_ENV_THREADS, default 256)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            size = int(os.environ.get("ALP_ENV_THREADS", "256"))
            _executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="alp-env-step")
        return _executor


def truncate_middle(text: str, limit: int) -> tuple[str, bool]:
    """Keep head and tail of an over-long tool output; the marker says how much was cut (the model should know)."""
    if len(text) <= limit:
        return text, False
    marker = "\n...[{} characters cut]...\n"
    room = max(0, limit - len(marker.format(len(text))))
    head, tail = room * 2 // 3, room - room * 2 // 3
    cut = len(text) - head - tail
    return text[:head] + marker.format(cut) + (text[len(text) - tail :] if tail else ""), True

"""`alp/GpuCheck-v0`: one model turn per episode, reward = CRC32 parity of the text (the GPU check's env).

Meaningless as a task, but it gives a random model varied rewards inside every group, hence real gradients; no tool,
so the sandbox is never used. Registered on import (configs/gpu_check.yaml lists this module in `env.imports`).
"""

from __future__ import annotations

import zlib
from typing import Any

import gymnasium as gym

from envs.registration import register_env

ENV_ID = "alp/GpuCheck-v0"


class GpuCheckEnv(gym.Env):
    """One model turn per episode; reward = CRC32 parity of the text. Meaningless as a task, but it gives a random
    model varied rewards, hence real gradients. No tool, so the sandbox is never used."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention
    stop_strings: list[str] = []  # noqa: RUF012

    def __init__(self, sandbox=None, num_tasks: int = 64):
        self._num_tasks = num_tasks

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        i = int((options or {}).get("task_index", 0))
        return [{"role": "user", "content": f"Task {i}: write a short sentence about the number {i}."}], {}

    def step(self, action: str):
        reward = float(zlib.crc32(action.encode("utf-8", "replace")) % 2)
        return [], reward, True, False, {"tool_calls": 0, "tool_errors": 0, "end_reason": "answer"}


register_env(ENV_ID, GpuCheckEnv)

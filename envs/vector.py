"""Step many tool envs concurrently, all sharing one sandbox (and so its warm session pool).

Gymnasium's vector envs assume fixed-shape array observations and lock-step episodes; tool episodes have text
observations and end at different turns. `ToolEnvBatch` keeps N independent envs and steps the ones still running at
once (`astep` -> threads), which is what the rollout needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Self

import gymnasium as gym

from envs.base import ToolEnv
from sandbox.base import Sandbox, make_sandbox
from sandbox.config import SandboxConfig

StepResult = tuple[list[dict], float, bool, bool, dict]


class ToolEnvBatch:
    """N envs of one id (or factory) sharing `sandbox`; created here (and closed in close()) when not given."""

    def __init__(
        self,
        env: str | Callable[..., ToolEnv],
        num_envs: int,
        *,
        sandbox: Sandbox | None = None,
        sandbox_config: SandboxConfig | None = None,
        **env_kwargs: Any,
    ):
        self._own_sandbox = sandbox is None
        self.sandbox = sandbox if sandbox is not None else make_sandbox(sandbox_config or SandboxConfig())
        make = (
            (lambda: gym.make(env, sandbox=self.sandbox, **env_kwargs))
            if isinstance(env, str)
            else (lambda: env(sandbox=self.sandbox, **env_kwargs))
        )
        self.envs: list[ToolEnv] = [make().unwrapped for _ in range(num_envs)]  # type: ignore[misc]
        self.done = [True] * num_envs

    def __len__(self) -> int:
        return len(self.envs)

    def reset(self, task_indices: Sequence[int | None] | None = None, seed: int | None = None) -> list[tuple]:
        """Reset all envs; env i gets task_indices[i] (GRPO: repeat an index), else seed + i picks its task."""
        out = []
        for i, env in enumerate(self.envs):
            index = task_indices[i] if task_indices is not None else None
            opts = {"task_index": index} if index is not None else None
            out.append(env.reset(seed=None if seed is None else seed + i, options=opts))
            self.done[i] = False
        return out

    async def astep(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        """Step env i with actions[i] concurrently; None (or a finished env) is skipped and gives None."""
        if len(actions) != len(self.envs):
            raise ValueError(f"{len(actions)} actions for {len(self.envs)} envs")

        async def one(i: int, action: str | None) -> StepResult | None:
            if action is None or self.done[i]:
                return None
            result = await self.envs[i].astep(action)
            self.done[i] = result[2] or result[3]
            return result

        return list(await asyncio.gather(*(one(i, a) for i, a in enumerate(actions))))

    def step(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        """Blocking form of `astep` (do not call from inside a running event loop)."""
        return asyncio.run(self.astep(actions))

    def close(self) -> None:
        for env in self.envs:
            env.close()
        if self._own_sandbox:
            self.sandbox.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Gymnasium ids of the built-in envs (namespace ``alp/``) and a one-call way to register a user's tool env.

Built-ins are registered with ``order_enforce=False, disable_env_checker=True`` so `gymnasium.make` returns the
`ToolEnv` itself: Gymnasium 1.x wrappers do not forward attributes, and the rollout reads `stop_strings`,
`tool_schemas()`, `num_tasks` and `astep` from the env. (Use ``env.unwrapped`` if you add wrappers yourself.)
`check_env` is run by the tests instead of on every make.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym

BUILTIN_IDS = {
    "alp/MathTool-v0": ("envs.math_env:MathToolEnv", {}),
    "alp/MathToolJSON-v0": ("envs.math_env:MathToolEnv", {"tool_format": "json"}),
    "alp/Tool-v0": ("envs.base:ToolEnv", {}),
}


def register_env(env_id: str, entry_point: str | Callable[..., gym.Env], **kwargs: Any) -> None:
    """`gymnasium.register` with the settings every tool env needs (see the module docstring)."""
    if env_id in gym.registry:
        del gym.registry[env_id]  # re-registering (notebooks, reloads) replaces, it does not warn
    gym.register(env_id, entry_point=entry_point, order_enforce=False, disable_env_checker=True, kwargs=kwargs)


def register_tool_env(
    env_id: str,
    *,
    tools: Sequence[Callable] | None = None,
    tasks: Sequence[Any],
    reward_fn: Callable[[str | None, Any], float] | None = None,
    **config: Any,
) -> None:
    """Register a generic tool env from tools + tasks (+ reward) without writing a class.

    ``config`` holds `ToolEnvConfig` fields (max_turns, tool_format, system_prompt, ...).
    """
    kwargs: dict[str, Any] = {"tasks": list(tasks), **config}
    if tools is not None:
        kwargs["tools"] = list(tools)
    if reward_fn is not None:
        kwargs["reward_fn"] = reward_fn
    register_env(env_id, "envs.base:ToolEnv", **kwargs)


def load_env_modules(modules: Sequence[str] = ()) -> None:
    """Register the built-in envs, then import each of `modules` (a user's env module registers itself when
    imported). The one loader behind `env.imports` in run configs and `alp-agent envs --import`."""
    import importlib

    register_builtins()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"env module {name!r} could not be imported: {exc}") from exc


def register_builtins() -> None:
    for env_id, (entry_point, kwargs) in BUILTIN_IDS.items():
        if env_id not in gym.registry:
            register_env(env_id, entry_point, **kwargs)

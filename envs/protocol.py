"""The typed seam between an env and the rollout: what `step` reports (`StepInfo`) and what the rollout calls
(`ChatEnv`). A leaf module (typing only), so the rollout can depend on it without importing the env machinery.

The rollout (alp_agent/rollout) depends on `ChatEnv`, not on `ToolEnv`: a hand-written env (a test's scripted env,
a user's own Gymnasium env) works as long as it has these members. Every `StepInfo` key is optional for such envs
(`total=False`); `ToolEnv` fills all of them.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict, runtime_checkable

Message = dict[str, Any]  # one chat message: {"role": ..., "content": ..., optional "tool_calls" / "tool_call_id"}


class ToolCallSpec(TypedDict):
    """One parsed call in the OpenAI/HF chat format, as chat templates render `assistant.tool_calls`."""

    id: str
    type: str  # always "function"
    function: dict[str, Any]  # {"name": str, "arguments": dict}


class StepInfo(TypedDict, total=False):
    """The info dict of one `step` (per turn unless named `total_*`, which are episode totals)."""

    tool_calls: int  # calls run this turn
    tool_errors: int  # of those, calls whose tool reported an error
    void_turn: bool  # neither a tool call (well-formed or not) nor a final answer
    parsed_answer: str | None  # the final answer read from this turn (None: none)
    sandbox_status: str | None  # status of the last call run this turn
    sandbox_statuses: list[str]
    observation_truncated: int  # tool outputs cut to max_observation_chars this turn
    parse_errors: int
    parse_error_kinds: list[str]
    task_index: int
    assistant_tool_calls: list[ToolCallSpec]  # the turn's calls in the template's form (json format; else [])
    end_reason: str  # set when the episode ended: "answer", "void", "max_turns"
    correct: bool  # set when the episode ended (reward functions may add more keys)
    turn: int
    total_tool_calls: int
    total_tool_errors: int
    total_parse_errors: int
    total_void_turns: int
    total_observation_truncated: int


StepResult = tuple[list[Message], float, bool, bool, StepInfo]


@runtime_checkable
class ChatEnv(Protocol):
    """What the rollout needs from an env (read from `env.unwrapped`; Gymnasium wrappers do not forward attributes).

    `reset(seed, options={"task_index": i}) -> (messages, info)`; `step(text) -> (messages to append, reward,
    terminated, truncated, StepInfo)`. Optional, found with getattr: `async astep(text)` (steps without blocking the
    event loop), `stop_strings` (strings that end a model turn so a tool can run), `tool_format` ("fenced" / "json")
    and `tool_schemas()` (for showing json-format tools to the model), `tools_in_prompt` (the env's own prompt
    already describes its tools), `num_tasks`.
    """

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[list[Message], dict]: ...

    def step(self, action: str) -> StepResult: ...

    def close(self) -> None: ...

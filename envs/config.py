"""`ToolEnvConfig`: the episode rules every tool env shares (embedded in the run config YAML under `env.kwargs`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sandbox.config import SandboxConfig

DEFAULT_VOID_HINT = (
    "Your last message had neither a tool call nor a final answer. Call a tool to compute, "
    "or give the final answer as \\boxed{...}."
)


class ToolEnvConfig(BaseModel):
    """Episode rules shared by every tool env. Embedded in the run config YAML under the env section."""

    model_config = ConfigDict(extra="forbid")

    tool_format: Literal["fenced", "json"] = Field(
        "fenced", description="'fenced': ```python blocks (TIR); 'json': <tool_call>{...}</tool_call> (Hermes/Qwen)."
    )
    max_turns: int = Field(6, ge=1, description="Model turns per episode; reaching it without an answer truncates.")
    max_tool_calls: int = Field(8, ge=0, description="Tool calls per episode; later calls get an error, not run.")
    max_tool_calls_per_turn: int = Field(1, ge=1, description="Calls run per turn; extra ones get an error.")
    max_observation_chars: int = Field(
        2000, ge=100, description="Longer tool output is cut in the middle with a marker (counted in info)."
    )
    max_call_chars: int = Field(16000, ge=1, description="Longer code/arguments are rejected unrun ('too_long').")
    max_action_chars: int = Field(200_000, ge=1, description="Bound of the action space (one model turn).")
    tool_timeout_s: float | None = Field(None, gt=0, description="Per-call time limit; None: the sandbox's default.")
    void_turn: Literal["end", "hint"] = Field(
        "end", description="A turn with no tool call and no answer: 'end' the episode (reward 0) or reply a hint."
    )
    void_hint: str = Field(DEFAULT_VOID_HINT, description="The hint message for void_turn='hint'.")
    tool_role: str = Field(
        "tool",
        description="Role of tool-result messages ('tool'; 'user' for templates without). With 'tool' and the json "
        "format, each result carries the `tool_call_id` of its call (native tool calls).",
    )
    system_prompt: str | None = Field(None, description="Overrides the env's default system prompt ('' = none).")
    sandbox_config: SandboxConfig | None = Field(
        None, description="Config of the env's own sandbox when none is passed in; None: SandboxConfig() defaults."
    )

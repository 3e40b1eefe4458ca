"""Rollout options (pydantic, extra="forbid": a typo in a run config is an error, not a silent default)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alp_agent.schema import StrictModel


class RolloutConfig(StrictModel):
    """How episodes are sampled. Truncation cases and their `finish_reason`:

    - "prompt_too_long": the rendered prompt alone exceeds `max_prompt_tokens` (or leaves no room in the context);
      the trajectory has no completion and truncated=True.
    - "turn_token_limit": a model turn used `max_tokens_per_turn` without stopping; with on_turn_limit="truncate"
      the episode ends there (truncated=True); with "continue" the cut text still goes to the env.
    - "context_limit": the next turn would have no room in `max_context_tokens`, a turn was cut by it, or an
      observation would overflow it (that observation is dropped: the trajectory ends after the last model turn).
    - "max_turns": the env truncated the episode (its own turn limit) or `max_turns` model turns were used.
    - "answer": the env terminated the episode normally (or the env's own `end_reason`, e.g. "void").
      "nonfinite_logprobs": the engine flagged NaN/inf logprobs (EngineConfig.nonfinite_logprobs="flag").
      "template_error": the chat template raised while rendering an observation (its message is in info).
      A template that rewrites history never ends an episode (chat.py: deltas come from a stub conversation).
    """

    max_turns: int = Field(5, ge=1, description="Model turns per episode (the paper: 5 train, 10 eval).")
    max_tokens_per_turn: int = Field(512, ge=1, description="Token limit of one model turn.")
    max_context_tokens: int | None = Field(
        None, ge=2, description="Prompt + all turns; None = the engine's max_model_len."
    )
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longest accepted prompt; None = context - 1.")
    on_turn_limit: Literal["truncate", "continue"] = Field(
        "truncate", description="What a turn cut at max_tokens_per_turn does (see class doc)."
    )
    temperature: float = Field(1.0, ge=0, description="Recorded in every trajectory; the trainer uses it.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="< 1 makes the logprobs those of the truncated, renormalised distribution."
    )
    top_k: int = Field(0, ge=0, description="0 = off; > 0 truncates like top_p.")
    seed: int | None = Field(None, description="Base seed for per-episode, per-turn sampling seeds; None = random.")
    max_concurrent_episodes: int = Field(64, ge=1, description="Episodes in flight (one env instance each).")
    stop_strings: list[str] | None = Field(None, description="Override the env's stop strings (None = the env's).")
    show_tools: Literal["auto", "template", "system_prompt", "off"] = Field(
        "auto",
        description="How the env's tool schemas reach the model. 'auto': for a json-format env whose prompt does "
        "not describe its tools, through the template's `tools=` when the template renders them, else as a "
        "generated tool section (names, schemas, the <tool_call> format) appended to the system prompt; "
        "'template' / 'system_prompt': always that way; 'off': never.",
    )
    check_template_drift: bool = Field(
        True, description="Count token_drift each turn (one full render of the conversation; diagnostic only)."
    )
    check_retokenize: bool = Field(True, description="Count retokenize_mismatch each turn (costs one encode).")

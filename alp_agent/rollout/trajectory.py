"""The typed hand-off from rollout to trainer: one finished episode as token ids, masks and inference logprobs.

Token ids are the source of truth: `ids = prompt_ids + completion_ids`; `loss_mask[i] == 1` exactly on tokens the
engine sampled (model turns, including the stop string that ended a tool call), 0 on tool-output and template tokens.
`infer_logprobs[i]` is the engine's logprob of completion token i (0.0 where loss_mask is 0).

`token_roles` says where each completion token came from, one character per token (a str, compact in JSON):

    "m"  model: sampled by the engine (exactly where loss_mask == 1)
    "o"  observation: the content of an env message (tool output, an error message, a hint)
    "t"  template: text the chat template adds (the closing text of an assistant turn, role headers, the
         generation prompt)

so `len(token_roles) == len(completion_ids)`; "" on trajectories written before the field existed (unknown).
`num_void_turns` counts model turns with neither a tool call nor a final answer (SimpleTIR's void turns), every turn
cut by a token limit included (`max_tokens_per_turn`, or the context), whatever it held.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ROLE_MODEL = "m"  # token_roles: sampled by the model
ROLE_OBSERVATION = "o"  # token_roles: content of an env message (tool output, error, hint)
ROLE_TEMPLATE = "t"  # token_roles: chat-template text (closing text, role headers, generation prompt)


@dataclass
class Trajectory:
    prompt_ids: list[int]  # the rendered task prompt (system + user + generation prompt)
    completion_ids: list[int]  # everything after the prompt: model turns and tool observations, in order
    loss_mask: list[int]  # len(completion_ids); 1 = model-generated
    infer_logprobs: list[float]  # len(completion_ids); engine logprob where loss_mask == 1, else 0.0
    reward: float = 0.0
    group_id: int = 0  # trajectories sampled from the same prompt share a group (GRPO)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each model turn in completion
    num_turns: int = 0
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    finish_reason: str = ""  # "answer", "max_turns", "turn_token_limit", "context_limit", "prompt_too_long", ...
    truncated: bool = False
    policy_version: int = 0  # trainer version of the weights that sampled it
    temperature: float = 1.0  # sampling knobs: the trainer divides logits by this temperature
    top_p: float = 1.0
    top_k: int = 0
    token_drift: int = 0  # turns where a full re-render of the conversation differs from our ids (diagnostic only)
    info: dict = field(default_factory=dict)
    num_void_turns: int = 0  # model turns with neither a tool call nor a final answer (cut turns included)
    token_roles: str = ""  # one of ROLE_* per completion token ("" = not recorded); see the module docstring

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        if len(self.loss_mask) != n or len(self.infer_logprobs) != n:
            raise ValueError(
                f"trajectory lengths disagree: completion {n}, loss_mask {len(self.loss_mask)}, "
                f"infer_logprobs {len(self.infer_logprobs)}"
            )
        if self.token_roles and len(self.token_roles) != n:
            raise ValueError(f"trajectory lengths disagree: completion {n}, token_roles {len(self.token_roles)}")

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def num_model_tokens(self) -> int:
        return int(sum(self.loss_mask))

    def has_finite_logprobs(self) -> bool:
        return all(math.isfinite(lp) for lp, m in zip(self.infer_logprobs, self.loss_mask) if m)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        d = dict(d)
        d["turn_spans"] = [tuple(s) for s in d.get("turn_spans", [])]
        return cls(**d)

"""`Transcript`: the running ids of one episode, built only by appending, with masks, logprobs and per-token roles.

`prompt_ids`: the rendered task prompt. `completion_ids`, `loss_mask`, `logprobs`, `roles`: everything after it.
Model turns are appended as sampled (mask 1); observations as the stub delta of chat.py (mask 0). The real
conversation (`messages`, with native `tool_calls` on assistant turns) is kept only for the diagnostics.
"""

from __future__ import annotations

import re

from alp_agent.rollout.chat import ChatTemplate, Delta, Message
from alp_agent.rollout.trajectory import ROLE_MODEL

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.DOTALL)


class Transcript:
    """One episode's ids. `add_model_turn` then `add_observation`, turn by turn; never edits what is there."""

    def __init__(self, chat: ChatTemplate, messages: list[Message], check_drift: bool = True):
        self.chat = chat
        self.check_drift = check_drift
        self.messages = [dict(m) for m in messages]
        self.text = chat.render(self.messages, add_generation_prompt=True)
        self.prompt_ids = chat.encode(self.text)
        self.completion_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.roles: list[str] = []
        self.turn_spans: list[tuple[int, int]] = []
        self.token_drift = 0
        self.retokenize_mismatch = 0

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def last_turn_ended_on_eos(self) -> bool:
        s, e = self.turn_spans[-1]
        return e > s and self.completion_ids[e - 1] in self.chat.eos_ids

    def add_model_turn(self, ids: list[int], logprobs: list[float]) -> str:
        """Append sampled ids as they are (mask 1, with their logprobs); return the assistant message text."""
        start = len(self.completion_ids)
        self.completion_ids.extend(ids)
        self.loss_mask.extend([1] * len(ids))
        self.logprobs.extend(float(x) for x in logprobs)
        self.roles.extend(ROLE_MODEL * len(ids))
        self.turn_spans.append((start, len(self.completion_ids)))
        content = self.chat.turn_content(ids)
        self.messages.append({"role": "assistant", "content": content})
        self.text += self.chat.decode(ids)
        return content

    def observation(self, new_messages: list[Message], tool_calls: list[dict] | None = None) -> Delta:
        """The delta for `new_messages` after the last model turn (not appended yet: the caller checks room)."""
        return self.chat.observation_delta(new_messages, tool_calls, after_eos=self.last_turn_ended_on_eos)

    def add_observation(
        self, new_messages: list[Message], delta: Delta, tool_calls: list[dict] | None = None, check: bool = True
    ) -> None:
        """Append a delta from `observation` (mask 0, logprob 0); then the diagnostics (full re-render, re-tokenize)."""
        if tool_calls:  # the real history as a tool-call parser would record it (diagnostics only)
            last = self.messages[-1]
            last["content"] = _TOOL_CALL_BLOCK.sub("", last["content"]).strip()
            last["tool_calls"] = tool_calls
        if self.check_drift:
            self.token_drift += self._full_render_differs(new_messages, delta.text)
        self.messages.extend(dict(m) for m in new_messages)
        self.completion_ids.extend(delta.ids)
        self.loss_mask.extend([0] * len(delta.ids))
        self.logprobs.extend([0.0] * len(delta.ids))
        self.roles.extend(delta.roles)
        self.text += delta.text
        if check and self.chat.encode(self.text) != self.ids:
            self.retokenize_mismatch += 1

    def _full_render_differs(self, new_messages: list[Message], piece: str) -> bool:
        """Whether a full render of the real conversation differs from our text (a template that cannot render
        the real history at all counts as differing: the diagnostic never ends an episode)."""
        try:
            full = self.chat.render(self.messages + [dict(m) for m in new_messages], add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - diagnostic only
            return True
        return not full.startswith(self.text + piece)

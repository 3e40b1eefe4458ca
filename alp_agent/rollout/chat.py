"""The one tokenizer/template path of the rollout: render the prompt, and render each observation as a delta that
does not depend on how the chat template treats history.

Token-in/token-out. A model turn is kept as the exact ids the engine sampled; it is never decoded and re-tokenized
(re-tokenizing can merge or split tokens differently, which silently changes what the trainer trains on). Everything
else (the prompt, tool observations, the template's own end-of-turn and role headers) is text rendered by the chat
template, tokenized, and appended with loss_mask 0.

Observation deltas against a fixed stub, never the real history. After a model turn the rollout appends

    (a) the template's closing text of an assistant turn (e.g. ChatML "<|im_end|>\\n"), unless the model ended the
        turn on its EOS and the closing text starts with it (then only the rest of it),
    (b) the rendering of the new messages (tool results with their call ids, a hint), and
    (c) the generation prompt of the next assistant turn,

all read off one render of a *stub* conversation: `[stub user, stub assistant (content = a marker, with the same
tool_calls and call ids as the real turn), *new messages]`. The delta is the text after the marker, minus the
template's rendering of the stub's `tool_calls` (the model already wrote its own call; sampled ids are never
changed). A template that hides earlier assistant turns entirely (no marker in the render) gets the closing text
plus the new messages rendered after a stub user turn. The real history is never re-rendered for the delta, so templates that rewrite history work: Qwen3
normalises `<think>` blocks of earlier turns, DeepSeek-R1-style templates drop earlier reasoning, GPT-OSS drops the
analysis channel. The training context therefore keeps every earlier turn's reasoning exactly as sampled, even
where the template's own rendering of the conversation would drop or reformat it: the trainer scores each token in
the context the engine actually sampled it in.

Diagnostics, never reasons to end an episode: `token_drift` counts turns where a full re-render of the real
conversation does not start with the running text (how often a naive render-and-diff pipeline would have broken:
expected > 0 for history-rewriting templates); `retokenize_mismatch` counts turns where tokenizing the running
text from scratch gives other ids than ours (what a decode-and-re-tokenize pipeline would get wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]

STUB_USER = "<<alp-stub-user-41d8>>"
STUB_ASSISTANT = "<<alp-stub-assistant-41d8>>"
_PROBE_TOOL = "alp_probe_tool_41d8"


@dataclass
class Delta:
    """What to append after a model turn: the text, its ids, and the character spans of message contents in it
    (everything else in `text` is template text: closing text, role headers, the generation prompt)."""

    text: str
    ids: list[int]
    roles: str  # per id: "o" observation content, "t" template text (see trajectory.py)


class ChatTemplate:
    """Thin wrapper over a HF tokenizer: render, encode without extra BOS, decode with special tokens kept, and the
    stub-conversation deltas (module docstring)."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; multi-turn rollout needs one")
        self.tokenizer = tokenizer
        self.tools = tools or None
        eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        self._closing: str | None = None

    # --- rendering ---------------------------------------------------------------------------------------------
    def render(
        self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        tools = tools if tools is not None else self.tools
        kwargs = {"tools": tools} if tools else {}
        return str(
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        )

    def encode(self, text: str) -> list[int]:
        """Template text already contains its BOS/special tokens as text: never add more."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def turn_content(self, ids: list[int]) -> str:
        """The assistant message text of a model turn: its decode, minus a trailing EOS the model sampled (the
        template adds the end-of-turn itself when it renders the message)."""
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.decode(ids)

    def renders_tools(self) -> bool:
        """Whether the template shows `tools=` to the model (a probe tool's name appears in the render). SmolLM2's
        template ignores `tools=`; Qwen2.5/Qwen3/Hermes-style templates render them in the system prompt."""
        probe = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe", "parameters": {}}}
        stub = [{"role": "user", "content": STUB_USER}]
        try:
            return _PROBE_TOOL in self.render(stub, add_generation_prompt=True, tools=[probe])
        except Exception:  # noqa: BLE001 - a template that rejects tools= does not render them
            return False

    # --- stub deltas -------------------------------------------------------------------------------------------
    @property
    def closing_text(self) -> str:
        """What the template writes after an assistant turn's content (ChatML: "<|im_end|>\\n")."""
        if self._closing is None:
            self._closing = self._after_marker(self.render(self._stub([]), add_generation_prompt=False))
        return self._closing

    def observation_delta(
        self, new_messages: list[Message], tool_calls: list[dict] | None = None, after_eos: bool = False
    ) -> Delta:
        """(a) + (b) + (c) of the module docstring for `new_messages`, after a turn that made `tool_calls` (their
        ids matter to templates that check them). `after_eos`: the turn ended on a sampled EOS token."""
        stub = self._stub(tool_calls or [])
        full = self.render(stub + [dict(m) for m in new_messages], add_generation_prompt=True)
        if STUB_ASSISTANT in full:
            rest = self._after_marker(full)
            calls_text = self._calls_text(stub) if tool_calls else ""
            if calls_text and rest.startswith(calls_text):
                rest = rest[len(calls_text) :]
        else:  # the template hides earlier assistant turns entirely: render the messages after a stub user turn
            rest = self.closing_text + self._after_user_stub(new_messages)
        if after_eos:
            rest = self._skip_eos_text(rest)
        return self._tokenized(rest, new_messages)

    def _stub(self, tool_calls: list[dict]) -> list[Message]:
        assistant: Message = {"role": "assistant", "content": STUB_ASSISTANT}
        if tool_calls:
            assistant["tool_calls"] = tool_calls
        return [{"role": "user", "content": STUB_USER}, assistant]

    @staticmethod
    def _after_marker(text: str) -> str:
        at = text.rfind(STUB_ASSISTANT)
        if at < 0:
            raise ValueError("the chat template did not render the assistant message's content")
        return text[at + len(STUB_ASSISTANT) :]

    def _after_user_stub(self, new_messages: list[Message]) -> str:
        user = [{"role": "user", "content": STUB_USER}]
        base = self.render(user, add_generation_prompt=False)
        full = self.render(user + [dict(m) for m in new_messages], add_generation_prompt=True)
        if not full.startswith(base):
            raise ValueError("the chat template's rendering of the new messages depends on what follows them")
        return full[len(base) :]

    def _calls_text(self, stub: list[Message]) -> str:
        """The template's own rendering of the stub's tool_calls (between the content and the closing text)."""
        tail = self._after_marker(self.render(stub, add_generation_prompt=False))
        closing = self.closing_text
        return tail[: len(tail) - len(closing)] if closing and tail.endswith(closing) else ""

    def _skip_eos_text(self, text: str) -> str:
        for eos in self.eos_ids:
            eos_text = self.decode([eos])
            if eos_text and text.startswith(eos_text):
                return text[len(eos_text) :]
        return text

    def _tokenized(self, text: str, new_messages: list[Message]) -> Delta:
        """Ids of `text` with a role per id: "o" where the id covers a message's content, else "t"."""
        spans, cursor = [], 0
        for m in new_messages:
            content = m.get("content")
            if not isinstance(content, str) or not content:
                continue
            at = text.find(content, cursor)
            if at >= 0:
                spans.append((at, at + len(content)))
                cursor = at + len(content)
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        except (NotImplementedError, ValueError, KeyError):  # a slow tokenizer has no offsets: all template text
            ids = self.encode(text)
            offsets = [(0, 0)] * len(ids)
        roles = "".join("o" if any(s < e1 and e > s1 for s1, e1 in spans) else "t" for s, e in offsets)
        return Delta(text, ids, roles)

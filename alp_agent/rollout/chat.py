"""The one tokenizer/template path of the rollout: render conversations, append template deltas, check drift.

Token-in/token-out. A model turn is kept as the exact ids the engine sampled; it is never decoded and re-tokenized
(re-tokenizing can merge or split tokens differently, which silently changes what the trainer trains on). Everything
else (the prompt, tool observations, the template's own end-of-turn and role headers) is text rendered by the chat
template, and only the *new* part is tokenized and appended:

    running text  T  = decode of the running ids, segment by segment (prompt, turn 1, delta 1, turn 2, ...)
    full render   F  = chat_template(messages so far, add_generation_prompt=True)
    delta            = F[len(T):]              (valid when F starts with T: the template is append-only)

The delta of the first observation after a model turn therefore starts with the end-of-turn text the template adds
after an assistant message (SmolLM2/Qwen: "<|im_end|>\\n") whenever the model stopped on a stop string rather than on
its EOS. Those template-added tokens were not sampled, have no logprob, and get loss_mask 0 (like tool output).

Drift check, every turn: if F does not start with T, the template is not append-only (e.g. it rewrites past
assistant turns): the turn is counted in `token_drift` and the episode ends with finish_reason "template_drift"
(reported, never silently mis-trained). Separately, `retokenize_mismatch` counts turns where tokenizing F from
scratch would give other ids than ours: that is what a decode-and-re-tokenize pipeline would get wrong (expected > 0
for random models, which sample non-canonical token splits; informational only).
"""

from __future__ import annotations

from typing import Any


class ChatTemplate:
    """Thin wrapper over a HF tokenizer: render, encode without extra BOS, decode with special tokens kept."""

    def __init__(self, tokenizer, tools: list[dict] | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; multi-turn rollout needs one")
        self.tokenizer = tokenizer
        self.tools = tools
        eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def encode(self, text: str) -> list[int]:
        """Template text already contains its BOS/special tokens as text: never add more."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def turn_content(self, ids: list[int]) -> str:
        """The assistant message text of a model turn: its decode, minus a trailing EOS the model sampled (the
        template adds the end-of-turn itself when it renders the message)."""
        if ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return self.decode(ids)


class Transcript:
    """The running ids of one episode, built only by appending, with the matching running text.

    `prompt_ids`: the rendered task prompt. `completion_ids`, `loss_mask`, `logprobs`: everything after it.
    """

    def __init__(self, chat: ChatTemplate, messages: list[dict[str, Any]]):
        self.chat = chat
        self.messages = [dict(m) for m in messages]
        self.text = chat.render(self.messages, add_generation_prompt=True)
        self.prompt_ids = chat.encode(self.text)
        self.completion_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.turn_spans: list[tuple[int, int]] = []
        self.token_drift = 0
        self.retokenize_mismatch = 0

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def add_model_turn(self, ids: list[int], logprobs: list[float]) -> str:
        """Append sampled ids as they are (mask 1, with their logprobs); return the assistant message text."""
        start = len(self.completion_ids)
        self.completion_ids.extend(ids)
        self.loss_mask.extend([1] * len(ids))
        self.logprobs.extend(float(x) for x in logprobs)
        self.turn_spans.append((start, len(self.completion_ids)))
        content = self.chat.turn_content(ids)
        self.messages.append({"role": "assistant", "content": content})
        self.text += self.chat.decode(ids)
        return content

    def observation_delta(self, new_messages: list[dict[str, Any]]) -> tuple[list[int], str] | None:
        """Ids (and text) to append for `new_messages` plus the next generation prompt, without appending them.

        Returns None when the template is not append-only (drift; counted here).
        """
        full = self.chat.render(self.messages + [dict(m) for m in new_messages], add_generation_prompt=True)
        if not full.startswith(self.text):
            self.token_drift += 1
            return None
        piece = full[len(self.text) :]
        return self.chat.encode(piece), piece

    def append_observation(self, new_messages: list[dict[str, Any]], ids: list[int], piece: str, check: bool) -> None:
        """Append a delta from `observation_delta` (mask 0, logprob 0) and optionally run the re-tokenize check."""
        self.messages.extend(dict(m) for m in new_messages)
        self.completion_ids.extend(ids)
        self.loss_mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))
        self.text += piece
        if check and self.chat.encode(self.text) != self.ids:
            self.retokenize_mismatch += 1

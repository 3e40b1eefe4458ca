"""Gymnasium spaces for text environments: free-form unicode actions and chat-message observations.

`gymnasium.spaces.Text` checks every character against a fixed charset (alphanumerics by default), so a model turn with
LaTeX, code or any non-ASCII letter would not be "in" it. These spaces accept any str (bounded length) and any list of
chat messages, and still sample deterministically from a seed so `check_env`'s determinism checks apply.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
from gymnasium.spaces import Space

_SAMPLE_CHARS = string.ascii_letters + string.digits + " .,;:!?+-*/=()[]{}\n"


class UnicodeText(Space[str]):
    """Any Python str of at most `max_length` characters (a model turn)."""

    def __init__(self, max_length: int = 100_000, seed: int | np.random.Generator | None = None):
        self.max_length = int(max_length)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        n = int(self.np_random.integers(1, min(64, self.max_length) + 1))
        idx = self.np_random.integers(0, len(_SAMPLE_CHARS), size=n)
        return "".join(_SAMPLE_CHARS[i] for i in idx)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText(max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnicodeText) and other.max_length == self.max_length


class ChatMessages(Space[list]):
    """A list of chat messages ``{"role": str, "content": str, ...}`` whose roles come from `roles`."""

    def __init__(
        self,
        roles: tuple[str, ...] = ("system", "user", "tool", "assistant"),
        max_messages: int = 64,
        seed: int | np.random.Generator | None = None,
    ):
        self.roles = tuple(roles)
        self.max_messages = int(max_messages)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> list:
        n = int(self.np_random.integers(1, 3))
        return [
            {"role": self.roles[int(self.np_random.integers(len(self.roles)))], "content": f"sample {i}"}
            for i in range(n)
        ]

    def contains(self, x: Any) -> bool:
        return (
            isinstance(x, list)
            and len(x) <= self.max_messages
            and all(
                isinstance(m, dict) and m.get("role") in self.roles and isinstance(m.get("content"), str) for m in x
            )
        )

    def __repr__(self) -> str:
        return f"ChatMessages(roles={self.roles})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatMessages) and other.roles == self.roles

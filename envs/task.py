"""One task of a tool environment: the question, the reference answer, where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    """`prompt` is the user message; `answer` the reference the reward compares against (a string, as in datasets)."""

    prompt: str
    answer: str
    id: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def coerce(cls, obj: Task | dict, index: int = 0) -> Task:
        """Accept a Task or a dict with prompt/question/problem and answer keys (what users write inline)."""
        if isinstance(obj, Task):
            return obj
        prompt = obj.get("prompt", obj.get("question", obj.get("problem")))
        if prompt is None or "answer" not in obj:
            raise ValueError(
                f"task {index} needs 'prompt' (or 'question'/'problem') and 'answer'; got keys {list(obj)}"
            )
        meta = {k: v for k, v in obj.items() if k not in ("prompt", "question", "problem", "answer", "id", "source")}
        return cls(str(prompt), str(obj["answer"]), str(obj.get("id", index)), str(obj.get("source", "")), meta)

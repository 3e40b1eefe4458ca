"""The flagship env: tool-integrated math reasoning. The model writes Python, reads the output, answers in \\boxed{}.

Reward: 1 when the final \\boxed{} answer is equivalent to the reference (see `grading`), else 0; optional shaping
terms (a bonus for a boxed answer, a bonus for having used the tool successfully) are off by default.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import Field, field_validator

from envs.base import ToolEnv, ToolEnvConfig, unwrap_reference
from envs.datasets import DatasetConfig, load_tasks
from envs.grading import Grader, GradingConfig, shared_grader
from envs.parsing import ParsedTurn
from envs.task import Task
from sandbox.base import Sandbox

FENCED_SYSTEM_PROMPT = """You are a careful math solver with a Python interpreter.
To run Python, write a code block and stop:
```python
print(2 ** 100)
```
You will then see its output. Variables persist between code blocks; use print() to show values.
Use Python for any calculation you cannot do exactly in your head.
Finish with the final answer in \\boxed{}, for example \\boxed{42}."""

JSON_SYSTEM_PROMPT = """You are a careful math solver with a Python interpreter, the `python` tool.
To run Python, call it and stop:
<tool_call>
{"name": "python", "arguments": {"code": "print(2 ** 100)"}}
</tool_call>
You will then see its output. Variables persist between calls; use print() to show values.
Use Python for any calculation you cannot do exactly in your head.
Finish with the final answer in \\boxed{}, for example \\boxed{42}."""


class MathEnvConfig(ToolEnvConfig):
    """Rules of the math tool env: the episode rules plus task set, grading and reward shaping."""

    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Task set (default: synthetic).")
    grading: GradingConfig = Field(default_factory=GradingConfig, description="Answer comparison and its limits.")
    user_template: str = Field("{prompt}", description="User message; {prompt} is replaced by the problem text.")
    format_reward: float = Field(0.0, description="Added when the episode ends with a \\boxed{} answer. Off: 0.")
    tool_use_reward: float = Field(
        0.0, description="Added when the episode answers after at least one successful tool call. Off: 0."
    )
    answer_fallback: bool = Field(
        False,
        description="Without a \\boxed{} answer, accept a number stated as 'the (final) answer is N' / 'answer: N'. "
        "Off (strict \\boxed, the paper's setting); the CPU quickstart turns it on for a 135M model.",
    )

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_by_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


# "The answer is 7623." / "Final answer: -3/4" / "answer = 12.5": a number only, so prose is never graded.
_ANSWER_STATEMENT = re.compile(r"(?i)\banswer\s*(?:is|:|=)\s*[*$]*\s*(-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)(?![\d/])")

_task_cache: dict[str, Sequence[Task]] = {}
_task_cache_lock = threading.Lock()


def _cached_tasks(config: DatasetConfig) -> Sequence[Task]:
    """64 envs of one run share one loaded task list instead of parsing the file 64 times."""
    key = config.model_dump_json()
    with _task_cache_lock:
        if key not in _task_cache:
            _task_cache[key] = load_tasks(config)
        return _task_cache[key]


class MathToolEnv(ToolEnv):
    """``gymnasium.make("alp/MathTool-v0", sandbox=..., dataset="gsm8k", max_turns=4, ...)``."""

    config_cls = MathEnvConfig
    config: MathEnvConfig

    def __init__(
        self,
        config: MathEnvConfig | dict | None = None,
        *,
        sandbox: Sandbox | None = None,
        tasks: Sequence[Task | dict] | None = None,
        grader: Grader | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ):
        super().__init__(config, sandbox=sandbox, tasks=tasks, render_mode=render_mode, **overrides)
        if self._tasks is None:
            self._tasks = _cached_tasks(self.config.dataset)  # type: ignore[assignment]
        self._grader: Grader | None = unwrap_reference(grader)

    @property
    def grader(self) -> Grader:
        return self._grader or shared_grader(self.config.grading)

    @property
    def tools_in_prompt(self) -> bool:
        """The built-in prompts describe the `python` tool and its call format; a user's prompt may not."""
        return self.config.system_prompt is None

    def system_prompt(self) -> str:
        if self.config.system_prompt is not None:
            return self.config.system_prompt
        return JSON_SYSTEM_PROMPT if self.config.tool_format == "json" else FENCED_SYSTEM_PROMPT

    def extract_answer(self, parsed: ParsedTurn) -> str | None:
        """The last \\boxed{} outside code; with `answer_fallback`, else the last 'the answer is <number>'."""
        if parsed.answer is not None or not self.config.answer_fallback:
            return parsed.answer
        found = _ANSWER_STATEMENT.findall(parsed.text)
        return found[-1].replace(",", "") if found else None

    def build_messages(self, task: Task) -> list[dict]:
        system = self.system_prompt()
        user = self.config.user_template.replace("{prompt}", task.prompt)
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def compute_reward(self, answer: str | None, task: Task) -> tuple[float, dict]:
        res = self.grader.grade(answer, task.answer)
        reward = float(res.correct)
        if answer is not None:
            reward += self.config.format_reward
            if self._ep.successful_calls:
                reward += self.config.tool_use_reward
        return reward, {"correct": res.correct, "grade_reason": res.reason, "grade_s": res.duration_s}

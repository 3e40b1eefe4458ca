"""Test doubles shared by the tests: a scripted chat env, a scripted policy, an engine wrapper that records, and an
engine that only takes weights.

They stand in for one side of a test only, so the other side stays real (the rollout, the chat templates, the
tokenizer, the trainer, vLLM where a test uses it): an env whose observations, rewards and end are fixed per turn; a
policy whose turns are a function of the prompt text it is given (ids and logprobs as an engine returns them); a
wrapper that records what a real engine was asked and answered; a weight sink that counts `load_weights` calls.
Outside pytest (torchrun workers) the repository root must be on sys.path to import them as `tests.fakes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from alp_agent.engine.base import Engine, Generation, SamplingConfig
from envs.protocol import Message, StepInfo, StepResult, ToolCallSpec

PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run code.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
    },
}

Reply = tuple[str, bool]  # one model turn: its text, and whether the model ended it with EOS
Script = Callable[[str, tuple[str, ...]], Reply]  # (prompt text, the request's stop strings) -> the turn


class ScriptedEnv:
    """A chat env (`envs.protocol.ChatEnv`) that plays a fixed script, whatever the model writes.

    The prompt is an optional system message and the user message `Task {task_index}: {question}`. Every turn counts
    as one tool call; each turn before the `finish_after`-th gets one tool message `observation.format(t=turn)` and
    reward 0; the `finish_after`-th terminates with `reward(text)` (default 1.0) and end reason "answer".
    stop: the env's stop string (None: none). truncate_at: from that turn on the env truncates (its own turn limit).
    native_calls: the env is json-format with a `python` tool; every turn is one call of it (a random model writes no
    parsable call), reported as the turn's `assistant_tool_calls`, and the tool message answers the call's id.
    delay / slow_task: `astep` first sleeps `delay` seconds (10x on task `slow_task`), for concurrency tests.
    `texts` keeps every model turn the env was given, across episodes.
    """

    num_tasks = 8
    tools_in_prompt = False

    def __init__(
        self,
        finish_after: int = 3,
        *,
        stop: str | None = "</tool>",
        system: str | None = "Use the python tool.",
        question: str = "6*7?",
        observation: str = "out[{t}]: 42",
        native_calls: bool = False,
        reward: Callable[[str], float] | None = None,
        truncate_at: int | None = None,
        delay: float = 0.0,
        slow_task: int | None = None,
    ):
        self.finish_after, self.system, self.question, self.observation = finish_after, system, question, observation
        self.stop_strings = [stop] if stop else []
        self.native_calls, self.tool_format = native_calls, "json" if native_calls else "fenced"
        self.reward, self.truncate_at, self.delay, self.slow_task = reward, truncate_at, delay, slow_task
        self.texts: list[str] = []
        self.task, self.t = 0, 0

    @property
    def unwrapped(self) -> ScriptedEnv:
        return self

    def tool_schemas(self) -> list[dict]:
        return [PYTHON_TOOL] if self.native_calls else []

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[list[Message], dict]:
        self.task, self.t = (options or {}).get("task_index", 0), 0
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": f"Task {self.task}: {self.question}"}], {}

    def step(self, action: str) -> StepResult:
        self.t += 1
        self.texts.append(action)
        info: StepInfo = {"tool_calls": 1, "tool_errors": 0, "void_turn": False}
        call: ToolCallSpec = {
            "id": f"call_{self.t}_0",
            "type": "function",
            "function": {"name": "python", "arguments": {"code": "6*7"}},
        }
        if self.native_calls:
            info["assistant_tool_calls"] = [call]
        if self.t >= self.finish_after:
            reward = 1.0 if self.reward is None else self.reward(action)
            return [], reward, True, False, {**info, "end_reason": "answer"}
        obs: Message = {"role": "tool", "content": self.observation.format(t=self.t)}
        if self.native_calls:
            obs.update(tool_call_id=call["id"], name="python")
        truncated = self.truncate_at is not None and self.t >= self.truncate_at
        return [obs], 0.0, False, truncated, info

    async def astep(self, action: str) -> StepResult:
        await asyncio.sleep(self.delay * (10 if self.task == self.slow_task else 1))
        return self.step(action)

    def close(self) -> None:
        pass


class SyncScriptedEnv(ScriptedEnv):
    """A ScriptedEnv without `astep`: the rollout steps it in a worker thread, as it does a plain Gymnasium env."""

    astep = None  # type: ignore[assignment]


class WeightSink(Engine):
    """An engine that only takes weights: counts `load_weights` calls (`weight_loads`) and keeps the last state dict
    (`loaded`). It does not sample; ScriptedPolicy does."""

    max_model_len = 4096

    def __init__(self) -> None:
        self.weight_loads = 0
        self.loaded: dict[str, Any] = {}

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        raise NotImplementedError("a WeightSink does not sample: use ScriptedPolicy")

    def load_weights(self, state_dict: Mapping[str, Any]) -> None:
        self.weight_loads += 1
        self.loaded = dict(state_dict)


class ScriptedPolicy(WeightSink):
    """An engine whose turns come from `script(prompt_text, stop_strings) -> (text, eos)` instead of a model.

    The ids are the tokenizer's for the text (plus EOS when `eos`), cut to the request's max_tokens (finish "length",
    no EOS) as vLLM cuts them; the logprobs are -0.25, -0.26, ... (distinct, so a misplaced one shows). A turn that
    ends on one of the request's stop strings reports it as its stop_reason. Every call is recorded: `calls` (prompt
    ids, Generation) and `prompts` (the decoded prompt); `delay` seconds of sleep before each answer.
    """

    def __init__(self, tokenizer: Any, script: Script, *, max_model_len: int = 4096, delay: float = 0.0) -> None:
        super().__init__()
        self.tok, self.script, self.max_model_len, self.delay = tokenizer, script, max_model_len, delay
        self.calls: list[tuple[list[int], Generation]] = []
        self.prompts: list[str] = []

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        return [asyncio.run(self.agenerate(p, sampling)) for p in prompts]

    async def agenerate(self, prompt: list[int], sampling: SamplingConfig) -> Generation:
        await asyncio.sleep(self.delay)
        text = self.tok.decode(prompt)
        self.prompts.append(text)
        reply, eos = self.script(text, sampling.stop)
        ids = self.tok(reply, add_special_tokens=False)["input_ids"]
        finish, stop = "stop", next((s for s in sampling.stop if reply.endswith(s)), None)
        if len(ids) > sampling.max_tokens:
            ids, finish, eos, stop = ids[: sampling.max_tokens], "length", False, None
        if eos:
            ids = [*ids, self.tok.eos_token_id]
        gen = Generation(ids, [-0.25 - 0.01 * i for i in range(len(ids))], finish, stop)
        self.calls.append((list(prompt), gen))
        return gen


def by_turn(*turns: Reply) -> Script:
    """A script by turn: the k-th reply for an episode's k-th turn (the last one repeats). The turn is read off the
    prompt (its ChatML assistant headers after the first), so concurrent episodes each follow the script."""

    def script(text: str, stop: tuple[str, ...]) -> Reply:
        k = text.count("<|im_start|>assistant") - 1
        return turns[min(k, len(turns) - 1)]

    return script


class RecordingEngine(Engine):
    """Wraps a real engine and records every `agenerate` call as (prompt ids, Generation) in `calls`."""

    def __init__(self, inner: Engine) -> None:
        self.inner, self.max_model_len = inner, inner.max_model_len
        self.calls: list[tuple[list[int], Generation]] = []

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        return self.inner.generate(prompts, sampling)

    async def agenerate(self, prompt: list[int], sampling: SamplingConfig) -> Generation:
        gen = await self.inner.agenerate(prompt, sampling)
        self.calls.append((list(prompt), gen))
        return gen

    def load_weights(self, state_dict: Mapping[str, Any]) -> None:
        self.inner.load_weights(state_dict)

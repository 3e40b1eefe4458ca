"""`ToolEnv`: a Gymnasium env whose action is one model turn (text) and whose observations are chat messages.

One episode = one task. reset() returns the task's chat messages; each step() parses the turn, runs its tool calls
(the `python` tool in the episode's persistent sandbox session) and returns the messages to append: tool results,
error messages for malformed calls, or a hint. The episode ends on a final answer (terminated, reward from
`compute_reward`), on a void turn when `void_turn="end"` (terminated, reward 0), or at `max_turns` (truncated,
reward 0). The env never sees token ids; the rollout owns the conversation and the tokens.

Native tool calls (json format): each parsed call gets an id (`call_<turn>_<i>`), reported in the step info as
`assistant_tool_calls` (the OpenAI/HF form chat templates render), and its result message carries that id as
`tool_call_id` (and the tool's `name`), so a template renders the exchange the way the model was trained.

Subclass hooks: `num_tasks`, `get_task`, `system_prompt`, `extract_answer`, `compute_reward`. The generic form needs
no subclass: ``ToolEnv(tasks=[...], tools=[fn, ...], reward_fn=...)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
from gymnasium.envs.registration import EnvSpec
from pydantic import BaseModel

from envs.config import DEFAULT_VOID_HINT, ToolEnvConfig
from envs.grading import normalize
from envs.parsing import INVALID_TEXT, STOP_STRINGS, ParsedTurn, ToolCall, parse_turn
from envs.protocol import Message, StepInfo, StepResult, ToolCallSpec
from envs.spaces import ChatMessages, UnicodeText
from envs.support import ByReference, EpisodeTotals, step_executor, truncate_middle, unwrap_reference
from envs.task import Task
from envs.tools import PYTHON_TOOL, Tool, ToolContext, as_tool
from sandbox.base import Sandbox, Session
from sandbox.config import SandboxConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_VOID_HINT",
    "ByReference",
    "ToolEnv",
    "ToolEnvConfig",
    "step_executor",
    "truncate_middle",
    "unwrap_reference",
]


@dataclass
class _TurnCalls:
    """What running one turn's calls produced: one result per call (its output or why it did not run), then one
    message per malformed call, plus the counts for the step info."""

    results: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # (content, call id, tool name)
    spec: list[ToolCallSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # invalid-text repairs, told with the first message
    error_kinds: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    run: int = 0
    errors: int = 0
    truncated: int = 0

    def messages(self, role: str) -> list[Message]:
        out: list[Message] = []
        for k, (content, call_id, name) in enumerate(self.results):
            msg: Message = {"role": role, "content": "\n".join(self.notes + [content]) if k == 0 else content}
            if call_id is not None and role == "tool":
                msg.update(tool_call_id=call_id, name=name)
            out.append(msg)
        return out


class ToolEnv(gym.Env[list[dict], str]):
    """Multi-turn tool-use environment. See the module docstring for the episode rules."""

    metadata: ClassVar[dict] = {"render_modes": ["ansi"]}
    _by_reference: ClassVar[tuple[str, ...]] = ("sandbox", "grader")
    default_system_prompt = "You are a helpful assistant. Give your final answer as \\boxed{...}."
    config_cls: type[ToolEnvConfig] = ToolEnvConfig

    def __init__(
        self,
        config: ToolEnvConfig | dict | None = None,
        *,
        sandbox: Sandbox | None = None,
        tasks: Sequence[Task | dict] | None = None,
        tools: Sequence[Tool | Callable] | None = None,
        reward_fn: Callable[[str | None, Task], float] | None = None,
        render_mode: str | None = None,
        **overrides: Any,
    ):
        """`config` (or keyword overrides of its fields) sets the rules; `sandbox` is shared (not closed here).

        `tools` defaults to the built-in `python` tool; `tasks` and `reward_fn` make a generic env without a subclass
        (`reward_fn(answer, task) -> float`; default: normalized exact match).
        """
        if isinstance(config, BaseModel):
            config = config.model_dump()
        self.config = self.config_cls(**{**(config or {}), **overrides})
        self.render_mode = render_mode
        self._tasks = [Task.coerce(t, i) for i, t in enumerate(tasks)] if tasks is not None else None
        self.tools: dict[str, Tool] = {t.name: t for t in map(as_tool, tools if tools is not None else [PYTHON_TOOL])}
        if self.config.tool_format == "fenced" and self.tools and "python" not in self.tools:
            raise ValueError(
                f"tool_format='fenced' runs ```python blocks with a tool named 'python', but the tools are "
                f"{sorted(self.tools)}; use tool_format='json' for other tools"
            )
        self._reward_fn = reward_fn
        self._shared_sandbox: Sandbox | None = unwrap_reference(sandbox)
        self._own_sandbox: Sandbox | None = None
        self._sandbox_lock = threading.Lock()
        self._session: Session | None = None
        self._task: Task | None = None
        self._task_index = -1
        self._ep = EpisodeTotals(done=True)
        self._transcript: list[dict] = []
        roles = ("system", "user", "assistant", self.config.tool_role)
        self.observation_space = ChatMessages(roles=tuple(dict.fromkeys(roles)))
        self.action_space = UnicodeText(max_length=self.config.max_action_chars)

    @property
    def spec(self) -> EnvSpec | None:  # type: ignore[override]
        return self.__dict__.get("_spec")

    @spec.setter
    def spec(self, value: EnvSpec | None) -> None:
        """Keep live objects (sandbox, grader) in the recorded kwargs by reference, so spec.make() can share them."""
        if value is not None and value.kwargs:
            kwargs = {
                k: ByReference(v) if k in self._by_reference and v is not None and not isinstance(v, ByReference) else v
                for k, v in value.kwargs.items()
            }
            value = dataclasses.replace(value, kwargs=kwargs)
        self.__dict__["_spec"] = value

    # ------------------------------------------------------------------ hooks for subclasses

    @property
    def num_tasks(self) -> int:
        if self._tasks is None:
            raise NotImplementedError("pass tasks=... or override num_tasks/get_task")
        return len(self._tasks)

    def get_task(self, index: int) -> Task:
        if self._tasks is None:
            raise NotImplementedError("pass tasks=... or override num_tasks/get_task")
        return self._tasks[index]

    def system_prompt(self) -> str:
        """The system message; config.system_prompt overrides the class default."""
        return self.default_system_prompt if self.config.system_prompt is None else self.config.system_prompt

    def build_messages(self, task: Task) -> list[dict]:
        system = self.system_prompt()
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": task.prompt}]

    def extract_answer(self, parsed: ParsedTurn) -> str | None:
        """The final answer of a turn (the last \\boxed{} outside code by default)."""
        return parsed.answer

    def compute_reward(self, answer: str | None, task: Task) -> tuple[float, dict]:
        """(reward, extra info) of a final answer. Default: `reward_fn`, else normalized exact match."""
        if self._reward_fn is not None:
            return float(self._reward_fn(answer, task)), {}
        ok = answer is not None and normalize(answer).casefold() == normalize(task.answer).casefold()
        return float(ok), {"correct": ok}

    # ------------------------------------------------------------------ contract read by the rollout

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end a model turn so a tool can run; the rollout keeps them in the generated text."""
        return list(STOP_STRINGS[self.config.tool_format])

    def tool_schemas(self) -> list[dict]:
        """JSON schemas for `apply_chat_template(tools=...)` (used by the json format)."""
        return [t.schema() for t in self.tools.values()]

    @property
    def tool_format(self) -> str:
        """'fenced' or 'json': the rollout shows json-format tools to the model (template `tools=` or a section)."""
        return self.config.tool_format

    @property
    def tools_in_prompt(self) -> bool:
        """Whether the env's own system prompt already describes its tools and the call format (the generic
        default prompt does not; subclasses with a tool-describing prompt say True)."""
        return False

    # ------------------------------------------------------------------ sandbox session

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox passed in, or else the process-wide one for this env's sandbox config.

        Why process-wide: each Sandbox keeps `pool_size` warm jails/containers; 64 envs creating their own would
        start 64 pools. `shared_sandbox` gives one per distinct config, closed at interpreter exit.
        """
        if self._shared_sandbox is not None:
            return self._shared_sandbox
        with self._sandbox_lock:
            if self._own_sandbox is None:
                from sandbox import shared_sandbox

                self._own_sandbox = shared_sandbox(self.config.sandbox_config or SandboxConfig())
            return self._own_sandbox

    def _get_session(self) -> Session:
        if self._session is None:
            self._session = self.sandbox.session()
        return self._session

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception as exc:  # noqa: BLE001  a failed close must not break the next episode
                logger.warning("closing a sandbox session failed: %s", exc)

    # ------------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[list[dict], dict]:
        """Start an episode on task ``options["task_index"]`` or, without it, on a task drawn from the seeded RNG."""
        super().reset(seed=seed)
        self._close_session()
        options = options or {}
        n = self.num_tasks
        if "task_index" in options and options["task_index"] is not None:
            index = int(options["task_index"])
            if not 0 <= index < n:
                raise IndexError(f"task_index {index} out of range [0, {n})")
        else:
            index = int(self.np_random.integers(n))
        self._task_index, self._task = index, self.get_task(index)
        self._ep = EpisodeTotals()
        obs = self.build_messages(self._task)
        self._transcript = [dict(m) for m in obs]
        info = {"task_index": index, "task_id": self._task.id, "reference_answer": self._task.answer}
        info.update(self._ep.as_info())
        return obs, info

    def step(self, action: str) -> StepResult:
        """Parse one model turn, run its calls, and return (messages to append, reward, terminated, truncated, info)."""
        if self._ep.done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        if not isinstance(action, (str, bytes, bytearray)):
            raise TypeError(f"action must be the text of one model turn (str), got {type(action).__name__}")
        ep, cfg = self._ep, self.config
        ep.turn += 1
        parsed = parse_turn(action, cfg.tool_format, self.tools, cfg.max_call_chars)
        self._transcript.append({"role": "assistant", "content": parsed.text})
        calls = self._run_calls(parsed)
        answer = None if parsed.attempted_call else self.extract_answer(parsed)
        void = not parsed.attempted_call and answer is None
        ep.tool_errors += calls.errors
        ep.parse_errors += len(calls.error_kinds)
        ep.observation_truncated += calls.truncated
        ep.void_turns += void
        obs, reward, terminated, truncated, extra = self._outcome(parsed, calls, answer)
        if terminated or truncated:
            ep.done = True
            self._close_session()
        self._transcript += [dict(m) for m in obs]
        info: StepInfo = {
            "tool_calls": calls.run,
            "tool_errors": calls.errors,
            "void_turn": void,
            "parsed_answer": answer,
            "sandbox_status": calls.statuses[-1] if calls.statuses else None,
            "sandbox_statuses": calls.statuses,
            "observation_truncated": calls.truncated,
            "parse_errors": len(calls.error_kinds),
            "parse_error_kinds": calls.error_kinds,
            "task_index": self._task_index,
            "assistant_tool_calls": calls.spec,
        }
        info.update(ep.as_info())  # type: ignore[typeddict-item]
        info.update(extra)  # type: ignore[typeddict-item]
        return obs, reward, terminated, truncated, info

    def _run_calls(self, parsed: ParsedTurn) -> _TurnCalls:
        """Run the turn's calls in order (within the per-turn and per-episode budgets); json-format calls get ids."""
        out = _TurnCalls(error_kinds=[e.kind for e in parsed.errors])
        out.notes = [e.message for e in parsed.errors if e.kind == INVALID_TEXT]
        native = self.config.tool_format == "json"
        for i, call in enumerate(parsed.calls):
            call_id = f"call_{self._ep.turn}_{i}" if native else None
            if call_id is not None:
                out.spec.append(
                    {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                )
            out.results.append((self._call_or_refusal(call, i, out), call_id, call.name))
        out.results += [(f"Error: {e.message}", None, None) for e in parsed.errors if e.kind != INVALID_TEXT]
        return out

    def _call_or_refusal(self, call: ToolCall, index: int, out: _TurnCalls) -> str:
        """The tool's (cut) output, or the error saying why the call was not run."""
        cfg, ep = self.config, self._ep
        if index >= cfg.max_tool_calls_per_turn:
            out.error_kinds.append("too_many_calls")
            return f"Error: only {cfg.max_tool_calls_per_turn} tool call(s) per turn; this one was not run."
        if ep.tool_calls >= cfg.max_tool_calls:
            out.error_kinds.append("call_budget")
            return f"Error: the budget of {cfg.max_tool_calls} tool calls is used up; give your answer."
        ctx = ToolContext(session=self._get_session, timeout_s=cfg.tool_timeout_s, env=self)
        res = self.tools[call.name](call.arguments, ctx)
        out.run += 1
        ep.tool_calls += 1
        out.errors += res.error
        ep.successful_calls += not res.error
        out.statuses.append(res.status)
        text, cut = truncate_middle(res.content, cfg.max_observation_chars)
        out.truncated += cut
        return self._wrap_output(text)

    def _outcome(
        self, parsed: ParsedTurn, calls: _TurnCalls, answer: str | None
    ) -> tuple[list[Message], float, bool, bool, dict]:
        """(messages, reward, terminated, truncated, extra info) of the turn, by the episode rules."""
        cfg = self.config
        reward, terminated, extra, obs = 0.0, False, {}, []
        if parsed.attempted_call:
            obs = calls.messages(cfg.tool_role)
        elif answer is not None:
            assert self._task is not None
            terminated = True
            reward, extra = self.compute_reward(answer, self._task)
            extra["end_reason"] = "answer"
        elif cfg.void_turn == "end":
            terminated, extra = True, {"end_reason": "void", "correct": False}
        else:
            obs = [{"role": "user", "content": "\n".join(calls.notes + [cfg.void_hint])}]
        if not terminated and self._ep.turn >= cfg.max_turns:
            return [], 0.0, False, True, {"end_reason": "max_turns", "correct": False}
        return obs, float(reward), terminated, False, extra

    async def astep(self, action: str) -> StepResult:
        """Non-blocking step: the sandbox call runs in a worker thread so many episodes step at once.

        Uses a wide shared thread pool, not asyncio's default one (min(32, cpus + 4) threads): steps mostly wait on
        sandbox processes, so 64 episodes on a 2-core machine should still wait concurrently.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(step_executor(), self.step, action)

    def _wrap_output(self, text: str) -> str:
        """Fenced format shows outputs as ```output blocks (the TIR convention); json format as plain text."""
        return f"```output\n{text}\n```" if self.config.tool_format == "fenced" else text

    def render(self) -> str | None:
        """'ansi': the conversation so far as text."""
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in self._transcript)

    def close(self) -> None:
        """Close the episode's session (the process-wide sandbox stays up for other envs). Safe to call twice."""
        self._close_session()
        self._own_sandbox = None
        self._ep.done = True

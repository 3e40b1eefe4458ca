"""`ToolEnv`: a Gymnasium env whose action is one model turn (text) and whose observations are chat messages.

One episode = one task. reset() returns the task's chat messages; each step() parses the turn, runs its tool calls
(the `python` tool in the episode's persistent sandbox session) and returns the messages to append: tool results,
error messages for malformed calls, or a hint. The episode ends on a final answer (terminated, reward from
`compute_reward`), on a void turn when `void_turn="end"` (terminated, reward 0), or at `max_turns` (truncated,
reward 0). The env never sees token ids; the rollout owns the conversation and the tokens.

Subclass hooks: `num_tasks`, `get_task`, `system_prompt`, `extract_answer`, `compute_reward`. The generic form needs
no subclass: ``ToolEnv(tasks=[...], tools=[fn, ...], reward_fn=...)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import gymnasium as gym
from gymnasium.envs.registration import EnvSpec
from pydantic import BaseModel, ConfigDict, Field

from envs.grading import normalize
from envs.parsing import INVALID_TEXT, STOP_STRINGS, ParsedTurn, parse_turn
from envs.spaces import ChatMessages, UnicodeText
from envs.task import Task
from envs.tools import PYTHON_TOOL, Tool, ToolContext, as_tool
from sandbox.base import Sandbox, Session
from sandbox.config import SandboxConfig

logger = logging.getLogger(__name__)

DEFAULT_VOID_HINT = (
    "Your last message had neither a tool call nor a final answer. Call a tool to compute, "
    "or give the final answer as \\boxed{...}."
)


class ToolEnvConfig(BaseModel):
    """Episode rules shared by every tool env. Embedded in the run config YAML under the env section."""

    model_config = ConfigDict(extra="forbid")

    tool_format: Literal["fenced", "json"] = Field(
        "fenced", description="'fenced': ```python blocks (TIR); 'json': <tool_call>{...}</tool_call> (Hermes/Qwen)."
    )
    max_turns: int = Field(6, ge=1, description="Model turns per episode; reaching it without an answer truncates.")
    max_tool_calls: int = Field(8, ge=0, description="Tool calls per episode; later calls get an error, not run.")
    max_tool_calls_per_turn: int = Field(1, ge=1, description="Calls run per turn; extra ones get an error.")
    max_observation_chars: int = Field(
        2000, ge=100, description="Longer tool output is cut in the middle with a marker (counted in info)."
    )
    max_call_chars: int = Field(16000, ge=1, description="Longer code/arguments are rejected unrun ('too_long').")
    max_action_chars: int = Field(200_000, ge=1, description="Bound of the action space (one model turn).")
    tool_timeout_s: float | None = Field(None, gt=0, description="Per-call time limit; None: the sandbox's default.")
    void_turn: Literal["end", "hint"] = Field(
        "end", description="A turn with no tool call and no answer: 'end' the episode (reward 0) or reply a hint."
    )
    void_hint: str = Field(DEFAULT_VOID_HINT, description="The hint message for void_turn='hint'.")
    tool_role: str = Field("tool", description="Role of tool-result messages ('tool'; 'user' for templates without).")
    system_prompt: str | None = Field(None, description="Overrides the env's default system prompt ('' = none).")
    sandbox_config: SandboxConfig | None = Field(
        None, description="Config of the env's own sandbox when none is passed in; None: SandboxConfig() defaults."
    )


@dataclass
class _Episode:
    """Running totals of one episode (reported in every info)."""

    turn: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    parse_errors: int = 0
    void_turns: int = 0
    observation_truncated: int = 0
    successful_calls: int = 0
    done: bool = False


class ByReference:
    """A constructor argument that `EnvSpec.make` passes on as is instead of deep-copying it.

    `gymnasium.make` records the kwargs in `env.spec`, and `spec.make()` (used by `check_env` and by users to clone an
    env) deep-copies them; a live Sandbox (threads, locks, processes) must be shared, not copied.
    """

    def __init__(self, obj: Any):
        self.obj = obj

    def __deepcopy__(self, memo: dict) -> ByReference:
        return self

    def __repr__(self) -> str:
        return f"ByReference({self.obj!r})"


def unwrap_reference(obj: Any) -> Any:
    return obj.obj if isinstance(obj, ByReference) else obj


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def step_executor() -> ThreadPoolExecutor:
    """The thread pool behind `astep` (size: $ALP_ENV_THREADS, default 256)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            size = int(os.environ.get("ALP_ENV_THREADS", "256"))
            _executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="alp-env-step")
        return _executor


def truncate_middle(text: str, limit: int) -> tuple[str, bool]:
    """Keep head and tail of an over-long tool output; the marker says how much was cut (the model should know)."""
    if len(text) <= limit:
        return text, False
    marker = "\n...[{} characters cut]...\n"
    room = max(0, limit - len(marker.format(len(text))))
    head, tail = room * 2 // 3, room - room * 2 // 3
    cut = len(text) - head - tail
    return text[:head] + marker.format(cut) + (text[len(text) - tail :] if tail else ""), True


class ToolEnv(gym.Env):
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
        self._ep = _Episode(done=True)
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
                from sandbox.pool import shared_sandbox

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
        self._ep = _Episode()
        obs = self.build_messages(self._task)
        self._transcript = [dict(m) for m in obs]
        info = {"task_index": index, "task_id": self._task.id, "reference_answer": self._task.answer}
        info.update(self._totals())
        return obs, info

    def step(self, action: str) -> tuple[list[dict], float, bool, bool, dict]:
        """Parse one model turn, run its calls, and return (messages to append, reward, terminated, truncated, info)."""
        if self._ep.done:
            raise RuntimeError("step() called on a finished episode; call reset() first")
        if not isinstance(action, (str, bytes, bytearray)):
            raise TypeError(f"action must be the text of one model turn (str), got {type(action).__name__}")
        ep = self._ep
        ep.turn += 1
        cfg = self.config
        parsed = parse_turn(action, cfg.tool_format, self.tools, cfg.max_call_chars)
        self._transcript.append({"role": "assistant", "content": parsed.text})

        contents: list[str] = []  # one tool message per call (its output or why it did not run), then parse errors
        notes = [e.message for e in parsed.errors if e.kind == INVALID_TEXT]
        parse_error_kinds = [e.kind for e in parsed.errors]
        tool_calls = tool_errors = truncated_obs = 0
        statuses: list[str] = []
        for i, call in enumerate(parsed.calls):
            if i >= cfg.max_tool_calls_per_turn:
                parse_error_kinds.append("too_many_calls")
                contents.append(
                    f"Error: only {cfg.max_tool_calls_per_turn} tool call(s) per turn; this one was not run."
                )
                continue
            if ep.tool_calls >= cfg.max_tool_calls:
                parse_error_kinds.append("call_budget")
                contents.append(f"Error: the budget of {cfg.max_tool_calls} tool calls is used up; give your answer.")
                continue
            ctx = ToolContext(session=self._get_session, timeout_s=cfg.tool_timeout_s, env=self)
            out = self.tools[call.name](call.arguments, ctx)
            tool_calls += 1
            ep.tool_calls += 1
            tool_errors += out.error
            ep.successful_calls += not out.error
            statuses.append(out.status)
            text, cut = truncate_middle(out.content, cfg.max_observation_chars)
            truncated_obs += cut
            contents.append(self._wrap_output(text))

        contents += [f"Error: {e.message}" for e in parsed.errors if e.kind != INVALID_TEXT]
        ep.tool_errors += tool_errors
        ep.parse_errors += len(parse_error_kinds)
        ep.observation_truncated += truncated_obs
        answer = None if parsed.attempted_call else self.extract_answer(parsed)
        void = not parsed.attempted_call and answer is None
        ep.void_turns += void

        reward, terminated, truncated, extra = 0.0, False, False, {}
        obs: list[dict] = []
        if parsed.attempted_call:
            obs = [{"role": cfg.tool_role, "content": "\n".join(notes + [c])} for c in contents[:1]]
            obs += [{"role": cfg.tool_role, "content": c} for c in contents[1:]]
        elif answer is not None:
            terminated = True
            reward, extra = self.compute_reward(answer, self._task)
            extra["end_reason"] = "answer"
        elif cfg.void_turn == "end":
            terminated = True
            extra = {"end_reason": "void", "correct": False}
        else:
            obs = [{"role": "user", "content": "\n".join(notes + [cfg.void_hint])}]
        if not terminated and ep.turn >= cfg.max_turns:
            truncated, obs = True, []
            extra = {"end_reason": "max_turns", "correct": False}
        if terminated or truncated:
            ep.done = True
            self._close_session()
        self._transcript += [dict(m) for m in obs]

        info = {
            "tool_calls": tool_calls,
            "tool_errors": tool_errors,
            "void_turn": void,
            "parsed_answer": answer,
            "sandbox_status": statuses[-1] if statuses else None,
            "sandbox_statuses": statuses,
            "observation_truncated": truncated_obs,
            "parse_errors": len(parse_error_kinds),
            "parse_error_kinds": parse_error_kinds,
            "task_index": self._task_index,
            **self._totals(),
            **extra,
        }
        return obs, float(reward), terminated, truncated, info

    async def astep(self, action: str) -> tuple[list[dict], float, bool, bool, dict]:
        """Non-blocking step: the sandbox call runs in a worker thread so many episodes step at once.

        Uses a wide shared thread pool, not asyncio's default one (min(32, cpus + 4) threads): steps mostly wait on
        sandbox processes, so 64 episodes on a 2-core machine should still wait concurrently.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(step_executor(), self.step, action)

    def _wrap_output(self, text: str) -> str:
        """Fenced format shows outputs as ```output blocks (the TIR convention); json format as plain text."""
        return f"```output\n{text}\n```" if self.config.tool_format == "fenced" else text

    def _totals(self) -> dict:
        ep = self._ep
        return {
            "turn": ep.turn,
            "total_tool_calls": ep.tool_calls,
            "total_tool_errors": ep.tool_errors,
            "total_parse_errors": ep.parse_errors,
            "total_void_turns": ep.void_turns,
            "total_observation_truncated": ep.observation_truncated,
        }

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

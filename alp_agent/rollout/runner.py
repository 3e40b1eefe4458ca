"""RolloutRunner: many multi-turn episodes at once, each advancing on its own, producing Trajectory objects.

Why asyncio per episode: an episode alternates between the engine (a turn) and the env (a tool call in a sandbox).
Each episode is one coroutine; while it awaits its tool call, the others' turns keep the engine's batch full
(VLLMEngine batches every request in flight on each step). So a slow tool call delays its own episode only.

Group sampling (GRPO) is built in: `run(task_indices, n_per_task)` starts n episodes per task index, all with the
same `group_id` (the task's position in `task_indices`).

Env contract: `envs.protocol.ChatEnv` (reset, step / astep returning a `StepInfo`; optional stop_strings,
tool_format, tool_schemas(), tools_in_prompt, num_tasks). Attributes are read from `env.unwrapped` (Gymnasium
wrappers do not forward them). The step info keys read here: tool_calls, tool_errors, void_turn, end_reason and
assistant_tool_calls (native tool calls: their ids reach the template through the stub, see chat.py).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alp_agent.engine.base import Engine, SamplingConfig
from alp_agent.rollout.chat import ChatTemplate
from alp_agent.rollout.config import RolloutConfig
from alp_agent.rollout.trajectory import Trajectory
from alp_agent.rollout.transcript import Transcript

if TYPE_CHECKING:
    from envs.protocol import ChatEnv, StepResult

log = logging.getLogger(__name__)


def _count(x: Any) -> int:
    """tool_calls / tool_errors may be a count or a list of calls."""
    if x is None:
        return 0
    if isinstance(x, (list, tuple)):
        return len(x)
    return int(x)


class RolloutRunner:
    """`RolloutRunner(engine, tokenizer, env_fn, config).run(task_indices, n_per_task, policy_version)`.

    `env_fn()` makes one env; the runner keeps up to `max_concurrent_episodes` of them and reuses them across
    episodes and runs (`close()` closes them). After each run, `last_metrics` holds the rollout metrics.
    """

    def __init__(self, engine: Engine, tokenizer, env_fn: Callable[[], ChatEnv], config: RolloutConfig | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.env_fn = env_fn
        self.config = config or RolloutConfig()
        self._envs: list[ChatEnv] = []
        self._chats: dict[str, ChatTemplate] = {}
        self._warned_tools = False
        self._free: asyncio.Queue | None = None
        self.last_metrics: dict[str, float] = {}
        ctx = self.config.max_context_tokens or getattr(engine, "max_model_len", None)
        if ctx is None:
            raise ValueError("RolloutConfig.max_context_tokens is required when the engine has no max_model_len")
        self.context_limit = int(ctx)

    # --- public API ---------------------------------------------------------------------------------------------
    def run(self, task_indices: list[int], n_per_task: int = 1, policy_version: int = 0) -> list[Trajectory]:
        """Blocking wrapper around `arun` (the trainer's entry point)."""
        return asyncio.run(self.arun(task_indices, n_per_task, policy_version))

    async def arun(self, task_indices: list[int], n_per_task: int = 1, policy_version: int = 0) -> list[Trajectory]:
        """All episodes of all groups, ordered by (group, sample)."""
        free: asyncio.Queue = asyncio.Queue()
        self._free = free
        for env in self._envs:
            free.put_nowait(env)
        sem = asyncio.Semaphore(self.config.max_concurrent_episodes)
        base_seed = self.config.seed if self.config.seed is not None else random.randrange(2**31)
        t0 = time.perf_counter()

        async def one(group: int, task: int, sample: int) -> Trajectory:
            async with sem:
                env = await self._acquire_env()
                try:
                    seed = (base_seed * 1_000_003 + group * 10_007 + sample) % (2**31)
                    return await self._episode(env, task, group, sample, seed, policy_version)
                finally:
                    free.put_nowait(env)

        jobs = [one(g, t, s) for g, t in enumerate(task_indices) for s in range(n_per_task)]
        trajs = list(await asyncio.gather(*jobs))
        self.last_metrics = rollout_metrics(trajs, time.perf_counter() - t0)
        return trajs

    def close(self) -> None:
        for env in self._envs:
            try:
                env.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.warning("env.close() failed: %s", exc)
        self._envs.clear()

    # --- internals ----------------------------------------------------------------------------------------------
    async def _acquire_env(self):
        assert self._free is not None
        if self._free.empty() and len(self._envs) < self.config.max_concurrent_episodes:
            env = self.env_fn()
            self._envs.append(env)
            return env
        return await self._free.get()

    async def _step(self, env: ChatEnv, text: str) -> StepResult:
        base = env.unwrapped if hasattr(env, "unwrapped") else env
        astep = getattr(env, "astep", None) or getattr(base, "astep", None)
        if astep is not None and inspect.iscoroutinefunction(astep):
            return await astep(text)
        return await asyncio.to_thread(env.step, text)

    async def _episode(self, env: ChatEnv, task: int, group: int, sample: int, seed: int, version: int) -> Trajectory:
        """One episode: model turn, env step, observation delta, until the env or a limit ends it."""
        st = _EpisodeState(task, group, sample, seed, version)
        tr, stop, reset_info = await self._start(env, st)
        engine = self.engine.route(group)  # every turn of the group on one engine of a pool: prefix-cache reuse
        max_prompt = min(self.config.max_prompt_tokens or self.context_limit - 1, self.context_limit - 1)
        if len(tr.prompt_ids) > max_prompt:
            st.end("prompt_too_long", truncated=True)
        while not st.finish:
            turn = await self._model_turn(engine, tr, st, stop)
            if turn is None:
                break
            content, cut = turn
            self._after_step(tr, st, await self._step(env, content), cut)
        return self._trajectory(tr, st, reset_info)

    async def _start(self, env: ChatEnv, st: _EpisodeState) -> tuple[Transcript, tuple[str, ...], dict]:
        """Reset the env on the task; the transcript starts from its messages (with the tools shown, see config)."""
        base = env.unwrapped if hasattr(env, "unwrapped") else env
        messages, reset_info = await asyncio.to_thread(env.reset, seed=st.seed, options={"task_index": st.task})
        cfg = self.config
        stop = tuple(cfg.stop_strings if cfg.stop_strings is not None else getattr(base, "stop_strings", []) or [])
        chat, messages = self._chat_for(base, messages)
        return Transcript(chat, messages, cfg.check_template_drift), stop, reset_info or {}

    def _chat_for(self, env: Any, messages: list[dict]) -> tuple[ChatTemplate, list[dict]]:
        """The template wrapper and first messages, with a json-format env's tools shown to the model: through the
        template's `tools=` where it renders them, else as a tool section in the system prompt."""
        mode = self.config.show_tools
        schemas = list(env.tool_schemas()) if hasattr(env, "tool_schemas") else []
        if mode == "auto":
            native = getattr(env, "tool_format", None) == "json" and not getattr(env, "tools_in_prompt", False)
            mode = "off" if not native else "template" if self._chat(None).renders_tools() else "system_prompt"
        if mode == "off" or not schemas:
            return self._chat(None), messages
        if mode == "template":
            if not self._warned_tools and not self._chat(None).renders_tools():
                self._warned_tools = True
                log.warning(
                    "rollout.show_tools='template' but the chat template ignores tools=: the model won't see them"
                )
            return self._chat(schemas), messages
        from envs.tools import tool_prompt_section

        return self._chat(None), with_system_section(messages, tool_prompt_section(schemas))

    def _chat(self, tools: list[dict] | None) -> ChatTemplate:
        key = json.dumps(tools, sort_keys=True, default=str)
        if key not in self._chats:
            self._chats[key] = ChatTemplate(self.tokenizer, tools)
        return self._chats[key]

    async def _model_turn(
        self, engine: Engine, tr: Transcript, st: _EpisodeState, stop: tuple[str, ...]
    ) -> tuple[str, bool] | None:
        """Sample one turn and append it; (its text, whether it was cut at the token limit), or None if it ended
        the episode."""
        cfg = self.config
        budget = min(cfg.max_tokens_per_turn, self.context_limit - len(tr))
        if budget <= 0:
            st.end("context_limit", truncated=True)
            return None
        sampling = SamplingConfig(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_tokens=budget,
            stop=stop,
            # per-request seeds make vLLM sample each request with its own generator (slower): only when asked
            seed=(st.seed * 31 + st.turns) % (2**31) if cfg.seed is not None else None,
        )
        gen = await engine.agenerate(tr.ids, sampling)
        content = tr.add_model_turn(gen.token_ids, gen.logprobs)
        st.turns += 1
        if gen.info.get("nonfinite_logprobs"):
            st.end("nonfinite_logprobs", truncated=True)
            return None
        cut = gen.finish_reason == "length"
        st.void_turns += cut  # a cut turn is void (SimpleTIR), whatever it held
        if cut and budget < cfg.max_tokens_per_turn:
            st.end("context_limit", truncated=True)
        elif cut and cfg.on_turn_limit == "truncate":
            st.end("turn_token_limit", truncated=True)
        elif cut:
            st.info["turn_token_limit_hits"] = st.info.get("turn_token_limit_hits", 0) + 1
        return None if st.finish else (content, cut)

    def _after_step(self, tr: Transcript, st: _EpisodeState, step: StepResult, cut: bool) -> None:
        """Book the env's step; append its observation unless the episode ends here."""
        obs, r, terminated, env_truncated, info = step
        st.reward += float(r)
        st.calls += _count(info.get("tool_calls"))
        st.errors += _count(info.get("tool_errors"))
        st.void_turns += bool(info.get("void_turn")) and not cut
        st.info["env_info"] = _json_safe(info)
        if terminated:  # the env says why it ended ("answer", "void", ...); a plain env without end_reason answered
            st.end(str(info.get("end_reason") or "answer"))
            return
        if env_truncated or st.turns >= self.config.max_turns:
            st.end("max_turns", truncated=True)
            return
        tool_calls = [dict(c) for c in info.get("assistant_tool_calls") or []]
        try:
            delta = tr.observation(obs, tool_calls)
        except Exception as exc:  # noqa: BLE001 - a template that cannot render this observation ends the episode
            st.info["template_error"] = f"{type(exc).__name__}: {exc}"
            st.end("template_error", truncated=True)
            return
        if len(tr) + len(delta.ids) >= self.context_limit:  # no room for a next turn: drop this observation
            st.end("context_limit", truncated=True)
            return
        tr.add_observation(obs, delta, tool_calls, self.config.check_retokenize)

    def _trajectory(self, tr: Transcript, st: _EpisodeState, reset_info: dict) -> Trajectory:
        cfg = self.config
        st.info["retokenize_mismatch"] = tr.retokenize_mismatch
        env_info = st.info.setdefault("env_info", {})
        for key in ("task_id", "reference_answer"):  # what eval records need to be diffable across runs
            if key in reset_info:
                env_info.setdefault(key, _json_safe(reset_info[key]))
        return Trajectory(
            prompt_ids=tr.prompt_ids,
            completion_ids=tr.completion_ids,
            loss_mask=tr.loss_mask,
            infer_logprobs=tr.logprobs,
            reward=st.reward,
            group_id=st.group,
            turn_spans=tr.turn_spans,
            num_turns=st.turns,
            num_tool_calls=st.calls,
            num_tool_errors=st.errors,
            finish_reason=st.finish,
            truncated=st.truncated,
            policy_version=st.version,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            token_drift=tr.token_drift,
            info=st.info,
            num_void_turns=st.void_turns,
            token_roles="".join(tr.roles),
        )


@dataclass
class _EpisodeState:
    """What one episode has accumulated besides its ids (those are the Transcript's)."""

    task: int
    group: int
    sample: int
    seed: int
    version: int
    reward: float = 0.0
    turns: int = 0
    calls: int = 0
    errors: int = 0
    void_turns: int = 0
    finish: str = ""
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.info.update(task_index=self.task, sample_index=self.sample, seed=self.seed)

    def end(self, reason: str, truncated: bool = False) -> None:
        self.finish, self.truncated = reason, truncated


def with_system_section(messages: list[dict], section: str) -> list[dict]:
    """`messages` with `section` appended to the system message (one is added when there is none)."""
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{section}" if out[0].get("content") else section
        return out
    return [{"role": "system", "content": section}, *out]


def _json_safe(x: Any) -> Any:
    """The env's info as plain JSON values (enums by value, unknown objects by str) for trajectories on disk."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    value = getattr(x, "value", None)
    return value if isinstance(value, (str, int, float)) else str(x)


def rollout_metrics(trajs: list[Trajectory], seconds: float) -> dict[str, float]:
    """Throughput, drift and truncation counts of one rollout batch (keys prefixed `rollout/`)."""
    n = max(len(trajs), 1)
    gen_tokens = sum(t.num_model_tokens for t in trajs)
    m: dict[str, float] = {
        "rollout/episodes": float(len(trajs)),
        "rollout/seconds": seconds,
        "rollout/generated_tokens": float(gen_tokens),
        "rollout/gen_tok_per_s": gen_tokens / seconds if seconds > 0 else 0.0,
        "rollout/episodes_per_s": len(trajs) / seconds if seconds > 0 else 0.0,
        "rollout/token_drift": float(sum(t.token_drift for t in trajs)),
        "rollout/void_turns": float(sum(t.num_void_turns for t in trajs)),
        "rollout/retokenize_mismatch": float(sum(t.info.get("retokenize_mismatch", 0) for t in trajs)),
        "rollout/truncated_frac": sum(t.truncated for t in trajs) / n,
        "rollout/mean_turns": sum(t.num_turns for t in trajs) / n,
        "rollout/mean_tool_calls": sum(t.num_tool_calls for t in trajs) / n,
        "rollout/mean_reward": sum(t.reward for t in trajs) / n,
        "rollout/nonfinite_logprob_episodes": float(sum(not t.has_finite_logprobs() for t in trajs)),
    }
    for reason, k in Counter(t.finish_reason for t in trajs).items():
        m[f"rollout/finish/{reason}"] = float(k)
    return m

"""RolloutRunner: many multi-turn episodes at once, each advancing on its own, producing Trajectory objects.

Why asyncio per episode: an episode alternates between the engine (a turn) and the env (a tool call in a sandbox).
Each episode is one coroutine; while it awaits its tool call, the others' turns keep the engine's batch full
(VLLMEngine batches every request in flight on each step). So a slow tool call delays its own episode only.

Group sampling (GRPO) is built in: `run(task_indices, n_per_task)` starts n episodes per task index, all with the
same `group_id` (the task's position in `task_indices`).

Env contract (envs/): `reset(seed, options={"task_index": i}) -> (messages, info)`;
`step(text) / await astep(text) -> (messages_to_append, reward, terminated, truncated, info)` with info keys
tool_calls, tool_errors, void_turn, parsed_answer, sandbox_status; `stop_strings`; `tool_schemas()`; `num_tasks`.
Attributes are read from `env.unwrapped` (Gymnasium wrappers do not forward them).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from alp_agent.engine.base import Engine, SamplingConfig
from alp_agent.rollout.chat import ChatTemplate, Transcript
from alp_agent.rollout.config import RolloutConfig
from alp_agent.rollout.trajectory import Trajectory

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

    def __init__(self, engine: Engine, tokenizer, env_fn: Callable[[], Any], config: RolloutConfig | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.env_fn = env_fn
        self.config = config or RolloutConfig()
        self._envs: list[Any] = []
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
        self._free = asyncio.Queue()
        for env in self._envs:
            self._free.put_nowait(env)
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
                    self._free.put_nowait(env)

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

    async def _step(self, env, text: str):
        base = env.unwrapped if hasattr(env, "unwrapped") else env
        astep = getattr(env, "astep", None) or getattr(base, "astep", None)
        if astep is not None and inspect.iscoroutinefunction(astep):
            return await astep(text)
        return await asyncio.to_thread(env.step, text)

    async def _episode(self, env, task: int, group: int, sample: int, seed: int, version: int) -> Trajectory:
        cfg = self.config
        base = env.unwrapped if hasattr(env, "unwrapped") else env
        messages, reset_info = await asyncio.to_thread(env.reset, seed=seed, options={"task_index": task})
        stop = tuple(cfg.stop_strings if cfg.stop_strings is not None else getattr(base, "stop_strings", []) or [])
        tools = base.tool_schemas() if cfg.pass_tool_schemas and hasattr(base, "tool_schemas") else None
        tr = Transcript(ChatTemplate(self.tokenizer, tools), messages)
        engine = self.engine.route(group)  # every turn of the group on one engine of a pool: prefix-cache reuse
        reward, turns, calls, errors = 0.0, 0, 0, 0
        finish, truncated = "", False
        info: dict[str, Any] = {"task_index": task, "sample_index": sample, "seed": seed}
        max_prompt = min(cfg.max_prompt_tokens or self.context_limit - 1, self.context_limit - 1)

        if len(tr.prompt_ids) > max_prompt:
            finish, truncated = "prompt_too_long", True
        while not finish:
            budget = min(cfg.max_tokens_per_turn, self.context_limit - len(tr))
            if budget <= 0:
                finish, truncated = "context_limit", True
                break
            sampling = SamplingConfig(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                max_tokens=budget,
                stop=stop,
                # per-request seeds make vLLM sample each request with its own generator (slower): only when asked
                seed=(seed * 31 + turns) % (2**31) if cfg.seed is not None else None,
            )
            gen = await engine.agenerate(tr.ids, sampling)
            content = tr.add_model_turn(gen.token_ids, gen.logprobs)
            turns += 1
            if gen.info.get("nonfinite_logprobs"):
                finish, truncated = "nonfinite_logprobs", True
                break
            if gen.finish_reason == "length":
                if budget < cfg.max_tokens_per_turn:
                    finish, truncated = "context_limit", True
                    break
                if cfg.on_turn_limit == "truncate":
                    finish, truncated = "turn_token_limit", True
                    break
                info["turn_token_limit_hits"] = info.get("turn_token_limit_hits", 0) + 1
            obs, r, terminated, env_truncated, step_info = await self._step(env, content)
            reward += float(r)
            calls += _count(step_info.get("tool_calls"))
            errors += _count(step_info.get("tool_errors"))
            info["env_info"] = _json_safe(step_info)
            if terminated:
                # the env says why it ended ("answer", "void", ...); a plain env without end_reason answered
                finish = str(step_info.get("end_reason") or "answer")
                break
            if env_truncated or turns >= cfg.max_turns:
                finish, truncated = "max_turns", True
                break
            delta = tr.observation_delta(obs)
            if delta is None:
                finish, truncated = "template_drift", True
                break
            ids, piece = delta
            if len(tr) + len(ids) >= self.context_limit:  # no room for a next turn: drop this observation
                finish, truncated = "context_limit", True
                break
            tr.append_observation(obs, ids, piece, cfg.check_retokenize)

        info["retokenize_mismatch"] = tr.retokenize_mismatch
        env_info = info.setdefault("env_info", {})
        for key in ("task_id", "reference_answer"):  # what eval records need to be diffable across runs
            if key in (reset_info or {}):
                env_info.setdefault(key, _json_safe(reset_info[key]))
        return Trajectory(
            prompt_ids=tr.prompt_ids,
            completion_ids=tr.completion_ids,
            loss_mask=tr.loss_mask,
            infer_logprobs=tr.logprobs,
            reward=reward,
            group_id=group,
            turn_spans=tr.turn_spans,
            num_turns=turns,
            num_tool_calls=calls,
            num_tool_errors=errors,
            finish_reason=finish,
            truncated=truncated,
            policy_version=version,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            token_drift=tr.token_drift,
            info=info,
        )


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

"""EnginePool: several engines behind one Engine interface (data-parallel rollout).

Why: one vLLM engine saturates one GPU (or a few cores); a trainer on 8 GPUs wants rollouts from several engines at
once, and every engine must sample with the same weights. The pool
  - routes work: `route(group)` pins every turn of every episode of a GRPO group to one engine (group g -> engine
    g mod n), so the group's shared prompt is prefilled once and each episode's history stays in that engine's
    prefix cache; a plain `agenerate` (or routing "least_loaded") goes to the engine with the fewest requests in
    flight;
  - loads weights into every engine after each batch, in parallel, and returns only when all have them (so no
    engine samples the next batch with old weights). Process engines share ONE set of shared-memory buffers: one
    copy from the trainer, however many engines.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Hashable, Mapping

import torch

from alp_agent.engine.base import Engine, Generation, SamplingConfig
from alp_agent.engine.remote import ProcessEngine
from alp_agent.engine.shared_weights import SharedWeights


class _Pinned(Engine):
    """The pool seen through one member: what `route()` returns for group routing (counts go to the pool)."""

    def __init__(self, pool: EnginePool, index: int):
        self.pool, self.index = pool, index
        self.max_model_len = pool.max_model_len

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        return self.pool._run_on(self.index, prompts, sampling)

    async def agenerate(self, prompt: list[int], sampling: SamplingConfig) -> Generation:
        return await self.pool._arun_on(self.index, prompt, sampling)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.pool.load_weights(state_dict)  # weights are the pool's business: all members, never one


class EnginePool(Engine):
    """`EnginePool([engine, ...], routing="group")`. Owns its members: `close()` closes them all.

    `requests[i]` counts requests served by member i (how the spread is checked and logged)."""

    def __init__(self, engines: list[Engine], routing: str = "group"):
        if not engines:
            raise ValueError("EnginePool needs at least one engine")
        if routing not in ("group", "least_loaded"):
            raise ValueError(f"routing must be 'group' or 'least_loaded', got {routing!r}")
        self.engines = list(engines)
        self.routing = routing
        self.max_model_len = min(int(e.max_model_len) for e in self.engines)
        self.inflight = [0] * len(self.engines)
        self.requests = [0] * len(self.engines)
        self._lock = threading.Lock()
        self._weights: SharedWeights | None = None

    # --- routing ------------------------------------------------------------------------------------------------
    def route(self, key: Hashable) -> Engine:
        """The engine for all requests of the episodes sharing `key` (the GRPO group): a fixed member with group
        routing, the pool itself (per-request least-loaded) otherwise."""
        if self.routing == "least_loaded":
            return self
        index = key if isinstance(key, int) else hash(key)
        return _Pinned(self, index % len(self.engines))

    def _least_loaded(self) -> int:
        with self._lock:
            return min(range(len(self.engines)), key=lambda i: (self.inflight[i], self.requests[i]))

    def _enter(self, i: int, k: int = 1) -> None:
        with self._lock:
            self.inflight[i] += k
            self.requests[i] += k

    def _leave(self, i: int, k: int = 1) -> None:
        with self._lock:
            self.inflight[i] -= k

    def _run_on(self, i: int, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        if not prompts:
            return []
        self._enter(i, len(prompts))
        try:
            return self.engines[i].generate(prompts, sampling)
        finally:
            self._leave(i, len(prompts))

    async def _arun_on(self, i: int, prompt: list[int], sampling: SamplingConfig) -> Generation:
        self._enter(i)
        try:
            return await self.engines[i].agenerate(prompt, sampling)
        finally:
            self._leave(i)

    # --- Engine interface ---------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        """Prompts dealt round-robin over the members, each member's share as one batch, in parallel."""
        n = len(self.engines)
        shares = [list(range(i, len(prompts), n)) for i in range(n)]
        out: list[Generation | None] = [None] * len(prompts)

        def run(i: int) -> None:
            for j, g in zip(shares[i], self._run_on(i, [prompts[j] for j in shares[i]], sampling)):
                out[j] = g

        with cf.ThreadPoolExecutor(n) as ex:
            list(ex.map(run, range(n)))
        return out  # type: ignore[return-value]

    async def agenerate(self, prompt: list[int], sampling: SamplingConfig) -> Generation:
        return await self._arun_on(self._least_loaded(), prompt, sampling)

    @property
    def weight_dtype(self) -> torch.dtype | None:
        return getattr(self.engines[0], "weight_dtype", None)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """The same weights into every member, in parallel; returns when all have loaded them.

        Process members read one shared-memory copy (filled once here); other members get `load_weights` each."""
        procs = [e for e in self.engines if isinstance(e, ProcessEngine)]
        futures: list[cf.Future] = []
        if procs:
            dtypes = {e.weight_dtype for e in procs}
            dtype = dtypes.pop() if len(dtypes) == 1 else None
            if self._weights is None or not self._weights.matches(state_dict):
                self._weights = SharedWeights.for_state_dict(state_dict, dtype)
            self._weights.fill(state_dict)
            futures += [e.load_shared(self._weights) for e in procs]
        others = [e for e in self.engines if not isinstance(e, ProcessEngine)]
        if others:
            ex = cf.ThreadPoolExecutor(len(others))
            futures += [ex.submit(e.load_weights, state_dict) for e in others]
            ex.shutdown(wait=False)
        errors = [f.exception() for f in futures]  # wait for every member before raising
        for exc in errors:
            if exc is not None:
                raise exc

    def release_kv_cache(self) -> int:
        """Every member's KV cache (members release one after another: each is a few milliseconds)."""
        return sum(e.release_kv_cache() for e in self.engines)

    def close(self) -> None:
        errors = []
        for e in self.engines:
            try:
                e.close()
            except Exception as exc:  # noqa: BLE001 - close the others first
                errors.append(exc)
        if errors:
            raise errors[0]

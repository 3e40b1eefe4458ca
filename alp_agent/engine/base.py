"""The inference-engine contract: token ids in, token ids + sampled-token logprobs out.

The rollout never sees text from an engine, only ids, so what the trainer trains on is exactly what was sampled.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling knobs. Those that change the distribution (temperature, top_p, top_k) are recorded in every
    trajectory so the trainer evaluates the same distribution. With top_p < 1 or top_k > 0 the engine's logprobs are
    those of the truncated, renormalised distribution (vLLM's `logprobs_mode="processed_logprobs"`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 512
    stop: tuple[str, ...] = ()  # stop strings; when hit they ARE kept in the output ids (include_stop_str_in_output)
    seed: int | None = None


@dataclass
class Generation:
    """One continuation: the ids the engine sampled and the logprob of each under the engine's own policy."""

    token_ids: list[int]
    logprobs: list[float]  # same length as token_ids
    finish_reason: str  # "stop" (EOS or stop string), "length" (max_tokens), "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it, when known
    info: dict = field(default_factory=dict)


class Engine(abc.ABC):
    """Generates continuations of token-id prompts and takes new weights in place."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        """Blocking batch generation: one Generation per prompt, in order."""

    async def agenerate(self, prompt: list[int], sampling: SamplingConfig) -> Generation:
        """Generate one continuation without blocking other episodes (continuous batching where supported)."""
        import asyncio

        return (await asyncio.to_thread(self.generate, [prompt], sampling))[0]

    def route(self, key: Hashable) -> Engine:
        """The engine that should serve every request of the episodes sharing `key` (the rollout passes the GRPO
        group). A single engine is its own route; a pool (pool.py) pins a group to one member so the group's
        shared prompt and each episode's growing history reuse that member's prefix cache."""
        return self

    @abc.abstractmethod
    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace the policy weights in place (HF parameter names). Never receives ALP log-sigmas."""

    def release_kv_cache(self) -> int:
        """Give the KV cache's memory back until the next request needs it (the loop calls this before an update,
        when nothing samples); returns the bytes released. The prefix cache is gone afterwards. Default: nothing to
        release (an engine without a KV cache of its own, or one whose memory is not the host's)."""
        return 0

    def close(self) -> None:  # noqa: B027 - a default no-op that engines without resources keep
        pass


class FutureEngine(Engine):
    """An engine whose primitive is `submit`: one request in, a future of its Generation out (vLLM in this process
    or in a child). Batch and async generation follow from it, so every request in flight is batched together."""

    @abc.abstractmethod
    def submit(self, prompt: list[int], sampling: SamplingConfig) -> cf.Future:
        """Queue one request; the future resolves to its Generation (or raises the request's error)."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        futures = [self.submit(p, sampling) for p in prompts]
        return [f.result() for f in futures]

    async def agenerate(self, prompt: list[int], sampling: SamplingConfig) -> Generation:
        import asyncio

        return await asyncio.wrap_future(self.submit(prompt, sampling))

"""Checks shared by every engine: a NaN/inf logprob is never passed on silently."""

from __future__ import annotations

import math

from alp_agent.engine.base import Generation


class NonFiniteLogprobsError(RuntimeError):
    """The engine returned a NaN or infinite logprob for a sampled token (broken weights, overflow in fp16...)."""


def check_logprobs(gen: Generation, mode: str = "raise") -> Generation:
    """Count non-finite logprobs; raise or flag them in `gen.info['nonfinite_logprobs']` depending on `mode`."""
    bad = [i for i, lp in enumerate(gen.logprobs) if not math.isfinite(lp)]
    if bad:
        if mode == "raise":
            raise NonFiniteLogprobsError(
                f"{len(bad)} of {len(gen.logprobs)} sampled-token logprobs are not finite (first at position "
                f"{bad[0]}: {gen.logprobs[bad[0]]}); set EngineConfig.nonfinite_logprobs='flag' to drop such "
                "episodes instead of stopping"
            )
        gen.info["nonfinite_logprobs"] = len(bad)
    return gen

"""sigma0 'auto': size the noise to the training-inference mismatch it is meant to cover (docs/method.md "Choosing
sigma0").

On the first rollout batch, before any update, with the first `perturb.auto_rows` episodes:
  1. one clean forward: the train-vs-engine divergence on the engine's sampled tokens, KL(mu || pi) by k3 (target);
  2. bisection on log sigma0 in [1e-5, 1] (one sigma for every perturbed layer, scale-aware noise, i.e. relative to
     each layer's input RMS, so every layer gets noise of the same relative size): perturbed no-grad forwards with a
     fixed noise draw until the exact KL(clean || perturbed), averaged over model-token positions, equals the target.
Both KLs and the chosen sigma0 are returned for the log (calibration/*). With no measurable mismatch (an fp32 engine)
the search ends at the lower bound, and the log says so. `calibration/kl_noise_at_min_sigma` is the noise KL at the
lower bound 1e-5: under bf16 compute any sigma re-draws the rounding of every matmul, so the noise KL has a floor of
the order of the bf16 mismatch itself; when it is close to the target, the calibrated sigma0 mostly reproduces
rounding noise (measured on the quickstart, docs/method.md "Choosing sigma0").

Why bisection: the noise KL grows monotonically with sigma for a fixed draw (it is ~ c sigma^2 while small), and a
fixed number of steps keeps every torchrun rank in the same sequence of collective forwards. Ranks draw different
noise (the rank enters the seed), so the chosen log sigma0 is averaged over ranks to keep the s_l replicated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from alp_agent.algo.perturb import LayerPerturbation
from alp_agent.train import distributed as D
from alp_agent.train.batching import Row, collate
from alp_agent.train.metrics import kl_stats
from alp_agent.train.noise_kl import clean_logits, kl_between, perturbed_logits, target_logprobs

LOG_SIGMA_RANGE = (math.log(1e-5), math.log(1.0))
STEPS = 12  # bracket width ln(1e5) / 2^12 = 0.3 %: far below the run-to-run spread of either KL


@torch.no_grad()
def calibrate_sigma0(
    model: nn.Module,
    forward_model: nn.Module,
    perturbation: LayerPerturbation,
    rows: list[Row],
    device: torch.device,
    autocast: Callable,
) -> dict[str, float]:
    """Set every s_l to the calibrated log sigma0 (in place) and return the calibration metrics."""
    t0 = time.perf_counter()
    mb = collate(rows, device)
    clean, targets, infer = clean_logits(model, forward_model, mb, autocast)
    logp = target_logprobs(clean, targets, mb.temperature)
    mismatch = kl_stats(logp, infer, "kl")
    target = max(mismatch.get("kl/k3", 0.0), 0.0)

    def kl_at(log_sigma: float) -> float:
        perturbation.log_sigma.data.fill_(log_sigma)
        noisy = perturbed_logits(model, forward_model, perturbation, mb, autocast, step=0, micro=0)
        return float(kl_between(clean, noisy, mb.temperature).mean()) if len(clean) else 0.0

    lo, hi = LOG_SIGMA_RANGE
    floor = kl_at(lo)  # in bf16 compute even the smallest sigma re-draws rounding: the KL does not start at 0
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl_at(mid) < target else (lo, mid)
    chosen = torch.tensor([(lo + hi) / 2], dtype=torch.float64, device=device)
    D.all_reduce_(chosen, "avg")  # no-op in a single process
    noise = kl_at(float(chosen))
    return {
        "calibration/sigma0": math.exp(float(chosen)),
        "calibration/kl_mismatch_k3": target,
        "calibration/kl_mismatch_k1": mismatch.get("kl/k1", float("nan")),
        "calibration/kl_noise_exact": noise,
        "calibration/kl_noise_at_min_sigma": floor,
        "calibration/at_lower_bound": float(float(chosen) <= LOG_SIGMA_RANGE[0] + 1e-3),
        "calibration/tokens": float(targets.numel()),
        "calibration/time": time.perf_counter() - t0,
    }


def maybe_calibrate(trainer: Any, rows: list[Row]) -> dict[str, float]:
    """The trainer's hook: with sigma0 'auto' and noise on, calibrate on the first batch before any update (a resumed
    run has its calibrated s_l in the checkpoint and skips this). Returns the calibration metrics, or {}."""
    pc = trainer.cfg.algo.perturb
    if not pc.auto or trainer.perturbation is None or trainer.batch > 0 or trainer.step > 0:
        return {}
    rows = rows[: pc.auto_rows]
    return calibrate_sigma0(
        trainer.model, trainer.forward_model, trainer.perturbation, rows, trainer.device, trainer._autocast
    )

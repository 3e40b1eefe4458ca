"""`alp-agent doctor`, part 2: the numeric checks. Logprob parity engine vs trainer at lr 0 (same ids, the run's
temperature / top-p / top-k) and ALP's noise per layer group next to that mismatch.

Statistics are pure functions of logprob lists; `trainer_logprobs` and `noise_kl_by_group` run the real trainer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from alp_agent.app.doctor_checks import FAIL, PASS, SKIP, WARN, Check
from alp_agent.rollout.trajectory import Trajectory

# Expected mean |log mu - log pi| per (engine dtype, trainer compute dtype), measured on SmolLM2-135M-Instruct
# (CPU vLLM vs the HF trainer, temperature 0.7, top-p 1; bf16 vs fp32 0.0257 measured by the doctor on the
# quickstart, as in the 0.025): WARN above 2x, FAIL above 10x.
EXPECTED_MEAN_ABS = {
    ("bfloat16", "float32"): 0.025,
    ("bfloat16", "bfloat16"): 0.029,  # bf16 autocast trainer (the quickstart): 0.0286 measured
    ("float32", "float32"): 1e-6,
    ("float32", "bfloat16"): 0.025,
}
EXPECTED_FALLBACK = 0.025  # float16 and other pairs: the bfloat16 figure (order of magnitude)
WARN_X, FAIL_X = 2.0, 10.0


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def parity_stats(engine: Sequence[float], trainer: Sequence[float]) -> dict[str, float]:
    """|Δ log p| mean / p99 / max, KL(mu||pi) by k3 = mean(r - 1 - log r) with r = pi/mu on mu's samples, and the
    ratio's p99.9 and max, over position-aligned logprobs of the sampled tokens."""
    d = [t - e for e, t in zip(engine, trainer) if math.isfinite(e) and math.isfinite(t)]
    if not d:
        return {"tokens": 0.0}
    a = [abs(x) for x in d]
    r = [math.exp(min(x, 50.0)) for x in d]
    return {
        "tokens": float(len(d)),
        "mean_abs": sum(a) / len(a),
        "p99_abs": _q(a, 0.99),
        "max_abs": max(a),
        "kl_k3": sum(ri - 1 - x for ri, x in zip(r, d)) / len(d),
        "ratio_p99_9": _q(r, 0.999),
        "ratio_max": max(r),
    }


def expected_mean_abs(engine_dtype: str, trainer_dtype: str) -> float:
    return EXPECTED_MEAN_ABS.get((engine_dtype, trainer_dtype), EXPECTED_FALLBACK)


def check_parity(
    stats: dict[str, float], engine_dtype: str, trainer_dtype: str, top_p: float = 1.0, top_k: int = 0
) -> Check:
    exp = expected_mean_abs(engine_dtype, trainer_dtype)
    numbers: dict[str, Any] = {**stats, "expected_mean_abs": exp, "engine_dtype": engine_dtype}
    numbers["trainer_dtype"] = trainer_dtype
    if not stats.get("tokens"):
        return Check("logprob parity", FAIL, "no sampled tokens to compare", numbers)
    m = stats["mean_abs"]
    status = FAIL if m > FAIL_X * exp else WARN if m > WARN_X * exp else PASS
    summary = (
        f"mean |Δ log p| {m:.3g} (expected {exp:.2g} for {engine_dtype} engine vs {trainer_dtype} trainer; WARN > "
        f"{WARN_X:g}x, FAIL > {FAIL_X:g}x), p99 {stats['p99_abs']:.3g}, max {stats['max_abs']:.3g}, "
        f"KL(mu||pi) {stats['kl_k3']:.3g}, ratio p99.9 {stats['ratio_p99_9']:.4g} over {int(stats['tokens'])} tokens"
    )
    details = []
    if status != PASS:
        details.append(
            "a mismatch this large at lr 0 usually means the trainer scores tokens under other sampling settings "
            "than the engine (temperature, top-p/top-k truncation) or with another dtype/kernel"
        )
    from alp_agent.train.episode_log import truncation_supported

    if (top_p < 1.0 or top_k > 0) and not truncation_supported():
        details.append(
            f"top_p={top_p} top_k={top_k}: the engine's logprobs are renormalised over the kept tokens, the "
            "trainer's are not, so every token differs by the log of the kept mass"
        )
    return Check("logprob parity", status, summary, numbers, details)


def trainer_logprobs(trainer, trajs: Sequence[Trajectory], temperature: float | None = None) -> list[list[float]]:
    """The trainer's clean logprobs of each trajectory's completion tokens (its update dtype, the trajectory's own
    temperature unless `temperature` is given: a deliberate mismatch in the tests)."""
    from alp_agent.train.episode_log import trainer_logprobs as logged

    if temperature is None:
        return logged(trainer, trajs)[0]
    moved = [_with_temperature(t, temperature) for t in trajs]
    return logged(trainer, moved)[0]


def _with_temperature(t: Trajectory, temperature: float) -> Trajectory:
    from dataclasses import replace

    return replace(t, temperature=temperature)


def model_token_pairs(trajs: Sequence[Trajectory], trainer_lps: Sequence[Sequence[float]]):
    """(engine, trainer) logprobs of the mask-1 tokens, flattened."""
    eng: list[float] = []
    tr: list[float] = []
    for t, lp in zip(trajs, trainer_lps):
        for i, m in enumerate(t.loss_mask):
            if m and i < len(lp):
                eng.append(t.infer_logprobs[i])
                tr.append(lp[i])
    return eng, tr


def layer_groups(layer_ids: Sequence[int]) -> dict[str, list[int]]:
    """Positions in the perturbation's layer list, by thirds of the perturbed layers (early/middle/late) and all."""
    n = len(layer_ids)
    cuts = {"early": (0, max(1, n // 3)), "middle": (n // 3, max(n // 3 + 1, 2 * n // 3)), "late": (2 * n // 3, n)}
    groups = {}
    for name, (a, b) in cuts.items():
        idx = list(range(a, min(b, n)))
        if idx and n >= 3:
            groups[f"{name} (layers {layer_ids[idx[0]]}-{layer_ids[idx[-1]]})"] = idx
    groups[f"all ({n} layers)"] = list(range(n))
    return groups


def noise_kl_by_group(trainer, trajs: Sequence[Trajectory]) -> dict[str, float]:
    """KL(clean||perturbed) by k3 on the sampled tokens, with noise at the configured sigma on one layer group at
    a time (the others' sigma set to 0 for the measurement, then restored)."""
    import torch

    from alp_agent.train.episode_log import trainer_logprobs as logged

    pert = trainer.perturbation
    clean, _ = logged(trainer, trajs)
    saved = pert.log_sigma.detach().clone()
    out = {}
    try:
        for name, idx in layer_groups(pert.layer_ids).items():
            with torch.no_grad():
                pert.log_sigma.copy_(torch.full_like(saved, -80.0))
                pert.log_sigma[idx] = saved[idx]
            _, noisy = logged(trainer, trajs)
            c, n = model_token_pairs(trajs, clean), model_token_pairs(trajs, noisy or [])
            d = [b - a for a, b in zip(c[1], n[1])]
            out[name] = sum(math.exp(x) - 1 - x for x in d) / max(len(d), 1)
    finally:
        with torch.no_grad():
            pert.log_sigma.copy_(saved)
    return out


def check_noise(
    kl_by_group: dict[str, float] | None,
    mismatch_kl: float,
    sigma: float,
    learnable: bool,
    trainer_dtype: str = "float32",
) -> Check:
    if kl_by_group is None:
        return Check("ALP noise", SKIP, "the algorithm adds no noise (bypass or a baseline)")
    total = next((v for k, v in kl_by_group.items() if k.startswith("all")), 0.0)
    parts = ", ".join(f"{k} {v:.3g}" for k, v in kl_by_group.items())
    numbers: dict[str, Any] = {"sigma": sigma, "mismatch_kl_k3": mismatch_kl, **kl_by_group}
    summary = f"σ={sigma:g}: KL(clean||perturbed) {parts}; measured mismatch KL(mu||pi) {mismatch_kl:.3g}"
    details = []
    status = PASS
    if mismatch_kl > 0 and not (0.1 * mismatch_kl <= total <= 10 * mismatch_kl):
        status = WARN
        side = "below" if total < mismatch_kl else "above"
        details.append(
            f"the noise's KL is more than 10x {side} the mismatch: ALP models the mismatch best when they are of "
            f"the same order{' (σ is learnable and will move)' if learnable else ''}"
        )
    if trainer_dtype == "bfloat16" and sigma <= 1.001e-3:  # float32 exp(log 1e-3) is 1.00000005e-3
        details.append(
            f"bfloat16 compute: a σ of {sigma:g} mostly re-draws bf16 rounding, so much of this KL is rounding, not "
            "the noise itself (compare trainer.update.dtype=float32)"
        )
    return Check("ALP noise", status, summary, numbers, details)

"""The engine-vs-trainer mismatch of each regime on a first batch, before any update (issue 14, item 1).

Tokens are sampled from the engine's mu; the trainer's pi scores the same tokens at the initial weights. With
r = pi / mu per sampled model token (log r = log pi - log mu):
- KL(mu||pi) by k1 = mean(-log r) and k3 = mean(r - 1 - log r) (both unbiased on mu's samples; k3 >= 0 per token),
- chi2(pi||mu) = mean(r^2) - 1,
- the normalised effective sample size (sum r)^2 / (n sum r^2),
- the ratio's tail: p99, p99.9 and max of r.
`alp-agent repro --mismatch` runs `measure_regimes` for every setting of a plan (bf16, int8, ...) and writes
mismatch.json / mismatch.md next to the study's tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def mismatch_stats(engine: Sequence[float], trainer: Sequence[float]) -> dict[str, float]:
    """The estimators above over position-aligned sampled-token logprobs (non-finite pairs skipped)."""
    mu = torch.tensor([float(x) for x in engine], dtype=torch.float64)
    pi = torch.tensor([float(x) for x in trainer], dtype=torch.float64)
    keep = torch.isfinite(mu) & torch.isfinite(pi)
    log_r = (pi - mu)[keep]
    n = int(log_r.numel())
    if n == 0:
        return {"tokens": 0.0}
    r = torch.exp(log_r.clamp(max=50.0))
    q = torch.quantile(r, torch.tensor([0.99, 0.999], dtype=torch.float64))
    return {
        "tokens": float(n),
        "kl_k1": float((-log_r).mean()),
        "kl_k3": float((r - 1 - log_r).mean()),
        "chi2": float((r * r).mean() - 1),
        "ess": float(r.sum() ** 2 / (n * (r * r).sum())),
        "ratio_p99": float(q[0]),
        "ratio_p99_9": float(q[1]),
        "ratio_max": float(r.max()),
    }


def _model_pairs(trajs, trainer_lps) -> tuple[list[float], list[float]]:
    """(engine, trainer) logprobs of the model-sampled (loss mask 1) tokens, flattened."""
    eng: list[float] = []
    tr: list[float] = []
    for t, lp in zip(trajs, trainer_lps):
        for i, m in enumerate(t.loss_mask):
            if m and i < len(lp):
                eng.append(float(t.infer_logprobs[i]))
                tr.append(float(lp[i]))
    return eng, tr


def measure_first_batch(cfg) -> dict[str, float]:
    """One rollout batch of `cfg` (its prompts_per_batch x samples_per_prompt, seed run.seed) from the engine as
    configured, scored by the trainer at its initial weights in `trainer.update.dtype`."""
    from alp_agent.app.job import build_inference, build_trainer
    from alp_agent.train.episode_log import trainer_logprobs

    torch.manual_seed(cfg.run.seed)
    comps = build_inference(cfg)
    try:
        tasks = list(range(min(cfg.run.prompts_per_batch, comps.num_tasks)))
        trajs = comps.runner.run(tasks, cfg.run.samples_per_prompt, 0)
        trainer = build_trainer(cfg, comps.model_dir)
        clean, _ = trainer_logprobs(trainer, trajs)
    finally:
        comps.close()
    return mismatch_stats(*_model_pairs(trajs, clean))


def measure_regimes(plan, cfg_path: Path, out_dir: Path, seed: int = 0, log=print) -> Path:
    """`measure_first_batch` for every setting of the plan (its overrides + the plan's, arm-independent: the first
    batch is sampled before any update), written to out_dir/mismatch.json and mismatch.md."""
    from alp_agent.app.repro_runinfo import cpu_info
    from alp_agent.config import RunConfig
    from alp_agent.config_io import load_config

    cpu = cpu_info()
    results: dict[str, Any] = {}
    for name, overrides in plan.settings.items():
        items = {**plan.overrides, **overrides, "run.seed": seed, "trainer.algo.name": "bypass", **plan.pinned}
        cfg = load_config(RunConfig, cfg_path, [f"{k}={json.dumps(v)}" for k, v in items.items()])
        log(f"mismatch: {name} (engine {cfg.engine.dtype}, weights {cfg.engine.weight_quantization})")
        results[name] = {
            "engine_dtype": cfg.engine.dtype,
            "weight_quantization": cfg.engine.weight_quantization,
            "trainer_dtype": cfg.trainer.update.dtype,
            "cpu": cpu["model"],
            "cpu_native_bf16": cpu["native_bf16"],
            "seed": seed,
            **measure_first_batch(cfg),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mismatch.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out_dir / "mismatch.md").write_text(mismatch_table(results), encoding="utf-8")
    return out_dir / "mismatch.md"


def mismatch_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per regime."""
    cols = ["kl_k1", "kl_k3", "chi2", "ess", "ratio_p99", "ratio_p99_9", "ratio_max"]
    lines = [
        "## Engine-vs-trainer mismatch on the first batch (before any update)",
        "",
        "r = pi/mu per sampled model token; KL(mu||pi) by k1 = mean(-log r) and k3 = mean(r - 1 - log r); "
        "chi2 = mean(r^2) - 1; ESS = (sum r)^2 / (n sum r^2). Quantization is weight-only (decoder linear weights "
        "quantize-dequantized, activations in the engine dtype): not W8A8. CPU: "
        + ", ".join(sorted({f"{r.get('cpu')} (native bf16: {r.get('cpu_native_bf16')})" for r in results.values()}))
        + ".",
        "",
        "| setting | engine | weights | trainer | tokens | " + " | ".join(cols) + " |",
        "|---|---|---|---|---:|" + "---:|" * len(cols),
    ]
    for name, r in results.items():
        cells = [_fmt(r.get(c)) for c in cols]
        lines.append(
            f"| {name} | {r.get('engine_dtype')} | {r.get('weight_quantization')} | {r.get('trainer_dtype')} | "
            f"{int(r.get('tokens', 0))} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return "-" if v is None or not math.isfinite(float(v)) else f"{float(v):.4g}"

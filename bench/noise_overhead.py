"""Trainer benchmark: optimizer-step time and peak memory of ALP against Bypass (and a naive-noise ALP) in one run.

Targets (issue 5): ALP <= 1.10x Bypass step time, <= 1.05x Bypass peak memory.

Time: one process builds one trainer per variant (identical models and data) and alternates them batch by batch
(A B C A B C ...), so load from other processes on a shared machine hits every variant alike; per variant we report
the median and the fastest timed optimizer step, and the median of the per-round paired ratios to Bypass.
Memory: each variant in its own fresh process, so peaks do not mix. On CUDA `torch.cuda.max_memory_allocated` minus
the memory before training; on CPU the peak RSS (VmHWM) minus the RSS before the first training step, with a fixed
glibc mmap threshold so freed tensors leave RSS (else the allocator's caching blurs the peak). Both include grads,
AdamW states, activations and the transient noise. Also exact: the bytes autograd saves for backward in one
training forward (saved_tensors_hooks), which is what the memory-light noise Function keeps flat.

Variants:
  bypass      name=bypass (no noise): the reference.
  alp         name=alp, noise on every layer, memory-light autograd (eps regenerated in backward).
  alp_naive   ALP with a naive `h + exp(s) * eps` (autograd saves eps per layer): what the custom Function avoids.
  bypass_ckpt / alp_ckpt (--ckpt): the same with activation checkpointing (ratios against bypass_ckpt).

    python bench/noise_overhead.py                      # CPU defaults (several minutes on 2 busy cores)
    python bench/noise_overhead.py --device cuda --hidden 1024 --layers 16 --seq 1024 --batch 32 --micro-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _naive_add_noise(h, log_sigma, seed, scale_aware=False):
    """Naive reference: autograd keeps eps (one hidden-state-sized tensor per layer) for the sigma gradient."""
    from alp_agent.algo import perturb

    eps = perturb.gaussian(h.shape, seed, h.device, h.dtype)
    return h + log_sigma.exp().to(h.dtype) * eps


def build(args: argparse.Namespace, variant: str):
    """A trainer for `variant` on a fresh random Llama (same seed for every variant) and the benchmark batches."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alp_agent.algo.config import TrainerConfig
    from alp_agent.rollout.trajectory import Trajectory
    from alp_agent.train.trainer import Trainer

    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=args.seq * 2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).float().to(dev)
    base = variant.removesuffix("_ckpt").removesuffix("_naive")
    tc = TrainerConfig.model_validate(
        {
            "algo": {"name": "alp" if base == "alp" else "bypass", "perturb": {"sigma0": 1e-3, "sigma_lr": 1e-2}},
            "optim": {"lr": 1e-6},
            "update": {
                "updates_per_batch": args.updates,
                "micro_batch_tokens": args.micro_tokens,
                "clean_metrics_every": args.clean_every,
                "activation_checkpointing": variant.endswith("_ckpt"),
                "dtype": args.dtype,
            },
        }
    )
    trainer = Trainer(model, tc)
    g = torch.Generator().manual_seed(1)
    prompt_len = args.seq // 4

    def batch() -> list[Trajectory]:
        out = []
        for i in range(args.batch):
            p = torch.randint(3, args.vocab, (prompt_len,), generator=g).tolist()
            c = torch.randint(3, args.vocab, (args.seq - prompt_len,), generator=g).tolist()
            lp = (-torch.rand(len(c), generator=g) * 3).tolist()
            out.append(Trajectory(p, c, [1] * len(c), lp, reward=float(i % 2), group_id=i // 4))
        return out

    return trainer, [batch() for _ in range(args.rounds + 1)]


def _noise_for(variant: str):
    from alp_agent.algo import perturb

    if not hasattr(perturb, "_bench_orig"):
        perturb._bench_orig = perturb.add_noise
    perturb.add_noise = _naive_add_noise if "naive" in variant else perturb._bench_orig


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_child(args: argparse.Namespace, variants: list[str]) -> dict:
    """All variants in this process, alternating batch by batch; returns per-step times per variant."""
    import torch

    torch.set_num_threads(args.threads)
    built = {v: build(args, v) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds + 1):  # round 0 is the warm-up (AdamW state, kernels), not timed
        for v in variants:
            _noise_for(v)
            trainer, data = built[v]
            _sync(trainer.device)
            t0 = time.perf_counter()
            m = trainer.update(data[r])
            _sync(trainer.device)
            if r > 0:
                times[v].append((time.perf_counter() - t0) / m["optimizer_steps"])
    return {"times": times, "params": sum(p.numel() for p in built[variants[0]][0].model.parameters())}


def mem_child(args: argparse.Namespace, variant: str) -> dict:
    """One variant in a fresh process: peak training memory over warm-up + one batch, and saved-for-backward bytes."""
    import torch

    torch.set_num_threads(args.threads)
    _noise_for(variant)
    trainer, data = build(args, variant)
    dev = trainer.device
    base = torch.cuda.memory_allocated() if dev.type == "cuda" else _rss_kib("VmRSS") * 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for b in data[:2]:
        trainer.update(b)
    _sync(dev)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {
        "train_bytes": peak - base,
        "peak_bytes": peak,
        "base_bytes": base,
        "saved_bytes": saved_for_backward_bytes(trainer, data[0]),
    }


def saved_for_backward_bytes(trainer, trajs) -> int:
    """Exact bytes autograd keeps for backward in one training forward of 4 rows (unique non-parameter storages)."""
    import torch

    from alp_agent.train.logprobs import sequence_logprobs

    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.tensor([t.ids for t in trajs[:4]], device=trainer.device)
    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer._noise(0), trainer._autocast():
        logp, _ = sequence_logprobs(trainer.model, ids)
    del logp
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def _child(argv: list[str], mode: str, env_extra: dict[str, str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--_child", mode], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        sys.exit(f"benchmark child {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256, help="tokens per trajectory (prompt = 1/4)")
    ap.add_argument("--batch", type=int, default=16, help="trajectories per rollout batch")
    ap.add_argument("--updates", type=int, default=2, help="optimizer steps per batch")
    ap.add_argument("--micro-tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5, help="timed batches per variant (interleaved)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--clean-every", type=int, default=0, help="clean-forward metrics every N steps (0: off)")
    ap.add_argument("--ckpt", action="store_true", help="also run the activation-checkpointing variants")
    ap.add_argument("--variants", default="bypass,alp,alp_naive")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "noise_overhead.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    variants = args.variants.split(",") + (["bypass_ckpt", "alp_ckpt"] if args.ckpt else [])

    if args._child:
        res = time_child(args, variants) if args._child == "time" else mem_child(args, args._child.split(":")[1])
        print(json.dumps(res))
        return

    argv = [a for a in sys.argv[1:]]
    t0 = time.time()
    timing = _child(argv, "time", {})
    print(f"timing done ({time.time() - t0:.0f}s)", flush=True)
    mem_env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if args.device == "cpu" else {}
    mem = {v: _child(argv, f"mem:{v}", mem_env) for v in variants}

    summary = {}
    for v in variants:
        ref = "bypass_ckpt" if v.endswith("_ckpt") else "bypass"
        t, tr = timing["times"][v], timing["times"].get(ref)
        s = {
            "step_time_median_s": statistics.median(t),
            "step_time_min_s": min(t),
            "train_mem_mib": mem[v]["train_bytes"] / 2**20,
            "saved_fwd_mib": mem[v]["saved_bytes"] / 2**20,
        }
        if tr:
            s["time_ratio_paired_median"] = statistics.median(a / b for a, b in zip(t, tr))
            s["time_ratio_min"] = min(t) / min(tr)
            s["mem_ratio"] = mem[v]["train_bytes"] / mem[ref]["train_bytes"]
            s["saved_ratio"] = mem[v]["saved_bytes"] / mem[ref]["saved_bytes"]
        summary[v] = s
    hdr = (
        f"{'variant':12s} {'step med (s)':>12s} {'step min (s)':>12s} {'time x':>7s} {'train mem MiB':>13s}"
        f" {'mem x':>6s} {'saved fwd MiB':>13s} {'saved x':>7s}"
    )
    print("\n" + hdr)
    for v, s in summary.items():
        print(
            f"{v:12s} {s['step_time_median_s']:12.3f} {s['step_time_min_s']:12.3f} "
            f"{s.get('time_ratio_paired_median', float('nan')):7.3f} {s['train_mem_mib']:13.1f} "
            f"{s.get('mem_ratio', float('nan')):6.3f} {s['saved_fwd_mib']:13.1f} {s.get('saved_ratio', float('nan')):7.3f}"
        )
    import torch

    record = {
        "args": {k: v for k, v in vars(args).items() if k != "_child"},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "params": timing["params"],
        "time_measure": "per optimizer step, variants interleaved batch by batch in one process; 'time x' = median "
        "of per-round ratios to the reference",
        "memory_measure": "cuda max_memory_allocated - allocated before training"
        if args.device == "cuda"
        else "peak RSS (VmHWM) - RSS before the first training step, MALLOC_MMAP_THRESHOLD_=131072",
        "summary": summary,
        "times": timing["times"],
        "memory": mem,
        "targets": {"time_ratio": 1.10, "mem_ratio": 1.05},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()

"""Trainer benchmark: optimizer-step time and peak memory of ALP against Bypass (and a naive-noise ALP) in one run.

Targets (issue 5): ALP <= 1.10x Bypass step time, <= 1.05x Bypass peak memory.

Each variant runs in its own subprocess so peak memory is clean: on CUDA `torch.cuda.max_memory_allocated`, on CPU
the process's peak RSS (VmHWM) minus its RSS just before the first training step ("training memory": activations,
grads, AdamW states, transient noise). Variants are run interleaved (A B C A B C ...) `--rounds` times; the table
reports the fastest timed batch (and the JSON also the median), because CPU timings on a shared machine only drift up.

Variants:
  bypass      name=bypass (no noise): the reference.
  alp         name=alp, noise on every layer, memory-light autograd (eps regenerated in backward).
  alp_naive   name=alp with a naive `h + exp(s) * eps` (eps saved for backward): what the custom Function avoids.
  alp_ckpt / bypass_ckpt (with --ckpt): the same with activation checkpointing.

    python bench/trainer.py                      # CPU defaults (~2-3 min on 2 cores)
    python bench/trainer.py --device cuda --hidden 1024 --layers 16 --seq 1024 --batch 32
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


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """Runs inside the subprocess: build model + trainer, warm up one batch, time `--batches` batches."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from alp_agent.algo import perturb
    from alp_agent.algo.config import TrainerConfig
    from alp_agent.rollout.trajectory import Trajectory
    from alp_agent.trainer import Trainer

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq * 2,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float().to(dev)
    base = variant.removesuffix("_ckpt").removesuffix("_naive")
    if variant.startswith("alp_naive"):
        # naive reference: autograd saves eps (one full hidden-state tensor per layer) for the sigma gradient
        def naive(h, log_sigma, seed, scale_aware=False):
            eps = perturb.gaussian(h.shape, seed, h.device, h.dtype)
            return h + log_sigma.exp().to(h.dtype) * eps

        perturb.add_noise = naive
    tc = TrainerConfig.model_validate({
        "algo": {"name": "alp" if base == "alp" else "bypass", "perturb": {"sigma0": 1e-3, "sigma_lr": 1e-2}},
        "optim": {"lr": 1e-6},
        "update": {"updates_per_batch": args.updates, "micro_batch_tokens": args.micro_tokens,
                   "clean_metrics_every": args.clean_every, "activation_checkpointing": variant.endswith("_ckpt"),
                   "dtype": args.dtype},
    })
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

    data = [batch() for _ in range(args.batches + 1)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # Memory baseline before any training (weights + data only): the peak then includes grads, AdamW states,
    # activations and the transient noise, i.e. everything a training step adds.
    base_mem = torch.cuda.memory_allocated() if dev.type == "cuda" else _rss_kib("VmRSS") * 1024
    trainer.update(data[0])  # warm-up: allocates AdamW state, autotunes kernels
    sync()
    times = []
    for b in data[1:]:
        t0 = time.perf_counter()
        m = trainer.update(b)
        sync()
        times.append((time.perf_counter() - t0) / m["optimizer_steps"])
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    n_params = sum(p.numel() for p in model.parameters())
    saved = saved_for_backward_bytes(trainer, data[0], dev)
    return {"saved_bytes": saved, "variant": variant, "step_time_s": statistics.median(times), "step_times_s": times,
            "peak_bytes": peak, "base_bytes": base_mem, "train_bytes": peak - base_mem,
            "params": n_params}


def saved_for_backward_bytes(trainer, trajs, dev) -> int:
    """Exact bytes autograd keeps for backward in one training forward (unique storages, via saved_tensors_hooks):
    the deterministic counterpart of the RSS peak, and the quantity the memory-light noise Function keeps flat."""
    import torch

    from alp_agent.logprobs import sequence_logprobs

    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.tensor([t.ids for t in trajs[:4]], device=dev)
    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainer._noise(0), trainer._autocast():
        logp, _ = sequence_logprobs(trainer.model, ids)
    del logp
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


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
    ap.add_argument("--batches", type=int, default=2, help="timed batches per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--clean-every", type=int, default=0, help="clean-forward metrics every N steps (0: off)")
    ap.add_argument("--ckpt", action="store_true", help="also run the activation-checkpointing variants")
    ap.add_argument("--variants", default="bypass,alp,alp_naive")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer.json"))
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        print(json.dumps(run_variant(args, args._child)))
        return
    variants = args.variants.split(",") + (["bypass_ckpt", "alp_ckpt"] if args.ckpt else [])
    results: dict[str, list[dict]] = {v: [] for v in variants}
    child_args = list(sys.argv[1:])
    for r in range(args.rounds):
        for v in variants:
            res = _child(child_args, v, env_extra={})  # timing: the normal allocator
            if args.device == "cpu":
                # memory: fixed mmap threshold, so big tensors are mmapped and returned on free and RSS follows live
                # memory (the default allocator keeps freed blocks and blurs peaks); slower, so not used for timing
                mem = _child(child_args, v, env_extra={"MALLOC_MMAP_THRESHOLD_": "131072"})
                res.update({k: mem[k] for k in ("peak_bytes", "base_bytes", "train_bytes")})
            results[v].append(res)
            print(f"round {r} {v:12s} step {res['step_time_s']:.3f}s  train mem {res['train_bytes'] / 2**20:.1f} MiB"
                  f"  saved-for-backward {res['saved_bytes'] / 2**20:.1f} MiB", flush=True)

    summary = {}
    for v, rs in results.items():
        every = [t for x in rs for t in x["step_times_s"]]
        # min over all timed batches of all rounds: other processes on a shared machine only ever add time
        summary[v] = {"step_time_s": min(every), "step_time_median_s": statistics.median(every),
                      "train_mem_mib": statistics.median(x["train_bytes"] for x in rs) / 2**20,
                      "peak_mib": statistics.median(x["peak_bytes"] for x in rs) / 2**20,
                      "saved_mib": statistics.median(x["saved_bytes"] for x in rs) / 2**20}
    ref = summary.get("bypass")
    print(f"\n{'variant':14s} {'step time (s)':>14s} {'x bypass':>9s} {'train mem (MiB)':>16s} {'x bypass':>9s}"
          f" {'saved fwd (MiB)':>16s} {'x bypass':>9s}")
    for v, s in summary.items():
        refv = summary.get("bypass_ckpt") if v.endswith("_ckpt") and "bypass_ckpt" in summary else ref
        s["time_ratio"] = s["step_time_s"] / refv["step_time_s"] if refv else None
        s["mem_ratio"] = s["train_mem_mib"] / refv["train_mem_mib"] if refv else None
        s["saved_ratio"] = s["saved_mib"] / refv["saved_mib"] if refv else None
        print(f"{v:14s} {s['step_time_s']:14.3f} {s['time_ratio']:9.3f} {s['train_mem_mib']:16.1f} {s['mem_ratio']:9.3f}"
              f" {s['saved_mib']:16.1f} {s['saved_ratio']:9.3f}")
    import torch

    record = {"args": {k: v for k, v in vars(args).items() if k != "_child"}, "device": args.device,
              "torch": torch.__version__, "params": next(iter(results.values()))[0]["params"],
              "memory_measure": "cuda max_memory_allocated" if args.device == "cuda"
              else "peak RSS (VmHWM) minus RSS before the first training step", "summary": summary, "runs": results,
              "targets": {"time_ratio": 1.10, "mem_ratio": 1.05}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


def _child(child_args: list[str], variant: str, env_extra: dict[str, str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    out = subprocess.run([sys.executable, __file__, *child_args, "--_child", variant], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()

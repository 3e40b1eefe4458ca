"""Trainer throughput on the main job's model and batch shapes: tokens/s and model FLOP utilisation (issue 15).

Model: SmolLM2-135M-Instruct (the embedded default), float32 master weights. Batch: 36 real quickstart-style
trajectories (prompt + multi-turn completion with tool observations, real token ids and masks) read from the
sample files of earlier runs (results/repro/runs/*/samples.jsonl, the same system prompt and env as the quickstart),
trained like the quickstart: Seq-ALP, 4 optimizer steps per batch, micro-batches of --micro-tokens (quickstart:
1024), clean metrics off (they add a no-grad forward; counted separately by bench/e2e.py).

Variants, each in a fresh process (peak RSS and page faults do not mix; two trainers with full logits do not fit
beside six other jobs in 24 GB), run one after the other; each measures its own matmul peak before and after:
  padded_full     right-padded rows bucketed by length, the model's full [tokens x vocab] logits, foreach AdamW
                  (before issue 15)
  packed_dense    packed rows (no padding computed) + chunked hidden x lm_head log-probs, attention dense over each
                  packed row with a block-diagonal mask, foreach AdamW (the default until 2026-11-30)
  packed_chunked  the default now: packed_dense with the fused AdamW kernel
  packed_segments packed_chunked with attention per packed trajectory (update.packed_attention, opt-in)
each in the compute dtype(s) asked for (--dtypes; `auto` resolves by the CPU's bf16 flags).

Model FLOP utilisation (MFU) = 6 x parameters x computed non-pad tokens / time, over the GFLOP/s of a large float32
(or bf16, for a bf16 variant) matmul measured in this process, with the same threads, before and after the variants
(the better of the two). "hw util" counts the work actually executed instead: the body (parameters minus the LM
head) on every token, the LM head only on trained tokens, times 3 for forward + backward, plus one recomputed LM-head
forward per trained token (the chunked backward); padding positions count for padded_full, since they are computed.
With --checkpointing (the quickstart's setting) both count the recomputed forward: + 2 x parameters per token (the
issue's rule). Neither counts attention; its query-key pairs, computed and needed, are in the JSON.
Page faults (minor) and system time come from getrusage around each timed batch.

    python bench/trainer.py                       # writes bench/results/trainer.json
    python bench/trainer.py --dtypes float32,bfloat16 --batches 3
    python bench/trainer.py --variants packed_chunked --allocators keep,mimalloc   # glibc vs mimalloc, same run
    python bench/trainer.py --variants packed_dense,packed_chunked --checkpointing   # as the quickstart trains
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python bench/trainer.py   # imitate a CPU without native bf16 (trainer side)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_info, with_mimalloc  # bench/ is sys.path[0] when run as python bench/X.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # update and optim keys over the bench's base config
    "padded_full": {"update": {"pack": False, "logprob_chunk_tokens": 0}, "optim": {"fused": False}},
    "packed_dense": {"update": {"pack": True, "packed_attention": False}, "optim": {"fused": False}},
    "packed_chunked": {"update": {"pack": True}, "optim": {}},
    "packed_segments": {"update": {"pack": True, "packed_attention": True}, "optim": {}},
}


def matmul_gflops(dtype, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype` (the CPU's peak that the trainer can reach)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def load_trajectories(pattern: str, n: int):
    """n real trajectories (repeated if the files hold fewer), grouped 6 per prompt as in the quickstart."""
    from alp_agent.rollout.trajectory import Trajectory

    rows = []
    for f in sorted(glob.glob(str(ROOT / pattern))):
        with open(f) as fh:
            rows += [json.loads(line) for line in fh]
    if not rows:
        raise SystemExit(f"no samples match {pattern}")
    keys = set(Trajectory.__dataclass_fields__)
    out = []
    for i in range(n):
        d = {k: v for k, v in rows[i % len(rows)].items() if k in keys}
        t = Trajectory.from_dict(d)
        t.group_id, t.reward, t.policy_version = i // 6, float((i * 7) % 3 == 0), 0
        out.append(t)
    return out


def build(variant: str, dtype: str, state: dict, micro_tokens: int, checkpointing: bool):
    import torch

    from alp_agent.algo.config import TrainerConfig
    from alp_agent.models import load_model
    from alp_agent.train.trainer import Trainer

    model = load_model("smollm2", dtype=torch.float32)
    model.load_state_dict(state)
    upd = {"updates_per_batch": 4, "micro_batch_tokens": micro_tokens, "clean_metrics_every": 0, "dtype": dtype}
    upd.update(VARIANTS[variant]["update"], activation_checkpointing=checkpointing)
    cfg = TrainerConfig.model_validate(
        {
            "algo": {"name": "alp", "ratio_level": "sequence", "perturb": {"sigma0": 1e-3, "sigma_lr": 0.01}},
            "optim": {"lr": 3e-5, **VARIANTS[variant]["optim"]},
            "update": upd,
        }
    )
    return Trainer(model, cfg)


def flops(trainer, trajs) -> dict[str, float]:
    """Model FLOPs (6 N per non-pad token) and executed FLOPs of one update of `trajs` (see the module docstring)."""
    import torch

    from alp_agent.train.batching import collate, micro_batches, rows_from
    from alp_agent.train.packed_attention import spans_of, uses_packed_attention

    params = sum(p.numel() for p in trainer.model.parameters())
    head = trainer.model.get_output_embeddings().weight.numel()
    rows = rows_from(trajs, torch.zeros(len(trajs)))
    u = trainer.cfg.update
    real = sum(len(r.ids) for r in rows)
    trained = sum(int(sum(1 for m in r.mask[1:] if m > 0)) for r in rows)
    computed = pairs = needed = 0
    for mb_rows in micro_batches(rows, u.micro_batch_tokens, u.max_micro_batch_size, u.pack):
        mb = collate(mb_rows, torch.device("cpu"), u.pack)
        computed += mb.ids.numel()
        if u.pack and uses_packed_attention(trainer.model):  # each segment's causal triangle, the tails' too
            spans = spans_of(mb.segments or [], *mb.ids.shape)
            pairs += sum((e - s) * (e - s + 1) // 2 for row in spans for s, e in row)
        else:  # dense over each model row (a mask, not a shorter computation)
            pairs += mb.attn_pairs[0]
        needed += mb.attn_pairs[1]
    if trainer.chunk_tokens > 0:
        hw = 6 * (params - head) * computed + (6 + 2) * head * trained
    else:
        hw = 6 * params * computed
    recompute = 2 if u.activation_checkpointing else 0  # one more forward of the body per token
    hw += recompute * (params - head) * computed
    return {
        "params": params,
        "tokens": real,
        "trained_tokens": trained,
        "computed_positions": computed,
        "padding_frac": 1 - real / computed,
        "attn_pairs_computed": pairs,
        "attn_pairs_needed": needed,
        "activation_checkpointing": u.activation_checkpointing,
        "model_flops": (6 + recompute) * params * real,
        "hw_flops": hw,
    }


def timed_update(trainer, trajs) -> dict[str, float]:
    import copy

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    trainer.update(copy.deepcopy(trajs))
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "time_s": dt,
        "minflt": r1.ru_minflt - r0.ru_minflt,
        "sys_s": r1.ru_stime - r0.ru_stime,
        "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
    }


def child(variant: str, dtype: str, args) -> dict:
    """One variant in this (fresh) process: peak before, a warm-up batch, timed batches, peak after, peak RSS."""
    import torch

    from alp_agent.models import load_model
    from alp_agent.train.hardware import keep_freed_memory

    # keep_freed_memory() says which allocator runs: glibc tuned, or the preloaded mimalloc (which it leaves alone)
    allocator = "glibc defaults" if args.allocator == "default" else keep_freed_memory()
    trajs = load_trajectories(args.samples, args.trajectories)
    state = load_model("smollm2", dtype=torch.float32).state_dict()
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    peaks = [matmul_gflops(tdt)]
    trainer = build(variant, dtype, state, args.micro_tokens, args.checkpointing)
    del state
    work = flops(trainer, trajs)
    warm = timed_update(trainer, trajs)  # first backward, AdamW state allocation
    runs = [timed_update(trainer, trajs) for _ in range(args.batches)]
    peaks.append(matmul_gflops(tdt))
    best = min(runs, key=lambda r: r["time_s"])
    peak = max(peaks)
    return {
        "variant": variant,
        "dtype": dtype,
        "allocator": allocator,
        **work,
        **best,
        "warmup": warm,
        "runs": runs,
        "peak_gflops": peaks,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "tokens_per_s": work["tokens"] / best["time_s"],
        "mfu": work["model_flops"] / best["time_s"] / 1e9 / peak,
        "hw_util": work["hw_flops"] / best["time_s"] / 1e9 / peak,
    }


def _allocator_env(allocator: str) -> dict[str, str]:
    """The child's environment: with the mimalloc wheel preloaded for `mimalloc`, else this one's."""
    if allocator not in ("keep", "default", "mimalloc"):
        raise SystemExit(f"unknown allocator {allocator!r} (keep, default, mimalloc)")
    return with_mimalloc(dict(os.environ)) if allocator == "mimalloc" else dict(os.environ)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="auto", help="comma list of update.dtype values (auto, float32, bfloat16)")
    ap.add_argument("--variants", default="padded_full,packed_dense,packed_chunked")
    ap.add_argument("--batches", type=int, default=2, help="timed batches per variant (after one warm-up)")
    ap.add_argument("--trajectories", type=int, default=36)
    ap.add_argument("--micro-tokens", type=int, default=1024, help="update.micro_batch_tokens (quickstart: 1024)")
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing, as the quickstart runs (MFU then counts the recomputed forward: 8 N per token)",
    )
    ap.add_argument("--samples", default="results/repro/runs/*/samples.jsonl")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer.json"))
    ap.add_argument(
        "--allocators",
        default="keep",
        help="comma list: keep (glibc keeping freed buffers, the job's glibc setting), default (glibc's own), "
        "mimalloc (LD_PRELOAD of the cmeel-mimalloc wheel, what ALP_ALLOCATOR=mimalloc bash scripts/quickstart.sh runs)",
    )
    ap.add_argument("--allocator", default="keep", help=argparse.SUPPRESS)  # the child's one allocator
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child.split(":"), args)), flush=True)
        return

    from alp_agent.train.hardware import cpu_flags, resolve_compute_dtype

    flags = cpu_flags()
    info = machine_info("transformers")
    info.update(
        avx512_bf16="avx512_bf16" in flags,
        amx_bf16="amx_bf16" in flags,
        onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA"),
        ld_preload=os.environ.get("LD_PRELOAD"),
    )
    dtypes = [resolve_compute_dtype(d, "cpu")[0] for d in args.dtypes.split(",")]
    combos = [(v, d, a) for d in dtypes for v in args.variants.split(",") for a in args.allocators.split(",")]
    results = []
    for v, d, a in dict.fromkeys(combos):  # one fresh process each: peaks and page faults do not mix
        cmd = [sys.executable, __file__, "--child", f"{v}:{d}", "--batches", str(args.batches)]
        cmd += ["--trajectories", str(args.trajectories), "--samples", args.samples, "--allocator", a]
        cmd += ["--micro-tokens", str(args.micro_tokens)] + (["--checkpointing"] if args.checkpointing else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_allocator_env(a))
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{v}:{d} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
        results.append(json.loads(line[7:]))
    print(f"CPU flags: avx512_bf16={info['avx512_bf16']} amx_bf16={info['amx_bf16']} threads={info['threads']} "
          f"ONEDNN_MAX_CPU_ISA={info['onednn_max_cpu_isa']} LD_PRELOAD={info['ld_preload']}")  # fmt: skip
    hdr = "| variant | dtype | allocator | tokens | computed | padding | update s | tok/s | peak GF/s | MFU | hw util | minflt | sys s | RSS GiB |"
    print(hdr + "\n|" + "---|" * (hdr.count("|") - 1))
    for r in results:
        print(
            f"| {r['variant']} | {r['dtype']} | {r['allocator']} | {r['tokens']} | {r['computed_positions']} | {r['padding_frac']:.2f} "
            f"| {r['time_s']:.1f} | {r['tokens_per_s']:.0f} | {max(r['peak_gflops']):.0f} | {r['mfu']:.2f} "
            f"| {r['hw_util']:.2f} | {r['minflt']} | {r['sys_s']:.1f} | {r['peak_rss_gib']:.2f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()

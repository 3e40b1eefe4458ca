"""Minor page faults and system time of the trainer's forward + backward on SmolLM2-135M (issue 15.3).

One packed micro-batch of 12 real trajectories (results/repro/runs/*/samples.jsonl), log-probs through
`microbatch_logprobs` with the given LM-head chunk (0 = the model's full logits), backward, one warm-up then two timed
iterations; getrusage before/after. `--keep` applies `alp_agent.train.hardware.keep_freed_memory()` (what the job
does at start-up). Each configuration needs its own process (malloc settings are process-wide):

    python bench/faults.py --chunk 0            # full [tokens x vocab] logits, glibc defaults
    python bench/faults.py --chunk 1024
    python bench/faults.py --chunk 128 --keep   # the defaults of the job
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--trajectories", type=int, default=12)
    args = ap.parse_args()
    import torch
    from trainer import load_trajectories  # bench/trainer.py

    from alp_agent.models import load_model
    from alp_agent.train.batching import collate, rows_from
    from alp_agent.train.hardware import keep_freed_memory
    from alp_agent.train.logprobs import microbatch_logprobs

    allocator = keep_freed_memory() if args.keep else "glibc defaults"
    model = load_model("smollm2")
    trajs = load_trajectories("results/repro/runs/*/samples.jsonl", args.trajectories)
    mb = collate(rows_from(trajs, torch.randn(len(trajs))), torch.device("cpu"), True)

    def step() -> None:
        lp, _ = microbatch_logprobs(model, mb, chunk_tokens=args.chunk)
        (lp * mb.mask).sum().backward()
        model.zero_grad(set_to_none=True)

    step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(2):
        step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "chunk": args.chunk, "allocator": allocator, "positions": mb.ids.numel(), "wall_s": time.perf_counter() - t0,
        "minflt": r1.ru_minflt - r0.ru_minflt, "sys_s": r1.ru_stime - r0.ru_stime, "user_s": r1.ru_utime - r0.ru_utime,
        "peak_rss_gib": r1.ru_maxrss / 1024**2,
    }))  # fmt: skip


if __name__ == "__main__":
    main()

"""vLLM generation speed by dtype on this CPU, and how many cores it keeps busy (issue 15 items 1 and 2).

Each dtype in a fresh process (vLLM keeps process-global state): SmolLM2-135M-Instruct on the in-process engine
(alp_agent.engine.vllm_engine.VLLMEngine, the quickstart's settings), 16 prompts x 64 generated tokens (EOS ignored
by a stop-free sampling of exactly max_tokens where the model allows; the token count is what was generated),
temperature 0.7, one warm-up round then --rounds timed ones. "cores busy" = process CPU time / wall time during the
timed rounds (2.0 = both cores of a 2-core machine).

    python bench/engine_dtype.py                   # bfloat16 and float32; writes bench/results/engine_dtype.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_info  # bench/ is sys.path[0] when run as python bench/X.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(dtype: str, rounds: int, n: int, tokens: int) -> dict:
    import torch

    from alp_agent.engine.base import SamplingConfig
    from alp_agent.engine.vllm_engine import VLLMEngine
    from alp_agent.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    eng = VLLMEngine(model="smollm2", dtype=dtype, max_model_len=2048)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": f"Write a long story about the number {i}."}],
                                add_generation_prompt=True, tokenize=True)
        for i in range(n)
    ]  # fmt: skip
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    s = SamplingConfig(temperature=0.7, max_tokens=tokens, seed=0)
    eng.generate(prompts, s)  # warm-up
    gen, wall, cpu = 0, 0.0, 0.0
    for _ in range(rounds):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        outs = eng.generate(prompts, s)
        wall += time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu += r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
        gen += sum(len(o.token_ids) for o in outs)
    threads = torch.get_num_threads()
    eng.close()
    return {"dtype": dtype, "tokens": gen, "wall_s": wall, "tok_per_s": gen / wall, "cores_busy": cpu / wall,
            "torch_threads_after_engine": threads}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_dtype.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.rounds, args.prompts, args.tokens)), flush=True)
        return
    from alp_agent.train.hardware import cpu_flags

    info = machine_info("vllm")
    info["avx512_bf16"] = "avx512_bf16" in cpu_flags()
    res = []
    for d in args.dtypes.split(","):
        cmd = [sys.executable, __file__, "--child", d, "--rounds", str(args.rounds), "--prompts", str(args.prompts)]
        cmd += ["--tokens", str(args.tokens)]
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{d} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
        res.append(json.loads(line[7:]))
    print(f"CPU avx512_bf16={info['avx512_bf16']} cores={info['cpus']}")
    print(
        "| engine dtype | generated tokens | tok/s | cores busy | torch threads after engine |\n|---|---|---|---|---|"
    )
    for r in res:
        print(f"| {r['dtype']} | {r['tokens']} | {r['tok_per_s']:.0f} | {r['cores_busy']:.2f} | "
              f"{r['torch_threads_after_engine']} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "results": res}, indent=2))


if __name__ == "__main__":
    main()

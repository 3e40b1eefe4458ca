"""Multi-turn rollout throughput vs raw vLLM generation of the same number of tokens, and vLLM vs HF.

What it answers: how much does the episode machinery (per-turn template deltas, re-submitting the growing context,
waiting for tool calls, async bookkeeping) cost compared with vLLM generating the same tokens in one batch? Target:
rollout generated tok/s >= 0.9x raw vLLM.

Setup: a synthetic tool env (every turn gets a short tool observation, optionally after `--tool-latency` seconds;
the episode ends after `--turns` turns), so the number of turns is fixed and only the engine and the rollout are
measured. Raw baseline: the same vLLM engine, one `generate` over as many sequences as episodes, each forced
(`ignore_eos`) to produce the rollout's mean tokens per episode. Rounds alternate raw / rollout to share noise.

    python bench/rollout.py                       # SmolLM2-135M bf16 (the default policy)
    python bench/rollout.py --model tiny --dtype float32

Writes bench/results/rollout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alp_agent.engine.base import SamplingConfig
from alp_agent.rollout.config import RolloutConfig
from alp_agent.rollout.runner import RolloutRunner

QUESTIONS = [
    "What is 17 * 23? Use the python tool.",
    "Compute the sum of the first 100 primes with python.",
    "How many divisors does 360 have? Check with code.",
    "Find x such that 3x + 7 = 52. Verify in python.",
    "What is 2**20 - 1? Use the tool.",
    "Is 221 prime? Show your check in python.",
    "What is the GCD of 462 and 1071? Compute it.",
    "Sum the digits of 2**50 using python.",
]


class SyntheticToolEnv:
    """Fixed-length episodes: a tool observation after each turn, terminate after `turns` turns."""

    stop_strings = ("</tool>",)

    def __init__(self, turns: int, latency: float):
        self.turns, self.latency = turns, latency

    @property
    def unwrapped(self):
        return self

    def reset(self, seed=None, options=None):
        self.t, i = 0, (options or {}).get("task_index", 0)
        return [
            {"role": "system", "content": "You are a helpful assistant. Use python in <tool></tool> tags."},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
        ], {}

    def step(self, text):
        self.t += 1
        if self.t >= self.turns:
            return [], 1.0, True, False, {"tool_calls": 1}
        return [{"role": "tool", "content": f"stdout: {self.t * 42}\n"}], 0.0, False, False, {"tool_calls": 1}

    async def astep(self, text):
        if self.latency:
            await asyncio.sleep(self.latency)
        return self.step(text)

    def close(self):
        pass


def rollout_round(engine, tok, args, latency: float, episodes_per_task: int, tasks: int):
    cfg = RolloutConfig(
        max_turns=args.turns,
        max_tokens_per_turn=args.turn_tokens,
        on_turn_limit="continue",
        temperature=1.0,
        seed=None,  # the default: no per-request seeds (seeded requests take vLLM's slower per-request sampler)
        max_concurrent_episodes=tasks * episodes_per_task,
        check_retokenize=False,
    )
    runner = RolloutRunner(engine, tok, lambda: SyntheticToolEnv(args.turns, latency), cfg)
    trajs = runner.run(list(range(tasks)), n_per_task=episodes_per_task)
    m = runner.last_metrics
    return {
        "episodes": len(trajs),
        "seconds": m["rollout/seconds"],
        "gen_tokens": int(m["rollout/generated_tokens"]),
        "gen_tok_per_s": m["rollout/gen_tok_per_s"],
        "episodes_per_s": m["rollout/episodes_per_s"],
        "token_drift": m["rollout/token_drift"],
        "mean_turns": m["rollout/mean_turns"],
        "prompt_tokens": statistics.mean(len(t.prompt_ids) for t in trajs),
        "completion_tokens": statistics.mean(len(t.completion_ids) for t in trajs),
        "lengths": [t.num_model_tokens for t in trajs],
    }


def raw_round(engine, tok, lengths: list[int], seed: int):
    """Plain vLLM: one generate call, one sequence per episode forced (ignore_eos) to exactly that episode's number
    of generated tokens, so batch occupancy over time matches the rollout's."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = []
    for i in range(len(lengths)):
        text = tok.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(TokensPrompt(prompt_token_ids=tok(text, add_special_tokens=False)["input_ids"]))
    params = [SamplingParams(max_tokens=n, ignore_eos=True, logprobs=0, temperature=1.0) for i, n in enumerate(lengths)]
    t0 = time.perf_counter()
    outs = engine.llm.generate(prompts, params, use_tqdm=False)  # the engine's stepping thread is idle here
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "gen_tokens": n, "gen_tok_per_s": n / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' (random test model), id or path")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--episodes-per-task", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--tool-latency", type=float, default=0.05, help="seconds per tool call in the latency row")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hf-tasks", type=int, default=2, help="tasks (x 1 episode) for the HF engine row; 0 = skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (None = vLLM default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout.json"))
    args = ap.parse_args()

    from alp_agent.engine.vllm_engine import VLLMEngine
    from alp_agent.models import build_tiny_model, load_tokenizer, tiny_model_cache_path

    model = str(build_tiny_model(tiny_model_cache_path("qwen2"))) if args.model == "tiny" else args.model
    t0 = time.perf_counter()
    engine = VLLMEngine(model=model, dtype=args.dtype, max_model_len=2048, seed=args.seed, block_size=args.block_size)
    startup = time.perf_counter() - t0
    tok = load_tokenizer(engine.model_path)
    # warm-up: first requests pay one-time kernel/allocator costs
    engine.generate([[1, 2, 3]], SamplingConfig(max_tokens=16))
    rollout_round(engine, tok, args, 0.0, 1, 2)
    raw_round(engine, tok, [16, 16], args.seed)

    rows: dict[str, list[dict]] = {"raw": [], "rollout": [], "rollout_latency": []}
    for _ in range(args.rounds):
        r = rollout_round(engine, tok, args, 0.0, args.episodes_per_task, args.tasks)
        rows["rollout"].append(r)
        rows["raw"].append(raw_round(engine, tok, r.pop("lengths"), args.seed))
        if args.tool_latency > 0:
            lat = rollout_round(engine, tok, args, args.tool_latency, args.episodes_per_task, args.tasks)
            lat.pop("lengths")
            rows["rollout_latency"].append(lat)
    engine.close()

    hf = None
    if args.hf_tasks > 0:
        from alp_agent.engine.hf_engine import HFEngine

        hf_engine = HFEngine(model=model, dtype=args.dtype, max_model_len=2048)
        hf = rollout_round(hf_engine, tok, args, 0.0, 1, args.hf_tasks)
        hf.pop("lengths")

    def mean(rs, k):
        return statistics.mean(r[k] for r in rs) if rs else float("nan")

    raw_tps = mean(rows["raw"], "gen_tok_per_s")
    table = [
        ("raw vLLM generate (same tokens)", raw_tps, float("nan"), 1.0),
        (
            "rollout, vLLM, tool latency 0",
            mean(rows["rollout"], "gen_tok_per_s"),
            mean(rows["rollout"], "episodes_per_s"),
            mean(rows["rollout"], "gen_tok_per_s") / raw_tps,
        ),
    ]
    if rows["rollout_latency"]:
        lat = rows["rollout_latency"]
        table.append(
            (
                f"rollout, vLLM, tool latency {args.tool_latency * 1000:.0f} ms",
                mean(lat, "gen_tok_per_s"),
                mean(lat, "episodes_per_s"),
                mean(lat, "gen_tok_per_s") / raw_tps,
            )
        )
    if hf:
        table.append(
            (
                f"rollout, HF generate ({hf['episodes']} episodes)",
                hf["gen_tok_per_s"],
                hf["episodes_per_s"],
                hf["gen_tok_per_s"] / raw_tps,
            )
        )
    print(
        f"\nmodel={args.model} dtype={args.dtype} episodes={args.tasks}x{args.episodes_per_task} turns={args.turns} "
        f"turn_tokens<={args.turn_tokens} rounds={args.rounds} engine start-up {startup:.1f} s"
    )
    print(f"| {'row':<42} | {'gen tok/s':>9} | {'episodes/s':>10} | {'x raw':>6} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 12}|{'-' * 8}|")
    for name, tps, eps, ratio in table:
        print(f"| {name:<42} | {tps:9.1f} | {eps:10.2f} | {ratio:6.2f} |")

    out = {
        "args": vars(args),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "engine_startup_s": startup,
        "rounds": rows,
        "hf": hf,
        "summary": {
            name: {"gen_tok_per_s": tps, "episodes_per_s": eps, "x_raw": ratio} for name, tps, eps, ratio in table
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

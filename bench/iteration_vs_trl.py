"""One whole RL iteration (rollout + update + weight sync) of our job against TRL's GRPOTrainer, on equal work.

Target (issue 15 item 7): ours >= 2x TRL per iteration. Each side runs in its own process (two vLLM engines cannot
share one: vLLM keeps process-global state) and the coordinator alternates them round by round (A B, B A, ...), so
load from other processes hits both alike; the first --warmup rounds are not in the table.

  ours   the job's real path: `alp_agent.app.job.build_inference` (sandbox, in-process vLLM, RolloutRunner on the
         quickstart's math env) and `build_trainer`, then per round exactly what the loop does: `runner.run(tasks,
         samples)`, `trainer.update(trajectories)`, `trainer.sync_weights(engine)`. Config: configs/quickstart.yaml
         with the overrides in `ours_overrides` (single turn, no stop strings, the batch shape below).
  trl    trl.GRPOTrainer with use_vllm=True, vllm_mode="colocate" (its fastest generation here: vLLM in the same
         process), driven by its own `trainer.train()` for updates x rounds optimizer steps; a TrainerCallback
         blocks at the start of every generation cycle until the coordinator says go, and reports at its end.

Equal work: SmolLM2-135M-Instruct (float32 master weights on both sides, bf16 autocast for the update where the CPU
has native bf16, else float32; vLLM sampling in the same dtype on both), the same prompts (the quickstart env's
synthetic level-0 problems with its system prompt, rendered with the model's chat template: ours by the runner,
TRL by its own apply_chat_template; the prompt token counts of both are in the JSON), G samples per prompt, P
prompts per batch, temperature 0.7, every completion exactly --max-tokens tokens (vLLM ignore_eos on both sides, no
stop strings), U optimizer steps per batch, micro-batches of R rows, AdamW lr/betas/wd/eps equal, grad clip 1.0,
gradient/activation checkpointing on both (TRL's default and the quickstart's), no KL, no reference model.
Not equal by design (reported as phases): TRL recomputes the old-policy logprobs with a no-grad forward (GRPO with
vLLM importance-sampling correction); ALP/Bypass use the engine's logprobs, so that phase is 0 for them. Run
--algos alp,grpo to add our GRPO, which does that forward too.

Ours forces equal lengths by wrapping its VLLMEngine's request parameters (`_params`) to add ignore_eos (no config
knob exists: a bench-only change); void-turn masking is off (a turn cut at the token limit would otherwise be
dropped from the loss, less work than TRL's). The quickstart's optional clean-metrics forward is off (work TRL does
not do).

    /tmp/trlvenv/bin/python bench/iteration_vs_trl.py            # TRL venv: see bench/README.md "trainer vs TRL"
    python bench/iteration_vs_trl.py --rounds 2 --algos alp,grpo

Writes bench/results/iteration_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

OURS_PY = ROOT / ".venv" / "bin" / "python"
TRL_PY = Path("/tmp/trlvenv/bin/python")
PHASES = ["generation", "old logprobs", "update", "prepare/bookkeeping", "weight sync"]


# ---------------------------------------------------------------------------------------------- protocol
class Channel:
    """Worker side: commands on stdin (one word a line), JSON results on a dedicated fd (vLLM logs own stdout)."""

    def __init__(self, fd: int):
        self.out = os.fdopen(fd, "w", buffering=1)

    def send(self, obj: dict) -> None:
        self.out.write(json.dumps(obj, default=str) + "\n")
        self.out.flush()

    @staticmethod
    def wait() -> str:
        return sys.stdin.readline().strip()


def compute_dtype() -> str:
    from alp_agent.train.hardware import engine_dtype_for

    return "bfloat16" if engine_dtype_for(False) == "bfloat16" else "float32"


# ---------------------------------------------------------------------------------------------- ours
def ours_overrides(a) -> list[str]:
    return [
        f"run.prompts_per_batch={a.prompts}",
        f"run.samples_per_prompt={a.group}",
        "rollout.max_turns=1",
        "env.kwargs.max_turns=1",
        f"rollout.max_tokens_per_turn={a.max_tokens}",
        "rollout.stop_strings=[]",
        f"rollout.temperature={a.temperature}",
        f"engine.dtype={a.dtype}",
        f"trainer.optim.lr={a.lr}",
        "trainer.optim.warmup_steps=0",
        f"trainer.update.updates_per_batch={a.updates}",
        f"trainer.update.max_micro_batch_size={a.micro_rows}",
        f"trainer.update.micro_batch_tokens={a.micro_rows * 1024}",
        "trainer.update.activation_checkpointing=true",
        "trainer.update.clean_metrics_every=0",
        f"trainer.update.dtype={a.dtype}",
        "trainer.algo.mask_void_turns=false",
        "trainer.algo.kl_coef=0.0",
    ]


def force_length(engine) -> None:
    """Every request samples exactly max_tokens tokens (vLLM ignore_eos), like TRL's generation_kwargs below."""
    orig = engine._params

    def params(s):
        p = orig(s)
        p.ignore_eos = True
        return p

    engine._params = params


def ours_build(a):
    import torch

    from alp_agent.app.job import build_inference, build_trainer
    from alp_agent.config import RunConfig
    from alp_agent.config_io import load_config
    from alp_agent.train.loop import task_cursor

    base = load_config(RunConfig, ROOT / "configs" / "quickstart.yaml", ours_overrides(a))
    torch.manual_seed(base.run.seed)
    comps = build_inference(base)
    force_length(comps.engine)
    trainers = {}
    for algo in a.algos.split(","):
        cfg = load_config(
            RunConfig, ROOT / "configs" / "quickstart.yaml", ours_overrides(a) + [f"trainer.algo.name={algo}"]
        )
        trainers[algo] = build_trainer(cfg, comps.model_dir)
    stream = task_cursor(comps.num_tasks, a.prompts, 0, base.run.seed)
    tasks = [next(stream)[1] for _ in range(a.warmup + a.rounds)]
    env = comps.runner.env_fn()
    prompts = []
    for round_tasks in tasks:
        for t in round_tasks:
            msgs, info = env.reset(seed=0, options={"task_index": t})
            prompts.append({"prompt": msgs, "answer": str(info.get("reference_answer"))})
    env.close()
    return comps, trainers, tasks, prompts


def ours_iteration(comps, trainer, tasks, samples: int) -> dict:
    t_it = time.perf_counter()
    t0 = time.perf_counter()
    trajs = comps.runner.run(tasks, samples, trainer.policy_version)
    t_roll = time.perf_counter() - t0
    threads = __import__("torch").get_num_threads()
    m = trainer.update(trajs)
    t0 = time.perf_counter()
    trainer.sync_weights(comps.engine)
    t_sync = time.perf_counter() - t0
    total = time.perf_counter() - t_it
    upd, old = m.get("time/update", 0.0), m.get("time/old_ref_logprobs", 0.0)
    return {
        "total_s": total,
        "phases_s": {
            "generation": t_roll,
            "old logprobs": old,
            "update": upd,
            "prepare/bookkeeping": max(m.get("time/batch_update_total", 0.0) - upd - old, 0.0),
            "weight sync": t_sync,
        },
        "generated_tokens": sum(t.num_model_tokens for t in trajs),
        "trained_tokens": sum(sum(t.loss_mask) for t in trajs),
        "prompt_tokens": [len(t.prompt_ids) for t in trajs],
        "completion_lengths": sorted({len(t.completion_ids) for t in trajs}),
        "optimizer_steps": m.get("optimizer_steps"),
        "skipped_steps": m.get("skipped_steps"),
        "torch_threads": threads,
        "reward_mean": m.get("reward/mean"),
    }


def ours_worker(a, ch: Channel) -> None:
    import torch

    t0 = time.perf_counter()
    comps, trainers, tasks, prompts = ours_build(a)
    synced = None
    ch.send(
        {"ready": True, "build_s": time.perf_counter() - t0, "prompts": prompts, "threads": torch.get_num_threads()}
    )
    r = 0
    while (cmd := ch.wait()) and cmd != "quit":
        algo = cmd.split()[1]
        tr = trainers[algo]
        if synced != algo and len(trainers) > 1:  # the engine serves this variant's weights (untimed)
            tr.sync_weights(comps.engine)
        out = ours_iteration(comps, tr, tasks[int(cmd.split()[2])], a.group)
        synced = algo
        ch.send(out)
        r += 1
    comps.close()


# ---------------------------------------------------------------------------------------------- TRL
class Phases:
    """Collects TRL's own profiling_context timings (the names it logs to wandb) plus our no-grad forward timer."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, name: str, dt: float) -> None:
        self.t[name] = self.t.get(name, 0.0) + dt

    def take(self) -> dict[str, float]:
        t, self.t = self.t, {}
        return t


def trl_instrument(phases: Phases, counts: dict) -> None:
    """Record TRL's phase timings: its ProfilingContext durations, the no-grad logprob forwards, and the token
    counts of every generation batch (prompt, completion mask)."""
    import torch
    from trl.extras import profiling
    from trl.trainer.grpo_trainer import GRPOTrainer

    profiling.ProfilingContext._log_metrics = lambda self, d: phases.add(self.name.split(".", 1)[1], d)
    logps = GRPOTrainer._get_per_token_logps_and_entropies

    def timed_logps(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return logps(self, *args, **kw)
        finally:
            if not torch.is_grad_enabled():
                phases.add("old logprobs", time.perf_counter() - t0)

    GRPOTrainer._get_per_token_logps_and_entropies = timed_logps
    gen_score = GRPOTrainer._generate_and_score_completions

    def counted(self, inputs):
        out = gen_score(self, inputs)
        counts["generated_tokens"] = int(out["completion_mask"].sum())
        counts["prompt_tokens"] = out["prompt_mask"].sum(1).tolist()
        counts["completion_width"] = int(out["completion_ids"].shape[1])
        counts["torch_threads"] = torch.get_num_threads()
        return out

    GRPOTrainer._generate_and_score_completions = counted


def trl_vllm_env(mode: str) -> None:
    """'ours': the vLLM CPU environment our engine sets for itself (alp_agent/engine/vllm_engine.py _set_vllm_env):
    1 GiB KV cache, OpenMP threads bound to all cores of this process, no core reserved. 'default': vLLM's defaults
    (12 GiB KV cache cap aside, x86 "auto" binding reserves one core for a scheduler process and binds the OpenMP
    threads, which the trainer shares in colocate mode, to the others: 1 core of 2 here)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if mode == "ours":
        cores = sorted(os.sched_getaffinity(0))
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
        )
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def trl_llm_dtype(dtype: str) -> None:
    """TRL's colocated LLM(...) takes its dtype from the checkpoint (float32 for SmolLM2): give it ours instead."""
    import functools

    from trl.generation import vllm_generation

    vllm_generation.LLM = functools.partial(vllm_generation.LLM, dtype=dtype)


def trl_vllm032_sync() -> None:
    """TRL 1.16's colocate weight sync calls `model.load_weights([(name, param)])` one tensor at a time; with vLLM
    0.32 on this CPU that raises "AttributeError: 'Parameter' object has no attribute 'weight_loader'" (the loaded
    layers were post-processed; TRL is tested up to vLLM 0.31). The same tensors go through vLLM 0.32's in-place
    `reload_weights` instead (what our engine calls); everything else in TRL's sync (parameter walk, names, prefix
    cache reset) is TRL's own."""
    from trl.generation.vllm_generation import VLLMGeneration

    orig = VLLMGeneration.sync_weights

    def sync_weights(self):
        if self.mode != "colocate" or self.enable_sleep_mode:
            return orig(self)
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker.reload_weights(weights_iterator=self._iter_named_params())
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


def trl_config(a, tmp: str):
    from _common import TRL_MATCHED_UPDATE
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=tmp,
        use_vllm=a.trl_generation == "vllm",
        vllm_mode="colocate",
        vllm_max_model_length=2048,
        # every completion exactly max_completion_length tokens: vLLM's ignore_eos, transformers' min_new_tokens
        generation_kwargs={"ignore_eos": True} if a.trl_generation == "vllm" else {"min_new_tokens": a.max_tokens},
        per_device_train_batch_size=a.micro_rows,
        gradient_accumulation_steps=a.prompts * a.group // a.micro_rows // a.updates,
        steps_per_generation=a.prompts * a.group // a.micro_rows,
        num_generations=a.group,
        max_completion_length=a.max_tokens,
        temperature=a.temperature,
        learning_rate=a.lr,
        **TRL_MATCHED_UPDATE,
        max_steps=a.updates * (a.warmup + a.rounds),
        gradient_checkpointing=True,
        bf16=a.dtype == "bfloat16",
        use_cpu=True,
        report_to="none",
        logging_steps=10**9,
        save_strategy="no",
        seed=0,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        log_completions=False,
    )


def trl_reward(completions, answer, **kw):
    """Exact match of the last \\boxed{} with the reference answer (cheap; the env's grading is not needed for timing)."""
    import re

    out = []
    for c, ans in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c
        boxed = re.findall(r"\\boxed\{([^}]*)\}", text)
        out.append(float(bool(boxed) and boxed[-1].strip() == ans))
    return out


def trl_callback(a, ch: Channel, phases: Phases, counts: dict):
    from transformers import TrainerCallback

    class Lockstep(TrainerCallback):
        """Blocks before each generation cycle until the coordinator says go; reports when its U steps are done."""

        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step % a.updates == 0:
                cmd = ch.wait()
                if cmd == "quit":
                    control.should_training_stop = True
                phases.take()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % a.updates == 0:
                total = time.perf_counter() - self.t0
                ch.send(trl_result(total, phases.take(), counts, a.updates))

    return Lockstep()


def trl_result(total: float, t: dict, counts: dict, steps: int) -> dict:
    gen = sum(t.get(k, 0.0) for k in ("vLLM.generate", "transformers.generate", "transformers.generate_batch"))
    sync, old = t.get("sync_weights", 0.0), t.get("old logprobs", 0.0)
    prep = t.get("_prepare_inputs", 0.0)
    return {
        "total_s": total,
        "phases_s": {
            "generation": gen,
            "old logprobs": old,
            "update": total - prep,
            "prepare/bookkeeping": max(prep - gen - sync - old, 0.0),
            "weight sync": sync,
        },
        "generated_tokens": counts.get("generated_tokens"),
        "trained_tokens": counts.get("generated_tokens"),  # mask_truncated_completions False: all completion tokens
        "prompt_tokens": counts.get("prompt_tokens"),
        "completion_lengths": [counts.get("completion_width")],
        "optimizer_steps": steps,
        "skipped_steps": 0,
        "torch_threads": counts.get("torch_threads"),
        "trl_profiling_s": t,
    }


def trl_worker(a, ch: Channel) -> None:
    import tempfile

    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    from alp_agent.models import load_model, load_tokenizer, resolve_model

    t0 = time.perf_counter()
    trl_vllm_env(a.trl_vllm_env)
    phases, counts = Phases(), {}
    trl_instrument(phases, counts)
    trl_llm_dtype(a.dtype)
    trl_vllm032_sync()
    prompts = json.loads(Path(a.prompts_file).read_text())
    path = resolve_model("smollm2")
    torch.manual_seed(0)
    model = load_model(path, dtype=torch.float32)
    ds = Dataset.from_dict({"prompt": [p["prompt"] for p in prompts], "answer": [p["answer"] for p in prompts]})
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward,
        args=trl_config(a, tempfile.mkdtemp(prefix="trl_iter_")),
        train_dataset=ds,
        processing_class=load_tokenizer(path),
        callbacks=[trl_callback(a, ch, phases, counts)],
    )
    acc = trainer.accelerator
    ch.send(
        {
            "ready": True,
            "build_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
            "mixed_precision": str(acc.mixed_precision),
            "generation": a.trl_generation,
            "vllm_dtype": str(trainer.vllm_generation.llm.llm_engine.model_config.dtype) if trainer.use_vllm else None,
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            "vllm_env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_"))},
        }
    )
    trainer.train()
    ch.wait()  # the coordinator's final quit


# ---------------------------------------------------------------------------------------------- coordinator
class Worker:
    def __init__(self, name: str, python: Path, a, extra: list[str], log: Path):
        r, w = os.pipe()
        cmd = [str(python), __file__, "--worker", name, "--result-fd", str(w)] + extra + a.passthrough
        self.log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=(w,), text=True
        )
        os.close(w)
        self.res = os.fdopen(r)
        self.name = name

    def recv(self) -> dict:
        line = self.res.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died: see {self.log.name}")
        return json.loads(line)

    def cmd(self, text: str) -> dict:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=120)
        except Exception:  # noqa: BLE001 - a worker that does not exit is ended (it is ours)
            self.proc.kill()
        self.log.close()


def run_rounds(a, ours: Worker, trl: Worker | None) -> list[dict]:
    """Warm-up + measured rounds; the order of the sides alternates every round (ours first on even rounds)."""
    rows = []
    for r in range(a.warmup + a.rounds):
        sides = [("ours", algo) for algo in a.algos.split(",")] + ([("trl", "trl")] if trl else [])
        if r % 2:
            sides.reverse()
        for side, algo in sides:
            w = ours if side == "ours" else trl
            out = w.cmd(f"go {algo} {r}")
            out.update({"round": r, "variant": algo, "warmup": r < a.warmup, "loadavg": os.getloadavg()})
            rows.append(out)
            Path(a.out).with_suffix(".rounds.json").write_text(json.dumps(rows, default=str))  # survives a kill
            tag = "warm-up" if out["warmup"] else "measured"
            print(
                f"round {r} ({tag}) {algo:<5} {out['total_s']:7.1f} s  generated {out['generated_tokens']} tok, "
                + "  ".join(f"{k} {v:.1f}" for k, v in out["phases_s"].items()),
                flush=True,
            )
    return rows


def summarise(a, rows: list[dict]) -> dict:
    """Per variant: mean phases, iterations/s, generated and trained tokens/s; same-round ratios vs TRL."""
    meas = [x for x in rows if not x["warmup"]]
    out = {}
    for v in dict.fromkeys(x["variant"] for x in meas):
        xs = [x for x in meas if x["variant"] == v]
        tot = sum(x["total_s"] for x in xs)
        out[v] = {
            "phases_mean_s": {p: sum(x["phases_s"][p] for x in xs) / len(xs) for p in PHASES},
            "total_mean_s": tot / len(xs),
            "iterations_per_s": len(xs) / tot,
            "generated_tok_s": sum(x["generated_tokens"] for x in xs) / tot,
            "trained_tok_s": sum(x["trained_tokens"] for x in xs) / tot,
            "generation_tok_s": sum(x["generated_tokens"] for x in xs) / sum(x["phases_s"]["generation"] for x in xs),
        }
    if "trl" in out:
        by_round = {(x["round"], x["variant"]): x for x in meas}
        for v in out:
            out[v]["x_trl"] = out[v]["trained_tok_s"] / out["trl"]["trained_tok_s"]
            out[v]["x_trl_per_round"] = [
                (by_round[(r, v)]["trained_tokens"] / by_round[(r, v)]["total_s"])
                / (by_round[(r, "trl")]["trained_tokens"] / by_round[(r, "trl")]["total_s"])
                for r in range(a.warmup, a.warmup + a.rounds)
            ]
    return out


def print_table(a, summ: dict) -> None:
    names = {"trl": "TRL GRPOTrainer", "alp": "ours, ALP", "bypass": "ours, Bypass", "grpo": "ours, GRPO"}
    order = ["trl"] + [v for v in summ if v != "trl"] if "trl" in summ else list(summ)
    cols = ["generation", "old logprobs", "update", "prepare/bookkeeping", "weight sync"]
    head = "| phase (s, mean) | " + " | ".join(names.get(v, v) for v in order) + " |"
    print(
        f"\n{a.prompts} prompts x {a.group} samples, {a.max_tokens} tokens each, {a.updates} optimizer steps, "
        f"micro-batches of {a.micro_rows} rows, {a.dtype}, mean of {a.rounds} measured rounds"
    )
    print(head)
    print("|" + "---|" * (len(order) + 1))
    for p in cols:
        print(f"| {p} | " + " | ".join(f"{summ[v]['phases_mean_s'][p]:.2f}" for v in order) + " |")
    rows = [
        ("total s/iteration", lambda s: f"{s['total_mean_s']:.2f}"),
        ("iterations/s", lambda s: f"{s['iterations_per_s']:.4f}"),
        ("generation tok/s (generation phase)", lambda s: f"{s['generation_tok_s']:.1f}"),
        ("trained tok/s (whole iteration)", lambda s: f"{s['trained_tok_s']:.1f}"),
    ]
    if "trl" in summ:
        rows += [
            ("x TRL (trained tok/s)", lambda s: f"{s['x_trl']:.2f}"),
            ("x TRL per round", lambda s: " / ".join(f"{x:.2f}" for x in s["x_trl_per_round"])),
        ]
    for label, f in rows:
        print(f"| {label} | " + " | ".join(f(summ[v]) for v in order) + " |")


def coordinate(a) -> None:
    from _common import machine_info

    logs = ROOT / "bench" / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ours = Worker("ours", Path(a.ours_python), a, [], logs / "iteration_vs_trl_ours.log")
    trl = None
    try:
        ready_ours = ours.recv()
        print(f"ours ready in {ready_ours['build_s']:.1f} s", flush=True)
        prompts_file = logs / "iteration_vs_trl_prompts.json"
        prompts_file.write_text(json.dumps(ready_ours.pop("prompts")))
        ready_trl, trl_error = None, None
        if not a.no_trl:
            trl = Worker(
                "trl", Path(a.trl_python), a, ["--prompts-file", str(prompts_file)], logs / "iteration_vs_trl_trl.log"
            )
            try:
                ready_trl = trl.recv()
                print(f"TRL ready in {ready_trl['build_s']:.1f} s: {ready_trl}", flush=True)
            except RuntimeError as e:
                trl_error = str(e)
                print(f"TRL failed to start: {e}", flush=True)
                trl.close()
                trl = None
        rows = run_rounds(a, ours, trl)
    finally:
        ours.close()
        if trl is not None:
            trl.close()
    summ = summarise(a, rows)
    print_table(a, summ)
    write_json(
        a, rows, summ, ready_ours, ready_trl, trl_error, machine_info("vllm", "transformers"), time.perf_counter() - t0
    )


def cpu_flags() -> dict:
    text = Path("/proc/cpuinfo").read_text()
    flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
    return {f: f in flags for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")}


def trl_versions(python: str) -> dict:
    code = "import trl, accelerate, datasets, transformers, vllm, torch, json; print(json.dumps({m.__name__: m.__version__ for m in (trl, accelerate, datasets, transformers, vllm, torch)}))"  # noqa: E501
    try:
        out = subprocess.run([python, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - versions are informational
        return {"error": str(e)}


def write_json(a, rows, summ, ready_ours, ready_trl, trl_error, machine, wall) -> None:
    out = {
        "command": "python bench/iteration_vs_trl.py " + " ".join(sys.argv[1:]),
        "args": {k: v for k, v in vars(a).items() if k != "passthrough"},
        "ours_overrides": ours_overrides(a),
        "summary": summ,
        "rounds": rows,
        "ready": {"ours": ready_ours, "trl": ready_trl},
        "trl_error": trl_error,
        "cpu_flags": cpu_flags(),
        "machine": machine,
        "trl_venv_versions": trl_versions(a.trl_python) if ready_trl else None,
        "wall_s": wall,
        "loadavg_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {a.out}")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO group)")
    ap.add_argument("--max-tokens", type=int, default=256, help="completion tokens (every completion exactly this)")
    ap.add_argument("--temperature", type=float, default=0.7, help="the quickstart's")
    ap.add_argument("--updates", type=int, default=2, help="optimizer steps per batch")
    ap.add_argument("--micro-rows", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="vLLM sampling and update autocast dtype on both sides; default: bf16 where native",
    )
    ap.add_argument("--algos", default="alp", help="our variants, comma list of alp, bypass, grpo")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-trl", action="store_true", help="ours only (no TRL venv)")
    ap.add_argument(
        "--trl-generation",
        default="vllm",
        choices=["vllm", "transformers"],
        help="TRL's generation: colocated vLLM (its fastest here) or transformers generate (use_vllm=False)",
    )
    ap.add_argument(
        "--trl-vllm-env",
        default="ours",
        choices=["ours", "default"],
        help="vLLM CPU env of the TRL process: the one our engine sets (default) or vLLM's own (see trl_vllm_env)",
    )
    ap.add_argument("--ours-python", default=str(OURS_PY))
    ap.add_argument("--trl-python", default=str(TRL_PY))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "iteration_vs_trl.json"))
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--result-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    assert (a.prompts * a.group) % (a.micro_rows * a.updates) == 0, "batch must be a multiple of micro_rows x updates"
    return a


def main() -> None:
    a = parse()
    if a.dtype is None:
        a.dtype = compute_dtype()
    keys = [
        "prompts",
        "group",
        "max_tokens",
        "temperature",
        "updates",
        "micro_rows",
        "lr",
        "dtype",
        "algos",
        "rounds",
        "warmup",
    ]
    a.passthrough = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
    if a.worker is None:
        coordinate(a)
        return
    ch = Channel(a.result_fd)
    (ours_worker if a.worker == "ours" else trl_worker)(a, ch)


if __name__ == "__main__":
    main()

"""Update throughput of our Trainer (ALP and Bypass) against TRL's GRPOTrainer on equal work, in one run.

Target (issue 7): >= 1.5x TRL's trained tokens/s. Trained tokens/s = model tokens under the loss mask in the batch /
seconds of the whole update of that batch (all optimizer steps: forwards, backward, clipping, AdamW, and each side's
own batch preparation: advantages, padding/collation).

Equal work: the same model (loaded fresh for each variant, float32 master weights, bf16 autocast), the same rollout
batches (N trajectories of a prompt and a completion of random token ids, rewards in groups, completion lengths
drawn in [C/2, C] unless --fixed), the same number of optimizer steps per batch (--updates) and micro-batches of
--micro-rows rows, AdamW with the same lr / betas / weight decay / eps, grad clip 1.0, no KL, no reference model.

  alp / bypass   alp_agent.train.trainer.Trainer.update(trajectories) (sequence-level ratio vs the engine logprobs;
                 ALP adds its noise on every layer). clean_metrics_every=0: the optional no-noise metrics forward
                 (quickstart: every 2nd step) is extra work TRL does not do, so it is off here.
  trl            trl.GRPOTrainer (loss_type dapo: token-mean like ours; num_iterations 1, beta 0, no vLLM), driven
                 the way transformers' Trainer loop drives it once completions exist: for every micro-batch
                 `trainer.training_step(model, inputs, num_items)` (TRL's compute_loss: its fused-LM-head forward
                 with entropy, loss, backward through accelerate), then clip, optimizer.step, scheduler, zero_grad.
                 Generation is replaced by the batch given here (the same tokens): `_prepare_inputs` returns it.
                 TRL pads the whole generation batch to its longest prompt/completion, as it does after generating.
  plain          (--plain, or when TRL cannot be imported) a plain PyTorch loop: the same micro-batches, forward,
                 gather-logsumexp logprobs of the completion tokens, REINFORCE token-mean loss, backward, clip, AdamW.

Timing: all variants in one process, alternated batch by batch (A B C A B C ...) so load from other processes hits
them alike; the first --warmup batches are not timed. Reported: total trained tokens / total seconds per variant,
the fastest batch, and x TRL (ratio of the totals; per-round ratios in the JSON).

    /tmp/trlvenv/bin/python bench/trainer_vs_trl.py          # TRL in its own venv (see bench/README.md)
    python bench/trainer_vs_trl.py --model tiny               # random small Llama, quick check

Writes bench/results/trainer_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info  # bench/ is sys.path[0] when run as python bench/X.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(args):
    import torch

    from alp_agent.models import load_model, load_tokenizer, resolve_model

    torch.manual_seed(0)
    if args.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg).float(), None
    path = resolve_model(args.model)
    return load_model(path, dtype=torch.float32), load_tokenizer(path)


def make_batches(args, vocab: int):
    import torch

    from alp_agent.rollout.trajectory import Trajectory

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(args.warmup + args.rounds):
        trajs = []
        for i in range(args.batch):
            C = (
                args.completion_len
                if args.fixed
                else int(torch.randint(args.completion_len // 2, args.completion_len + 1, (1,), generator=g))
            )
            p = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
            c = torch.randint(3, vocab, (C,), generator=g).tolist()
            lp = (-torch.rand(C, generator=g) * 0.1).tolist()
            trajs.append(
                Trajectory(
                    p,
                    c,
                    [1] * C,
                    lp,
                    reward=float(torch.rand(1, generator=g) > 0.5),
                    group_id=i // args.group,
                    temperature=1.0,
                )
            )
        out.append(trajs)
    return out


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- ours
class Ours:
    def __init__(self, args, algo: str):
        from alp_agent.algo.config import TrainerConfig
        from alp_agent.train.trainer import Trainer

        model, _ = load(args)
        model.to(args.device)
        tc = TrainerConfig.model_validate(
            {
                "algo": {"name": algo, "perturb": {"sigma0": 1e-3, "sigma_lr": 1e-2}},
                "optim": {"lr": args.lr, "warmup_steps": 0},
                "update": {
                    "updates_per_batch": args.updates,
                    "micro_batch_tokens": args.micro_rows * args.seq,
                    "max_micro_batch_size": args.micro_rows,
                    "clean_metrics_every": 0,
                    "dtype": args.dtype,
                    "shuffle": True,
                },
            }
        )
        self.trainer = Trainer(model, tc)
        self.model = model
        self.device = self.trainer.device

    def update(self, trajs) -> dict:
        m = self.trainer.update(trajs)
        return {"steps": m["optimizer_steps"], "skipped": m["skipped_steps"]}


# ---------------------------------------------------------------------------------------------- TRL
class TRL:
    def __init__(self, args):
        import torch
        from _common import TRL_MATCHED_UPDATE
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        model, tok = load(args)
        model.to(args.device)
        if tok is None:
            from transformers import PreTrainedTokenizerFast  # noqa: F401 - tiny model: any tokenizer will do

            from alp_agent.models import load_tokenizer, resolve_model

            tok = load_tokenizer(resolve_model("smollm2"))
        self.n_micro = args.batch // args.micro_rows
        self.accum = self.n_micro // args.updates
        self.tmp = tempfile.mkdtemp(prefix="trl_bench_")
        cfg = GRPOConfig(
            output_dir=self.tmp,
            per_device_train_batch_size=args.micro_rows,
            gradient_accumulation_steps=self.accum,
            steps_per_generation=self.n_micro,
            num_generations=args.group,
            max_completion_length=args.completion_len,
            learning_rate=args.lr,
            **TRL_MATCHED_UPDATE,
            bf16=args.dtype == "bfloat16",
            use_cpu=args.device == "cpu",
            report_to="none",
            logging_steps=10**9,
            save_strategy="no",
            seed=0,
            temperature=1.0,
            shuffle_dataset=False,
            dataloader_num_workers=0,
        )
        ds = Dataset.from_dict({"prompt": ["x"] * args.batch})
        self.trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
        )
        t = self.trainer
        t._prepare_inputs = lambda inputs: inputs  # completions exist already: the batch below is the input
        t.create_optimizer_and_scheduler(num_training_steps=10**6)
        t.current_gradient_accumulation_steps = self.accum
        self.model = t.model
        self.device = next(self.model.parameters()).device
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.torch = torch

    def _inputs(self, trajs):
        """What GRPOTrainer._generate_and_score_completions returns after generation: left-padded prompts,
        right-padded completions (the whole generation batch to one length), group-normalised advantages."""
        torch = self.torch
        from trl.trainer.utils import pad

        dev = self.device
        prompt = [torch.tensor(t.prompt_ids) for t in trajs]
        comp = [torch.tensor(t.completion_ids) for t in trajs]
        prompt_ids = pad(prompt, padding_value=self.pad, padding_side="left").to(dev)
        prompt_mask = pad([torch.ones_like(x) for x in prompt], padding_value=0, padding_side="left").to(dev)
        completion_ids = pad(comp, padding_value=self.pad, padding_side="right").to(dev)
        completion_mask = pad([torch.tensor(t.loss_mask) for t in trajs], padding_value=0, padding_side="right").to(dev)
        r = torch.tensor([t.reward for t in trajs], dtype=torch.float32)
        g = r.view(-1, self.trainer.num_generations)
        adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1).to(dev)
        perm = torch.randperm(len(trajs))
        full = {
            "prompt_ids": prompt_ids[perm],
            "prompt_mask": prompt_mask[perm],
            "completion_ids": completion_ids[perm],
            "completion_mask": completion_mask[perm],
            "advantages": adv[perm],
        }
        n_items = completion_mask.sum()
        rows = prompt_ids.shape[0] // self.n_micro
        micro = []
        for i in range(self.n_micro):
            d = {k: v[i * rows : (i + 1) * rows] for k, v in full.items()}
            d["num_items_in_batch"] = n_items
            micro.append(d)
        return micro, n_items

    def update(self, trajs) -> dict:
        t = self.trainer
        micro, n_items = self._inputs(trajs)
        steps = 0
        for s in range(len(micro) // self.accum):
            for mb in micro[s * self.accum : (s + 1) * self.accum]:
                t.training_step(self.model, mb, n_items)
            t.accelerator.clip_grad_norm_(self.model.parameters(), t.args.max_grad_norm)
            t.optimizer.step()
            t.lr_scheduler.step()
            self.model.zero_grad()
            steps += 1
        return {"steps": steps, "skipped": 0}


# ---------------------------------------------------------------------------------------------- plain PyTorch
class Plain:
    def __init__(self, args):
        import torch

        model, _ = load(args)
        self.model = model.to(args.device).train()
        self.device = next(self.model.parameters()).device
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=args.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01
        )
        self.args = args
        self.torch = torch

    def update(self, trajs) -> dict:
        torch, a = self.torch, self.args
        n_micro = a.batch // a.micro_rows
        accum = n_micro // a.updates
        order = torch.randperm(len(trajs)).tolist()
        steps = 0
        for s in range(a.updates):
            idx = order[s * accum * a.micro_rows : (s + 1) * accum * a.micro_rows]
            n_tok = sum(len(trajs[i].completion_ids) for i in idx)
            for j in range(accum):
                rows = [trajs[i] for i in idx[j * a.micro_rows : (j + 1) * a.micro_rows]]
                T = max(len(r.ids) for r in rows)
                ids = torch.zeros(len(rows), T, dtype=torch.long)
                attn = torch.zeros_like(ids)
                mask = torch.zeros(len(rows), T)
                for k, r in enumerate(rows):
                    ids[k, : len(r.ids)] = torch.tensor(r.ids)
                    attn[k, : len(r.ids)] = 1
                    mask[k, len(r.prompt_ids) : len(r.ids)] = 1
                ids, attn, mask = ids.to(self.device), attn.to(self.device), mask.to(self.device)
                adv = torch.tensor([[r.reward - 0.5] for r in rows], device=self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16"):
                    logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
                logits = logits.float()
                logp = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
                loss = -(adv * logp * mask[:, 1:]).sum() / n_tok
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            steps += 1
        return {"steps": steps, "skipped": 0}


def machine(args) -> dict:
    return machine_info("transformers", "trl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (embedded), an HF folder, or 'tiny' (random Llama)")
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype")
    ap.add_argument("--batch", type=int, default=16, help="trajectories per rollout batch")
    ap.add_argument("--group", type=int, default=4, help="GRPO group size")
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--completion-len", type=int, default=256, help="max completion tokens (lengths in [C/2, C])")
    ap.add_argument("--fixed", action="store_true", help="every completion exactly --completion-len tokens")
    ap.add_argument("--updates", type=int, default=2, help="optimizer steps per batch")
    ap.add_argument("--micro-rows", type=int, default=4, help="rows per micro-batch")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--rounds", type=int, default=2, help="timed batches per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default="trl,alp,bypass", help="comma list of trl, alp, bypass, plain")
    ap.add_argument("--plain", action="store_true", help="add the plain PyTorch loop")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer_vs_trl.json"))
    args = ap.parse_args()
    args.seq = args.prompt_len + args.completion_len
    assert args.batch % (args.micro_rows * args.updates) == 0, "batch must be a multiple of micro_rows * updates"
    assert args.batch % args.group == 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    if args.plain and "plain" not in variants:
        variants.append("plain")
    trl_error = None
    if "trl" in variants:
        try:
            import trl  # noqa: F401
        except Exception as e:  # noqa: BLE001
            trl_error = f"{type(e).__name__}: {e}"
            print(f"TRL not importable here ({trl_error}): comparing against the plain PyTorch loop instead")
            variants.remove("trl")
            if "plain" not in variants:
                variants.append("plain")

    built = {}
    for v in variants:
        t0 = time.perf_counter()
        built[v] = TRL(args) if v == "trl" else Plain(args) if v == "plain" else Ours(args, v)
        print(f"built {v} in {time.perf_counter() - t0:.1f} s", flush=True)
    vocab = built[variants[0]].model.config.vocab_size
    batches = make_batches(args, vocab)
    trained = [float(sum(sum(t.loss_mask) for t in b)) for b in batches]

    times = {v: [] for v in variants}
    for r, b in enumerate(batches):
        for v in variants:
            x = built[v]
            _sync(x.device)
            t0 = time.perf_counter()
            info = x.update(b)
            _sync(x.device)
            dt = time.perf_counter() - t0
            assert info["skipped"] == 0, f"{v}: skipped optimizer steps would make the work unequal"
            assert info["steps"] == args.updates, (v, info)
            tag = "warm-up" if r < args.warmup else "timed"
            print(f"round {r} ({tag}) {v:<7} {dt:7.2f} s  {trained[r] / dt:8.1f} trained tok/s", flush=True)
            if r >= args.warmup:
                times[v].append(dt)

    timed_tok = trained[args.warmup :]
    ref = "trl" if "trl" in variants else "plain" if "plain" in variants else variants[0]
    rows = {}
    for v in variants:
        tps = sum(timed_tok) / sum(times[v])
        best = max(n / t for n, t in zip(timed_tok, times[v]))
        rows[v] = {"tok_s": tps, "best_tok_s": best, "seconds": times[v], "per_batch_s": statistics.mean(times[v])}
    for v in variants:
        rows[v]["x_ref"] = rows[v]["tok_s"] / rows[ref]["tok_s"]
        rows[v]["x_ref_per_round"] = [rt / vt for rt, vt in zip(times[ref], times[v])]

    names = {"trl": "TRL GRPOTrainer", "alp": "ours, ALP", "bypass": "ours, Bypass", "plain": "plain PyTorch loop"}
    print(
        f"\nmodel {args.model}, {args.batch} trajectories x ({args.prompt_len} prompt + <= {args.completion_len} "
        f"completion), {args.updates} optimizer steps/batch, micro-batches of {args.micro_rows} rows, {args.dtype} "
        f"autocast, {sum(timed_tok) / len(timed_tok):.0f} trained tokens/batch, {args.rounds} timed batches"
    )
    print(f"| {'variant':<20} | {'trained tok/s':>13} | {'best batch tok/s':>16} | {'s/batch':>8} | {'x ' + ref:>8} |")
    print(f"|{'-' * 22}|{'-' * 14}:|{'-' * 17}:|{'-' * 9}:|{'-' * 9}:|")
    for v in variants:
        x = rows[v]
        print(
            f"| {names[v]:<20} | {x['tok_s']:13.1f} | {x['best_tok_s']:16.1f} | {x['per_batch_s']:8.2f} | "
            f"{x['x_ref']:8.2f} |"
        )

    out = {
        "command": f"{Path(sys.executable).parent.parent.name}/bin/python bench/trainer_vs_trl.py "
        + " ".join(sys.argv[1:]),
        "args": vars(args),
        "reference": ref,
        "trl_import_error": trl_error,
        "rows": rows,
        "trained_tokens_per_batch": trained,
        "trl_accelerate": (
            {
                "mixed_precision": str(built["trl"].trainer.accelerator.mixed_precision),
                "native_amp": bool(getattr(built["trl"].trainer.accelerator, "native_amp", False)),
            }
            if "trl" in built
            else None
        ),
        "machine": machine(args),
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

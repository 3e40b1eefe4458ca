"""Worker of tests/alp_agent/test_distributed.py, started with `torchrun --nproc-per-node 2 dist_worker.py OUT`.

Runs every scenario in one launch (a torchrun start costs seconds): rank 0 leads each one the way `alp-agent train`
does (it calls the Trainer, which announces the collective work), rank 1 sits in `Trainer.follow()`. What the test
compares is saved to OUT/<scenario>_rank<r>.pt; the single-process references are computed by the test itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

# torchrun starts this file as a script: its folder is on sys.path (test_trainer), the repository root (tests.fakes) not
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))

import torch
from test_trainer import config, make_batch, tiny

from alp_agent.algo.config import DistConfig
from alp_agent.train import distributed as D
from alp_agent.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alp_agent.train.logprobs import sequence_logprobs
from alp_agent.train.loop import FunctionSampler
from alp_agent.train.trainer import Trainer
from tests.fakes import WeightSink

OUT = Path(".")  # set by main() from argv


def grad_recorder(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Full (unsharded) policy gradients at every optimizer step: what the ranks' backward passes summed to."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    seen: list[dict[str, torch.Tensor]] = []

    def hook(opt, *_):
        g = {}
        for p in opt.param_groups[0]["params"]:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            g[names[id(p)]] = grad.detach().clone()
        seen.append(g)

    trainer.optimizer.register_step_pre_hook(hook)
    return seen


def lead(trainer: Trainer, work: Callable[[], dict]) -> dict:
    """Rank 0 runs `work` (which calls the trainer); the other ranks follow until rank 0 is done."""
    if D.rank() == 0:
        try:
            return work()
        finally:
            trainer.release_followers()
    trainer.follow()
    return {}


def save(name: str, obj: dict) -> None:
    torch.save(obj, OUT / f"{name}_rank{D.rank()}.pt")


def equivalence(name: str, strategy: str, algo: dict, batch_kw: dict | None = None, update: dict | None = None):
    """One update from rank 0's batch; record gradients, final full weights and metrics."""
    cfg = config(algo=algo, update=update or {}, dist={"strategy": strategy})
    tr = Trainer(tiny(), cfg)
    grads = grad_recorder(tr)
    res = lead(
        tr, lambda: {"metrics": tr.update(make_batch(tiny(), **(batch_kw or {}))), "weights": tr.policy_state_dict()}
    )
    local = [p.to_local() if hasattr(p, "to_local") else p for p in tr.model.parameters()]
    adam = [s["exp_avg"] for s in tr.optimizer.state.values()]
    held = {
        "params": sum(p.numel() for p in local),
        "adam": sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in adam),
    }
    save(name, {**res, "grads": grads, "step": tr.step, "batch": tr.batch, "held": held})


def alp_noise() -> None:
    """ALP under FSDP2: per-rank noise, replicated log-sigmas whose gradient is the ranks' average."""
    tr = Trainer(tiny(), config(dist={"strategy": "fsdp2"}))
    sigma_grads = []
    inner = tr.perturbation.average_grad

    def recording(all_reduce_avg) -> None:
        before = tr.perturbation.log_sigma.grad.clone()
        inner(all_reduce_avg)
        sigma_grads.append((before, tr.perturbation.log_sigma.grad.clone()))

    tr.perturbation.average_grad = recording
    res = lead(tr, lambda: {"metrics": tr.update(make_batch(tiny()))})
    # the same input on both ranks, in train mode: noisy forwards differ by rank, clean ones do not
    ids = torch.tensor([make_batch(tiny())[0].ids])
    tr.model.train()
    with torch.no_grad():
        with tr.perturbation.active(0, 0):
            noisy, _ = sequence_logprobs(tr.model, ids)
        tr.model.eval()
        clean, _ = sequence_logprobs(tr.model, ids)
    save(
        "alp_noise",
        {
            **res,
            "sigma_grads": sigma_grads,
            "log_sigma": tr.perturbation.log_sigma.detach().clone(),
            "noisy": noisy,
            "clean": clean,
        },
    )


def activation_checkpointing() -> None:
    """ALP under FSDP2 with HF activation checkpointing: the recompute inside backward re-gathers the layer and
    re-enters the noise hook with the same seed, so the update equals the one without checkpointing."""
    res = {}
    for ckpt in (False, True):
        tr = Trainer(tiny(), config(dist={"strategy": "fsdp2"}, update={"activation_checkpointing": ckpt}))

        def one_update(tr: Trainer = tr) -> dict:
            tr.update(make_batch(tiny()))
            return {"weights": tr.policy_state_dict()}

        res[ckpt] = {**lead(tr, one_update), "log_sigma": tr.perturbation.log_sigma.detach().clone()}
    save("activation_checkpointing", res)


def resume() -> None:
    """Sharded checkpoint after batch 1 of 3, resumed by a trainer built from another init, vs uninterrupted."""
    cfg = config(dist={"strategy": "fsdp2"}, optim={"warmup_steps": 3})
    data = [make_batch(tiny(), seed=s) for s in range(3)]
    ref = Trainer(tiny(), cfg)

    def uninterrupted() -> dict:
        for b in data:
            ref.update(b)
        return {"weights": ref.policy_state_dict()}

    res = lead(ref, uninterrupted)
    res["log_sigma_ref"] = ref.perturbation.log_sigma.detach().clone()

    first = Trainer(tiny(), cfg)

    def until_checkpoint() -> dict:
        first.update(data[0])
        first.data_cursor = 17
        save_checkpoint(first, OUT / "ckpt")
        return {"weights_at_ckpt": first.policy_state_dict()}

    res.update(lead(first, until_checkpoint))
    again = Trainer(tiny(seed=123), cfg)
    load_checkpoint(again, latest_checkpoint(OUT / "ckpt"))  # every rank: the load is collective
    res["counters_after_load"] = (again.step, again.batch, again.policy_version, again.data_cursor)

    def the_rest() -> dict:
        for b in data[1:]:
            again.update(b)
        return {"weights_resumed": again.policy_state_dict()}

    res.update(lead(again, the_rest))
    res["log_sigma_resumed"] = again.perturbation.log_sigma.detach().clone()
    save("resume", res)


def job(strategy: str) -> None:
    """`alp-agent train`'s job under torchrun (inference side faked on rank 0): 2 batches, then resume to 3."""
    from alp_agent.app import job as J
    from alp_agent.config import RunConfig

    model_dir = OUT / "model"
    if D.rank() == 0 and not model_dir.exists():
        tiny().save_pretrained(model_dir)
    D.barrier()
    engine = WeightSink()

    def fake_inference(cfg: RunConfig) -> J.Components:
        """Rank 0's inference side: a weight sink for vLLM, random episodes (engine logprobs from the initial tiny
        model) for the rollout."""
        sampler = FunctionSampler(lambda tasks, n, version: make_batch(tiny(), groups=len(tasks), n=n, seed=version))
        return J.Components(
            cfg, None, engine, None, sampler, None, model_dir=str(model_dir), num_tasks=4, num_eval_tasks=0
        )

    J.build_inference = fake_inference
    trainer = config(dist={"strategy": strategy}).model_dump()
    base = {
        "engine": {"model": str(model_dir)},
        "trainer": trainer,
        "eval": {"num_tasks": 0},
        "run": {
            "out_dir": str(OUT),
            "name": f"job_{strategy}",
            "prompts_per_batch": 2,
            "samples_per_prompt": 2,
            "sample_episodes": 0,
            "tensorboard": False,
            "checkpoint_every": 1,
        },
    }
    first = J.train(RunConfig.model_validate({**base, "run": {**base["run"], "iterations": 2}}), progress=False)
    again = J.train(
        RunConfig.model_validate({**base, "run": {**base["run"], "iterations": 3}}), resume=True, progress=False
    )
    save(
        f"job_{strategy}",
        {
            "first": first,
            "again": again,
            "engine_loads": engine.weight_loads,
            "engine_keys": sorted(engine.loaded),
            "model_keys": sorted(tiny().state_dict()),
        },
    )


def main() -> None:
    global OUT
    OUT = Path(sys.argv[1])
    torch.set_num_threads(1)
    assert D.launched_by_torchrun() and D.init_distributed(DistConfig(backend="gloo"))
    for strategy in ("ddp", "fsdp2"):
        equivalence(f"{strategy}_bypass", strategy, {"name": "bypass"})
        # 5 rows in mini-batches of 1, 2, 2 rows: a rank with no row, odd splits, unequal micro-batch counts
        equivalence(
            f"{strategy}_uneven",
            strategy,
            {"name": "bypass"},
            {"groups": 1, "n": 5},
            {"updates_per_batch": 3, "micro_batch_tokens": 16},
        )
    # old logprobs and a (sharded) reference model: the no-grad forwards are split and gathered too
    equivalence("fsdp2_grpo_kl", "fsdp2", {"name": "grpo", "kl_coef": 1e-2})
    alp_noise()
    activation_checkpointing()
    resume()
    job("fsdp2")
    job("ddp")
    D.barrier()
    D.shutdown()


if __name__ == "__main__":
    main()

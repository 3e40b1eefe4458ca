"""Several trainer processes (torchrun, 2 CPU ranks, gloo) against the single-process trainer on the tiny Llama.

One torchrun launch (tests/alp_agent/dist_worker.py) runs every scenario with rank 0 leading and rank 1 following,
as `alp-agent train` does; a hang fails through the subprocess timeout. The references are computed here, in one
process, from the same models and batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import grad_recorder
from test_trainer import config, make_batch, tiny

from alp_agent.train.batching import split_rows
from alp_agent.train.checkpoint import (
    export_hf,
    latest_checkpoint,
    load_checkpoint,
    load_policy_weights,
    save_checkpoint,
)
from alp_agent.train.trainer import Trainer

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(WORKER),
        str(out),
    ]
    try:
        p = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:  # a collective that never pairs up: fail, do not block CI
        pytest.fail(f"torchrun workers hung (timeout 300 s): {(e.stderr or '')[-3000:]}")
    assert p.returncode == 0, p.stderr[-5000:]
    return out


def load(runs: Path, name: str, rank: int = 0) -> dict:
    return torch.load(runs / f"{name}_rank{rank}.pt", weights_only=False)


def single_process(algo: dict, batch_kw: dict | None = None, update: dict | None = None):
    torch.set_num_threads(1)
    tr = Trainer(tiny(), config(algo=algo, update=update or {}))
    grads = grad_recorder(tr)
    metrics = tr.update(make_batch(tiny(), **(batch_kw or {})))
    return metrics, tr.policy_state_dict(), grads


def assert_same_update(dist: dict, ref: tuple) -> None:
    metrics, weights, grads = ref
    assert len(dist["grads"]) == len(grads) and dist["step"] == len(grads)
    for g_dist, g_ref in zip(dist["grads"], grads):
        assert g_dist.keys() == g_ref.keys()
        for k in g_ref:  # the gradient summed over ranks is the single-process one
            assert torch.allclose(g_dist[k], g_ref[k], atol=1e-6, rtol=1e-4), k
    assert dist["weights"].keys() == weights.keys()  # full HF weights on rank 0, no log-sigma
    for k in weights:
        assert torch.allclose(dist["weights"][k], weights[k], atol=1e-5), k
    # metrics over all ranks' tokens (quantiles, KL, clip fractions, loss) equal the single-process ones; padding and
    # micro-batch counts depend on the split and timings on the machine
    skip = ("time/", "steps_mean/padding_frac", "micro_batches")
    keys = [k for k in metrics if not k.startswith(skip)]
    assert set(keys) <= set(dist["metrics"])
    for k in keys:
        assert dist["metrics"][k] == pytest.approx(metrics[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_update_equals_single_process(runs, strategy):
    assert_same_update(load(runs, f"{strategy}_bypass"), single_process({"name": "bypass"}))
    # the follower got rank 0's batch and took the same steps
    assert load(runs, f"{strategy}_bypass", 1)["step"] == 2
    # what each rank holds: DDP the whole model and optimizer state, FSDP2 about half of each
    total = sum(p.numel() for p in tiny().parameters())
    held = [load(runs, f"{strategy}_bypass", r)["held"] for r in (0, 1)]
    if strategy == "ddp":
        assert held[0] == held[1] == {"params": total, "adam": total}
    else:
        assert sum(h["params"] for h in held) == sum(h["adam"] for h in held) == total
        assert all(abs(h["params"] - total / 2) < 0.05 * total for h in held), held


def test_fsdp2_old_and_reference_logprobs_are_gathered(runs):
    assert_same_update(load(runs, "fsdp2_grpo_kl"), single_process({"name": "grpo", "kl_coef": 1e-2}))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_uneven_split_does_not_hang_and_matches(runs, strategy):
    """5 rows in mini-batches of 1, 2, 2: rank 1 has no row in the first one (zero-weight filler micro-batch)."""
    ref = single_process({"name": "bypass"}, {"groups": 1, "n": 5}, {"updates_per_batch": 3, "micro_batch_tokens": 16})
    assert_same_update(load(runs, f"{strategy}_uneven"), ref)


def test_alp_noise_per_rank_and_sigma_replicated(runs):
    r0, r1 = load(runs, "alp_noise", 0), load(runs, "alp_noise", 1)
    assert not torch.allclose(r0["noisy"], r1["noisy"])  # rank enters the noise seed
    assert torch.equal(r0["clean"], r1["clean"])  # same weights: the difference is the noise
    assert len(r0["sigma_grads"]) == len(r1["sigma_grads"]) == 2
    for (b0, a0), (b1, a1) in zip(r0["sigma_grads"], r1["sigma_grads"]):
        assert not torch.allclose(b0, b1)  # each rank's own rows and noise ...
        assert torch.allclose(a0, (b0 + b1) / 2) and torch.equal(a0, a1)  # ... averaged like DDP does
    assert torch.equal(r0["log_sigma"], r1["log_sigma"])
    assert r0["metrics"]["steps_mean/kl_noise/exact"] > 0 and r0["metrics"]["steps_mean/sigma_grad/norm"] > 0


def test_sharded_checkpoint_resume_equals_uninterrupted(runs):
    r0, r1 = load(runs, "resume", 0), load(runs, "resume", 1)
    for k, v in r0["weights"].items():
        assert torch.equal(v, r0["weights_resumed"][k]), k
    assert torch.equal(r0["log_sigma_ref"], r0["log_sigma_resumed"])
    assert torch.equal(r1["log_sigma_ref"], r1["log_sigma_resumed"])
    assert r0["counters_after_load"] == r1["counters_after_load"] == (2, 1, 1, 17)


def test_sharded_checkpoint_loads_in_one_process_and_exports(runs, tmp_path):
    """DCP reshards: a 2-rank FSDP2 checkpoint resumes in a single process, and exports a full HF folder."""
    ckpt = latest_checkpoint(runs / "ckpt")
    assert ckpt is not None and (ckpt / "dcp").is_dir() and not (ckpt / "trainer.pt").exists()
    expected = load(runs, "resume")["weights_at_ckpt"]
    tr = Trainer(tiny(seed=7), config(optim={"warmup_steps": 3}))
    load_checkpoint(tr, ckpt)
    assert (tr.step, tr.batch, tr.data_cursor) == (2, 1, 17)
    for k, v in tr.policy_state_dict().items():
        assert torch.equal(v, expected[k]), k
    tr.update(make_batch(tiny(), seed=1))  # the optimizer state came along: it steps

    model = tiny(seed=9)
    load_policy_weights(model, ckpt)
    out = export_hf(model, tmp_path / "export")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_split_rows_balances_tokens_and_covers_every_row():
    from alp_agent.train.batching import Row as _Row

    rows = [_Row(list(range(n)), [1.0] * n, [0.0] * n, 0.0, 1.0) for n in (9, 3, 8, 2, 7, 1, 5)]
    parts = [split_rows(rows, 3, r) for r in range(3)]
    assert sorted(id(r) for p in parts for r in p) == sorted(id(r) for r in rows)
    loads = [sum(len(r.ids) for r in p) for p in parts]
    assert max(loads) - min(loads) <= 2, loads
    assert split_rows(rows, 1, 0) == rows
    assert split_rows(rows[:1], 2, 1) == []  # fewer rows than ranks: this rank pads with a filler micro-batch


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_train_job_under_torchrun_leads_follows_and_resumes(runs, strategy):
    """`alp-agent train`'s job (inference faked): rank 0 samples, logs, checkpoints and syncs the engine with the
    full weights; rank 1 only trains; a resumed second start continues from the checkpoint (sharded under FSDP2,
    the single-process file under DDP)."""
    r0, r1 = load(runs, f"job_{strategy}", 0), load(runs, f"job_{strategy}", 1)
    assert (r0["first"]["batches"], r0["again"]["batches"]) == (2, 3)
    assert r1["again"]["rank"] == 1 and r1["engine_loads"] == 0
    assert r0["engine_loads"] == 4 and r0["engine_keys"] == r0["model_keys"]  # 3 batches + the sync after resume
    run = runs / f"job_{strategy}"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "batch"] == [1, 2, 3]  # one writer: rank 0
    assert [r["step"] for r in recs if r["kind"] == "step"] == [1, 2, 3, 4, 5, 6]
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_000003"
    if strategy == "fsdp2":
        assert (ckpt / "dcp").is_dir() and (ckpt / "rng_rank1.pt").is_file()
    else:
        assert (ckpt / "trainer.pt").is_file() and not (ckpt / "dcp").exists()


def test_load_policy_weights_reads_single_file_checkpoints_too(tmp_path):
    tr = Trainer(tiny(), config())
    tr.update(make_batch(tiny()))
    model = tiny(seed=3)
    load_policy_weights(model, save_checkpoint(tr, tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, tr.model.state_dict()[k]), k


def test_fsdp2_activation_checkpointing_gives_same_update(runs):
    res = load(runs, "activation_checkpointing")
    assert torch.allclose(res[False]["log_sigma"], res[True]["log_sigma"], atol=1e-6)
    for k, v in res[False]["weights"].items():
        assert torch.allclose(v, res[True]["weights"][k], atol=1e-6), k

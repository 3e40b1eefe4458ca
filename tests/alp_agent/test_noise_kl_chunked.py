"""The noise KL and the sigma0 calibration read their logits a chunk of positions at a time from the lm_head's input
(train.noise_kl.TargetLogits), never as one (tokens x vocab) tensor: pinned here against the full-logits path of the
model's own forward, with noise off and on, and with the logits-post-processing fallback."""

from __future__ import annotations

import contextlib

import torch
from test_trainer import make_batch, tiny

from alp_agent.algo.perturb import LayerPerturbation
from alp_agent.train.batching import collate, rows_from
from alp_agent.train.metrics import exact_kl
from alp_agent.train.noise_kl import (
    TargetLogits,
    clean_logits,
    kl_between,
    perturbed_logits,
    target_logits,
    target_logprobs,
)


def _full(model, mb) -> torch.Tensor:
    """The old path: the model's own logits at the model-token positions."""
    T = mb.ids.shape[1]
    start = max(1, min(int(mb.start), T))
    out = model(input_ids=mb.ids, attention_mask=mb.attn, use_cache=False, logits_to_keep=T - start + 1)
    return out.logits[:, :-1][mb.mask[:, start:] > 0]


def _mb(model):
    trajs = make_batch(model)
    return collate(rows_from(trajs, torch.zeros(len(trajs))), torch.device("cpu"))


@torch.no_grad()
def test_chunked_target_logits_equal_the_models_own_logits():
    model = tiny().eval()
    mb = _mb(model)
    src, targets, infer = target_logits(model, mb)
    assert src.logits is None and src.hidden is not None  # the (N, H) input of the head, not (N, V)
    full = _full(model, mb)
    assert len(src) == full.shape[0] == targets.numel() == infer.numel() > 20
    blocks = torch.cat([src.block(i, i + 7) for i in range(0, len(src), 7)])
    assert torch.allclose(blocks, full, atol=1e-5)
    ref_lp = torch.log_softmax(full.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(target_logprobs(src, targets, 1.0, chunk=5), ref_lp, atol=1e-5)


@torch.no_grad()
def test_noise_kl_chunked_equals_full_logits_kl():
    model = tiny()
    mb = _mb(model)
    pert = LayerPerturbation(model, sigma0=0.05, seed=0)
    clean, _, _ = clean_logits(model, model, mb, contextlib.nullcontext)
    noisy = perturbed_logits(model, model, pert, mb, contextlib.nullcontext, step=3, micro=0)
    with pert.active(3, 0):
        model.train()
        noisy_full = _full(model, mb)
    model.eval()
    full_kl = exact_kl(_full(model, mb), noisy_full)
    got = kl_between(clean, noisy, chunk=6)
    assert got.shape == full_kl.shape and (got > 0).all()
    assert torch.allclose(got, full_kl, rtol=1e-4, atol=1e-9)
    held = TargetLogits(None, None, _full(model, mb), contextlib.nullcontext)  # the post-processing fallback's form
    assert torch.allclose(kl_between(held, noisy, chunk=6), full_kl, rtol=1e-4, atol=1e-9)


@torch.no_grad()
def test_noise_on_the_logits_falls_back_to_the_models_own_logits():
    """perturb.target 'logits' acts through a hook on the head's output: the head cannot run on its own later (the
    hook would be outside its noise context), so the forward's own logits are kept and the noise KL is not 0."""
    model = tiny()
    mb = _mb(model)
    pert = LayerPerturbation(model, sigma0=0.05, seed=0, target="logits")
    clean, _, _ = clean_logits(model, model, mb, contextlib.nullcontext)
    noisy = perturbed_logits(model, model, pert, mb, contextlib.nullcontext, step=3, micro=0)
    assert clean.logits is not None and noisy.logits is not None
    assert (kl_between(clean, noisy) > 0).all()

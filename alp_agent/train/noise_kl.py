"""What the perturbation does by itself, measured exactly: KL(clean || perturbed) over the whole vocabulary at every
model-token position (docs/method.md "What to watch"), from one clean and one perturbed no-grad forward.

A sample-based estimate on the sampled tokens would do here too, but the exact value costs nothing extra once the
logits exist and has no sampling noise, so a user can read a KL of 1e-6 as 1e-6. Used by the trainer on clean-metrics
steps (`update.noise_kl_rows` rows) and by the sigma0 'auto' calibration (alp_agent.train.calibrate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from alp_agent.algo.perturb import LayerPerturbation
from alp_agent.train.batching import MicroBatch
from alp_agent.train.metrics import exact_kl


def rows_of(mb: MicroBatch, k: int) -> MicroBatch:
    """The first k rows of a collated micro-batch in the right-padded layout (`MicroBatch.padded()` first when packed)."""

    def cut(x: torch.Tensor | None) -> torch.Tensor | None:
        return x[:k] if x is not None else None

    return replace(
        mb, ids=mb.ids[:k], attn=mb.attn[:k], mask=mb.mask[:k], infer=mb.infer[:k], adv=mb.adv[:k],
        old=cut(mb.old), ref=cut(mb.ref), tags=cut(mb.tags), row_ids=cut(mb.row_ids), row_len=cut(mb.row_len),
        src=None, dst=None, tgt=None, segments=None,
    )  # fmt: skip


def target_logits(forward_model: nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V) logits predicting each model token (loss mask 1), the (N,) token ids and the (N,) engine logprobs.
    Only positions from `mb.start` get the LM head (`logits_to_keep`), as in train.logprobs."""
    if mb.pos is not None:
        raise ValueError("target_logits reads rows: pass MicroBatch.padded(), not a packed micro-batch")
    T = mb.ids.shape[1]
    start = max(1, min(int(mb.start), T))
    out = forward_model(input_ids=mb.ids, attention_mask=mb.attn, use_cache=False, logits_to_keep=T - start + 1)
    valid = mb.mask[:, start:] > 0
    return out.logits[:, :-1][valid], mb.ids[:, start:][valid], mb.infer[:, start:][valid]


@contextlib.contextmanager
def mode(model: nn.Module, training: bool):
    """Model in train (the perturbation hooks fire) or eval mode (they do not) inside the block."""
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def clean_logits(model: nn.Module, forward_model: nn.Module, mb: MicroBatch, autocast: Callable):
    """`target_logits` of the clean policy (eval mode: no noise)."""
    with mode(model, False), autocast():
        return target_logits(forward_model, mb)


@torch.no_grad()
def perturbed_logits(
    model: nn.Module, forward_model: nn.Module, perturbation: LayerPerturbation, mb: MicroBatch, autocast: Callable,
    step: int, micro: int,
) -> torch.Tensor:  # fmt: skip
    """`target_logits` (logits only) with the noise of (step, micro) on."""
    with mode(model, True), perturbation.active(step, micro), autocast():
        return target_logits(forward_model, mb)[0]


@torch.no_grad()
def noise_kl(
    model: nn.Module, forward_model: nn.Module, perturbation: LayerPerturbation, mb: MicroBatch, autocast: Callable,
    step: int, micro: int, rows: int,
) -> torch.Tensor:  # fmt: skip
    """Exact KL(clean || perturbed) at each model-token position of the first `rows` rows of `mb` (float64, CPU).
    Under torchrun every rank must call it for the same micro-batches (the forwards are collectives under FSDP2)."""
    sub = rows_of(mb, rows)
    clean, _, _ = clean_logits(model, forward_model, sub, autocast)
    noisy = perturbed_logits(model, forward_model, perturbation, sub, autocast, step, micro)
    return exact_kl(clean, noisy, sub.temperature).cpu()


def record_noise_kl(trainer: Any, mb: MicroBatch, micro: int, stats: Any) -> None:
    """The trainer's hook: on a clean-metrics step with noise on, the exact noise KL of `update.noise_kl_rows` rows of
    micro-batch `micro` into `stats` (a StepStats, or None for a rank's zero-weight filler, which still runs the
    forwards so FSDP2's collectives pair up). The noise has the training forward's sigma and (step, micro) seed, but
    it is drawn for this no-grad forward's padded rows, not keyed per (row, position) like the packed training
    forward's: the same distribution, a fresh draw, so the value describes the noise, not the loss's exact sample."""
    rows = trainer.cfg.update.noise_kl_rows
    if trainer.perturbation is None or rows <= 0:
        return
    kl = noise_kl(
        trainer.model, trainer.forward_model, trainer.perturbation, mb, trainer._autocast, trainer.step, micro, rows
    )
    if stats is not None:
        stats.add_noise_kl(kl)

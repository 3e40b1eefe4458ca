"""What the perturbation does by itself, measured exactly: KL(clean || perturbed) over the whole vocabulary at every
model-token position (docs/method.md "What to watch"), from one clean and one perturbed no-grad forward.

A sample-based estimate on the sampled tokens would do here too, but the exact value costs nothing extra once the
logits exist and has no sampling noise, so a user can read a KL of 1e-6 as 1e-6. Used by the trainer on clean-metrics
steps (`update.noise_kl_rows` rows) and by the sigma0 'auto' calibration (alp_agent.train.calibrate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from alp_agent.algo.perturb import LayerPerturbation
from alp_agent.train.batching import MicroBatch
from alp_agent.train.logprobs import _head, hidden_states
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


@dataclass
class TargetLogits:
    """The logits predicting each model token, (N, V), held as the lm_head's input (N, H) wherever the model allows
    (train.logprobs.hidden_states): `block(i, j)` computes rows i..j only, so no (N, V) tensor exists. At a 150k
    vocabulary and thousands of tokens the full tensor is tens of GB (the calibration keeps one and makes a second per
    bisection step). Models that post-process their logits (soft-capping) keep the full tensor in `logits`."""

    hidden: torch.Tensor | None
    head: nn.Module | None
    logits: torch.Tensor | None
    autocast: Callable

    def __len__(self) -> int:
        src = self.logits if self.logits is not None else self.hidden
        return 0 if src is None else src.shape[0]

    def block(self, i: int, j: int) -> torch.Tensor:
        if self.logits is not None:
            return self.logits[i:j]
        assert self.hidden is not None and self.head is not None
        with self.autocast():  # the head's matmul in the forward's compute dtype, as inside the model
            return self.head(self.hidden[i:j])


def target_logits(
    forward_model: nn.Module, mb: MicroBatch, autocast: Callable = contextlib.nullcontext
) -> tuple[TargetLogits, torch.Tensor, torch.Tensor]:
    """The logits predicting each model token (loss mask 1), the (N,) token ids and the (N,) engine logprobs.
    Call it inside the forward's autocast; `autocast` is kept for the head's later blocks."""
    if mb.pos is not None:
        raise ValueError("target_logits reads rows: pass MicroBatch.padded(), not a packed micro-batch")
    T = mb.ids.shape[1]
    start = max(1, min(int(mb.start), T))
    valid = mb.mask[:, start:] > 0
    targets, infer = mb.ids[:, start:][valid], mb.infer[:, start:][valid]
    if _head_callable_later(forward_model):
        h, head = hidden_states(forward_model, input_ids=mb.ids, attention_mask=mb.attn)
        return TargetLogits(h[:, start - 1 : T - 1][valid], head, None, autocast), targets, infer
    out = forward_model(input_ids=mb.ids, attention_mask=mb.attn, use_cache=False, logits_to_keep=T - start + 1)
    return TargetLogits(None, None, out.logits[:, :-1][valid], autocast), targets, infer


def _head_callable_later(model: nn.Module) -> bool:
    """Whether the lm_head can run on its own after the forward and give the forward's logits: not when the model
    post-processes its logits (soft-capping), when the head's weight is an FSDP2 shard outside the forward, or when
    a hook acts on the head's output (ALP noise on the logits: `perturb.target: logits`)."""
    from alp_agent.train.distributed import is_sharded

    try:
        head = _head(model)
    except ValueError:
        return False
    return not is_sharded(head) and not head._forward_hooks and not head._forward_pre_hooks


def kl_between(p: TargetLogits, q: TargetLogits, temperature: float = 1.0, chunk: int = 256) -> torch.Tensor:
    """metrics.exact_kl(p, q) at every position, `chunk` positions of logits at a time: (N,) float64."""
    n = len(p)
    out = [exact_kl(p.block(i, i + chunk), q.block(i, i + chunk), temperature, chunk) for i in range(0, n, chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def target_logprobs(src: TargetLogits, targets: torch.Tensor, temperature: float, chunk: int = 256) -> torch.Tensor:
    """Float32 log-probs of `targets` under `src`'s logits / temperature, a chunk of positions at a time: (N,)."""
    out = []
    for i in range(0, len(src), chunk):
        lp = torch.log_softmax(src.block(i, i + chunk).float() / temperature, dim=-1)
        out.append(lp.gather(-1, targets[i : i + chunk, None]).squeeze(-1))
    return torch.cat(out) if out else torch.zeros(0)


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
        return target_logits(forward_model, mb, autocast)


@torch.no_grad()
def perturbed_logits(
    model: nn.Module, forward_model: nn.Module, perturbation: LayerPerturbation, mb: MicroBatch, autocast: Callable,
    step: int, micro: int,
) -> TargetLogits:  # fmt: skip
    """`target_logits` (logits only) with the noise of (step, micro) on: the noise enters the hidden states, which
    `TargetLogits` keeps, so its later blocks need no noise hook."""
    with mode(model, True), perturbation.active(step, micro), autocast():
        return target_logits(forward_model, mb, autocast)[0]


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
    return kl_between(clean, noisy, sub.temperature).cpu()


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

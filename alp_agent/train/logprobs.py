"""The one logprob computation of the project: trainer, tests and parity checks all call this.

Position t of the result is log pi(ids[t] | ids[:t]) with logits divided by the sampling temperature and, when the
engine sampled with top-k / top-p, truncated and renormalised exactly as vLLM's sampler does (chunked_head), so it is
directly comparable to the inference engine's sampled-token logprob for the same token.

Two ways to get there: the model's own logits (simple, any model; materialises [tokens x vocab]), or the last hidden
states x lm_head in chunks (`chunk_tokens` > 0; forward and backward never hold more than [chunk x vocab]). The
trainer uses the second on micro-batches (`microbatch_logprobs`), packed or padded (alp_agent.train.batching).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from alp_agent.train.chunked_head import _kept, head_logprobs, truncation_threshold
from alp_agent.train.packed_attention import spans_of, uses_packed_attention

if TYPE_CHECKING:  # batching imports the rollout package; the engines import this module
    from alp_agent.train.batching import MicroBatch


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `targets` under `logits` (..., V), computed in float32 (top-k/top-p truncated when asked).

    Uses gather - logsumexp instead of a full log_softmax so only one (..., V) float32 tensor is alive.
    Returns (logprobs, entropy or None), both shaped like `targets`. entropy_grad=False computes the entropy as a
    metric only (no graph: autograd would otherwise keep a (..., V) softmax alive for as long as the entropy lives).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0 or top_k > 0:
        flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        with torch.no_grad():
            keep = _kept(flat.detach(), truncation_threshold(flat.detach(), top_p, top_k), t)
        logits = flat.masked_fill(~keep, -float("inf")).view_as(logits)
    lse = torch.logsumexp(logits, dim=-1)
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - lse
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            p = torch.softmax(logits, dim=-1)
            finite = logits.masked_fill(torch.isinf(logits), 0.0)  # p = 0 there; 0 * -inf would be nan (also in grad)
            entropy = lse - (p * finite).sum(-1)
    return logp, entropy


def _head(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)  # DDP wraps the HF model in .module
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(inner).__name__} has no linear output embedding: use chunk_tokens=0")
    cfg = getattr(inner, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        raise ValueError(f"{type(inner).__name__} post-processes its logits: use chunk_tokens=0")
    return head


def hidden_states(model: nn.Module, **inputs) -> tuple[torch.Tensor, nn.Module]:
    """The (B, T, H) hidden states the model feeds its lm_head, and the head, without computing any logits: a
    pre-hook on the head takes its input and hands it an empty slice. Runs the model's own forward (so DDP and the
    perturbation hooks see a normal forward)."""
    head, box = _head(model), {}

    def take(_mod, args):
        box["h"] = args[0]
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(take)
    try:
        model(**inputs, use_cache=False, logits_to_keep=0)
    finally:
        handle.remove()
    return box["h"], head


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    position_ids: torch.Tensor | None = None,
    start: int = 1,
    entropy_grad: bool = True,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs of a (B, T) batch of ids under a causal LM.

    Returns (B, T) tensors aligned with input_ids: out[:, t] = log p(ids[:, t] | ids[:, :t]); out[:, 0] = 0
    (the first token has no context). Right padding is expected; padded positions hold garbage to be masked.
    `start` (>= 1): positions before it are not needed (the shared prompt of the batch) and come back as 0; the LM
    head and the float32 softmax then run only on positions start-1.. (`logits_to_keep`), which saves the vocabulary
    projection of every prompt token (a fifth of SmolLM2's compute per token, more with 150k vocabularies).
    """
    T = input_ids.shape[1]
    start = max(1, min(int(start), T))
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=T - start + 1,
    )
    logits = out.logits[:, :-1]
    logp, ent = logprobs_from_logits(
        logits, input_ids[:, start:], temperature, with_entropy, entropy_grad, top_p, top_k
    )
    zeros = logp.new_zeros(logp.shape[0], start)
    logp = torch.cat([zeros, logp], dim=1)
    if ent is not None:
        ent = torch.cat([zeros, ent], dim=1)
    return logp, ent


def microbatch_logprobs(
    model: nn.Module,
    mb: MicroBatch,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) logprobs (and entropy) of a collated micro-batch in its loss layout, computed only where a token
    is trained on (mb.src/dst/tgt); other positions are 0. The model runs on mb.ids (packed rows with position ids,
    or right-padded rows with an attention mask; packed under train.packed_attention, each trajectory's own causal
    attention only). chunk_tokens > 0: chunked hidden x lm_head (no full logits)."""
    if mb.src is None or mb.dst is None or mb.tgt is None:
        raise ValueError("microbatch_logprobs needs a micro-batch from batching.collate (src/dst/tgt)")
    src, dst, tgt = mb.src, mb.dst, mb.tgt
    inputs: dict[str, object] = {
        "input_ids": mb.ids,
        "attention_mask": mb.attn if mb.pos is None else None,
        "position_ids": mb.pos,
    }
    if mb.pos is not None and mb.segments is not None and uses_packed_attention(model):
        inputs["packed_spans"] = spans_of(mb.segments, *mb.ids.shape)  # each trajectory's causal triangle only
    if chunk_tokens > 0:
        h, head = hidden_states(model, **inputs)
        sel = h.reshape(-1, h.shape[-1]).index_select(0, src)
        weight, bias = cast(torch.Tensor, head.weight), cast("torch.Tensor | None", getattr(head, "bias", None))
        lp, ent_c = head_logprobs(sel, weight, bias, tgt, mb.temperature, mb.top_p, mb.top_k, chunk_tokens)
        ent: torch.Tensor | None = ent_c
    else:
        logits = model(**inputs, use_cache=False, logits_to_keep=0).logits
        sel = logits.reshape(-1, logits.shape[-1]).index_select(0, src)
        lp, ent = logprobs_from_logits(sel, tgt, mb.temperature, with_entropy, entropy_grad, mb.top_p, mb.top_k)
    B, T = mb.mask.shape
    out = lp.new_zeros(B * T).index_put((dst,), lp).view(B, T)
    if not with_entropy or ent is None:
        return out, None
    ent = ent if entropy_grad and torch.is_grad_enabled() else ent.detach()
    return out, ent.new_zeros(B * T).index_put((dst,), ent).view(B, T)


def chunk_tokens_for(requested: int, sharded: bool, algo) -> int:
    """The chunk size the trainer can use: 0 (the model's own logits) under FSDP2 (the lm_head weight is a shard
    outside the forward) and with noise on the logits (a hook on the lm_head output that the chunked path bypasses)."""
    if sharded or (algo.noise_on and algo.perturb.target == "logits"):
        return 0
    return requested

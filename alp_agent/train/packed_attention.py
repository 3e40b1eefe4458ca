"""Causal attention over packed rows that computes only each trajectory's own causal triangle.

Why: a packed micro-batch row holds several trajectories back to back (alp_agent.train.batching). Given only position
ids, transformers builds a block-diagonal causal mask and SDPA computes every query-key pair of the row densely, then
masks: for the quickstart's batches 2.1x the pairs that are needed (2.81 M vs 1.33 M per update). Here each segment
goes through SDPA on its own with `is_causal=True` (the flash kernels then skip the blocks above the diagonal), and
the outputs are laid back side by side: the same result, no masked work. Opt-in (update.packed_attention): on 2 CPU
cores the many short calls took longer than the one dense masked call (5.6 vs 4.7 s of SDPA over a quickstart batch,
bench/README.md "trainer throughput"); long packed rows on a GPU are where it should pay.

How it is wired: the trainer switches its model (and reference) to the attention implementation `PACKED_SDPA`
(registered below with transformers' AttentionInterface, with SDPA's own mask builder) when it packs micro-batches,
and passes the segments of a packed forward as the keyword `packed_spans` (transformers hands unknown keywords down
to the attention function, through activation checkpointing too). A call without `packed_spans` (a padded forward,
generation with a KV cache, anything else) is plain SDPA with its mask, so the switched model stays a normal model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "alp_packed_sdpa"

Spans = tuple[tuple[tuple[int, int], ...], ...]  # per model row: (start, end) of each segment, covering the row


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_spans: Spans | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """(B, T, heads, head_dim) output like transformers' SDPA; per segment when `packed_spans` is given.

    query/key/value: (B, heads, T, head_dim). The mask transformers built from the position ids is not needed then:
    attention within a segment is causal and nothing crosses segments."""
    if packed_spans is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if len(packed_spans) != query.shape[0] or any(row[-1][1] != query.shape[2] for row in packed_spans):
        raise ValueError(f"packed_spans {packed_spans} do not cover a batch of shape {tuple(query.shape)}")
    rows = []
    for b, spans in enumerate(packed_spans):
        parts = [
            sdpa_attention_forward(
                module,
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                None,
                dropout=dropout,
                scaling=scaling,
                is_causal=True,
            )[0]
            for s, e in spans
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def spans_of(segments: Sequence[tuple[int, ...]], rows: int, width: int) -> Spans:
    """Segment spans per model row from batching's segments ((row, offset, length, key) per trajectory): each row's
    trajectories in order, and its padding tail as one more segment (its outputs are never read)."""
    by_row: list[list[tuple[int, int]]] = [[] for _ in range(rows)]
    for seg in segments:
        b, off, n = seg[0], seg[1], seg[2]
        by_row[b].append((off, off + n))
    out = []
    for spans in by_row:
        spans.sort()
        end = spans[-1][1] if spans else 0
        if end < width:
            spans.append((end, width))
        out.append(tuple(spans))
    return tuple(out)


def uses_packed_attention(model: nn.Module) -> bool:
    """Does this model (or the one DDP wraps) run `PACKED_SDPA`?"""
    inner = getattr(model, "module", model)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) == PACKED_SDPA


def enable_packed_attention(model: nn.Module) -> bool:
    """Switch an SDPA model to `PACKED_SDPA` (same weights, same results); other implementations (eager, flash,
    a model without the attention interface) are left as they are. True when the model now runs it."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return uses_packed_attention(model)
    cast(Any, model).set_attn_implementation(PACKED_SDPA)
    return uses_packed_attention(model)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
if PACKED_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)

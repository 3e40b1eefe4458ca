"""From trajectories to tensors: rows (one per trajectory), mini-batch chunks, micro-batches and their collation.

A `Row` is one trajectory as position-aligned lists over ids = prompt + completion (prompt positions have mask 0).
A mini-batch (one optimizer step, the staleness unit of the paper) is a chunk of rows; it is cut into micro-batches
under a token budget (gradient accumulation) and each micro-batch is collated into right-padded (B, T) tensors.
Under torchrun the rows of a mini-batch are split over the ranks by token count (`split_rows`) and ranks pad to the
same number of micro-batches with zero-weight `filler` rows, so every collective pairs up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alp_agent.rollout.trajectory import Trajectory


@dataclass
class Row:
    """One trajectory as position-aligned lists over ids = prompt + completion (prompt positions have mask 0)."""

    ids: list[int]
    mask: list[float]
    infer: list[float]
    adv: float
    temperature: float
    old: torch.Tensor | None = None  # (len,) clean logprobs at theta_old, when the algorithm needs them
    ref: torch.Tensor | None = None  # (len,) reference-model logprobs, when kl_coef > 0


@dataclass
class MicroBatch:
    """A collated micro-batch: right-padded (B, T) tensors on the training device."""

    ids: torch.Tensor  # (B, T)
    attn: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) float loss mask
    infer: torch.Tensor  # (B, T)
    adv: torch.Tensor  # (B, 1)
    temperature: float
    old: torch.Tensor | None
    ref: torch.Tensor | None
    start: int = 1  # first position with loss mask 1 in any row: logits before it are never needed


def rows_from(trajs: list[Trajectory], adv: torch.Tensor) -> list[Row]:
    """One Row per trajectory with its advantage; prompt positions get loss mask 0 and engine logprob 0."""
    rows = []
    for t, a in zip(trajs, adv.tolist()):
        p = len(t.prompt_ids)
        rows.append(
            Row(
                t.ids,
                [0.0] * p + [float(x) for x in t.loss_mask],
                [0.0] * p + list(t.infer_logprobs),
                a,
                float(t.temperature),
            )
        )
    return rows


def minibatch_chunks(n_rows: int, updates_per_batch: int, generator: torch.Generator | None) -> list[list[int]]:
    """Row indices of each mini-batch: a (seeded) shuffle cut into `updates_per_batch` near-equal chunks (fewer when
    there are fewer rows than updates). generator=None keeps the rows in order."""
    order = torch.randperm(n_rows, generator=generator).tolist() if generator is not None else list(range(n_rows))
    k = min(updates_per_batch, n_rows)
    return [order[i * n_rows // k : (i + 1) * n_rows // k] for i in range(k)]


def micro_batches(rows: list[Row], token_budget: int, max_rows: int) -> list[list[Row]]:
    """Bucket by (temperature, length): sort longest first, fill each micro-batch while rows x padded length fits the
    budget. Choice vs "packing": bucketing keeps standard right padding (correct with every attention backend);
    padding stays small because neighbours have similar lengths. A single row longer than the budget gets its own."""
    order = sorted(rows, key=lambda r: (r.temperature, -len(r.ids)))
    out: list[list[Row]] = []
    cur: list[Row] = []
    for r in order:
        if cur and (
            r.temperature != cur[0].temperature
            or len(cur) >= max_rows
            or len(cur[0].ids) * (len(cur) + 1) > token_budget
        ):
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def split_rows(rows: list[Row], world: int, rank: int) -> list[Row]:
    """This rank's share of `rows` (kept in their original order): longest rows first to the least-loaded rank, so
    ranks get similar token counts. Deterministic, so every rank computes the same partition. world=1: all rows."""
    if world == 1:
        return list(rows)
    load = [0] * world
    owner = [0] * len(rows)
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i].ids)):
        k = min(range(world), key=lambda r: (load[r], r))
        owner[i] = k
        load[k] += len(rows[i].ids)
    return [r for i, r in enumerate(rows) if owner[i] == rank]


def filler(row: Row) -> Row:
    """A zero-weight copy of a row (loss mask 0, advantage 0): the micro-batch a rank with fewer (or no) rows runs so
    that every rank joins the same number of forward/backward collectives. Its loss and gradient are exactly 0."""
    n = len(row.ids)
    return Row(row.ids, [0.0] * n, row.infer, 0.0, row.temperature, row.old, row.ref)


def collate(rows: list[Row], device: torch.device) -> MicroBatch:
    """Right-padded tensors of `rows` on `device`; `start` is the first position any row trains on."""
    T = max(len(r.ids) for r in rows)
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T)
    infer = torch.zeros(B, T)
    old = torch.zeros(B, T) if rows[0].old is not None else None
    ref = torch.zeros(B, T) if rows[0].ref is not None else None
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(r.mask)
        infer[i, :n] = torch.tensor(r.infer)
        if old is not None:
            old[i, :n] = r.old
        if ref is not None:
            ref[i, :n] = r.ref
    adv = torch.tensor([[r.adv] for r in rows])
    on = mask.any(0).nonzero()
    start = int(on[0]) if on.numel() else 1

    def to(x: torch.Tensor | None) -> torch.Tensor | None:
        return x.to(device) if x is not None else None

    return MicroBatch(
        ids.to(device),
        attn.to(device),
        mask.to(device),
        infer.to(device),
        adv.to(device),
        rows[0].temperature,
        to(old),
        to(ref),
        start,
    )

"""From trajectories to tensors: rows (one per trajectory), mini-batch chunks, micro-batches and their collation.

A `Row` is one trajectory as position-aligned lists over ids = prompt + completion (prompt positions have mask 0).
A mini-batch (one optimizer step, the staleness unit of the paper) is a chunk of rows; it is cut into micro-batches
under a token budget (gradient accumulation) and each micro-batch is collated twice over: the loss layout, right-padded
(B, T) tensors with one trajectory per row (what the losses and statistics read), and the model layout, what the
model computes. Packed (default), the model layout is P rows of width W = the longest trajectory, each holding several
trajectories back to back with position ids restarting at 0 (transformers then builds a block-diagonal causal mask
from the position ids), so no position is spent on padding except the tail of a bin; unpacked, it is the loss
layout itself with an attention mask. `src`/`dst`/`tgt` map every trained token between the two.
Under torchrun the rows of a mini-batch are split over the ranks by token count (`split_rows`) and ranks pad to the
same number of micro-batches with zero-weight `filler` rows, so every collective pairs up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train.tail import token_tags


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
    top_p: float = 1.0  # the engine's truncation: the trainer's logprobs use the same distribution
    top_k: int = 0
    key: int = 0  # the row's index in its rollout batch: keys the perturbation noise per (row, position)
    tags: list[int] | None = None  # per position: model turn and after-observation flag (train.tail), -1 elsewhere


@dataclass
class MicroBatch:
    """A collated micro-batch on the training device: the model layout (ids, attn, pos) and the (B, T) loss layout."""

    ids: torch.Tensor  # (P, W) what the model computes: packed rows, or the right-padded (B, T) rows
    attn: torch.Tensor  # (P, W) 1 on real tokens (padding_frac counts the rest)
    mask: torch.Tensor  # (B, T) float loss mask
    infer: torch.Tensor  # (B, T)
    adv: torch.Tensor  # (B, 1)
    temperature: float
    old: torch.Tensor | None
    ref: torch.Tensor | None
    start: int = 1  # first position with loss mask 1 in any row
    pos: torch.Tensor | None = None  # (P, W) position ids when packed (then no attention mask is passed)
    src: torch.Tensor | None = None  # (N,) flat index in (P, W) of the hidden state that predicts each trained token
    dst: torch.Tensor | None = None  # (N,) flat index of that token in the (B, T) loss layout
    tgt: torch.Tensor | None = None  # (N,) its token id
    top_p: float = 1.0
    top_k: int = 0
    segments: list[tuple[int, int, int, int]] | None = None  # (model row, offset, length, row key) per trajectory
    attn_pairs: tuple[int, int] = (0, 0)  # (query-key pairs the attention computes, causal pairs it needs)
    tags: torch.Tensor | None = None  # (B, T) long, train.tail.token_tags per row (-1: not a model token / unknown)
    row_ids: torch.Tensor | None = None  # (B, T) the right-padded ids (== ids when not packed)
    row_len: torch.Tensor | None = None  # (B,) trajectory lengths

    def padded(self) -> MicroBatch:
        """This micro-batch in the right-padded model layout (ids (B, T) + attention mask): for code that reads
        model outputs row by row (the noise-KL metric, the sigma0 calibration)."""
        if self.pos is None or self.row_ids is None or self.row_len is None or self.dst is None:
            return self
        attn = (torch.arange(self.row_ids.shape[1], device=self.row_ids.device)[None] < self.row_len[:, None]).long()
        return replace(self, ids=self.row_ids, attn=attn, pos=None, src=self.dst - 1, attn_pairs=(0, 0))


def rows_from(trajs: list[Trajectory], adv: torch.Tensor) -> list[Row]:
    """One Row per trajectory with its advantage; prompt positions get loss mask 0 and engine logprob 0."""
    rows = []
    for key, (t, a) in enumerate(zip(trajs, adv.tolist())):
        p = len(t.prompt_ids)
        rows.append(
            Row(
                t.ids,
                [0.0] * p + [float(x) for x in t.loss_mask],
                [0.0] * p + list(t.infer_logprobs),
                a,
                float(t.temperature),
                top_p=float(t.top_p),
                top_k=int(t.top_k),
                key=key,
                tags=[-1] * p + token_tags(t),
            )
        )
    return rows


def minibatch_chunks(n_rows: int, updates_per_batch: int, generator: torch.Generator | None) -> list[list[int]]:
    """Row indices of each mini-batch: a (seeded) shuffle cut into `updates_per_batch` near-equal chunks (fewer when
    there are fewer rows than updates). generator=None keeps the rows in order."""
    order = torch.randperm(n_rows, generator=generator).tolist() if generator is not None else list(range(n_rows))
    k = min(updates_per_batch, n_rows)
    return [order[i * n_rows // k : (i + 1) * n_rows // k] for i in range(k)]


def _sampling(r: Row) -> tuple[float, float, int]:
    return (r.temperature, r.top_p, r.top_k)


def micro_batches(rows: list[Row], token_budget: int, max_rows: int, packed: bool = False) -> list[list[Row]]:
    """Micro-batches of rows of one sampling distribution (temperature, top-p, top-k) under the token budget.

    Padded: longest first, rows x longest row <= budget (bucketing: neighbours have similar lengths, so padding
    stays small). Packed: each micro-batch takes the longest remaining row (its width W), then first-fit-decreasing
    over *all* remaining rows into at most budget // W bins of width W, so short rows fill the long rows' bins (the
    bins `collate` builds from these rows are the same ones). A single row longer than the budget gets its own."""
    groups: dict[tuple[float, float, int], list[Row]] = {}
    for r in sorted(rows, key=lambda r: -len(r.ids)):
        groups.setdefault(_sampling(r), []).append(r)
    out: list[list[Row]] = []
    for key in sorted(groups):
        out += (_packed_groups if packed else _bucketed_groups)(groups[key], token_budget, max_rows)
    return out


def _bucketed_groups(order: list[Row], budget: int, max_rows: int) -> list[list[Row]]:
    out: list[list[Row]] = []
    cur: list[Row] = []
    for r in order:
        if cur and (len(cur) >= max_rows or len(cur[0].ids) * (len(cur) + 1) > budget):
            out.append(cur)
            cur = []
        cur.append(r)
    return out + [cur] if cur else out


def _packed_groups(order: list[Row], budget: int, max_rows: int) -> list[list[Row]]:
    out: list[list[Row]] = []
    left = list(order)  # longest first
    while left:
        width = len(left[0].ids)
        room: list[int] = []
        taken: list[int] = []
        for i, r in enumerate(left):
            n = len(r.ids)
            b = next((b for b in range(len(room)) if room[b] >= n), None)
            if b is None and (len(room) + 1) * width <= max(budget, width):
                room.append(width)
                b = len(room) - 1
            if b is not None:
                room[b] -= n
                taken.append(i)
                if len(taken) >= max_rows:
                    break
        out.append([left[i] for i in taken])
        left = [r for i, r in enumerate(left) if i not in set(taken)]
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
    return Row(
        row.ids, [0.0] * n, row.infer, 0.0, row.temperature, row.old, row.ref, row.top_p, row.top_k, row.key, row.tags
    )


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the row indices of each bin, every bin's total length <= width (>= the longest row)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b in range(len(bins)) if room[b] >= lengths[i]), None)
        if b is None:
            bins.append([])
            room.append(width)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def _model_layout(rows: list[Row], packed: bool, T: int):
    """(ids, attn, pos, start offset of each row in the flat model layout, segments) for `rows`."""
    if not packed:
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        attn = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.ids)] = torch.tensor(r.ids)
            attn[i, : len(r.ids)] = 1
        segs = [(i, 0, len(r.ids), r.key) for i, r in enumerate(rows)]
        return ids, attn, None, [i * T for i in range(len(rows))], segs
    bins = pack([len(r.ids) for r in rows], T)
    ids = torch.zeros(len(bins), T, dtype=torch.long)
    attn = torch.zeros(len(bins), T, dtype=torch.long)
    pos = torch.zeros(len(bins), T, dtype=torch.long)
    base, segs = [0] * len(rows), []
    for b, members in enumerate(bins):
        off = 0
        for i in members:
            n = len(rows[i].ids)
            ids[b, off : off + n] = torch.tensor(rows[i].ids)
            attn[b, off : off + n] = 1
            pos[b, off : off + n] = torch.arange(n)
            base[i] = b * T + off
            segs.append((b, off, n, rows[i].key))
            off += n
        pos[b, off:] = torch.arange(T - off)  # the tail is a segment of its own (diff != 1 starts a new one)
    return ids, attn, pos, base, segs


def collate(rows: list[Row], device: torch.device, packed: bool = False) -> MicroBatch:
    """The loss layout (right-padded (B, T)) and the model layout (packed or padded) of `rows` on `device`."""
    T = max(len(r.ids) for r in rows)
    B = len(rows)
    mask = torch.zeros(B, T)
    infer = torch.zeros(B, T)
    old = torch.zeros(B, T) if rows[0].old is not None else None
    ref = torch.zeros(B, T) if rows[0].ref is not None else None
    tags = torch.full((B, T), -1, dtype=torch.long) if any(r.tags is not None for r in rows) else None
    for i, r in enumerate(rows):
        n = len(r.ids)
        mask[i, :n] = torch.tensor(r.mask)
        if tags is not None and r.tags is not None:
            tags[i, :n] = torch.tensor(r.tags)
        infer[i, :n] = torch.tensor(r.infer)
        if old is not None and r.old is not None:  # rows of a mini-batch are filled alike
            old[i, :n] = r.old
        if ref is not None and r.ref is not None:
            ref[i, :n] = r.ref
    adv = torch.tensor([[r.adv] for r in rows])
    ids, attn, pos, base, segs = _model_layout(rows, packed, T)
    row_ids = _model_layout(rows, False, T)[0] if packed else ids
    # the trained tokens (t >= 1, mask > 0); none at all (a filler): one zero-weight token, so the backward still
    # reaches every parameter (DDP/FSDP2 wait for every gradient)
    bi, ti = (mask[:, 1:] > 0).nonzero(as_tuple=True)
    ti = ti + 1
    if bi.numel() == 0:
        bi, ti = torch.tensor([0]), torch.tensor([min(1, len(rows[0].ids) - 1)])
    src = torch.tensor(base)[bi] + ti - 1
    tgt = torch.tensor([rows[int(b)].ids[int(t)] for b, t in zip(bi, ti)], dtype=torch.long)
    on = mask.any(0).nonzero()
    needed = sum(len(r.ids) * (len(r.ids) + 1) // 2 for r in rows)

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
        int(on[0]) if on.numel() else 1,
        pos=to(pos),
        src=src.to(device),
        dst=(bi * T + ti).to(device),
        tgt=tgt.to(device),
        top_p=rows[0].top_p,
        top_k=rows[0].top_k,
        segments=segs,
        attn_pairs=(ids.shape[0] * ids.shape[1] ** 2, needed),
        tags=to(tags),
        row_ids=to(row_ids),
        row_len=torch.tensor([len(r.ids) for r in rows], device=device),
    )

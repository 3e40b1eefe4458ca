"""The statistics of one optimizer step and of one rollout batch: what the trainer logs besides the loss.

`StepStats` collects, micro-batch by micro-batch, the per-token and per-sequence values the metrics need (log-ratios
against the loss's base and against the engine, clean and noisy logprobs, entropies, clip and mask counts); under
torchrun `gather()` combines every rank's share with one collective, so quantiles and KLs describe the whole
mini-batch exactly as in a single process. `ratio_metrics` summarises log-ratios the same way for a step and for a
whole batch. Estimators themselves live in `alp_agent.train.metrics`.
"""

from __future__ import annotations

from collections import Counter

import torch

from alp_agent.algo.losses import PGTerms, sequence_log_ratio
from alp_agent.train import distributed as D
from alp_agent.train.batching import MicroBatch
from alp_agent.train.metrics import kl_stats, summarize

TOKEN_KEYS = ("log_ratio", "d_infer", "clean", "noisy", "inf", "entropy", "ent_train")
SEQ_KEYS = ("log_ratio", "d_infer")


def ratio_metrics(raw: dict[str, torch.Tensor], base_name: str, clamp: float) -> dict[str, float]:
    """Token and sequence ratio summaries against the loss's base (`infer` or `old`) and, for the baselines whose base
    is `old`, against the engine's mu too, so every algorithm is compared on the same ratio."""
    m = summarize(raw["log_ratio"].exp(), f"ratio_token_vs_{base_name}")
    m.update(summarize(raw["seq_log_ratio"].exp(), f"ratio_seq_vs_{base_name}"))
    if base_name == "old":
        m.update(summarize(raw["d_infer"].clamp(-clamp, clamp).exp(), "ratio_token_vs_infer"))
        m.update(summarize(raw["seq_d_infer"].exp(), "ratio_seq_vs_infer"))
    return m


class StepStats:
    """Per-token values and counts of one optimizer step, added micro-batch by micro-batch."""

    def __init__(self, base_name: str, clamp: float, geometric: bool) -> None:
        self.base_name, self.clamp, self.geometric = base_name, clamp, geometric
        self.tok: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_KEYS}
        self.seq: dict[str, list[torch.Tensor]] = {k: [] for k in SEQ_KEYS}
        self.counts: Counter = Counter()
        self.loss_total = 0.0

    def add_clean(self, logp: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> None:
        """Clean (no-noise) logprobs and entropy of a micro-batch's model tokens."""
        self.tok["clean"].append(logp.detach()[valid].float().cpu())
        self.tok["entropy"].append(entropy.detach()[valid].float().cpu())

    @torch.no_grad()
    def add(
        self,
        mb: MicroBatch,
        logp: torch.Tensor,
        entropy: torch.Tensor | None,
        terms: PGTerms,
        mask: torch.Tensor,
        loss: float,
    ) -> None:
        """The training forward's values of one (real) micro-batch: logp as the loss saw it (noisy under ALP)."""
        c, valid = self.clamp, mb.mask > 0
        lpd = logp.detach().float()
        base = mb.infer if self.base_name == "infer" else mb.old
        self.loss_total += loss
        self.tok["log_ratio"].append((lpd - base)[valid].clamp(-c, c).cpu())
        self.tok["d_infer"].append((lpd - mb.infer)[valid].cpu())
        self.tok["noisy"].append(lpd[valid].cpu())
        self.tok["inf"].append(mb.infer[valid].cpu())
        if entropy is not None:
            self.tok["ent_train"].append(entropy.detach()[valid].float().cpu())
        self.seq["log_ratio"].append(
            sequence_log_ratio(lpd, base, mb.mask, geometric=self.geometric).clamp(-c, c).cpu()
        )
        self.seq["d_infer"].append(sequence_log_ratio(lpd, mb.infer, mb.mask).clamp(-c, c).cpu())
        n = self.counts
        n["tokens"] += int(valid.sum())
        n["clip_upper"] += int((terms.clip_upper & valid).sum())
        n["clip_lower"] += int((terms.clip_lower & valid).sum())
        n["clip_dual"] += int((terms.clip_dual & valid).sum())
        n["kept"] += int((mask.bool() & valid).sum())
        n["micro_batches"] += 1
        n["padded_tokens"] += mb.ids.numel()
        n["real_tokens"] += int(mb.attn.sum())

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in self.tok.items()}
        seq = {k: torch.cat(v) if v else torch.empty(0) for k, v in self.seq.items()}
        return cat, seq

    def gather(self) -> None:
        """Combine every rank's values and counts (one collective); afterwards this object describes the whole
        mini-batch on every rank."""
        cat, seq = self.tensors()
        parts = D.all_gather_objects((cat, seq, self.counts, self.loss_total))
        self.tok = {k: [torch.cat([p[0][k] for p in parts])] for k in cat}
        self.seq = {k: [torch.cat([p[1][k] for p in parts])] for k in seq}
        self.counts = sum((p[2] for p in parts), Counter())
        self.loss_total = sum(p[3] for p in parts)

    def raw(self) -> dict[str, torch.Tensor]:
        """The log-ratios a batch-level summary needs (see `ratio_metrics`)."""
        cat, seq = self.tensors()
        return {
            "log_ratio": cat["log_ratio"],
            "d_infer": cat["d_infer"],
            "seq_log_ratio": seq["log_ratio"],
            "seq_d_infer": seq["d_infer"],
        }

    def metrics(self, did_clean: bool) -> dict[str, float]:
        """Loss, clip/mask fractions, padding, ratio summaries, train-inference KL (noisy and clean) and entropy."""
        cat, _ = self.tensors()
        c = self.counts
        n = max(c["tokens"], 1)
        m = {
            "loss/pg": self.loss_total,
            "clip_frac/upper": c["clip_upper"] / n,
            "clip_frac/lower": c["clip_lower"] / n,
            "clip_frac/dual": c["clip_dual"] / n,
            "clip_frac/total": (c["clip_upper"] + c["clip_lower"]) / n,
            "mask/kept_frac": c["kept"] / n,
            "tokens": float(c["tokens"]),
            "padding_frac": 1.0 - c["real_tokens"] / max(c["padded_tokens"], 1),
            "micro_batches": float(c["micro_batches"]),
        }
        m.update(ratio_metrics(self.raw(), self.base_name, self.clamp))
        # train-inference KL with the noise the loss saw (== clean when noise is off) and, if measured, without it
        m.update(kl_stats(cat["noisy"], cat["inf"], "kl_train_infer/noisy"))
        if did_clean:
            m.update(kl_stats(cat["clean"], cat["inf"], "kl_train_infer/clean"))
            m.update(kl_stats(cat["noisy"], cat["clean"], "kl_noise"))  # what the perturbation does by itself
            m["entropy"] = float(cat["entropy"].mean()) if cat["entropy"].numel() else 0.0
        elif cat["ent_train"].numel():
            m["entropy"] = float(cat["ent_train"].mean())
        return m

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
from alp_agent.train.batching import MicroBatch, Row
from alp_agent.train.metrics import divergence_stats, summarize
from alp_agent.train.tail import tail_metrics

TOKEN_KEYS = ("log_ratio", "d_infer", "clean", "noisy", "inf", "entropy", "ent_train", "tags", "noise_kl")
SEQ_KEYS = ("log_ratio", "d_infer", "clean_d_infer")
_DTYPES = {"tags": torch.long}  # an empty share (a rank with no row) must concatenate with the others' as the same type

# step metrics the trainer averages into the batch record as steps_mean/<key>
STEP_MEAN_KEYS: tuple[str, ...] = ("loss/", "grad_norm", "clip_frac/", "kl_train_infer/", "kl_noise/", "entropy")
STEP_MEAN_KEYS += ("mask/", "padding_frac", "sigma")


def ratio_metrics(raw: dict[str, torch.Tensor], base_name: str, clamp: float) -> dict[str, float]:
    """Token and sequence ratio summaries against the loss's base (`infer` or `old`) and, for the baselines whose base
    is `old`, against the engine's mu too, so every algorithm is compared on the same ratio. With `tags` in `raw`
    (the batch summary), also the tail panel of the ratio against mu per turn and after observations (train.tail)."""
    m = summarize(raw["log_ratio"].exp(), f"ratio_token_vs_{base_name}")
    m.update(summarize(raw["seq_log_ratio"].exp(), f"ratio_seq_vs_{base_name}"))
    if base_name == "old":
        m.update(summarize(raw["d_infer"].clamp(-clamp, clamp).exp(), "ratio_token_vs_infer"))
        m.update(summarize(raw["seq_d_infer"].exp(), "ratio_seq_vs_infer"))
    if "tags" in raw and raw["tags"].numel() == raw["d_infer"].numel():
        m.update(tail_metrics(raw["d_infer"].clamp(-clamp, clamp), raw["tags"]))
    return m


class StepStats:
    """Per-token values and counts of one optimizer step, added micro-batch by micro-batch."""

    def __init__(self, base_name: str, clamp: float, geometric: bool) -> None:
        self.base_name, self.clamp, self.geometric = base_name, clamp, geometric
        self.tok: dict[str, list[torch.Tensor]] = {k: [] for k in TOKEN_KEYS}
        self.seq: dict[str, list[torch.Tensor]] = {k: [] for k in SEQ_KEYS}
        self.counts: Counter = Counter()
        self.loss_total = 0.0
        self._clean_bt: torch.Tensor | None = None  # the last add_clean's (B, T) logprobs, for its sequence sums

    def add_clean(self, logp: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> None:
        """Clean (no-noise) logprobs and entropy of a micro-batch's model tokens (before `add` of the same one)."""
        self._clean_bt = logp.detach().float()
        self.tok["clean"].append(logp.detach()[valid].float().cpu())
        self.tok["entropy"].append(entropy.detach()[valid].float().cpu())

    def add_noise_kl(self, kl: torch.Tensor) -> None:
        """Exact per-position KL(clean || perturbed) of model-token positions (alp_agent.train.noise_kl)."""
        self.tok["noise_kl"].append(kl.detach().double().cpu())

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
        if base is None:
            raise ValueError("ratio statistics against 'old' need the micro-batch's old logprobs")
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
        if self._clean_bt is not None:
            self.seq["clean_d_infer"].append(sequence_log_ratio(self._clean_bt, mb.infer, mb.mask).clamp(-c, c).cpu())
            self._clean_bt = None
        tags = mb.tags if mb.tags is not None else torch.full(mb.mask.shape, -1, dtype=torch.long)
        self.tok["tags"].append(tags.to(valid.device)[valid].cpu())  # every kept value lives on the CPU (GPU check)
        n = self.counts
        n["tokens"] += int(valid.sum())
        n["clip_upper"] += int((terms.clip_upper & valid).sum())
        n["clip_lower"] += int((terms.clip_lower & valid).sum())
        n["clip_dual"] += int((terms.clip_dual & valid).sum())
        kept = terms.kept if terms.kept is not None else mask.bool()
        n["kept"] += int((kept & valid).sum())
        n["micro_batches"] += 1
        n["padded_tokens"] += mb.ids.numel()
        n["real_tokens"] += int(mb.attn.sum())

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        cat = {k: torch.cat(v) if v else torch.empty(0, dtype=_DTYPES.get(k)) for k, v in self.tok.items()}
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
            "tags": cat["tags"],
        }

    def metrics(self, did_clean: bool) -> dict[str, float]:
        """Loss, clip/mask fractions, padding, ratio summaries, train-inference divergences (noisy and clean), the
        noise's exact KL and entropy. Divergences: KL(mu || pi) by k1/k3, chi2, ESS (alp_agent.train.metrics)."""
        cat, seq = self.tensors()
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
        raw = self.raw()
        raw.pop("tags")  # the tail panel is a batch-level summary
        m.update(ratio_metrics(raw, self.base_name, self.clamp))
        # train-inference divergence with the noise the loss saw (== clean when noise is off) and, if measured,
        # without it; tokens were sampled from mu, so these estimate KL(mu || pi)
        m.update(divergence_stats(cat["noisy"], cat["inf"], "kl_train_infer/noisy", seq["d_infer"]))
        if cat["noise_kl"].numel():  # what the perturbation does by itself, exactly (not from samples)
            m.update(
                {"kl_noise/exact": float(cat["noise_kl"].mean()), "kl_noise/exact_max": float(cat["noise_kl"].max())}
            )
        if did_clean:
            clean_seq = seq["clean_d_infer"] if seq["clean_d_infer"].numel() else seq["d_infer"]
            m.update(divergence_stats(cat["clean"], cat["inf"], "kl_train_infer/clean", clean_seq))
            m["entropy"] = float(cat["entropy"].mean()) if cat["entropy"].numel() else 0.0
        elif cat["ent_train"].numel():
            m["entropy"] = float(cat["ent_train"].mean())
        return m


def old_infer_metrics(rows: list[Row]) -> dict[str, float]:
    """The pure mismatch at theta_old (GRPO family, which recomputes pi_old): divergence of pi_old from mu on mu's
    samples, kl_old_infer/{k1,k3,chi2,ess_token,ess_seq}."""
    olds, infs, seqs = [], [], []
    for r in rows:
        if r.old is None:
            continue
        m = torch.tensor(r.mask) > 0
        o, i = r.old.cpu()[m].double(), torch.tensor(r.infer, dtype=torch.float64)[m]  # rows keep CPU values
        olds.append(o)
        infs.append(i)
        seqs.append((o - i).sum().reshape(1))
    if not olds:
        return {}
    return divergence_stats(torch.cat(olds), torch.cat(infs), "kl_old_infer", torch.cat(seqs))

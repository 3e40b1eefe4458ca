"""The ALP trainer: rollout batch -> advantages -> mini-batch optimizer steps -> weight sync.

`Trainer.update(trajectories)` is one rollout batch:
  1. drop unusable episodes (no model token, non-finite engine logprobs), GRPO/RLOO advantages per group;
  2. (GRPO, TIS, MIS, GSPO only) old logprobs pi_{theta_old}: one clean no-grad forward before the first step;
     (kl_coef > 0) reference logprobs from the frozen reference model;
  3. shuffle, split into `updates_per_batch` mini-batches (each one optimizer step: the staleness of the paper),
     each split into micro-batches bucketed by length under a token budget (gradient accumulation);
  4. every micro-batch: training forward with noise (ALP) inside `perturbation.active(step, micro)`, per-token loss
     from `algo.losses`, aggregated with the mini-batch token count so accumulation equals one big batch;
  5. clip, skip non-finite steps (counted), AdamW step; metrics per step and per batch through one MetricsWriter.
Then `sync_weights(engine)` pushes the weights (never the log-sigmas) into the engine in place.

Under torchrun (`trainer.dist.strategy` ddp or fsdp2, see alp_agent/train/distributed.py) every rank holds the same rollout
batch (rank 0 broadcasts it: `update` on rank 0 announces it, the other ranks run `follow()`), the same shuffle and
mini-batches; each mini-batch's rows are split over the ranks by token count, every rank normalises its loss with the
whole mini-batch's token count (known to all), so the gradients summed over ranks equal the single-process one.
Ranks pad to the same number of micro-batches with zero-weight ones, so collectives always pair up.

The outer loop around it (rollout -> update -> sync -> eval -> checkpoint, sync or async) is `alp_agent.train.loop`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from alp_agent.algo.advantages import group_advantages
from alp_agent.algo.config import TrainerConfig
from alp_agent.algo.losses import aggregate, kl_penalty, policy_loss, sequence_log_ratio
from alp_agent.algo.perturb import build_perturbation, sigma_penalty
from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train import distributed as D
from alp_agent.train.logprobs import sequence_logprobs
from alp_agent.train.metrics import kl_stats, mean_over, summarize


@dataclass
class _Row:
    """One trajectory as position-aligned lists over ids = prompt + completion (prompt positions have mask 0)."""

    ids: list[int]
    mask: list[float]
    infer: list[float]
    adv: float
    temperature: float
    old: torch.Tensor | None = None  # (len,) clean logprobs at theta_old, when the algorithm needs them
    ref: torch.Tensor | None = None  # (len,) reference-model logprobs, when kl_coef > 0


@dataclass
class _Micro:
    ids: torch.Tensor  # (B, T)
    attn: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) float loss mask
    infer: torch.Tensor  # (B, T)
    adv: torch.Tensor  # (B, 1)
    temperature: float
    old: torch.Tensor | None
    ref: torch.Tensor | None
    start: int = 1  # first position with loss mask 1 in any row: logits before it are never needed


def _rows_from(trajs: list[Trajectory], adv: torch.Tensor) -> list[_Row]:
    rows = []
    for t, a in zip(trajs, adv.tolist()):
        p = len(t.prompt_ids)
        rows.append(
            _Row(
                t.ids,
                [0.0] * p + [float(x) for x in t.loss_mask],
                [0.0] * p + list(t.infer_logprobs),
                a,
                float(t.temperature),
            )
        )
    return rows


def micro_batches(rows: list[_Row], token_budget: int, max_rows: int) -> list[list[_Row]]:
    """Bucket by (temperature, length): sort longest first, fill each micro-batch while rows x padded length fits the
    budget. Choice vs "packing": bucketing keeps standard right padding (correct with every attention backend);
    padding stays small because neighbours have similar lengths. A single row longer than the budget gets its own."""
    order = sorted(rows, key=lambda r: (r.temperature, -len(r.ids)))
    out: list[list[_Row]] = []
    cur: list[_Row] = []
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


def split_rows(rows: list[_Row], world: int, rank: int) -> list[_Row]:
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


def _filler(row: _Row) -> _Row:
    """A zero-weight copy of a row (loss mask 0, advantage 0): the micro-batch a rank with fewer (or no) rows runs so
    that every rank joins the same number of forward/backward collectives. Its loss and gradient are exactly 0."""
    n = len(row.ids)
    return _Row(row.ids, [0.0] * n, row.infer, 0.0, row.temperature, row.old, row.ref)


def _collate(rows: list[_Row], device: torch.device) -> _Micro:
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

    def to(x):
        return x.to(device) if x is not None else None

    return _Micro(to(ids), to(attn), to(mask), to(infer), to(adv), rows[0].temperature, to(old), to(ref), start)


class Trainer:
    """Owns the policy (float32 master weights), the log-sigmas, the optimizer and the step counters.

    model: an HF causal LM already on `device`. ref_model: frozen reference for the KL term (deep-copied from the
    initial model when kl_coef > 0 and none is given). writer: an alp_agent.train.logging.MetricsWriter or None (None on
    ranks > 0 under torchrun: rank 0 writes the metrics, which cover every rank's tokens).

    Under torchrun (process group initialised by `distributed.init_distributed`) the model is wrapped here per
    `config.dist.strategy`; `self.model` stays the HF module (state dicts, hooks, train/eval), `self.forward_model`
    is what the training forward calls (the DDP wrapper, or the FSDP2-sharded model itself).
    """

    def __init__(
        self, model: nn.Module, config: TrainerConfig | None = None, ref_model: nn.Module | None = None, writer=None
    ) -> None:
        self.cfg = config or TrainerConfig()
        self.model = model
        self.device = next(model.parameters()).device
        self.writer = writer
        a, o, u = self.cfg.algo, self.cfg.optim, self.cfg.update
        if next(model.parameters()).dtype != torch.float32:
            raise ValueError("Trainer expects float32 master weights; use update.dtype='bfloat16' for bf16 compute")
        self.distributed = D.is_distributed()
        if self.distributed and self.cfg.dist.strategy == "none":
            raise ValueError(
                f"{D.world_size()} ranks are running but trainer.dist.strategy is 'none': set it to 'ddp' or 'fsdp2'"
            )
        self.sharded = self.distributed and self.cfg.dist.strategy == "fsdp2"
        self.perturbation = build_perturbation(model, a, rank=D.rank())
        if self.perturbation is not None:
            self.perturbation.to(self.device)
        self.ref_model = ref_model
        if a.kl_coef > 0 and self.ref_model is None:
            self.ref_model = copy.deepcopy(model)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        if u.activation_checkpointing:
            # non-reentrant: recompute happens inside backward, which we call inside perturbation.active(), so the
            # hook regenerates the same eps from the same (step, micro, layer) seed.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Wrap after the hooks, the reference copy and checkpointing are in place, before the optimizer sees the
        # parameters (FSDP2 replaces them by DTensor shards). The reference is sharded too under FSDP2 (memory).
        self.forward_model = D.wrap_policy(model, self.cfg.dist)
        if self.sharded and self.ref_model is not None:
            D.wrap_policy(self.ref_model, self.cfg.dist)
        groups = [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "lr": o.lr,
                "weight_decay": o.weight_decay,
                "name": "policy",
            }
        ]
        if self.perturbation is not None and isinstance(self.perturbation.log_sigma, nn.Parameter):
            groups.append(
                {
                    "params": [self.perturbation.log_sigma],
                    "lr": a.perturb.sigma_lr,
                    "weight_decay": 0.0,
                    "name": "log_sigma",
                }
            )
        self.optimizer = torch.optim.AdamW(groups, betas=o.betas, eps=o.adam_eps)
        warm = o.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
        )
        self.step = 0  # optimizer steps taken or skipped; part of the noise seed
        self.batch = 0  # rollout batches consumed by update()
        self.policy_version = 0  # version of the weights the engine should sample with; +1 per update()
        self.data_cursor = 0  # the outer loop's position in its task stream (saved in checkpoints)
        self.skipped_steps = 0
        self.shuffle_gen = torch.Generator().manual_seed(u.seed)

    # ------------------------------------------------------------------ forwards
    def _autocast(self):
        enabled = self.cfg.update.dtype == "bfloat16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def _clean_logprobs(self, mb: _Micro, model: nn.Module | None = None, with_entropy: bool = False):
        """No noise, no grad: used for old logprobs, reference logprobs and the clean-forward metrics."""
        model = model or self.model
        was_training = model.training
        model.eval()  # eval mode also gates the perturbation hooks off
        try:
            with self._autocast():
                return sequence_logprobs(model, mb.ids, mb.attn, mb.temperature, with_entropy, start=mb.start)
        finally:
            model.train(was_training)

    def _noise(self, micro: int):
        return self.perturbation.active(self.step, micro) if self.perturbation is not None else contextlib.nullcontext()

    def _fill_clean(self, rows: list[_Row], attr: str, model: nn.Module) -> None:
        """Clean logprobs of every row into `row.<attr>`; under torchrun each rank computes its share and the
        results are gathered, so every rank ends with all rows filled."""
        mine = split_rows(rows, D.world_size(), D.rank())
        done: list[tuple[int, torch.Tensor]] = []
        index = {id(r): i for i, r in enumerate(rows)}
        for mb_rows, real in self._micro_schedule(mine, rows[0]):
            mb = _collate(mb_rows, self.device)
            lp, _ = self._clean_logprobs(mb, model)
            if real:
                done += [(index[id(r)], lp[i, : len(r.ids)].float().cpu()) for i, r in enumerate(mb_rows)]
        for part in D.all_gather_objects(done) if self.distributed else [done]:
            for i, t in part:
                setattr(rows[i], attr, t)

    def _micro_schedule(self, mine: list[_Row], spare: _Row) -> list[tuple[list[_Row], bool]]:
        """This rank's micro-batches as (rows, real), padded with zero-weight filler micro-batches up to the largest
        count over ranks: FSDP2 gathers weights in every forward and DDP reduces in the last backward, so all ranks
        must run the same number of forwards/backwards, even a rank that got no rows at all."""
        u = self.cfg.update
        mbs = [(m, True) for m in micro_batches(mine, u.micro_batch_tokens, u.max_micro_batch_size)] if mine else []
        if self.distributed:
            n = D.all_reduce_int(len(mbs), "max")
            mbs += [([_filler(spare)], False)] * (n - len(mbs))
        return mbs

    def _grad_sync(self, last: bool):
        """Gradient reduction over ranks on this backward? Only on the last micro-batch (when sync_last_micro_only):
        DDP no_sync() around the others, FSDP2 set_requires_gradient_sync(False) for them."""
        sync = last or not self.cfg.dist.sync_last_micro_only
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
        elif self.distributed and not sync:
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one optimizer step
    def _optimizer_step(self, rows: list[_Row]) -> tuple[dict[str, float], dict[str, list[torch.Tensor]]]:
        a, u = self.cfg.algo, self.cfg.update
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # every rank holds the whole mini-batch, so this is the global token count without a collective
        n_tok = sum(sum(r.mask) for r in rows)
        denom = float(n_tok) if a.loss_agg == "token_mean" else float(len(rows))
        do_clean = u.clean_metrics_every > 0 and self.step % u.clean_metrics_every == 0
        base_name = "infer" if not a.uses_old_logprobs else "old"
        tok = {k: [] for k in ("log_ratio", "d_infer", "clean", "noisy", "inf", "entropy", "ent_train")}
        seq = {k: [] for k in ("log_ratio", "d_infer")}
        counts = Counter()
        loss_total = 0.0
        t0 = time.perf_counter()
        schedule = self._micro_schedule(split_rows(rows, D.world_size(), D.rank()), rows[0])
        for j, (mb_rows, real) in enumerate(schedule):
            mb = _collate(mb_rows, self.device)
            sync = self._grad_sync(j == len(schedule) - 1)
            valid = mb.mask > 0
            # Without noise the training forward *is* the clean one: its logprobs and entropy serve the clean
            # metrics, and the extra no-grad forward is only paid when there is noise to compare against.
            clean_from_train = do_clean and self.perturbation is None
            if do_clean and not clean_from_train:
                clean, ent = self._clean_logprobs(mb, with_entropy=True)
                tok["clean"].append(clean[valid].float().cpu())
                tok["entropy"].append(ent[valid].float().cpu())
            with self._noise(j), sync:
                with self._autocast():
                    logp, ent_t = sequence_logprobs(
                        self.forward_model,
                        mb.ids,
                        mb.attn,
                        mb.temperature,
                        with_entropy=a.entropy_coef > 0 or clean_from_train,
                        start=mb.start,
                        entropy_grad=a.entropy_coef > 0,
                    )
                if clean_from_train:
                    tok["clean"].append(logp.detach()[valid].float().cpu())
                    tok["entropy"].append(ent_t.detach()[valid].float().cpu())
                terms, mask = policy_loss(
                    a.name,
                    logp,
                    mb.infer,
                    mb.mask,
                    mb.adv,
                    level=a.level,
                    eps_low=a.eps_low,
                    eps_high=a.eps_high,
                    dual_clip=a.dual_clip,
                    old=mb.old,
                    log_ratio_clamp=a.log_ratio_clamp,
                    is_level=a.is_level,
                    is_threshold=a.is_threshold,
                )
                # Choice: MIS-dropped tokens stay in the normaliser (they contribute 0), so masking shrinks the step.
                loss = aggregate(terms.loss, mask, a.loss_agg, denom)
                if a.kl_coef > 0:
                    loss = loss + a.kl_coef * aggregate(kl_penalty(logp, mb.ref, a.kl_type), mb.mask, a.loss_agg, denom)
                if a.entropy_coef > 0:
                    loss = loss - a.entropy_coef * aggregate(ent_t, mb.mask, a.loss_agg, denom)
                # backward inside the noise context: activation-checkpoint recompute re-enters the hooks.
                if self.distributed:
                    # DDP and FSDP2 average gradients over ranks; each rank's loss is its share of the global sum
                    (loss * D.world_size()).backward()
                else:
                    loss.backward()
            if not real:
                continue
            loss_total += float(loss.detach())
            with torch.no_grad():
                lpd = logp.detach().float()
                base = mb.infer if base_name == "infer" else mb.old
                tok["log_ratio"].append((lpd - base)[valid].clamp(-a.log_ratio_clamp, a.log_ratio_clamp).cpu())
                tok["d_infer"].append((lpd - mb.infer)[valid].cpu())
                tok["noisy"].append(lpd[valid].cpu())
                tok["inf"].append(mb.infer[valid].cpu())
                if ent_t is not None:
                    tok["ent_train"].append(ent_t.detach()[valid].float().cpu())
                seq["log_ratio"].append(
                    sequence_log_ratio(lpd, base, mb.mask, geometric=a.level == "geo_sequence")
                    .clamp(-a.log_ratio_clamp, a.log_ratio_clamp)
                    .cpu()
                )
                seq["d_infer"].append(
                    sequence_log_ratio(lpd, mb.infer, mb.mask, geometric=False)
                    .clamp(-a.log_ratio_clamp, a.log_ratio_clamp)
                    .cpu()
                )
                counts["tokens"] += int(valid.sum())
                counts["clip_upper"] += int((terms.clip_upper & valid).sum())
                counts["clip_lower"] += int((terms.clip_lower & valid).sum())
                counts["clip_dual"] += int((terms.clip_dual & valid).sum())
                counts["kept"] += int((mask.bool() & valid).sum())
                counts["micro_batches"] += 1
                counts["padded_tokens"] += mb.ids.numel()
                counts["real_tokens"] += int(mb.attn.sum())
        t_fwd_bwd = time.perf_counter() - t0

        m: dict[str, float] = {}
        if self.perturbation is not None and (a.perturb.sigma_penalty_alpha > 0 or a.perturb.sigma_penalty_beta > 0):
            pen = sigma_penalty(
                self.perturbation.log_sigma, a.perturb.sigma_penalty_alpha, a.perturb.sigma_penalty_beta
            )
            if pen.requires_grad:
                pen.backward()
            m["loss/sigma_penalty"] = float(pen.detach())
        policy_params = self.optimizer.param_groups[0]["params"]
        if self.distributed:
            self._sync_sigma_grad()
            gn = D.clip_grad_norm(policy_params, self.cfg.optim.grad_clip)
        else:
            gn = float(torch.nn.utils.clip_grad_norm_(policy_params, self.cfg.optim.grad_clip))
        sgn = 0.0
        sig_grad = None
        if len(self.optimizer.param_groups) > 1 and self.perturbation.log_sigma.grad is not None:
            sig_grad = self.perturbation.log_sigma.grad.detach().clone()
            # Choice: the s_l are clipped on their own (same max norm), so a large sigma gradient cannot shrink the
            # policy step through a shared global norm.
            sgn = float(torch.nn.utils.clip_grad_norm_([self.perturbation.log_sigma], self.cfg.optim.grad_clip))
        skipped = not (math.isfinite(gn) and math.isfinite(sgn))
        if skipped:
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.scheduler.step()
        t_step = time.perf_counter() - t0

        cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in tok.items()}
        seq_lr = torch.cat(seq["log_ratio"]) if seq["log_ratio"] else torch.empty(0)
        seq_d_infer = torch.cat(seq["d_infer"]) if seq["d_infer"] else torch.empty(0)
        if self.distributed:
            cat, seq_lr, seq_d_infer, counts, loss_total = self._gather_step_stats(
                cat, seq_lr, seq_d_infer, counts, loss_total
            )
        n = max(counts["tokens"], 1)
        m.update(
            {
                "loss/pg": loss_total,
                "grad_norm": gn,
                "grad_norm/log_sigma": sgn,
                "skipped": float(skipped),
                "skipped_steps_total": float(self.skipped_steps),
                "lr": self.optimizer.param_groups[0]["lr"],
                "clip_frac/upper": counts["clip_upper"] / n,
                "clip_frac/lower": counts["clip_lower"] / n,
                "clip_frac/dual": counts["clip_dual"] / n,
                "clip_frac/total": (counts["clip_upper"] + counts["clip_lower"]) / n,
                "mask/kept_frac": counts["kept"] / n,
                "tokens": float(counts["tokens"]),
                "padding_frac": 1.0 - counts["real_tokens"] / max(counts["padded_tokens"], 1),
                "micro_batches": float(counts["micro_batches"]),
                "time/fwd_bwd": t_fwd_bwd,
                "time/step": t_step,
            }
        )
        m.update(summarize(cat["log_ratio"].exp(), f"ratio_token_vs_{base_name}"))
        m.update(summarize(seq_lr.exp(), f"ratio_seq_vs_{base_name}"))
        if base_name == "old":
            # the trained policy against the sampler mu as well, so every algorithm is compared on the same ratio
            m.update(
                summarize(cat["d_infer"].clamp(-a.log_ratio_clamp, a.log_ratio_clamp).exp(), "ratio_token_vs_infer")
            )
            m.update(summarize(seq_d_infer.exp(), "ratio_seq_vs_infer"))
        # train-inference KL with the noise the loss saw (== clean when noise is off) and, if measured, without noise
        m.update(kl_stats(cat["noisy"], cat["inf"], "kl_train_infer/noisy"))
        if do_clean:
            m.update(kl_stats(cat["clean"], cat["inf"], "kl_train_infer/clean"))
            m.update(kl_stats(cat["noisy"], cat["clean"], "kl_noise"))  # what the perturbation does by itself
            m["entropy"] = float(cat["entropy"].mean()) if cat["entropy"].numel() else 0.0
        elif cat["ent_train"].numel():
            m["entropy"] = float(cat["ent_train"].mean())
        m.update(self._sigma_metrics(sig_grad))
        return m, {
            "log_ratio": [cat["log_ratio"]],
            "seq_log_ratio": [seq_lr],
            "d_infer": [cat["d_infer"]],
            "seq_d_infer": [seq_d_infer],
        }

    def _sync_sigma_grad(self) -> None:
        """The log-sigmas live outside the wrapped model, so DDP/FSDP2 do not reduce their gradient: average it over
        ranks here (as DDP does for parameters), so every rank takes the same step and they stay replicated."""
        if self.perturbation is None or not isinstance(self.perturbation.log_sigma, nn.Parameter):
            return
        ls = self.perturbation.log_sigma
        if ls.grad is None:  # cannot happen with noise on every forward; keep the collective paired regardless
            ls.grad = torch.zeros_like(ls)
        D.all_reduce_(ls.grad, "avg")

    @staticmethod
    def _gather_step_stats(
        cat: dict[str, torch.Tensor],
        seq_lr: torch.Tensor,
        seq_d_infer: torch.Tensor,
        counts: Counter,
        loss_total: float,
    ):
        """Every rank's per-token/per-sequence values and counts, combined (one collective): quantiles, KL and clip
        fractions then describe the whole mini-batch, exactly as in a single process."""
        parts = D.all_gather_objects((cat, seq_lr, seq_d_infer, counts, loss_total))
        cat = {k: torch.cat([p[0][k] for p in parts]) for k in cat}
        seq_lr = torch.cat([p[1] for p in parts])
        seq_d_infer = torch.cat([p[2] for p in parts])
        counts = sum((p[3] for p in parts), Counter())
        return cat, seq_lr, seq_d_infer, counts, sum(p[4] for p in parts)

    def _sigma_metrics(self, grad: torch.Tensor | None) -> dict[str, float]:
        if self.perturbation is None:
            return {}
        s = self.perturbation.sigmas().float().cpu()
        m = {"sigma/mean": float(s.mean()), "sigma/min": float(s.min()), "sigma/max": float(s.max())}
        for lid, v in zip(self.perturbation.layer_ids, s.tolist()):
            m[f"sigma/layer_{lid}"] = v
        if grad is not None:
            g = grad.float().cpu()
            m["sigma_grad/norm"] = float(g.norm())
            for lid, v in zip(self.perturbation.layer_ids, g.tolist()):
                m[f"sigma_grad/layer_{lid}"] = v
        return m

    # ------------------------------------------------------------------ one rollout batch
    def update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """Train on one rollout batch; returns the batch metrics (step metrics go to the writer as kind='step').

        Under torchrun: call it on rank 0 while the other ranks are in `follow()`; rank 0's batch is broadcast."""
        self.announce("update", trajectories)
        a, u = self.cfg.algo, self.cfg.update
        t_start = time.perf_counter()
        usable = [t for t in trajectories if t.num_model_tokens > 0 and t.has_finite_logprobs()]
        bm: dict[str, float] = {
            "batch/trajectories": float(len(trajectories)),
            "batch/dropped": float(len(trajectories) - len(usable)),
        }
        bm.update(episode_metrics(trajectories, self.policy_version))
        if not usable:
            self.batch += 1
            self.policy_version += 1
            self._write("batch", self.batch, bm)
            return bm
        adv, adv_stats = group_advantages(
            [t.reward for t in usable], [t.group_id for t in usable], a.advantage, a.adv_std_norm
        )
        bm.update(adv_stats)
        rows = _rows_from(usable, adv)

        t0 = time.perf_counter()
        if a.uses_old_logprobs:
            self._fill_clean(rows, "old", self.model)
        if a.kl_coef > 0:
            self._fill_clean(rows, "ref", self.ref_model)
        bm["time/old_ref_logprobs"] = time.perf_counter() - t0
        if a.uses_old_logprobs:
            old = torch.cat([r.old[torch.tensor(r.mask) > 0] for r in rows])
            inf = torch.cat([torch.tensor(r.infer)[torch.tensor(r.mask) > 0] for r in rows])
            bm.update(kl_stats(old, inf, "kl_old_infer"))  # the pure mismatch at theta_old

        order = torch.randperm(len(rows), generator=self.shuffle_gen).tolist() if u.shuffle else list(range(len(rows)))
        k = min(u.updates_per_batch, len(rows))
        chunks = [order[i * len(order) // k : (i + 1) * len(order) // k] for i in range(k)]
        t0 = time.perf_counter()
        step_ms, acc = [], {"log_ratio": [], "seq_log_ratio": [], "d_infer": [], "seq_d_infer": []}
        for ch in chunks:
            sm, raw = self._optimizer_step([rows[i] for i in ch])
            self.step += 1
            self._write("step", self.step, sm)
            step_ms.append(sm)
            for key in acc:
                acc[key] += raw[key]
        bm["time/update"] = time.perf_counter() - t0
        base_name = "infer" if not a.uses_old_logprobs else "old"
        bm.update(summarize(torch.cat(acc["log_ratio"]).exp(), f"ratio_token_vs_{base_name}"))
        bm.update(summarize(torch.cat(acc["seq_log_ratio"]).exp(), f"ratio_seq_vs_{base_name}"))
        if base_name == "old":  # the same ratio against the sampler for every algorithm (comparisons, repro)
            bm.update(
                summarize(
                    torch.cat(acc["d_infer"]).clamp(-a.log_ratio_clamp, a.log_ratio_clamp).exp(), "ratio_token_vs_infer"
                )
            )
            bm.update(summarize(torch.cat(acc["seq_d_infer"]).exp(), "ratio_seq_vs_infer"))
        keep = (
            "loss/",
            "grad_norm",
            "clip_frac/",
            "kl_train_infer/",
            "kl_noise/",
            "entropy",
            "mask/",
            "padding_frac",
            "sigma",
        )
        bm.update({f"steps_mean/{kk}": v for kk, v in mean_over(step_ms).items() if kk.startswith(keep)})
        bm["skipped_steps"] = float(sum(s["skipped"] for s in step_ms))
        bm["skipped_steps_total"] = float(self.skipped_steps)
        bm["optimizer_steps"] = float(len(step_ms))
        bm.update(self._sigma_metrics(None))
        self.batch += 1
        self.policy_version += 1
        bm["policy_version"] = float(self.policy_version)
        bm["time/batch_update_total"] = time.perf_counter() - t_start
        self._write("batch", self.batch, bm)
        return bm

    def _write(self, kind: str, step: int, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.write(kind, step, metrics)

    # ------------------------------------------------------------------ weights out
    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF weights only (the log-sigmas live outside the model, so they cannot leak in).

        FSDP2: the full, unsharded weights gathered to rank 0 on the CPU (other ranks join the gather and get {})."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            self.announce("policy_state_dict")
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = {k: v.detach() for k, v in self.model.state_dict().items()}
        assert not any("log_sigma" in k for k in sd), "log-sigmas leaked into the model state dict"
        return sd

    def sync_weights(self, engine) -> None:
        """Load the current weights into the inference engine in place (HF names; no log-sigmas)."""
        engine.load_weights(self.policy_state_dict())

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict:
        """Everything that decides the next step, as one picklable dict (single process and DDP: rank 0's copy is
        every rank's). FSDP2 shards cannot go into one file: see `sharded_state` / alp_agent.train.checkpoint."""
        if self.sharded:
            raise RuntimeError("an FSDP2 trainer is saved sharded: use alp_agent.train.checkpoint.save_checkpoint")
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "perturbation": self.perturbation.state_dict() if self.perturbation is not None else None,
            "optimizer": self.optimizer.state_dict(),
            **self.meta_state(),
        }

    def meta_state(self) -> dict:
        """The small, replicated part of the state (scheduler, counters, shuffle generator, config)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "counters": {
                "step": self.step,
                "batch": self.batch,
                "policy_version": self.policy_version,
                "data_cursor": self.data_cursor,
                "skipped_steps": self.skipped_steps,
            },
            "shuffle_gen": self.shuffle_gen.get_state(),
            "config": self.cfg.model_dump(),
        }

    def _state_module(self) -> nn.Module:
        """Policy and perturbation under one module, so the torch.distributed.checkpoint helpers can name every
        optimizer parameter (the log-sigmas are not in the policy): keys 'policy.*' and 'perturbation.log_sigma'."""
        mod = nn.Module()
        mod.policy = self.model
        if self.perturbation is not None:
            mod.perturbation = self.perturbation
        return mod

    def sharded_state(self) -> dict:
        """Model (incl. log-sigmas) and optimizer state in torch.distributed.checkpoint form: DTensor shards under
        FSDP2, plain tensors otherwise; also the template that `dcp.load` fills in place (collective under FSDP2)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._state_module(), self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_sharded_state(self, state: dict, meta: Mapping) -> None:
        """Inverse of `sharded_state` (after `dcp.load` filled it) plus `meta_state`."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self._state_module(), self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        self._load_meta(meta)

    def load_state_dict(self, sd: Mapping) -> None:
        if self.sharded:
            raise RuntimeError(
                "an FSDP2 trainer resumes from sharded checkpoints only (alp_agent.train.checkpoint); this "
                "one was written by a single process or DDP: resume it with trainer.dist.strategy=ddp"
            )
        self.model.load_state_dict(sd["model"])
        if self.perturbation is not None and sd.get("perturbation") is not None:
            self.perturbation.load_state_dict(sd["perturbation"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self._load_meta(sd)

    def _load_meta(self, sd: Mapping) -> None:
        self.scheduler.load_state_dict(sd["scheduler"])
        c = sd["counters"]
        self.step, self.batch, self.policy_version = c["step"], c["batch"], c["policy_version"]
        self.data_cursor, self.skipped_steps = c["data_cursor"], c["skipped_steps"]
        self.shuffle_gen.set_state(sd["shuffle_gen"])

    # ------------------------------------------------------------------ torchrun: rank 0 leads, the others follow
    def announce(self, command: str, payload=None) -> None:
        """On rank 0 under torchrun: tell the ranks in `follow()` to join the collective `command` (with rank 0's
        payload). A no-op elsewhere, so the same methods run on every rank."""
        if self.distributed and D.rank() == 0:
            D.broadcast_object((command, payload), command=True)

    def follow(self) -> None:
        """Ranks > 0: run what rank 0 announces (update on its batch, weight gather, checkpoint save) until it
        calls `release_followers()`. Rank 0 alone builds the sampler and runs the outer loop."""
        from alp_agent.train.checkpoint import save_checkpoint

        while True:
            command, payload = D.broadcast_object(None, command=True)
            if command == "stop":
                return
            if command == "update":
                self.update(payload)
            elif command == "policy_state_dict":
                self.policy_state_dict()
            elif command == "save_checkpoint":
                save_checkpoint(self, *payload)
            else:
                raise RuntimeError(f"unknown command from rank 0: {command!r}")

    def release_followers(self) -> None:
        """Rank 0, at the end (also after an error): let the ranks in `follow()` return."""
        self.announce("stop")


def episode_metrics(trajs: list[Trajectory], policy_version: int) -> dict[str, float]:
    """Reward, lengths, turns, tool calls/errors, token drift, truncation and staleness of a rollout batch."""
    if not trajs:
        return {}
    n = len(trajs)
    r = torch.tensor([t.reward for t in trajs], dtype=torch.float64)
    resp = torch.tensor([float(t.num_model_tokens) for t in trajs])
    calls = sum(t.num_tool_calls for t in trajs)
    m = {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()) if n > 1 else 0.0,
        "reward/min": float(r.min()),
        "reward/max": float(r.max()),
        "length/response_mean": float(resp.mean()),
        "length/response_max": float(resp.max()),
        "length/completion_mean": sum(len(t.completion_ids) for t in trajs) / n,
        "length/prompt_mean": sum(len(t.prompt_ids) for t in trajs) / n,
        "turns/mean": sum(t.num_turns for t in trajs) / n,
        "tools/calls_per_episode": calls / n,
        "tools/error_rate": sum(t.num_tool_errors for t in trajs) / max(calls, 1),
        "token_drift/total": float(sum(t.token_drift for t in trajs)),
        "token_drift/episode_frac": sum(t.token_drift > 0 for t in trajs) / n,
        "truncated_frac": sum(t.truncated for t in trajs) / n,
        "staleness/mean": sum(policy_version - t.policy_version for t in trajs) / n,
        "staleness/max": float(max(policy_version - t.policy_version for t in trajs)),
    }
    for reason, c in Counter(t.finish_reason or "unknown" for t in trajs).items():
        m[f"finish/{reason}"] = c / n
    return m

"""The ALP trainer: rollout batch -> advantages -> mini-batch optimizer steps -> weight sync.

`Trainer.update(trajectories)` is one rollout batch:
  1. drop unusable episodes (no model token, non-finite engine logprobs), GRPO/RLOO advantages per group;
  2. (GRPO, TIS, MIS, GSPO only) old logprobs pi_{theta_old}: one clean no-grad forward before the first step;
     (kl_coef > 0) reference logprobs from the frozen reference model;
  3. shuffle, split into `updates_per_batch` mini-batches (each one optimizer step: the staleness of the paper),
     each split into micro-batches under a token budget (gradient accumulation; alp_agent.train.batching);
  4. every micro-batch (`_micro_step`): training forward with noise (ALP) inside `perturbation.active(step, micro)`,
     per-token loss from `algo.losses.policy_loss`, aggregated with the mini-batch token count so accumulation equals
     one big batch;
  5. clip, skip non-finite steps (counted), hold all-zero-gradient steps, AdamW step (`_apply_gradients`); metrics
     per step and per batch through one MetricsWriter (statistics in alp_agent.train.step_stats).
Then `sync_weights(engine)` pushes the weights (never the log-sigmas) into the engine in place.

Under torchrun (`trainer.dist.strategy` ddp or fsdp2, see alp_agent/train/distributed.py) every rank holds the same
rollout batch (rank 0 broadcasts it: `update` on rank 0 announces it, the other ranks run `follow()`; the commands
are alp_agent.train.ranks), the same shuffle and mini-batches; each mini-batch's rows are split over the ranks by
token count, every rank normalises its loss with the whole mini-batch's token count (known to all), so the
gradients summed over ranks equal the single-process one. Ranks pad to the same number of micro-batches with
zero-weight ones, so collectives always pair up.

The outer loop around it (rollout -> update -> sync -> eval -> checkpoint, sync or async) is `alp_agent.train.loop`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any, cast

import torch
from torch import nn

from alp_agent.algo.advantages import group_advantages
from alp_agent.algo.config import TrainerConfig
from alp_agent.algo.losses import LossBatch, aggregate, kl_penalty, policy_loss
from alp_agent.algo.perturb import build_perturbation
from alp_agent.algo.void_turns import void_filter
from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train import distributed as D
from alp_agent.train import ranks
from alp_agent.train.batching import (
    MicroBatch,
    Row,
    collate,
    filler,
    micro_batches,
    minibatch_chunks,
    rows_from,
    split_rows,
)
from alp_agent.train.calibrate import maybe_calibrate
from alp_agent.train.gradients import prepare_gradients
from alp_agent.train.hardware import lean_phase, with_compute_dtype
from alp_agent.train.logprobs import chunk_tokens_for, microbatch_logprobs
from alp_agent.train.metrics import episode_metrics, mean_over
from alp_agent.train.noise_kl import record_noise_kl
from alp_agent.train.optimizer import build_optimizer, use_fused_adamw
from alp_agent.train.packed_attention import enable_packed_attention
from alp_agent.train.ranks import Command
from alp_agent.train.step_stats import STEP_MEAN_KEYS, StepStats, old_infer_metrics, ratio_metrics
from alp_agent.train.trainer_state import TrainerState


class Trainer(TrainerState):
    """Owns the policy (float32 master weights), the log-sigmas, the optimizer and the step counters.

    model: an HF causal LM already on `device`. ref_model: frozen reference for the KL term (deep-copied from the
    initial model when kl_coef > 0 and none is given). writer: an alp_agent.train.logging.MetricsWriter or None (None
    on ranks > 0 under torchrun: rank 0 writes the metrics, which cover every rank's tokens).

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
        self.writer = writer  # None on ranks > 0
        self.cfg, self.dtype_reason = with_compute_dtype(self.cfg, self.device.type)  # update.dtype auto resolved
        a, u = self.cfg.algo, self.cfg.update
        if next(model.parameters()).dtype != torch.float32:
            raise ValueError("Trainer expects float32 master weights; use update.dtype='bfloat16' for bf16 compute")
        self.distributed = D.is_distributed()
        if self.distributed and self.cfg.dist.strategy == "none":
            raise ValueError(
                f"{D.world_size()} ranks are running but trainer.dist.strategy is 'none': set it to 'ddp' or 'fsdp2'"
            )
        self.sharded = self.distributed and self.cfg.dist.strategy == "fsdp2"
        self.chunk_tokens = chunk_tokens_for(u.logprob_chunk_tokens, self.sharded, a)
        self.perturbation = build_perturbation(model, a, rank=D.rank())
        if self.perturbation is not None:
            self.perturbation.to(self.device)
        if u.pack and u.packed_attention:
            enable_packed_attention(model)  # opt-in; before the reference copy, so it has it too
        self.ref_model = ref_model
        if a.kl_coef > 0 and self.ref_model is None:
            self.ref_model = copy.deepcopy(model)
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        if u.activation_checkpointing:
            # non-reentrant: recompute happens inside backward, which we call inside perturbation.active(), so the
            # hook regenerates the same eps from the same (step, micro, layer) seed.
            cast(Any, model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Wrap after the hooks, the reference copy and checkpointing are in place, before the optimizer sees the
        # parameters (FSDP2 replaces them by DTensor shards). The reference is sharded too under FSDP2 (memory).
        self.forward_model = D.wrap_policy(model, self.cfg.dist)
        if self.sharded and self.ref_model is not None:
            D.wrap_policy(self.ref_model, self.cfg.dist)
        self.optimizer, self.scheduler = build_optimizer(
            model, self.perturbation, self.cfg, use_fused_adamw(self.cfg, self.device, self.sharded)
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
    def _clean_logprobs(self, mb: MicroBatch, model: nn.Module | None = None, with_entropy: bool = False):
        """No noise, no grad: used for old logprobs, reference logprobs and the clean-forward metrics."""
        model = model or self.model
        was_training = model.training
        model.eval()  # eval mode also gates the perturbation hooks off
        try:
            with self._autocast():
                return microbatch_logprobs(model, mb, with_entropy, chunk_tokens=self.chunk_tokens)
        finally:
            model.train(was_training)

    def _noise(self, micro: int, segments: list | None = None):
        p = self.perturbation
        return p.active(self.step, micro, segments) if p is not None else contextlib.nullcontext()

    def _fill_clean(self, rows: list[Row], attr: str, model: nn.Module) -> None:
        """Clean logprobs of every row into `row.<attr>`; under torchrun each rank computes its share and the
        results are gathered, so every rank ends with all rows filled."""
        mine = split_rows(rows, D.world_size(), D.rank())
        done: list[tuple[int, torch.Tensor]] = []
        index = {id(r): i for i, r in enumerate(rows)}
        for mb_rows, real in self._micro_schedule(mine, rows[0]):
            mb = collate(mb_rows, self.device, self.cfg.update.pack)
            lp, _ = self._clean_logprobs(mb, model)
            if real:
                done += [(index[id(r)], lp[i, : len(r.ids)].float().cpu()) for i, r in enumerate(mb_rows)]
        for part in D.all_gather_objects(done) if self.distributed else [done]:
            for i, t in part:
                setattr(rows[i], attr, t)

    def _micro_schedule(self, mine: list[Row], spare: Row) -> list[tuple[list[Row], bool]]:
        """This rank's micro-batches as (rows, real), padded with zero-weight filler micro-batches up to the largest
        count over ranks: FSDP2 gathers weights in every forward and DDP reduces in the last backward, so all ranks
        must run the same number of forwards/backwards, even a rank that got no rows at all."""
        u = self.cfg.update
        mbs = (
            [(m, True) for m in micro_batches(mine, u.micro_batch_tokens, u.max_micro_batch_size, u.pack)]
            if mine
            else []
        )
        if self.distributed:
            n = D.all_reduce_int(len(mbs), "max")
            mbs += [([filler(spare)], False)] * (n - len(mbs))
        return mbs

    def _grad_sync(self, last: bool):
        """Gradient reduction over ranks on this backward? Only on the last micro-batch (when sync_last_micro_only):
        DDP no_sync() around the others, FSDP2 set_requires_gradient_sync(False) for them."""
        sync = last or not self.cfg.dist.sync_last_micro_only
        if self.sharded:
            cast(Any, self.model).set_requires_gradient_sync(sync)  # an FSDPModule
        elif self.distributed and not sync:
            return cast(Any, self.forward_model).no_sync()  # DistributedDataParallel
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one optimizer step
    def _loss(self, mb: MicroBatch, logp: torch.Tensor, ent: torch.Tensor | None, denom: float):
        """The micro-batch's share of the mini-batch loss: PG terms (+ KL to the reference, - entropy bonus)."""
        a = self.cfg.algo
        terms, mask = policy_loss(a, LossBatch(logp, mb.infer, mb.mask, mb.adv, mb.old))
        # Choice: MIS-dropped tokens stay in the normaliser (they contribute 0), so masking shrinks the step.
        loss = aggregate(terms.loss, mask, a.loss_agg, denom)
        if a.kl_coef > 0:
            assert mb.ref is not None, "kl_coef > 0: reference logprobs are filled before the first step"
            loss = loss + a.kl_coef * aggregate(kl_penalty(logp, mb.ref, a.kl_type), mb.mask, a.loss_agg, denom)
        if a.entropy_coef > 0:
            assert ent is not None, "entropy_coef > 0: the forward computes the entropy"
            loss = loss - a.entropy_coef * aggregate(ent, mb.mask, a.loss_agg, denom)
        return loss, terms, mask

    def _micro_step(self, mb: MicroBatch, j: int, last: bool, denom: float, stats: StepStats | None, clean: bool):
        """Forward (noisy under ALP), loss and backward of micro-batch j; its statistics into `stats` (None for a
        rank's zero-weight filler). clean: also log the no-noise logprobs and entropy of this micro-batch."""
        a = self.cfg.algo
        valid = mb.mask > 0
        # Without noise the training forward *is* the clean one: its logprobs and entropy serve the clean metrics,
        # and the extra no-grad forward is only paid when there is noise to compare against.
        clean_from_train = clean and self.perturbation is None
        if clean and not clean_from_train:  # fillers too: under FSDP2 every forward is a collective
            clean_lp, clean_ent = self._clean_logprobs(mb, with_entropy=True)
            if stats is not None:
                stats.add_clean(clean_lp, clean_ent, valid)
            if j == 0:  # the noise's exact KL(clean || perturbed), on a few rows
                record_noise_kl(self, mb.padded(), j, stats)
        with self._noise(j, mb.segments), self._grad_sync(last):
            with self._autocast():
                want_ent = a.entropy_coef > 0 or clean_from_train
                logp, ent = microbatch_logprobs(self.forward_model, mb, want_ent, a.entropy_coef > 0, self.chunk_tokens)
            loss, terms, mask = self._loss(mb, logp, ent, denom)
            # backward inside the noise context: activation-checkpoint recompute re-enters the hooks. Under torchrun
            # DDP and FSDP2 average gradients over ranks; each rank's loss is its share of the global sum.
            (loss * D.world_size() if self.distributed else loss).backward()
        if stats is not None:
            if clean_from_train:
                assert ent is not None, "clean_from_train: the forward computes the entropy"
                stats.add_clean(logp, ent, valid)
            stats.add(mb, logp, ent, terms, mask, float(loss.detach()))

    def _apply_gradients(self) -> dict[str, Any]:
        """Sigma penalty, rank averaging of the s_l gradient, clipping, and the AdamW step, except when a norm is not
        finite (skipped, counted) or, with optim.skip_zero_grad_steps, when every gradient is exactly 0 (held: AdamW
        would move the weights along its momentum and decay them with no new information)."""
        p = self.perturbation
        gn, sgn, sig_grad, m = prepare_gradients(self.optimizer, p, self.cfg, self.distributed)
        skipped = not (math.isfinite(gn) and math.isfinite(sgn))
        held = not skipped and self.cfg.optim.skip_zero_grad_steps and gn == 0.0 and sgn == 0.0
        self.skipped_steps += int(skipped)
        if skipped or held:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.scheduler.step()
        m.update({"grad_norm": gn, "grad_norm/log_sigma": sgn, "skipped": float(skipped), "no_signal": float(held)})
        m["skipped_steps_total"] = float(self.skipped_steps)
        m["lr"] = self.optimizer.param_groups[0]["lr"]
        if p is not None:
            m.update(p.metrics(sig_grad))
        return m

    def _optimizer_step(self, rows: list[Row]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One mini-batch: every micro-batch's forward/backward, then one optimizer step. Returns the step metrics and
        the raw log-ratios for the batch summary."""
        a, u = self.cfg.algo, self.cfg.update
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # every rank holds the whole mini-batch, so this is the global token count without a collective
        n_tok = sum(sum(r.mask) for r in rows)
        denom = float(n_tok) if a.loss_agg == "token_mean" else float(len(rows))
        do_clean = u.clean_metrics_every > 0 and self.step % u.clean_metrics_every == 0
        stats = StepStats("old" if a.uses_old_logprobs else "infer", a.log_ratio_clamp, a.level == "geo_sequence")
        t0 = time.perf_counter()
        schedule = self._micro_schedule(split_rows(rows, D.world_size(), D.rank()), rows[0])
        for j, (mb_rows, real) in enumerate(schedule):
            mb = collate(mb_rows, self.device, u.pack)
            self._micro_step(mb, j, j == len(schedule) - 1, denom, stats if real else None, do_clean)
        t_fwd_bwd = time.perf_counter() - t0
        m = self._apply_gradients()
        m["time/fwd_bwd"], m["time/step"] = t_fwd_bwd, time.perf_counter() - t0
        if self.distributed:
            stats.gather()
        m.update(stats.metrics(do_clean))
        return m, stats.raw()

    # ------------------------------------------------------------------ one rollout batch
    def update(self, trajectories: list[Trajectory]) -> dict[str, float]:
        """Train on one rollout batch; returns the batch metrics (step metrics go to the writer as kind='step').

        Under torchrun: call it on rank 0 while the other ranks are in `follow()`; rank 0's batch is broadcast."""
        ranks.announce(Command.UPDATE, trajectories)
        t_start = time.perf_counter()
        usable = [t for t in trajectories if t.num_model_tokens > 0 and t.has_finite_logprobs()]
        bm: dict[str, float] = {
            "batch/trajectories": float(len(trajectories)),
            "batch/dropped": float(len(trajectories) - len(usable)),
        }
        bm.update(episode_metrics(trajectories, self.policy_version))
        if usable:
            bm.update(self._train_on(usable))
        self.batch += 1
        self.policy_version += 1
        bm["policy_version"] = float(self.policy_version)
        bm["time/batch_update_total"] = time.perf_counter() - t_start
        self.log("batch", self.batch, bm)
        return bm

    def _train_on(self, usable: list[Trajectory]) -> dict[str, float]:
        """Advantages, old/reference logprobs, then every mini-batch's optimizer step; the batch-level metrics."""
        a, u = self.cfg.algo, self.cfg.update
        adv, bm = group_advantages(
            [t.reward for t in usable], [t.group_id for t in usable], a.advantage, a.adv_std_norm
        )
        rows = void_filter(usable, rows_from(usable, adv), a.mask_void_turns, bm)  # after the advantages
        if not rows:
            return bm
        bm.update(maybe_calibrate(self, rows))  # sigma0 'auto': first batch only
        t0 = time.perf_counter()
        if a.uses_old_logprobs:
            self._fill_clean(rows, "old", self.model)
        if a.kl_coef > 0:
            assert self.ref_model is not None, "kl_coef > 0: the reference model is built in __init__"
            self._fill_clean(rows, "ref", self.ref_model)
        bm["time/old_ref_logprobs"] = time.perf_counter() - t0
        bm.update(old_infer_metrics(rows))  # the pure mismatch at theta_old (GRPO family)
        chunks = minibatch_chunks(len(rows), u.updates_per_batch, self.shuffle_gen if u.shuffle else None)
        t0 = time.perf_counter()
        step_ms, raws = [], []
        # freed memory back to the OS before and after the update, no gradients kept after it. Not between steps:
        # the next step would fault the same pages back in (3x the page faults, 2x the system time, for +0.04 GiB)
        with lean_phase(self.optimizer):
            for ch in chunks:
                sm, raw = self._optimizer_step([rows[i] for i in ch])
                self.step += 1
                self.log("step", self.step, sm)
                step_ms.append(sm)
                raws.append(raw)
        bm["time/update"] = time.perf_counter() - t0
        raw_all = {k: torch.cat([r[k] for r in raws]) for k in raws[0]}
        bm.update(ratio_metrics(raw_all, "old" if a.uses_old_logprobs else "infer", a.log_ratio_clamp))
        bm.update({f"steps_mean/{k}": v for k, v in mean_over(step_ms).items() if k.startswith(STEP_MEAN_KEYS)})
        for k in ("skipped", "no_signal"):
            bm[f"{k}_steps"] = float(sum(s[k] for s in step_ms))
        bm["skipped_steps_total"], bm["optimizer_steps"] = float(self.skipped_steps), float(len(step_ms))
        if self.perturbation is not None:
            bm.update(self.perturbation.metrics())
        return bm

    def log(self, kind: str, step: int, metrics: dict) -> None:
        """Write one metrics record (kind: step, batch, rollout, eval) if this rank has a writer."""
        if self.writer is not None:
            self.writer.write(kind, step, metrics)

    # ------------------------------------------------------------------ weights out
    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF weights only (the log-sigmas live outside the model, so they cannot leak in).

        FSDP2: the full, unsharded weights gathered to rank 0 on the CPU (other ranks join the gather and get {})."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            ranks.announce(Command.POLICY_STATE_DICT)
            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return cast(dict[str, torch.Tensor], full)
        sd = {k: v.detach() for k, v in self.model.state_dict().items()}
        assert not any("log_sigma" in k for k in sd), "log-sigmas leaked into the model state dict"
        return sd

    def sync_weights(self, engine) -> None:
        """Load the current weights into the inference engine in place (HF names; no log-sigmas)."""
        with lean_phase():  # cast copies and vLLM's per-layer reload buffers go back to the OS
            engine.load_weights(self.policy_state_dict())

    # ------------------------------------------------------------------ torchrun: rank 0 leads, the others follow
    def follow(self) -> None:
        """Ranks > 0: run what rank 0 announces (update on its batch, weight gather, checkpoint save) until it
        calls `release_followers()`. Rank 0 alone builds the sampler and runs the outer loop."""
        from alp_agent.train.checkpoint import save_checkpoint

        while True:
            command, payload = ranks.receive()
            if command is Command.STOP:
                return
            if command is Command.UPDATE:
                self.update(payload)
            elif command is Command.POLICY_STATE_DICT:
                self.policy_state_dict()
            elif command is Command.SAVE_CHECKPOINT:
                save_checkpoint(self, *payload)
            else:
                raise RuntimeError(f"command {command} is not one a trainer follows")

    def release_followers(self) -> None:
        """Rank 0, at the end (also after an error): let the ranks in `follow()` return."""
        ranks.announce(Command.STOP)

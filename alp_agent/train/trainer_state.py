"""The trainer's resumable state: what a checkpoint holds and how it is put back.

A mixin of `Trainer` (kept apart so the update reads on its own): one picklable dict for a single process or DDP
(rank 0's copy is every rank's), or, under FSDP2, torch.distributed.checkpoint state (DTensor shards) plus the small
replicated `meta_state`. alp_agent.train.checkpoint writes and reads both forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    import torch

    from alp_agent.algo.config import TrainerConfig
    from alp_agent.algo.perturb import LayerPerturbation


class TrainerState:
    """State-dict methods of `Trainer`; relies on the attributes `Trainer.__init__` sets."""

    model: nn.Module
    perturbation: LayerPerturbation | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cfg: TrainerConfig
    sharded: bool
    step: int
    batch: int
    policy_version: int
    data_cursor: int
    skipped_steps: int
    shuffle_gen: torch.Generator

    def state_dict(self) -> dict:
        """Everything that decides the next step, as one picklable dict (single process and DDP: rank 0's copy is
        every rank's). FSDP2 shards cannot go into one file: see `sharded_state` / alp_agent.train.checkpoint."""
        if self.sharded:
            raise RuntimeError("an FSDP2 trainer is saved sharded: use alp_agent.train.checkpoint.save_checkpoint")
        return {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},  # 1 host copy
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

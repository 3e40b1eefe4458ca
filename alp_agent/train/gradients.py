"""The gradients of one optimizer step before AdamW sees them: the optional sigma penalty, the s_l gradient's
average over torchrun ranks, and clipping (docs/method.md "The perturbation": under one global norm with the policy,
as the reference, or apart from it, `perturb.sigma_clip`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from alp_agent.algo.config import TrainerConfig
from alp_agent.algo.perturb import LayerPerturbation
from alp_agent.train import distributed as D


def _clip_plain(params: list[torch.Tensor], max_norm: float) -> float:
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def clip_gradients(
    policy_params: list[torch.Tensor],
    p: LayerPerturbation | None,
    max_norm: float,
    policy_clip: Callable[[list[torch.Tensor], float], float],
    mode: str = "global",
) -> tuple[float, float, torch.Tensor | None]:
    """Clip the policy and s_l gradients; returns (policy norm, s_l norm, pre-clip s_l gradient or None), norms
    before clipping. policy_clip(params, max_norm) clips the policy alone and returns its global norm (plain, DDP or
    FSDP2). mode 'global' (the reference): one norm over both, sqrt(policy^2 + s_l^2), scales both; 'separate': each
    clipped on its own."""
    if p is None or not p.learnable or mode == "separate":
        gn = policy_clip(policy_params, max_norm)
        sgn, sig_grad = p.clip_grad(max_norm) if p is not None else (0.0, None)
        return gn, sgn, sig_grad
    gn = policy_clip(policy_params, math.inf)  # the norm only (the coefficient clamps to 1)
    sgn, sig_grad = p.clip_grad(math.inf)
    coef = max_norm / (math.hypot(gn, sgn) + 1e-6)
    if coef < 1.0:  # non-finite norms give coef 0 or nan: the trainer skips that step anyway
        for t in [*policy_params, p.log_sigma]:
            if t.grad is not None:
                t.grad.mul_(coef)
    return gn, sgn, sig_grad


def prepare_gradients(
    optimizer: torch.optim.Optimizer,
    p: LayerPerturbation | None,
    cfg: TrainerConfig,
    distributed: bool,
) -> tuple[float, float, torch.Tensor | None, dict[str, float]]:
    """Penalty backward, rank averaging of the s_l gradient, clipping to optim.grad_clip. Returns (policy norm, s_l
    norm, pre-clip s_l gradient or None, metrics). The policy is the optimizer's first group (the trainer's order)."""
    pc, max_norm = cfg.algo.perturb, cfg.optim.grad_clip
    policy_params = optimizer.param_groups[0]["params"]
    m: dict[str, float] = {}
    if p is not None:
        pen = p.penalty_backward(pc.sigma_penalty_alpha, pc.sigma_penalty_beta)
        if pen is not None:
            m["loss/sigma_penalty"] = pen
        if distributed:
            p.average_grad(lambda g: D.all_reduce_(g, "avg"))
    clip_policy = D.clip_grad_norm if distributed else _clip_plain
    gn, sgn, sig_grad = clip_gradients(policy_params, p, max_norm, clip_policy, pc.sigma_clip)
    return gn, sgn, sig_grad, m

"""Group-relative advantages (docs/method.md "The loss"): A_i = (R_i - mean(R_group)) / (std(R_group) + 1e-6).

A group is the set of responses sampled from one prompt (Trajectory.group_id). Groups whose rewards are all equal
carry no learning signal: their advantage is exactly 0 and they are counted (`zero_adv_groups`) because a batch made
mostly of such groups is the usual reason GRPO stalls.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def group_advantages(
    rewards: torch.Tensor | list[float],
    group_ids: torch.Tensor | list[int],
    estimator: str = "grpo",
    std_norm: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(N,) per-response advantages and stats.

    grpo: (R - mean) / (std + eps) with the unbiased std (torch.std, as the reference implementation); std_norm=False
          gives R - mean. rloo: R_i - mean of the other responses of the group (no std).
    Single-response groups and all-equal groups get 0.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    g = [int(x) for x in (group_ids.tolist() if isinstance(group_ids, torch.Tensor) else group_ids)]
    members: dict[int, list[int]] = defaultdict(list)
    for i, gid in enumerate(g):
        members[gid].append(i)
    adv = torch.zeros_like(r)
    zero_groups = 0
    for idx in members.values():
        ri = r[idx]
        n = len(idx)
        if n < 2 or bool((ri == ri[0]).all()):
            zero_groups += 1
            continue
        if estimator == "grpo":
            a = ri - ri.mean()
            if std_norm:
                a = a / (ri.std() + eps)
        elif estimator == "rloo":
            a = ri - (ri.sum() - ri) / (n - 1)
        else:
            raise ValueError(f"unknown advantage estimator {estimator!r}")
        adv[idx] = a
    stats = {
        "adv/groups": float(len(members)),
        "adv/zero_adv_groups": float(zero_groups),
        "adv/zero_adv_group_frac": zero_groups / max(len(members), 1),
        "adv/mean": float(adv.mean()) if adv.numel() else 0.0,
        "adv/abs_mean": float(adv.abs().mean()) if adv.numel() else 0.0,
    }
    return adv.float(), stats

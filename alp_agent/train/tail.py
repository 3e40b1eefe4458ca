"""Tail-panel data: where in a multi-turn episode the importance ratio's tail lives (docs/method.md "What to watch").

Each model token gets a tag = 2 * turn + head, where `turn` is the index of the model turn it belongs to and `head` is
1 for the first `HEAD_TOKENS` model tokens after a tool observation (the tokens conditioned on fresh, never-sampled
text, where train and engine numerics are most likely to part). Other positions get -1. `tail_metrics` summarises the
token ratio r = pi/mu per turn index and for head vs the rest: quantiles p50/p99/p99.9/max and the normalised ESS.
"""

from __future__ import annotations

import torch

from alp_agent.rollout.trajectory import ROLE_MODEL, ROLE_OBSERVATION, Trajectory
from alp_agent.train.metrics import ess

HEAD_TOKENS = 8  # the "first 8 model tokens after each tool observation"
_Q = ((0.5, "p50"), (0.99, "p99"), (0.999, "p99_9"))


def token_tags(traj: Trajectory) -> list[int]:
    """One tag per completion token (see the module docstring). Without recorded token roles (old trajectories) the
    observation positions are unknown: a model turn after the first is then taken to follow an observation."""
    n = len(traj.completion_ids)
    turn_of = [-1] * n
    for k, (a, b) in enumerate(traj.turn_spans):
        for i in range(max(a, 0), min(b, n)):
            turn_of[i] = k
    roles = traj.token_roles or "".join(
        ROLE_MODEL if m else ROLE_OBSERVATION if i > 0 and turn_of[i] < 0 else "t" for i, m in enumerate(traj.loss_mask)
    )
    tags, since_obs, k_last = [-1] * n, None, -1
    for i, role in enumerate(roles):
        if role == ROLE_OBSERVATION:
            since_obs = 0
        if role != ROLE_MODEL or not traj.loss_mask[i]:
            continue
        k = turn_of[i] if turn_of[i] >= 0 else max(k_last, 0)
        k_last = k
        head = since_obs is not None and since_obs < HEAD_TOKENS
        if since_obs is not None:
            since_obs += 1
        tags[i] = 2 * k + int(head)
    return tags


def _panel(log_r: torch.Tensor, prefix: str) -> dict[str, float]:
    r = log_r.double().exp()
    qs = torch.quantile(r, torch.tensor([q for q, _ in _Q], dtype=torch.float64)).tolist()
    m = {f"{prefix}/{name}": v for (_, name), v in zip(_Q, qs)}
    m[f"{prefix}/max"] = float(r.max())
    m[f"{prefix}/ess"] = ess(log_r)
    m[f"{prefix}/tokens"] = float(r.numel())
    return m


def tail_metrics(log_r: torch.Tensor, tags: torch.Tensor, prefix: str = "tail") -> dict[str, float]:
    """Per turn index (`{prefix}/turn_k/*`) and head vs rest (`{prefix}/after_obs8/*`, `{prefix}/rest/*`) summaries
    of the token ratio exp(log_r); `tags` aligned with `log_r` (1-D). Empty groups give no keys."""
    log_r, tags = log_r.detach().cpu(), tags.long().cpu()  # a summary: on the CPU, wherever the values came from
    ok = tags >= 0
    log_r, tags = log_r[ok], tags[ok]
    m: dict[str, float] = {}
    if log_r.numel() == 0:
        return m
    for k in sorted(set((tags // 2).tolist())):
        m.update(_panel(log_r[tags // 2 == k], f"{prefix}/turn_{k}"))
    head = tags % 2 == 1
    if head.any():
        m.update(_panel(log_r[head], f"{prefix}/after_obs{HEAD_TOKENS}"))
    if (~head).any():
        m.update(_panel(log_r[~head], f"{prefix}/rest"))
    return m

"""SimpleTIR's void-turn filter (docs/method.md "Void turns"): an episode with a void turn (a model turn with neither
a tool call nor a final answer, a turn cut at max_tokens_per_turn included; counted by the rollout as
`Trajectory.num_void_turns`) gives every one of its tokens loss weight 0, for every algorithm, so a collapse into
empty turns is not reinforced. Group advantages are computed before, over all episodes, as in the reference.

Weight 0 on every token of an episode is the same as leaving it out of the loss: it adds nothing to the sum nor to
the token-mean normaliser. The trainer therefore drops those rows after the advantages, which also saves their
forwards.
"""

from __future__ import annotations

from typing import TypeVar

from alp_agent.rollout.trajectory import Trajectory

R = TypeVar("R")


def void_keep(trajs: list[Trajectory], enabled: bool) -> tuple[list[bool], dict[str, float]]:
    """(keep flag per episode, metrics). Metrics are logged whether or not the filter is on: void/episode_frac (share
    of episodes with a void turn), void/filtered_frac and void/filtered_token_frac (share of episodes and of model
    tokens given weight 0; 0 when off), void/turns_mean."""
    void = [t.num_void_turns > 0 for t in trajs]
    keep = [not (enabled and v) for v in void]
    n = max(len(trajs), 1)
    tokens = sum(t.num_model_tokens for t in trajs)
    dropped = sum(t.num_model_tokens for t, k in zip(trajs, keep) if not k)
    return keep, {
        "void/episode_frac": sum(void) / n,
        "void/filtered_frac": sum(not k for k in keep) / n,
        "void/filtered_token_frac": dropped / max(tokens, 1),
        "void/turns_mean": sum(t.num_void_turns for t in trajs) / n,
    }


def void_filter(trajs: list[Trajectory], rows: list[R], enabled: bool, metrics: dict[str, float]) -> list[R]:
    """The rows (one per trajectory, same order) that keep a loss weight; the void/* metrics go into `metrics`."""
    keep, m = void_keep(trajs, enabled)
    metrics.update(m)
    return [r for r, k in zip(rows, keep) if k]

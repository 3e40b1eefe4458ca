"""Evaluation: run episodes on a task set with the tool, grade them, and aggregate avg@k and unbiased pass@k.

Used inside training (held-out split, before/after and every N batches) and by `alp-agent eval`. Per-problem results
are plain dicts (one JSONL line each) so two runs can be diffed.
"""

from __future__ import annotations

from collections import defaultdict
from math import comb

from alp_agent.rollout.trajectory import Trajectory


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def is_correct(t: Trajectory) -> bool:
    """An episode is correct when the env graded its final answer correct (reward shaping aside)."""
    env_info = t.info.get("env_info") or {}
    if "correct" in env_info:
        return bool(env_info["correct"])
    return t.reward >= 1.0


SAMPLE_KEYS = ("correct", "turns", "tool_calls", "tool_errors", "void_turns", "no_answer", "response_tokens")
"""The per-sample lists of a problem record that `aggregate` reads."""


def is_complete_record(r: dict, k: int) -> bool:
    """Whether `r` is a whole record of `k` samples as `problem_records` writes it: an int task index and `k` entries
    under every key `aggregate` reads. A resumed eval recomputes any other problem (a line from an older version, an
    eval with another k, a hand-edited file), so its table never mixes sample counts or fails on a missing key."""
    if not isinstance(r.get("task_index"), int) or isinstance(r.get("task_index"), bool):
        return False
    return all(isinstance(r.get(key), list) and len(r[key]) == k for key in SAMPLE_KEYS)


def problem_records(trajs: list[Trajectory], task_ids: list[str] | None = None) -> list[dict]:
    """One record per problem (group): its samples' correctness, turns, tool use and failure modes."""
    groups: dict[int, list[Trajectory]] = defaultdict(list)
    for t in trajs:
        groups[t.group_id].append(t)
    out = []
    for g, ts in sorted(groups.items()):
        infos = [t.info.get("env_info") or {} for t in ts]
        out.append(
            {
                "task_index": ts[0].info.get("task_index"),
                "task_id": task_ids[g] if task_ids else infos[0].get("task_id") if infos else None,
                "correct": [is_correct(t) for t in ts],
                "answers": [i.get("parsed_answer") for i in infos],
                "reference": infos[0].get("reference_answer") if infos else None,
                "turns": [t.num_turns for t in ts],
                "tool_calls": [t.num_tool_calls for t in ts],
                "tool_errors": [t.num_tool_errors for t in ts],
                "void_turns": [int(i.get("total_void_turns", 0) or 0) for i in infos],
                "no_answer": [i.get("parsed_answer") is None for i in infos],
                "finish": [t.finish_reason for t in ts],
                "response_tokens": [t.num_model_tokens for t in ts],
            }
        )
    return out


def aggregate(records: list[dict], ks: list[int] | None = None) -> dict[str, float]:
    """avg@n (mean accuracy over all samples), pass@k for k up to n, and episode statistics."""
    if not records:
        return {"problems": 0.0}
    n = min(len(r["correct"]) for r in records)
    ks = sorted({k for k in (ks or [1, 2, 4, 8, 16, 32, 64]) if k <= n} | {1})

    def flat(key):
        return [x for r in records for x in r[key]]

    samples = len(flat("correct"))
    tool_calls = sum(flat("tool_calls"))
    m: dict[str, float] = {
        "problems": float(len(records)),
        "samples": float(samples),
        f"avg@{n}": sum(flat("correct")) / samples,
        "accuracy": sum(flat("correct")) / samples,
        "mean_turns": sum(flat("turns")) / samples,
        "mean_tool_calls": tool_calls / samples,
        "tool_error_rate": sum(flat("tool_errors")) / tool_calls if tool_calls else 0.0,
        "void_turns_per_episode": sum(flat("void_turns")) / samples,
        "answer_missing_rate": sum(flat("no_answer")) / samples,
        "mean_response_tokens": sum(flat("response_tokens")) / samples,
    }
    for k in ks:
        m[f"pass@{k}"] = sum(pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in records) / len(records)
    return m

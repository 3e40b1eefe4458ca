"""How each run's held-out episodes went, eval by eval: accuracy, tool calls per episode, episodes that ran into the
per-turn token limit and episodes that ended in a void turn.

Accuracy alone cannot tell the study's failure modes apart: a policy whose answers grow until every turn hits the
token limit and a policy that stops calling the tool both end near 0. The held-out records (eval_batchNNNN.jsonl,
written by the job at every eval) can, so the report prints their course per run instead of leaving it to
hand-made tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alp_agent.app.jsonl import read_records
from alp_agent.app.repro import ReproGroup, RunSpec

TOKEN_LIMIT = "turn_token_limit"  # rollout.config: a model turn used max_tokens_per_turn without stopping
VOID = "void"  # the env's end reason for a turn with neither a tool call nor an answer


@dataclass(frozen=True)
class EvalPoint:
    """One held-out eval of a run, over every sampled episode of every problem."""

    batch: int  # rollout batches trained before this eval
    episodes: int
    accuracy: float
    tool_calls: float  # per episode
    at_token_limit: int  # episodes that ended on the per-turn token limit
    void: int  # episodes that ended in a void turn


def _point(batch: int, records: list[dict]) -> EvalPoint | None:
    correct, calls, finish = [], [], []
    for r in records:
        correct += [bool(c) for c in r.get("correct", [])]
        calls += [int(c) for c in r.get("tool_calls", [])]
        finish += [str(f) for f in r.get("finish", [])]
    if not correct:
        return None
    n = len(correct)
    return EvalPoint(
        batch=batch,
        episodes=n,
        accuracy=sum(correct) / n,
        tool_calls=sum(calls) / len(calls) if calls else 0.0,
        at_token_limit=finish.count(TOKEN_LIMIT),
        void=finish.count(VOID),
    )


def read_course(run_dir: Path) -> list[EvalPoint]:
    """The run's evals in batch order. A line that is not a JSON object (a run killed mid-write) is skipped, and a
    file without records gives no point: a damaged eval file shortens the course, it does not break the report."""
    points = []
    for f in sorted(run_dir.glob("eval_batch*.jsonl")):
        batch = f.stem.removeprefix("eval_batch")
        if not batch.isdigit():  # not a file the job wrote (eval_batchNNNN.jsonl)
            continue
        p = _point(int(batch), read_records(f))
        if p is not None:
            points.append(p)
    return points


def _arrow(values: list[str]) -> str:
    return " → ".join(values) or "-"


def course_table(g: ReproGroup, setting: str, runs_dir: Path) -> list[str]:
    """Markdown: one row per finished run of the group's arms and seeds in `setting`, each cell the course over the
    evals (b0 → b4 → ...). Folded in a <details> block: it is the evidence behind the tables above, not a claim."""
    rows = []
    for a in g.arms:
        for seed in g.seeds:
            d = runs_dir / RunSpec(a, setting, seed).name
            if not (d / "summary.json").is_file():  # a running or crashed run is not a result
                continue
            pts = read_course(d)
            if not pts:
                continue
            n = pts[-1].episodes
            rows.append(
                f"| {a} | {seed} | {_arrow([f'b{p.batch}' for p in pts])} "
                f"| {_arrow([f'{p.accuracy:.2f}' for p in pts])} | {_arrow([f'{p.tool_calls:.2f}' for p in pts])} "
                f"| {_arrow([str(p.at_token_limit) for p in pts])} | {_arrow([str(p.void) for p in pts])} | {n} |"
            )
    if not rows:
        return []
    return [
        "<details><summary>How each run's held-out episodes went (accuracy, tool calls per episode, episodes ending on "
        "the per-turn token limit or in a void turn, at each eval)</summary>",
        "",
        "| arm | seed | evals | accuracy | tool calls per episode | at the token limit | void | episodes |",
        "|---|---:|---|---|---|---|---|---:|",
        *rows,
        "",
        "</details>",
        "",
    ]

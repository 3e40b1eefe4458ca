"""The report's per-run course of the held-out evals (repro_course): exact counts from hand-written eval records."""

from __future__ import annotations

import json
from pathlib import Path

from alp_agent.app.repro import ReproGroup
from alp_agent.app.repro_course import course_table, read_course


def _eval(run: Path, batch: int, episodes: list[tuple[bool, int, str]]) -> None:
    """One eval file: one problem per episode, one greedy sample each (the job's record layout)."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / f"eval_batch{batch:04d}.jsonl", "w", encoding="utf-8") as f:
        for i, (ok, calls, finish) in enumerate(episodes):
            f.write(json.dumps({"task_index": i, "correct": [ok], "tool_calls": [calls], "finish": [finish]}) + "\n")


def test_course_counts_accuracy_tool_calls_token_limit_and_void(tmp_path):
    run = tmp_path / "int8_stale8_seq_bypass_s1"
    _eval(run, 0, [(True, 1, "answer"), (False, 0, "void"), (False, 0, "turn_token_limit"), (False, 1, "answer")])
    _eval(run, 4, [(True, 2, "answer"), (True, 1, "answer"), (False, 0, "turn_token_limit"), (False, 1, "max_turns")])
    pts = read_course(run)
    assert [p.batch for p in pts] == [0, 4]
    assert (pts[0].accuracy, pts[0].tool_calls, pts[0].at_token_limit, pts[0].void) == (0.25, 0.5, 1, 1)
    assert (pts[1].accuracy, pts[1].tool_calls, pts[1].at_token_limit, pts[1].void) == (0.5, 1.0, 1, 0)


def test_a_damaged_eval_file_shortens_the_course_without_breaking_it(tmp_path):
    run = tmp_path / "r"
    _eval(run, 0, [(True, 1, "answer"), (False, 0, "void")])
    with open(run / "eval_batch0000.jsonl", "a", encoding="utf-8") as f:
        f.write('{"task_index": 2, "correct": [tr\n[1, 2]\n')  # killed mid-write; a line that is not an object
    (run / "eval_batch0004.jsonl").write_bytes(b"\xff\xfe not json\n")
    (run / "eval_batch_copy.jsonl").write_text('{"correct": [true]}\n')  # not a file the job writes
    pts = read_course(run)
    assert len(pts) == 1 and pts[0].episodes == 2 and pts[0].accuracy == 0.5


def test_course_table_lists_finished_runs_only(tmp_path):
    g = ReproGroup(name="g", arms=["seq_alp", "seq_bypass"], settings=["int8_stale8"], seeds=[0, 1])
    for name in ("int8_stale8_seq_alp_s0", "int8_stale8_seq_bypass_s0", "int8_stale8_seq_bypass_s1"):
        _eval(tmp_path / name, 0, [(False, 0, "void"), (True, 1, "answer")])
        _eval(tmp_path / name, 12, [(False, 3, "turn_token_limit"), (False, 0, "void")])
    for name in ("int8_stale8_seq_alp_s0", "int8_stale8_seq_bypass_s0"):  # s1 of seq_bypass is still running
        (tmp_path / name / "summary.json").write_text("{}")
    lines = course_table(g, "int8_stale8", tmp_path)
    rows = [ln for ln in lines if ln.startswith("| seq_")]
    assert rows == [
        "| seq_alp | 0 | b0 → b12 | 0.50 → 0.00 | 0.50 → 1.50 | 0 → 1 | 1 → 1 | 2 |",
        "| seq_bypass | 0 | b0 → b12 | 0.50 → 0.00 | 0.50 → 1.50 | 0 → 1 | 1 → 1 | 2 |",
    ]
    assert lines[0].startswith("<details>") and "</details>" in lines
    assert course_table(g, "bf16_stale8", tmp_path) == []

"""`alp-agent eval` on a run directory: the run's own settings, the same score as the training loop's own held-out
eval on the same problems; a results table that reads on 80 columns and in a pipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alp_agent.app.cli import main
from alp_agent.app.evaluate_cli import _read_done, format_table

REPO = Path(__file__).resolve().parents[2]


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "benchmark": f"synthetic{i}-k2-t1",
                "problems": 16.0,
                "accuracy": 0.25 * i,
                "pass@1": 0.25,
                "pass@2": 0.5,
                "mean_turns": 2.0,
                "mean_tool_calls": 1.0,
                "tool_error_rate": 0.0,
                "void_turns_per_episode": 0.0,
                "answer_missing_rate": 0.125,
            }
        )
    return rows


def test_plain_table_in_a_pipe_keeps_every_header_whole():
    out = format_table(_rows(3), terminal=False)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == ["metric", "synthetic0-k2-t1", "synthetic1-k2-t1", "synthetic2-k2-t1"]
    by_metric = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert by_metric["accuracy"] == ["0.000", "0.250", "0.500"]
    assert by_metric["answer_missing_rate"] == ["0.125"] * 3 and by_metric["problems"] == ["16"] * 3
    assert "…" not in out and "\x1b" not in out  # no truncation, no colour codes in a pipe


def test_terminal_table_fits_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = format_table(_rows(3), terminal=True)
    import re

    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert max(len(line) for line in plain.splitlines()) <= 80
    assert "synthetic2-k2-t1" in plain and "answer_missing_rate" in plain and "…" not in plain


@pytest.mark.vllm
def test_eval_of_a_run_dir_matches_the_training_loops_heldout_eval(tiny_model_dir, tmp_path, capsys):
    common = [
        f"engine.model={tiny_model_dir}",
        "engine.dtype=float32",  # greedy decoding is then deterministic between the two engines
        "engine.max_model_len=1024",
        "rollout.max_tokens_per_turn=16",
        "run.prompts_per_batch=2",
        "run.samples_per_prompt=2",
        "run.tensorboard=false",
        "trainer.update.updates_per_batch=1",
        "trainer.update.dtype=float32",
        "trainer.optim.lr=1e-3",  # move the weights, so a base-model eval would differ
        "eval.num_tasks=6",
    ]
    args = ["train", "-c", str(REPO / "configs/quickstart.yaml"), "--quiet", *common]
    assert main([*args, f"run.out_dir={tmp_path}", "run.name=run", "run.iterations=1"]) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    train_records = [json.loads(x) for x in (run / "eval_batch0001.jsonl").read_text().splitlines()]
    assert len(train_records) == 6

    out = tmp_path / "ev"
    assert main(["eval", "--model", str(run), "-b", "heldout", "--limit", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"the run's own config ({run / 'config.yaml'})" in printed
    assert (run / "export" / "source_checkpoint.txt").read_text().strip() == "step_000001"
    records = [json.loads(x) for x in (out / "heldout-k1-t0.jsonl").read_text().splitlines()]
    keys = ("task_index", "task_id", "reference", "correct", "answers", "turns", "tool_calls", "finish")
    assert [{k: r[k] for k in keys} for r in records] == [{k: r[k] for k in keys} for r in train_records]
    (row,) = json.loads((out / "summary.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert row["accuracy"] == pytest.approx(summary["accuracy_after"])


def _record(task_index: int, k: int) -> dict:
    return {
        "task_index": task_index,
        "correct": [True] * k,
        "turns": [1] * k,
        "tool_calls": [0] * k,
        "tool_errors": [0] * k,
        "void_turns": [0] * k,
        "no_answer": [False] * k,
        "finish": ["answer"] * k,
        "response_tokens": [5] * k,
    }


def test_a_resumed_eval_keeps_whole_records_and_reruns_damaged_ones(tmp_path):
    """An interrupted or damaged eval file: only whole records of the same k count as done; the rest run again."""
    missing = _record(2, 2)
    del missing["correct"]
    lines = [
        json.dumps(_record(0, 2)).encode(),
        json.dumps(_record(1, 3)).encode(),  # another k
        json.dumps(missing).encode(),  # an older or hand-edited record
        json.dumps({**_record(3, 2), "task_index": "3"}).encode(),
        b"\xff\xfe not utf-8",
        json.dumps(_record(4, 2)).encode(),
        json.dumps(_record(5, 2)).encode()[:40],  # cut by the interruption
    ]
    path = tmp_path / "heldout-k2-t0.jsonl"
    path.write_bytes(b"\n".join(lines))
    assert sorted(_read_done(path, 2)) == [0, 4]
    assert _read_done(tmp_path / "none.jsonl", 2) == {}

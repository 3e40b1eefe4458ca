"""Dataset loaders: the local benchmark copies ($ALP_DATA_DIR; skipped when unset), the Hugging Face path (with a stub
of `datasets`: tests have no network), file formats, the one-line error, the synthetic generator."""

from __future__ import annotations

import json
import sys
import types

import pytest

from envs import DatasetConfig, load_tasks
from envs.datasets import gsm8k_answer, load_aime, load_amc, load_gsm8k, load_math500
from envs.grading import Grader, GradingConfig
from envs.synthetic import GENERATORS, SyntheticTasks, make_task


def test_gsm8k_answer():
    assert gsm8k_answer("so 3 + 4 = <<3+4=7>>7\n#### 1,234") == "1234"
    assert gsm8k_answer("#### -5") == "-5"


@pytest.mark.parametrize(
    "loader,n,first_answer",
    [
        (lambda d: load_gsm8k(data_dir=str(d)), 1319, "18"),
        (lambda d: load_gsm8k(data_dir=str(d), split="train"), 7473, "72"),
        (lambda d: load_math500(data_dir=str(d)), 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
        (lambda d: load_aime(2024, data_dir=str(d)), 30, None),
        (lambda d: load_aime(2025, data_dir=str(d)), 30, "70"),
        (lambda d: load_amc(data_dir=str(d)), 40, "27"),
    ],
)
def test_builtin_loaders_on_local_copies(data_dir, loader, n, first_answer):
    tasks = loader(data_dir)
    assert len(tasks) == n
    assert all(t.prompt and t.answer for t in tasks)
    if first_answer is not None:
        assert tasks[0].answer == first_answer
    assert "####" not in tasks[0].answer


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("ALP_DATA_DIR", str(data_dir))
    tasks = load_tasks({"name": "aime25", "limit": 5, "shuffle_seed": 1})
    assert len(tasks) == 5
    assert [t.id for t in tasks] == [t.id for t in load_tasks({"name": "aime25", "limit": 5, "shuffle_seed": 1})]


def test_reference_answers_grade_against_themselves(data_dir):
    """Every MATH-500 reference is gradable: it is equivalent to itself (boxed round trip through the grader)."""
    tasks = load_math500(data_dir=str(data_dir))[:60]
    with Grader(GradingConfig(timeout_s=5, workers=2)) as g:
        bad = [t.answer for t in tasks if not g.grade(t.answer, t.answer).correct]
    assert not bad, bad


def test_jsonl_with_field_mapping(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"q": "1+1?", "sol": "The answer is \\boxed{2}.", "id": "a"}, {"q": "2+2?", "sol": "\\boxed{4}", "id": "b"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = DatasetConfig(name="jsonl", path=str(path), question_field="q", answer_field="sol", answer_format="boxed")
    tasks = load_tasks(cfg)
    assert [(t.prompt, t.answer, t.id) for t in tasks] == [("1+1?", "2", "a"), ("2+2?", "4", "b")]
    with pytest.raises(KeyError, match="question"):
        load_tasks(DatasetConfig(name="jsonl", path=str(path)))  # no default field names match: clear message
    (tmp_path / "bad.jsonl").write_text('{"problem": "x", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_tasks(DatasetConfig(name="jsonl", path=str(tmp_path / "bad.jsonl")))


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": "3"}]), path)
    assert load_tasks(DatasetConfig(name="parquet", path=str(path)))[0].answer == "3"


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ALP_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed (import raises ImportError)
    with pytest.raises(FileNotFoundError) as err:
        load_tasks(DatasetConfig(name="gsm8k", data_dir=str(tmp_path)))
    msg = str(err.value)
    assert "\n" not in msg and "gsm8k_test.jsonl" in msg and str(tmp_path) in msg
    assert all(hint in msg for hint in ("ALP_DATA_DIR", "--data-dir", "datasets", "openai/gsm8k")), msg
    with pytest.raises(FileNotFoundError, match="math500.jsonl; set"):
        load_tasks(DatasetConfig(name="math500"))  # no data_dir at all: no "(not in ...)" part
    with pytest.raises(ValueError, match="path"):
        load_tasks(DatasetConfig(name="jsonl"))
    with pytest.raises(Exception, match="nme"):
        DatasetConfig(nme="gsm8k")


def test_synthetic_is_seeded_and_exact():
    a, b = SyntheticTasks(50, [0, 1, 2, 3, 4], seed=3), SyntheticTasks(50, [0, 1, 2, 3, 4], seed=3)
    assert list(a) == list(b) and list(a) != list(SyntheticTasks(50, [0, 1, 2, 3, 4], seed=4))
    assert [t.meta["level"] for t in a[:5]] == [0, 1, 2, 3, 4]
    assert len(load_tasks({"name": "synthetic", "num_tasks": 100, "limit": 10})) == 10
    # every generator's answer is what Python computes from the question's numbers
    t = make_task(0, 0)
    a_, op, b_ = t.prompt.removeprefix("What is ").rstrip("?").split()
    assert int(t.answer) == (int(a_) + int(b_) if op == "+" else int(a_) * int(b_))
    kinds = {make_task(i, lv).meta["kind"] for lv in GENERATORS for i in range(60)}
    assert kinds == {g.__name__.lstrip("_") for gens in GENERATORS.values() for g in gens}
    with pytest.raises(ValueError):
        SyntheticTasks(10, 7)


def test_synthetic_answers_are_gradable():
    with Grader(GradingConfig(timeout_s=5, workers=1)) as g:
        for lv in GENERATORS:
            t = make_task(1, lv)
            assert g.grade(t.answer, t.answer).correct, t


def _stub_datasets(monkeypatch, rows_by_id: dict[str, list[dict]], seen: list) -> None:
    """Put a stand-in `datasets` module in sys.modules whose load_dataset records its call and returns given rows."""

    def load_dataset(path, name=None, split=None):
        seen.append((path, name, split))
        if path not in rows_by_id:
            raise ConnectionError(f"cannot reach the hub for {path}")
        return rows_by_id[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_datasets_path_with_a_stub(monkeypatch, tmp_path):
    """Without a local copy, built-in names go to `datasets.load_dataset` (stubbed here: no network in tests)."""
    seen: list = []
    _stub_datasets(monkeypatch, {"openai/gsm8k": [{"question": "q1", "answer": "work\n#### 1,000"}]}, seen)
    monkeypatch.delenv("ALP_DATA_DIR", raising=False)
    tasks = load_tasks(DatasetConfig(name="gsm8k", data_dir=str(tmp_path), split="train"))
    assert seen == [("openai/gsm8k", "main", "train")]
    assert [(t.prompt, t.answer) for t in tasks] == [("q1", "1000")]
    _stub_datasets(monkeypatch, {"me/set": [{"question": "q1", "answer": "work\n#### 1,000"}]}, seen)
    tasks = load_tasks(DatasetConfig(name="hf", hf_path="me/set", question_field="question"))
    assert seen[-1][0] == "me/set" and tasks[0].answer == "work\n#### 1,000"  # raw format unless told


# One row shaped like each hub dataset's columns (names and value types as published), and the task it must give.
HUB_ROWS = {
    "math500": (
        "HuggingFaceH4/MATH-500",
        "test",
        {
            "problem": "P",
            "solution": "long \\boxed{3}",
            "answer": "3",
            "subject": "Algebra",
            "level": 2,
            "unique_id": "test/a/1.json",
        },
    ),
    "aime24": (
        "HuggingFaceH4/aime_2024",
        "train",
        {"id": 60, "problem": "P", "solution": "S", "answer": "204", "url": "u", "year": "2024"},
    ),
    "aime25": ("math-ai/aime25", "test", {"problem": "P", "answer": "70", "id": "0"}),
    "amc23": ("math-ai/amc23", "test", {"id": 0, "question": "P", "answer": 27.0, "url": "u"}),
}


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_builtin_hub_ids_and_columns(name, monkeypatch):
    """Each built-in asks the hub for its id and split, and its columns map to (question, reference answer)."""
    hf_id, split, row = HUB_ROWS[name]
    seen: list = []
    _stub_datasets(monkeypatch, {hf_id: [row]}, seen)
    monkeypatch.delenv("ALP_DATA_DIR", raising=False)
    (task,) = load_tasks(DatasetConfig(name=name))
    assert seen == [(hf_id, None, split)]
    expected_answer = "27" if name == "amc23" else row["answer"]  # a whole float column value reads as an integer
    assert (task.prompt, task.answer, task.source) == ("P", expected_answer, name)


def test_local_copy_wins_over_the_hub_and_hub_failure_is_clear(monkeypatch, tmp_path):
    seen: list = []
    _stub_datasets(monkeypatch, {}, seen)  # every hub call fails like an offline machine
    (tmp_path / "aime25.jsonl").write_text(json.dumps({"problem": "P", "answer": "70"}) + "\n")
    monkeypatch.setenv("ALP_DATA_DIR", str(tmp_path))
    assert [t.answer for t in load_tasks(DatasetConfig(name="aime25"))] == ["70"] and seen == []
    with pytest.raises(RuntimeError, match="math-ai/amc23.*ALP_DATA_DIR or --data-dir"):
        load_tasks(DatasetConfig(name="amc23"))  # no local amc23.jsonl: the hub is tried and fails

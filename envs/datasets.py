"""Task sets: synthetic, GSM8K, MATH-500, AIME 2024/2025, AMC 2023, any JSONL/Parquet file, Hugging Face `datasets`.

A built-in benchmark name resolves, in this order, to ``path`` if given; else ``<data_dir>/<file>`` (``data_dir``
defaults to ``$ALP_DATA_DIR``; the CLI's ``--data-dir`` sets it), so runs work offline from local JSONL copies; else
the Hugging Face hub through `datasets` (the optional ``hub`` extra, imported lazily: it downloads on first use and
then reads its cache); else one clear error line saying what to set. The project ships no data files.
GSM8K's reference is the number after ``####``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from envs.synthetic import SyntheticTasks
from envs.task import Task

DatasetName = Literal["synthetic", "gsm8k", "math500", "aime24", "aime25", "amc23", "jsonl", "parquet", "hf"]

# name -> (file name pattern in data_dir, HF dataset id, HF config, HF split, answer format). The hub copies' columns
# (question / reference): openai/gsm8k 'main' (train 7473, test 1319 rows): question / answer ("... #### 72");
# HuggingFaceH4/MATH-500 test (500): problem / answer (also solution, subject, level, unique_id);
# HuggingFaceH4/aime_2024 train (30): problem / answer (also id, solution, url, year); math-ai/aime25 test (30):
# problem / answer; math-ai/amc23 test (40): question / answer (also id, url). The default field lookup below
# (problem/question/..., answer/solution/...) picks the right column in each, and in the local JSONL copies.
BUILTIN: dict[str, tuple[str, str, str | None, str, str]] = {
    "gsm8k": ("gsm8k_{split}.jsonl", "openai/gsm8k", "main", "{split}", "gsm8k"),
    "math500": ("math500.jsonl", "HuggingFaceH4/MATH-500", None, "test", "raw"),
    "aime24": ("aime24.jsonl", "HuggingFaceH4/aime_2024", None, "train", "raw"),
    "aime25": ("aime25.jsonl", "math-ai/aime25", None, "test", "raw"),
    "amc23": ("amc23.jsonl", "math-ai/amc23", None, "test", "raw"),
}
_QUESTION_KEYS = ("problem", "question", "prompt", "input")
_ANSWER_KEYS = ("answer", "solution", "target", "output")


class DatasetConfig(BaseModel):
    """Which tasks an env draws from."""

    model_config = ConfigDict(extra="forbid")

    name: DatasetName = Field("synthetic", description="Task set; 'jsonl'/'parquet' need path, 'hf' needs hf_path.")
    path: str | None = Field(None, description="File to load (overrides the data_dir lookup of built-in names).")
    data_dir: str | None = Field(None, description="Folder with gsm8k_test.jsonl etc.; default $ALP_DATA_DIR.")
    split: str = Field("test", description="Split for GSM8K (file gsm8k_<split>.jsonl) and HF datasets.")
    hf_path: str | None = Field(None, description="Hugging Face dataset id (name='hf', or override a built-in's).")
    hf_config: str | None = Field(None, description="Hugging Face dataset config name.")
    question_field: str | None = Field(None, description="Field with the question; default: problem/question/...")
    answer_field: str | None = Field(None, description="Field with the reference; default: answer/solution/...")
    answer_format: Literal["raw", "gsm8k", "boxed"] = Field(
        "raw", description="'gsm8k': take the text after ####; 'boxed': the last \\boxed{}; 'raw': as is."
    )
    limit: int | None = Field(None, ge=1, description="Keep the first N tasks (after shuffling).")
    shuffle_seed: int | None = Field(None, description="Shuffle the tasks with this seed before limit.")
    # synthetic only
    level: int | list[int] = Field(1, description="Synthetic difficulty 0..4, or a list interleaved task by task.")
    num_tasks: int = Field(10_000, ge=1, description="Number of synthetic tasks.")
    seed: int = Field(0, description="Seed of the synthetic generator.")


def gsm8k_answer(text: str) -> str:
    """The number after the last '####' without thousands separators ('#### 1,234' -> '1234')."""
    tail = str(text).rsplit("####", 1)[-1]
    return tail.strip().replace(",", "").replace("$", "").strip()


def _pick(row: dict, field: str | None, defaults: tuple[str, ...], what: str, source: str) -> Any:
    if field is not None:
        if field not in row:
            raise KeyError(f"{source}: no field '{field}' for the {what}; fields are {sorted(row)}")
        return row[field]
    for key in defaults:
        if key in row:
            return row[key]
    raise KeyError(f"{source}: no {what} field among {defaults}; set {what}_field (fields: {sorted(row)})")


def _answer_text(value: Any) -> str:
    """A reference as text; a whole float (a hub column typed float, e.g. 27.0) is written as the integer '27'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def rows_to_tasks(rows: Sequence[dict], config: DatasetConfig, source: str) -> list[Task]:
    """Map raw rows to Tasks with the config's field mapping and answer format."""
    from envs.grading import extract_boxed

    fmt = config.answer_format
    if config.name in BUILTIN and fmt == "raw":
        fmt = BUILTIN[config.name][4]
    tasks = []
    for i, row in enumerate(rows):
        question = _pick(row, config.question_field, _QUESTION_KEYS, "question", source)
        answer = _answer_text(_pick(row, config.answer_field, _ANSWER_KEYS, "answer", source))
        if fmt == "gsm8k":
            answer = gsm8k_answer(answer)
        elif fmt == "boxed":
            answer = extract_boxed(answer) or answer
        tid = str(row.get("id", row.get("unique_id", f"{source}-{i}")))
        tasks.append(Task(str(question), answer.strip(), id=tid, source=source))
    return tasks


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: invalid JSON line ({exc.msg})") from None
    return rows


def read_parquet(path: str | Path) -> list[dict]:
    """Parquet rows via pyarrow, or pandas; neither is a hard dependency."""
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow or pandas: pip install pyarrow") from None


def read_hf(hf_path: str, hf_config: str | None, split: str) -> list[dict]:
    """Rows of a Hugging Face dataset: downloaded on first use, then read from the `datasets` cache.

    Raises ImportError when `datasets` is not installed, and a RuntimeError naming the offline alternative when the
    hub cannot be reached (or the id/split does not exist)."""
    try:
        import datasets as hf_datasets
    except ImportError:
        raise ImportError(f"loading '{hf_path}' from the Hugging Face hub needs: pip install datasets") from None
    try:
        return list(hf_datasets.load_dataset(hf_path, hf_config, split=split))
    except Exception as exc:
        raise RuntimeError(
            f"could not load '{hf_path}' (config {hf_config}, split {split}) from the Hugging Face hub: {exc}. "
            "Offline, point $ALP_DATA_DIR or --data-dir at a folder with local copies."
        ) from exc


def read_file(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    return read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path)


def _builtin_rows(config: DatasetConfig) -> tuple[list[dict], str]:
    file_pat, hf_path, hf_config, hf_split, _ = BUILTIN[config.name]
    if config.path:
        return read_file(config.path), config.path
    data_dir = config.data_dir or os.environ.get("ALP_DATA_DIR")
    if data_dir:
        candidate = Path(data_dir) / file_pat.format(split=config.split)
        if candidate.exists():
            return read_file(candidate), str(candidate)
    hf = config.hf_path or hf_path
    try:
        return read_hf(hf, config.hf_config or hf_config, hf_split.format(split=config.split)), hf
    except ImportError:
        where = f" (not in {data_dir})" if data_dir else ""
        raise FileNotFoundError(
            f"dataset '{config.name}': no local copy of {file_pat.format(split=config.split)}{where}; set "
            f"$ALP_DATA_DIR or --data-dir (data_dir=) to a folder with it, or install `datasets` "
            f"(pip install 'alp-agent[hub]') to load {hf} from the Hugging Face hub"
        ) from None


def load_tasks(config: DatasetConfig | dict | None = None) -> Sequence[Task]:
    """The task list a config names. Synthetic tasks are generated lazily; the rest are loaded into memory."""
    config = config if isinstance(config, DatasetConfig) else DatasetConfig(**(config or {}))
    if config.name == "synthetic":
        n = min(config.num_tasks, config.limit or config.num_tasks)
        if config.shuffle_seed is None:
            return SyntheticTasks(n, config.level, config.seed)
        tasks = list(SyntheticTasks(config.num_tasks, config.level, config.seed))
    else:
        if config.name in BUILTIN:
            rows, source = _builtin_rows(config)
        elif config.name in ("jsonl", "parquet"):
            if not config.path:
                raise ValueError(f"dataset name '{config.name}' needs path=...")
            rows, source = read_file(config.path), config.path
        else:  # hf
            if not config.hf_path:
                raise ValueError("dataset name 'hf' needs hf_path=...")
            rows, source = read_hf(config.hf_path, config.hf_config, config.split), config.hf_path
        tasks = rows_to_tasks(rows, config, config.name if config.name in BUILTIN else str(source))
    if config.shuffle_seed is not None:
        random.Random(config.shuffle_seed).shuffle(tasks)
    if config.limit:
        tasks = tasks[: config.limit]
    if not tasks:
        raise ValueError(f"dataset '{config.name}' has no tasks")
    return tasks


def load_gsm8k(path: str | None = None, split: str = "test", **kw: Any) -> list[Task]:
    return list(load_tasks(DatasetConfig(name="gsm8k", path=path, split=split, **kw)))


def load_math500(path: str | None = None, **kw: Any) -> list[Task]:
    return list(load_tasks(DatasetConfig(name="math500", path=path, **kw)))


def load_aime(year: int = 2024, path: str | None = None, **kw: Any) -> list[Task]:
    name = {2024: "aime24", 2025: "aime25", 24: "aime24", 25: "aime25"}[year]
    return list(load_tasks(DatasetConfig(name=name, path=path, **kw)))


def load_amc(path: str | None = None, **kw: Any) -> list[Task]:
    return list(load_tasks(DatasetConfig(name="amc23", path=path, **kw)))

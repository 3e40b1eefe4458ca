"""`alp-agent eval`: a model on math tool benchmarks, multi-turn with the python tool (or without it), greedy or
sampled, avg@k and unbiased pass@k, per-problem JSONL (diffable, and the resume point), a progress bar.

Which settings: `--config` when given; else, for a run directory, the run's own `config.yaml` (its system prompt,
answer format and fallback, rollout limits, sandbox: a model must be evaluated under the env it was trained in, or
its answers go unparsed); else the defaults. The benchmark `heldout` is the run config's own held-out set (the
problems the training loop evaluates), so `alp-agent eval --model RUN -b heldout` reproduces the run's last eval.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from alp_agent.app.jsonl import read_records
from alp_agent.config import RunConfig
from alp_agent.config_io import ConfigError, deep_merge, load_run_config

BENCHMARKS = {
    "gsm8k": {"name": "gsm8k", "split": "test"},
    "math500": {"name": "math500"},
    "aime24": {"name": "aime24"},
    "aime25": {"name": "aime25"},
    "amc23": {"name": "amc23"},
    "amc": {"name": "amc23"},
    "synthetic": {"name": "synthetic", "seed": 1, "num_tasks": 500},
}
HELDOUT = "heldout"  # the run config's own held-out set (env.kwargs deep-merged with eval.env_kwargs)

NO_TOOL_SYSTEM_PROMPT = (
    "You are a careful math solver. Reason step by step, then give the final answer in \\boxed{}, "
    "for example \\boxed{42}."
)
DEFAULT_MAX_TURNS = 10  # paper: 10 model turns at eval; used when no run config says otherwise


def default_data_dir() -> str | None:
    """Benchmark files come from --data-dir or $ALP_DATA_DIR only (else the datasets load from the hub)."""
    return os.environ.get("ALP_DATA_DIR") or None


def dataset_for(bench: str, data_dir: str | None) -> dict:
    if bench in BENCHMARKS:
        ds = dict(BENCHMARKS[bench])
        if ds["name"] != "synthetic" and data_dir:
            ds["data_dir"] = data_dir
        return ds
    p = Path(bench)
    if p.suffix in (".jsonl", ".json", ".parquet") and p.is_file():
        return {"name": "parquet" if p.suffix == ".parquet" else "jsonl", "path": str(p)}
    known = ", ".join([*BENCHMARKS, HELDOUT])
    raise ConfigError(f"--benchmark {bench!r}: not one of {known} and not an existing .jsonl/.parquet")


def is_run_dir(spec: str) -> bool:
    run = Path(spec)
    return (run / "config.yaml").is_file() and (run / "checkpoints").is_dir()


def resolve_eval_model(spec: str) -> str:
    """A run directory means its exported weights, (re-)exported when missing or older than the latest checkpoint
    (the export records which checkpoint it holds in `source_checkpoint.txt`)."""
    from alp_agent.train.checkpoint import EXPORT_SOURCE, export_run, latest_checkpoint

    if not is_run_dir(spec):
        return spec
    run = Path(spec)
    export, latest = run / "export", latest_checkpoint(run / "checkpoints")
    marker = export / EXPORT_SOURCE
    fresh = marker.is_file() and latest is not None and marker.read_text().strip() == latest.name
    if not (export / "config.json").is_file() or (latest is not None and not fresh):
        export_run(run, out=export)
    return str(export)


@dataclass
class EvalSettings:
    """Where the env/rollout/sandbox settings come from, and the config they give (before each benchmark)."""

    cfg: RunConfig
    source: str  # "--config FILE", "the run's config.yaml (PATH)" or "defaults"
    from_run: bool  # a run directory's (or --config) settings: keep its turns and env options


def settings_for(args: argparse.Namespace, model: str) -> EvalSettings:
    """--config wins; else a run directory's own config.yaml; else the defaults. Engine model and eval sampling are
    this command's (overrides last)."""
    path, source = args.config, f"--config {args.config}"
    if path is None and is_run_dir(args.model):
        path = str(Path(args.model) / "config.yaml")
        source = f"the run's own config ({path})"
    elif path is None:
        source = "defaults (no --config, --model is not a run directory)"
    temperature = args.temperature if args.temperature is not None else (0.0 if args.k == 1 else 1.0)
    over = [f"engine.model={model}", f"eval.temperature={temperature}", *args.overrides]
    cfg = load_run_config(path, over)
    if args.max_turns is not None or path is None:
        turns = args.max_turns or DEFAULT_MAX_TURNS
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_turns": turns})})
    return EvalSettings(cfg, source, path is not None)


def config_for_benchmark(s: EvalSettings, bench: str, args: argparse.Namespace) -> RunConfig:
    """The run config with the env pointed at one benchmark: the eval env is env.kwargs + eval.env_kwargs, so the
    dataset replaces the held-out one (kept for `heldout`); --no-tool swaps in a single-turn, tool-free prompt."""
    cfg = s.cfg
    eval_kwargs = deep_merge(cfg.env.kwargs, cfg.eval.env_kwargs)
    if bench != HELDOUT:
        eval_kwargs["dataset"] = dataset_for(bench, args.data_dir or default_data_dir())
    if cfg.eval.max_turns is not None:
        eval_kwargs["max_turns"] = cfg.eval.max_turns
    if args.no_tool:
        eval_kwargs.update({"system_prompt": NO_TOOL_SYSTEM_PROMPT, "max_tool_calls": 0, "max_turns": 1})
    return cfg.model_copy(
        update={
            "env": cfg.env.model_copy(update={"kwargs": eval_kwargs}),
            "eval": cfg.eval.model_copy(
                update={"env_kwargs": {}, "max_turns": 1 if args.no_tool else cfg.eval.max_turns}
            ),
            "rollout": cfg.rollout.model_copy(
                update={"stop_strings": [] if args.no_tool else cfg.rollout.stop_strings}
            ),
        }
    )


def _tag(bench: str, args: argparse.Namespace, temperature: float) -> str:
    name = bench if bench in BENCHMARKS or bench == HELDOUT else Path(bench).stem
    return f"{name}{'-notool' if args.no_tool else ''}-k{args.k}-t{temperature:g}"


def _read_done(path: Path, k: int) -> dict[int, dict]:
    """Finished problems of an earlier (interrupted) eval of `k` samples each: they are not recomputed. A line cut by
    the interruption, bytes that are not UTF-8 and records that are not whole records of `k` samples are left out,
    so those problems run again instead of breaking the table."""
    from alp_agent.app.eval import is_complete_record

    if not path.is_file():
        return {}
    return {r["task_index"]: r for r in read_records(path) if is_complete_record(r, k)}


def eval_benchmark(cfg: RunConfig, tag: str, path: Path, k: int, limit: int | None) -> dict[str, float]:
    """Run (or resume) one benchmark; per-problem records appended to `path`; returns the aggregate row."""
    from rich.progress import Progress

    from alp_agent.app.eval import aggregate, problem_records
    from alp_agent.app.job import build_inference

    done = _read_done(path, k)
    comps = build_inference(cfg)
    try:
        n = min(limit or comps.num_eval_tasks, comps.num_eval_tasks)
        todo = [i for i in range(n) if i not in done]
        chunk = max(1, min(32, comps.eval_runner.config.max_concurrent_episodes // max(k, 1)))
        with Progress(transient=True, disable=not sys.stderr.isatty()) as bar, open(path, "a", encoding="utf-8") as f:
            task = bar.add_task(tag, total=n, completed=n - len(todo))
            for s in range(0, len(todo), chunk):
                ids = todo[s : s + chunk]
                trajs = comps.eval_runner.run(ids, k, 0)
                for t in trajs:  # group ids are positions in `ids`; map back to task indices
                    t.group_id = ids[t.group_id]
                for r in problem_records(trajs):
                    done[r["task_index"]] = r
                    f.write(json.dumps(r) + "\n")
                f.flush()
                bar.advance(task, len(ids))
    finally:
        comps.close()
    m = aggregate([done[i] for i in sorted(done) if i < n])
    m["benchmark"] = tag
    return m


def run_eval_command(args: argparse.Namespace) -> int:
    model = resolve_eval_model(args.model)
    settings = settings_for(args, model)
    print(f"env, rollout and sandbox settings: {settings.source}")
    out_root = Path(args.out or Path("evals") / Path(model).name)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for bench in args.benchmark:
        cfg = config_for_benchmark(settings, bench, args)
        tag = _tag(bench, args, cfg.eval.temperature)
        rows.append(eval_benchmark(cfg, tag, out_root / f"{tag}.jsonl", args.k, args.limit))
    print(format_table(rows, sys.stdout.isatty()), end="")
    (out_root / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"per-problem results and summary.json: {out_root}")
    return 0


def table_keys(rows: list[dict]) -> list[str]:
    passes = sorted({k for r in rows for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    return ["problems", "accuracy", *passes, "mean_turns", "mean_tool_calls", "tool_error_rate"] + [
        "void_turns_per_episode",
        "answer_missing_rate",
    ]


def format_table(rows: list[dict], terminal: bool) -> str:
    """One line per metric, one column per benchmark: ~25 + 16 characters per benchmark, so an 80-column terminal
    shows three benchmarks untruncated. A pipe gets the same table as plain text (no colour, no box drawing)."""
    keys = table_keys(rows)
    names = [str(r["benchmark"]) for r in rows]

    def cell(r: dict, k: str) -> str:
        v = r.get(k)
        if not isinstance(v, (int, float)):
            return "-"
        return f"{int(v)}" if k == "problems" else f"{v:.3f}"

    body = [[k, *[cell(r, k) for r in rows]] for k in keys]
    if terminal:
        import io

        from rich.console import Console
        from rich.table import Table

        t = Table(title="alp-agent eval", box=None, pad_edge=False)
        t.add_column("metric", no_wrap=True)
        for n in names:
            t.add_column(n, justify="right", overflow="fold")
        for line in body:
            t.add_row(*line)
        buf = io.StringIO()
        Console(file=buf, width=shutil.get_terminal_size().columns, force_terminal=True).print(t)
        return buf.getvalue()
    widths = [max(len(x) for x in col) for col in zip(["metric", *names], *body)]
    lines = [
        "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
        for row in [["metric", *names], *body]
    ]
    return "\n".join(lines) + "\n"

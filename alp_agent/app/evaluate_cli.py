"""`alp-agent eval`: a model on math tool benchmarks, multi-turn with the python tool (or without it), greedy or
sampled, avg@k and unbiased pass@k, per-problem JSONL (diffable, and the resume point), a progress bar.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from alp_agent.config_io import ConfigError

BENCHMARKS = {
    "gsm8k": {"name": "gsm8k", "split": "test"},
    "math500": {"name": "math500"},
    "aime24": {"name": "aime24"},
    "aime25": {"name": "aime25"},
    "amc23": {"name": "amc23"},
    "amc": {"name": "amc23"},
    "synthetic": {"name": "synthetic", "seed": 1, "num_tasks": 500},
}

NO_TOOL_SYSTEM_PROMPT = (
    "You are a careful math solver. Reason step by step, then give the final answer in \\boxed{}, "
    "for example \\boxed{42}."
)


def default_data_dir() -> str | None:
    if os.environ.get("ALP_DATA_DIR"):
        return os.environ["ALP_DATA_DIR"]
    guess = Path(__file__).resolve().parents[3] / "shared" / "data"
    return str(guess) if guess.is_dir() else None


def dataset_for(bench: str, data_dir: str | None) -> dict:
    if bench in BENCHMARKS:
        ds = dict(BENCHMARKS[bench])
        if ds["name"] != "synthetic" and data_dir:
            ds["data_dir"] = data_dir
        return ds
    p = Path(bench)
    if p.suffix in (".jsonl", ".json", ".parquet") and p.is_file():
        return {"name": "parquet" if p.suffix == ".parquet" else "jsonl", "path": str(p)}
    raise ConfigError(f"--benchmark {bench!r}: not one of {', '.join(BENCHMARKS)} and not an existing .jsonl/.parquet")


def resolve_eval_model(spec: str) -> str:
    """A run directory means its exported weights (exported from the latest checkpoint when missing)."""
    run = Path(spec)
    if (run / "config.yaml").is_file() and (run / "checkpoints").is_dir():
        export = run / "export"
        if not (export / "config.json").is_file():
            from alp_agent.app.cli import cmd_export

            cmd_export(argparse.Namespace(run_dir=str(run), checkpoint=None, out=str(export), dtype="float32"))
        return str(export)
    return spec


def run_eval_command(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from alp_agent.app.cli import _load_run_config
    from alp_agent.app.eval import aggregate, problem_records
    from alp_agent.app.job import build_inference

    model = resolve_eval_model(args.model)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.k == 1 else 1.0)
    data_dir = args.data_dir or default_data_dir()
    out_root = Path(args.out or Path("evals") / Path(model).name)
    out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for bench in args.benchmark:
        dataset = dataset_for(bench, data_dir)
        over = [
            f"engine.model={model}",
            f"eval.temperature={temperature}",
            f"eval.max_turns={args.max_turns}",
            *args.overrides,
        ]
        cfg = _load_run_config(args.config, over)
        env_kwargs = {"dataset": dataset, "max_turns": 1 if args.no_tool else args.max_turns}
        if args.no_tool:
            env_kwargs.update({"system_prompt": NO_TOOL_SYSTEM_PROMPT, "max_tool_calls": 0})
        cfg = cfg.model_copy(
            update={
                "env": cfg.env.model_copy(update={"kwargs": {**cfg.env.kwargs, **env_kwargs}}),
                "eval": cfg.eval.model_copy(update={"env_kwargs": {}}),
                "rollout": cfg.rollout.model_copy(update={"stop_strings": [] if args.no_tool else None}),
            }
        )
        tag = f"{bench if bench in BENCHMARKS else Path(bench).stem}{'-notool' if args.no_tool else ''}-k{args.k}-t{temperature:g}"
        path = out_root / f"{tag}.jsonl"
        done = {}
        if path.is_file():  # resume: finished problems are not recomputed
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                    done[r["task_index"]] = r
                except (json.JSONDecodeError, KeyError):
                    continue
        comps = build_inference(cfg)
        try:
            n = min(args.limit or comps.num_eval_tasks, comps.num_eval_tasks)
            todo = [i for i in range(n) if i not in done]
            chunk = max(1, min(32, comps.runner.config.max_concurrent_episodes // max(args.k, 1)))
            with Progress(transient=True) as bar, open(path, "a", encoding="utf-8") as f:
                task = bar.add_task(f"{tag}", total=n, completed=n - len(todo))
                for s in range(0, len(todo), chunk):
                    ids = todo[s : s + chunk]
                    trajs = comps.eval_runner.run(ids, args.k, 0)
                    for t in trajs:  # group ids are positions in `ids`; map back to task indices
                        t.group_id = ids[t.group_id]
                    for r in problem_records(trajs):
                        done[r["task_index"]] = r
                        f.write(json.dumps(r) + "\n")
                    f.flush()
                    bar.advance(task, len(ids))
        finally:
            comps.close()
        records = [done[i] for i in sorted(done) if i < n]
        m = aggregate(records)
        m["benchmark"] = tag
        rows.append(m)
    _print_table(rows)
    (out_root / "summary.json").write_text(json.dumps(rows, indent=2))
    return 0


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = ["problems", "accuracy"] + sorted(
        {k for r in rows for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:])
    )
    keys += ["mean_turns", "mean_tool_calls", "tool_error_rate", "void_turns_per_episode", "answer_missing_rate"]
    t = Table(title="alp-agent eval")
    t.add_column("benchmark")
    for k in keys:
        t.add_column(k, justify="right")
    for r in rows:
        t.add_row(r["benchmark"], *[f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-" for k in keys])
    Console().print(t)

"""`alp-agent`: train, eval, rollout, envs, export, report.

User mistakes (a broken config, a missing model, an unknown env) end with one line saying what to fix and exit
code 2; only bugs print a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from alp_agent.config_io import ConfigError, load_run_config

EPILOG = "Overrides: any config key as dotted.key=value, e.g. trainer.algo.name=bypass run.iterations=2."


def cmd_train(args: argparse.Namespace) -> int:
    from alp_agent.app.job import train

    cfg = load_run_config(args.config, args.overrides)
    if args.resume and args.run_dir:
        p = Path(args.run_dir)
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"out_dir": str(p.parent), "name": p.name})})
    summary = train(cfg, resume=args.resume, progress=not args.quiet)
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    print(f"run directory: {summary['run_dir']}")
    if before is not None:
        print(f"held-out accuracy before training: {before:.3f}")
    if after is not None:
        print(f"held-out accuracy after training:  {after:.3f}")
    if summary.get("interrupted"):
        print("interrupted: checkpoint written; continue with --resume")
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    import gymnasium as gym

    from envs.registration import load_env_modules

    load_env_modules(args.imports)
    for env_id in sorted(k for k in gym.registry if k.startswith(args.prefix)):
        spec = gym.registry[env_id]
        print(f"{env_id:28s} {spec.entry_point}  {json.dumps(spec.kwargs, default=str)[:80]}")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from alp_agent.app.job import build_inference
    from alp_agent.app.samples import render_episode

    cfg = load_run_config(args.config, args.overrides)
    comps = build_inference(cfg)
    try:
        tasks = list(range(args.start, args.start + args.episodes))
        trajs = comps.runner.run(tasks, 1, 0)
        for t in trajs:
            print(render_episode(t, comps.tokenizer))
        print(json.dumps(comps.runner.last_metrics, indent=1))
    finally:
        comps.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from alp_agent.train.checkpoint import export_run

    ckpt, out = export_run(args.run_dir, args.checkpoint, args.out, args.dtype)
    print(f"exported {ckpt} -> {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from alp_agent.app.plots import write_report
    from alp_agent.app.viewer import write_viewer

    out = write_report(Path(args.run_dir))
    print(f"report: {out}")
    print(f"episode viewer: {write_viewer(Path(args.run_dir))}")
    return 0


def cmd_repro(args: argparse.Namespace) -> int:
    from alp_agent.app.repro_cli import run_repro

    return run_repro(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from alp_agent.app.doctor import run_doctor

    cfg = load_run_config(args.config, args.overrides)
    return run_doctor(cfg, as_json=args.json, prompts=args.prompts, samples=args.samples)


def cmd_eval(args: argparse.Namespace) -> int:
    from alp_agent.app.evaluate_cli import run_eval_command

    return run_eval_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alp-agent", description="Train tool-using LLM agents with RL and ALP.")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="Train with ALP (or a baseline) on a registered env.", epilog=EPILOG)
    t.add_argument("--config", "-c", help="YAML run config (see configs/); defaults apply where absent.")
    t.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="Show third-party logs too.")
    t.add_argument(
        "--resume", action="store_true", help="Continue the run in run.out_dir/run.name from its last checkpoint."
    )
    t.add_argument("--run-dir", help="With --resume: the run directory to continue (instead of out_dir/name).")
    t.add_argument("--quiet", action="store_true", help="No live progress display.")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides.")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="Evaluate a model on math tool benchmarks (avg@k, pass@k).", epilog=EPILOG)
    e.add_argument("--model", required=True, help="'smollm2', a Hugging Face id or folder, or a run directory.")
    e.add_argument(
        "--benchmark",
        "-b",
        action="append",
        required=True,
        help="gsm8k | math500 | aime24 | aime25 | amc23 | synthetic | heldout (the run config's own held-out set) | "
        "path/to/file.jsonl (repeatable).",
    )
    e.add_argument("--k", type=int, default=1, help="Samples per problem (avg@k; pass@j for j <= k).")
    e.add_argument("--limit", type=int, help="First N problems of each benchmark.")
    e.add_argument("--temperature", type=float, help="Sampling temperature (default: 0 = greedy when k=1, else 1.0).")
    e.add_argument("--no-tool", action="store_true", help="No python tool: a single-turn no-tool baseline.")
    e.add_argument(
        "--max-turns", type=int, help="Model turns per episode (default: the run config's; else 10, the paper's)."
    )
    e.add_argument("--out", help="Output folder for per-problem JSONL and the table (default: evals/<model>).")
    e.add_argument(
        "--data-dir", help="Folder with the benchmark JSONL files (default: $ALP_DATA_DIR, else the Hugging Face hub)."
    )
    e.add_argument(
        "--config",
        "-c",
        help="Run config for env/engine/rollout/sandbox settings (default: a run directory's own config.yaml).",
    )
    e.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run config.")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("rollout", help="Sample a few episodes and print them readably.", epilog=EPILOG)
    r.add_argument("--config", "-c")
    r.add_argument("--episodes", "-n", type=int, default=2, help="Episodes to sample.")
    r.add_argument("--start", type=int, default=0, help="Index of the first task.")
    r.add_argument("overrides", nargs="*")
    r.set_defaults(fn=cmd_rollout)

    v = sub.add_parser("envs", help="List registered environments.")
    v.add_argument("--prefix", default="alp/", help="Only ids starting with this ('' = all Gymnasium envs).")
    v.add_argument("--imports", nargs="*", default=[], help="Modules to import first (your own envs).")
    v.set_defaults(fn=cmd_envs)

    x = sub.add_parser("export", help="Write a plain Hugging Face folder (no log-sigmas) from a run's checkpoint.")
    x.add_argument("run_dir", help="Run directory.")
    x.add_argument("--checkpoint", help="Checkpoint folder (default: the latest).")
    x.add_argument("--out", help="Output folder (default: <run_dir>/export).")
    x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="Saved dtype.")
    x.set_defaults(fn=cmd_export)

    rr = sub.add_parser(
        "repro",
        help="Small-scale reproduction of the paper: every arm, one table and plots.",
        epilog=EPILOG + " Overrides apply to every run of the plan.",
    )
    from alp_agent.app.repro_cli import add_arguments as repro_arguments

    repro_arguments(rr)
    rr.set_defaults(fn=cmd_repro)

    d = sub.add_parser(
        "doctor",
        help="Check a run's parts before training: template, masks, logprob parity, ALP noise, sandbox, machine.",
        epilog=EPILOG,
    )
    d.add_argument("--config", "-c", help="YAML run config (the one you will train with).")
    d.add_argument("--json", action="store_true", help="Print the checks as JSON (for scripts).")
    d.add_argument("--prompts", type=int, default=2, help="Tasks sampled for the mask/parity/noise checks.")
    d.add_argument("--samples", type=int, default=2, help="Episodes per task for those checks.")
    d.add_argument("overrides", nargs="*", help="dotted.key=value overrides.")
    d.set_defaults(fn=cmd_doctor)

    rp = sub.add_parser("report", help="Plots (PNG), a markdown summary and the episode viewer (report.html) of a run.")
    rp.add_argument("run_dir", help="Run directory.")
    rp.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:  # vLLM/torch FutureWarnings, vLLM start-up warnings, tqdm bars (issue 15.9)
        from alp_agent.app.progress import quiet_third_party

        quiet_third_party()
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"alp-agent: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"alp-agent: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

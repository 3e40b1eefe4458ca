"""`alp-agent repro` command: run a plan's missing runs, then write its tables and plots.

`--quick` runs configs/repro/quick.yaml (one seed, Seq-ALP vs Seq-Bypass, small batches: the mechanism in minutes,
no statistics); `--mismatch` measures the engine-vs-trainer mismatch of each of the plan's settings on a first batch
before any update (repro_mismatch) and adds it to the results.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

QUICK_PLAN = "configs/repro/quick.yaml"


def run_repro(args: argparse.Namespace) -> int:
    from alp_agent.app.repro import execute, load_plan
    from alp_agent.app.repro_report import write_results

    config = QUICK_PLAN if args.quick else args.config
    plan, cfg_path = load_plan(config, args.overrides)
    out_dir = Path(args.out or plan.out_dir)
    command = "alp-agent " + " ".join(shlex.quote(a) for a in args.argv)  # recorded with the results
    if args.mismatch and not args.dry_run:
        from alp_agent.app.repro_mismatch import measure_regimes

        print(f"mismatch: {measure_regimes(plan, cfg_path, out_dir)}")
    if not args.report_only:
        try:
            execute(plan, cfg_path, out_dir, only=args.only, dry_run=args.dry_run)
        except KeyboardInterrupt:
            print("interrupted: finished runs are kept and the stopped run checkpointed; rerun the command to resume")
            return 130
        finally:
            if not args.dry_run:
                out_dir.mkdir(parents=True, exist_ok=True)
                with open(out_dir / "commands.txt", "a", encoding="utf-8") as f:
                    f.write(command + "\n")
    if not args.dry_run:
        print(f"table: {write_results(plan, out_dir, command, name=Path(config).stem)}")
    return 0


def add_arguments(rr: argparse.ArgumentParser) -> None:
    """The `repro` subcommand's options (the parser itself lives in cli.py)."""
    rr.add_argument("--config", "-c", default="configs/repro/default.yaml", help="Repro plan (configs/repro/).")
    rr.add_argument("--quick", action="store_true", help=f"Run {QUICK_PLAN}: one seed, Seq-ALP vs Seq-Bypass.")
    rr.add_argument(
        "--mismatch",
        action="store_true",
        help="First measure each setting's engine-vs-trainer KL(mu||pi), chi2 and ratio tail before any update.",
    )
    rr.add_argument("--out", help="Output folder (default: the plan's out_dir).")
    rr.add_argument(
        "--only", action="append", help="Only runs whose name contains this (repeatable), e.g. stale4_seq_alp."
    )
    rr.add_argument("--dry-run", action="store_true", help="Validate every run's config and print the commands.")
    rr.add_argument("--report-only", action="store_true", help="Only rebuild the tables and plots from finished runs.")
    rr.add_argument("overrides", nargs="*", help="dotted.key=value overrides for every run.")

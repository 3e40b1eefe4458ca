"""Corrected divergence numbers for the runs logged before issue 13 (results/repro/runs), from what their logs hold.

Those runs logged, per optimizer step, k1' = mean(log pi - log mu) and k3' = mean(e^x - x - 1) with x = log mu - log pi
(the old, unsound estimators), plus the token ratio r = pi/mu's mean, std and count. With these the sound estimators
(alp_agent.train.metrics.divergence_stats) follow exactly:

    k1   = mean(-log r)          = -k1'
    k3   = mean(r - 1 - log r)   = mean(r) - 1 - k1'
    chi2 = mean(r^2) - 1         = std^2 (n-1)/n + mean(r)^2 - 1      (std is the unbiased one, torch.std)
    ESS  = (sum r)^2 / (n sum r^2) = mean(r)^2 / mean(r^2)

r is the training forward's ratio (with ALP's noise where the arm has it), so these are train-vs-engine divergences of
the policy the loss saw; for arms without noise that is the clean policy. The KL-spike threshold is recomputed as
`SPIKE_FACTOR` x the median corrected k3 at the first step of each batch (theta = theta_old: the mismatch alone), the
rule the old tables used with the old estimator. `python -m alp_agent.app.repro_legacy results/repro` writes
corrected.md and corrected.json there. Kept apart from the new study's code (alp_agent.app.repro*).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

SPIKE_FACTOR = 100.0  # the old tables' rule: "100x the mismatch alone"
OLD_THRESHOLD = 0.1  # what the old tables counted spikes against (old k3')
_NAME = re.compile(r"^(stale\d+)_(.+)_s(\d+)$")


def corrected_step(rec: dict, prefix: str = "kl_train_infer/noisy") -> dict[str, float] | None:
    """The sound estimators of one logged step record (None when the record lacks the inputs)."""
    try:
        k1_old, mean = float(rec[f"{prefix}/k1"]), float(rec["ratio_token_vs_infer/mean"])
        std, n = float(rec["ratio_token_vs_infer/std"]), float(rec["tokens"])
    except KeyError:
        return None
    m2 = std * std * (n - 1) / n + mean * mean if n > 0 else float("nan")
    return {"k1": -k1_old, "k3": mean - 1.0 - k1_old, "chi2": m2 - 1.0, "ess": mean * mean / m2}


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_summary(run_dir: Path) -> dict | None:
    """Corrected per-step series and their summaries for one run folder, with the old values beside them."""
    recs = _records(run_dir)
    steps = [r for r in recs if r.get("kind") == "step"]
    m = _NAME.match(run_dir.name)
    if not steps or m is None:
        return None
    per_batch = int(m.group(1)[len("stale") :])
    rows = [(int(r["step"]), corrected_step(r), r) for r in steps]
    rows = [(s, c, r) for s, c, r in rows if c is not None]
    k3 = [c["k3"] for _, c, _ in rows]
    old_k3 = [float(r["kl_train_infer/clean/k3"]) for _, _, r in rows if "kl_train_infer/clean/k3" in r]
    summary_path = run_dir / "summary.json"
    acc = json.loads(summary_path.read_text()).get("accuracy_after") if summary_path.exists() else None
    old_infer = [-float(r["kl_old_infer/k1"]) for r in recs if r.get("kind") == "batch" and "kl_old_infer/k1" in r]
    return {
        "setting": m.group(1),
        "arm": m.group(2),
        "seed": int(m.group(3)),
        "acc_final": acc,
        "steps": len(rows),
        "k3_first_steps": [c["k3"] for s, c, _ in rows if (s - 1) % per_batch == 0],
        "k3_series": k3,
        "k3_peak": max(k3),
        "k3_mean": statistics.fmean(k3),
        "k1_peak": max(c["k1"] for _, c, _ in rows),
        "chi2_peak": max(c["chi2"] for _, c, _ in rows),
        "ess_min": min(c["ess"] for _, c, _ in rows),
        "ess_mean": statistics.fmean(c["ess"] for _, c, _ in rows),
        "old_k3_peak": max(old_k3) if old_k3 else None,
        "old_k3_mean": statistics.fmean(old_k3) if old_k3 else None,
        "old_spikes": sum(k > OLD_THRESHOLD for k in old_k3),
        "kl_old_infer_k1_mean": statistics.fmean(old_infer) if old_infer else None,
    }


def spike_threshold(runs: list[dict]) -> tuple[float, float]:
    """(median corrected mismatch k3 at batch-first steps over all runs, SPIKE_FACTOR x that)."""
    first = [k for r in runs for k in r["k3_first_steps"]]
    med = statistics.median(first) if first else float("nan")
    return med, SPIKE_FACTOR * med


def _fmt(v, spec: str = "{:.3g}") -> str:
    return "-" if v is None else spec.format(v)


def render(runs: list[dict], mismatch: float, threshold: float) -> str:
    head = [
        "# Corrected divergence numbers of the pre-issue-13 runs (old verdicts superseded)",
        "",
        "Built by `python -m alp_agent.app.repro_legacy results/repro` from `runs/*/metrics.jsonl` (docstring of "
        "alp_agent/app/repro_legacy.py for the formulas). KL = train-vs-engine KL(mu||pi) on mu's samples; k3 = "
        "mean(r - 1 - log r) with r = pi/mu of the training forward (ALP's noise included where the arm has it). "
        "chi2 = mean(r^2) - 1, ESS = (sum r)^2 / (n sum r^2), per optimizer step. The old columns are what the "
        "tables in default.md / sweep.md / seeds.md used: k3' = mean(mu/pi - 1 + log(pi/mu)), not a KL.",
        "",
        f"Mismatch alone (median corrected k3 at the first step of each batch, all runs): {mismatch:.3g}. "
        f"KL-spike threshold = {SPIKE_FACTOR:g} x that = {threshold:.3g} (old: {OLD_THRESHOLD:g} on k3').",
        "",
        "| run | final acc | k3 peak | k3 mean | spikes | k1 peak | chi2 peak | ESS min | ESS mean | "
        "old k3' peak | old k3' mean | old spikes | kl_old_infer k1 (batch mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = []
    for r in sorted(runs, key=lambda r: (r["setting"], r["arm"], r["seed"])):
        spikes = sum(k > threshold for k in r["k3_series"])
        cells = [f"{r['setting']}_{r['arm']}_s{r['seed']}", _fmt(r["acc_final"], "{:.3f}"), _fmt(r["k3_peak"])]
        cells += [_fmt(r["k3_mean"]), str(spikes), _fmt(r["k1_peak"]), _fmt(r["chi2_peak"])]
        cells += [_fmt(r["ess_min"], "{:.3f}"), _fmt(r["ess_mean"], "{:.3f}"), _fmt(r["old_k3_peak"])]
        cells += [_fmt(r["old_k3_mean"]), str(r["old_spikes"]), _fmt(r["kl_old_infer_k1_mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + lines) + "\n"


def main(out_dir: str = "results/repro") -> None:
    root = Path(out_dir)
    runs = [s for d in sorted((root / "runs").iterdir()) if d.is_dir() and (s := run_summary(d)) is not None]
    mismatch, threshold = spike_threshold(runs)
    (root / "corrected.md").write_text(render(runs, mismatch, threshold))
    slim = [{k: v for k, v in r.items() if k != "k3_series"} for r in runs]
    payload = {"mismatch_k3": mismatch, "spike_threshold": threshold, "runs": slim}
    (root / "corrected.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"{len(runs)} runs; mismatch k3 {mismatch:.3g}; spike threshold {threshold:.3g} -> {root / 'corrected.md'}")


if __name__ == "__main__":
    main(*sys.argv[1:2])

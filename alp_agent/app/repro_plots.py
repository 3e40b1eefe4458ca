"""Figures of `alp-agent repro`: per group and setting, the mechanism over steps (sequence-ratio envelope, clean
KL(mu||pi), reward and held-out accuracy; mean over seeds with a min..max band) and the claims (every seed as a point,
the mean with its 95 % t interval per arm)."""

from __future__ import annotations

import math
from pathlib import Path

from alp_agent.app.repro import ReproGroup, ReproPlan, RunSpec
from alp_agent.app.repro_stats import CLAIMS, finite_values, mean_ci


def _records(run_dir: Path) -> dict[str, list[dict]]:
    from alp_agent.app.plots import read_metrics

    return read_metrics(run_dir)


def _step_series(recs: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in recs if r.get(key) is not None and math.isfinite(float(r[key]))}


def _seed_band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over seeds at the steps every seed has."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    mean = [sum(s[x] for s in series) / len(series) for x in common]
    return common, mean, [min(s[x] for s in series) for x in common], [max(s[x] for s in series) for x in common]


def _save(fig, out: Path) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _draw_arm(axes, a: str, color: str, recs: list[dict]) -> None:
    """One arm's lines on the three panels (recs: each finished seed's records by kind)."""
    # (1) envelope of the sequence ratio vs mu over batches (all sequences of the batch), seed 0 shaded
    b = recs[0].get("batch", [])
    lo, hi = _step_series(b, "ratio_seq_vs_infer/p2"), _step_series(b, "ratio_seq_vs_infer/p98")
    xs = sorted(set(lo) & set(hi))
    if xs:
        axes[0].fill_between(xs, [lo[x] for x in xs], [hi[x] for x in xs], color=color, alpha=0.15)
        axes[0].plot(xs, [hi[x] for x in xs], color=color, label=a)
        axes[0].plot(xs, [lo[x] for x in xs], color=color, linestyle="--")
    # (2) clean train-inference KL per optimizer step: mean over seeds, band = min..max
    x, m, mn, mxs = _seed_band([_step_series(r.get("step", []), "kl_train_infer/clean/k3") for r in recs])
    if x:
        axes[1].plot(x, m, color=color, label=a)
        if len(recs) > 1:
            axes[1].fill_between(x, mn, mxs, color=color, alpha=0.15)
    # (3) rollout reward per batch (solid) and held-out accuracy (markers)
    x, m, mn, mxs = _seed_band([_step_series(r.get("batch", []), "reward/mean") for r in recs])
    if x:
        axes[2].plot(x, m, color=color, label=f"{a} reward")
        if len(recs) > 1:
            axes[2].fill_between(x, mn, mxs, color=color, alpha=0.15)
    x, m, _, _ = _seed_band([_step_series(r.get("eval", []), "accuracy") for r in recs])
    if x:
        axes[2].plot(x, m, color=color, marker="o", linestyle=":", label=f"{a} held-out acc")


def plot_group(
    plan: ReproPlan, g: ReproGroup, setting: str, runs_dir: Path, out: Path, kl_threshold: float | None = None
) -> Path | None:
    """Three panels over optimizer steps / batches: sequence-ratio P2-P98 envelope, clean KL, reward and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    drawn = False
    for i, a in enumerate(g.arms):
        recs = [
            _records(d)
            for d in (runs_dir / RunSpec(a, setting, seed).name for seed in g.seeds)
            if (d / "metrics.jsonl").is_file()
        ]
        if recs:
            drawn = True
            _draw_arm(axes, a, f"C{i % 10}", recs)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(
        title="sequence ratio vs mu: P98 (solid) and P2 (dashed), per batch", xlabel="rollout batch", yscale="log"
    )
    if kl_threshold is not None:
        axes[1].axhline(kl_threshold, color="grey", linestyle=":", label="spike threshold")
    axes[1].set(title="clean train-vs-engine KL(μ‖π) (k3)", xlabel="optimizer step", yscale="log")
    axes[2].set(title="reward (line) and held-out accuracy (markers)", xlabel="rollout batch")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{g.name} / {setting}")
    return _save(fig, out)


def plot_claims(g: ReproGroup, setting: str, per_run: dict[str, dict], out: Path) -> Path | None:
    """One panel per claim: every finished seed of every arm as a point, the arm's mean with its 95 % t interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {a: [per_run.get(RunSpec(a, setting, s).name) for s in g.seeds] for a in g.arms}
    rows = {a: [r for r in rs if r and r["done"]] for a, rs in rows.items()}
    if not any(rows.values()):
        return None
    fig, axes = plt.subplots(1, len(CLAIMS), figsize=(3.6 * len(CLAIMS), 4))
    for ax, c in zip(axes, CLAIMS):
        _claim_panel(ax, c, g.arms, rows)
    fig.suptitle(
        f"{g.name} / {setting}: seeds (points), mean and 95 % t interval (black; an interval wider than the panel "
        "is cut at its edge and printed in grey)"
    )
    return _save(fig, out)


def _claim_panel(ax, c, arms: list[str], rows: dict[str, list[dict]]) -> None:
    """One claim: the seeds as points, each arm's mean and interval beside them. The y range follows the points
    (with 2-3 seeds a t interval can be 10x wider than the data and would squash them to a line); an interval cut
    by it is written out."""
    points: list[float] = []
    cut: list[tuple[int, float, float]] = []
    for i, a in enumerate(arms):
        vals = finite_values(rows[a], c.key)
        if not vals:
            continue
        points += vals
        jitter = [i + 0.08 * (k - (len(vals) - 1) / 2) for k in range(len(vals))]
        ax.scatter(jitter, vals, s=14, color=f"C{i % 10}", alpha=0.7)
        iv = mean_ci(vals)
        if iv.n >= 2:
            ax.errorbar([i + 0.3], [iv.mean], yerr=[[iv.mean - iv.lo], [iv.hi - iv.mean]], fmt="_", color="k")
            cut.append((i, iv.lo, iv.hi))
        else:
            ax.plot([i + 0.3], [iv.mean], marker="_", color="k")
    if points:
        pad = max(0.25 * (max(points) - min(points)), 0.05 * max(abs(p) for p in points), 1e-6)
        lo, hi = min(points) - pad, max(points) + pad
        ax.set_ylim(lo, hi)
        for i, a_lo, a_hi in cut:
            if a_lo < lo or a_hi > hi:
                ax.text(i + 0.35, hi, f"[{a_lo:.3g}, {a_hi:.3g}]", fontsize=6, color="0.4", va="top", rotation=90)
    ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=7)
    ax.set_title(c.name, fontsize=7)
    ax.grid(alpha=0.3)

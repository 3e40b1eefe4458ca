"""`alp-agent report`: PNG plots and a markdown summary from a run directory's metrics.jsonl (the episode viewer,
report.html, is alp_agent.app.viewer).

Works on a running run too (it only reads what has been flushed). Plots: reward and held-out accuracy, the
sequence-ratio quantile envelope over steps, train-inference KL, sigma per layer, tool calls per episode.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

from alp_agent.app.jsonl import read_records

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """Records of metrics.jsonl grouped by kind; unreadable (half-written) lines are skipped."""
    out: dict[str, list[dict]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory?")
    for rec in read_records(path):
        out.setdefault(rec.get("kind", "?"), []).append(rec)
    return out


def series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _first_key(recs: list[dict], *keys: str) -> str | None:
    for k in keys:
        if any(r.get(k) is not None for r in recs):
            return k
    return None


def envelope(ax, recs: list[dict], prefix: str, label: str, color: str | None = None) -> bool:
    """Shade the P2..P98 band of a ratio over steps (falls back to P1..P99 / P5..P95), with the median line."""
    lo = _first_key(recs, f"{prefix}/p2", f"{prefix}/p1", f"{prefix}/p5")
    hi = {f"{prefix}/p2": f"{prefix}/p98", f"{prefix}/p1": f"{prefix}/p99", f"{prefix}/p5": f"{prefix}/p95"}.get(
        lo or ""
    )
    if lo is None or hi is None:
        return False
    x, ylo = series(recs, lo)
    _, yhi = series(recs, hi)
    xm, ym = series(recs, f"{prefix}/p50")
    n = min(len(x), len(ylo), len(yhi))
    line = ax.plot(xm, ym, label=f"{label} median", color=color)[0]
    ax.fill_between(
        x[:n],
        ylo[:n],
        yhi[:n],
        alpha=0.25,
        color=line.get_color(),
        label=f"{label} {lo.rsplit('/', 1)[1].upper()}-{hi.rsplit('/', 1)[1].upper()}",
    )
    return True


class _Figures:
    """Writes one PNG per plot into `folder`; a plot whose `draw(ax)` returns False (nothing to show) is skipped."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.made: list[str] = []

    def plot(self, name: str, title: str, xlabel: str, draw) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        try:
            if draw(ax) is False:
                return
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            fig.tight_layout()
            fig.savefig(self.folder / name, dpi=110)
            self.made.append(name)
        finally:
            plt.close(fig)


def _draw_reward(batch: list[dict], ev: list[dict]):
    def draw(ax) -> None:
        ax.plot(*series(batch, "reward/mean"), marker="o", label="train reward (mean)")
        if ev:
            ax.plot(*series(ev, "accuracy"), marker="s", label="held-out accuracy")

    return draw


def _draw_ratio_envelope(step: list[dict]):
    def draw(ax) -> bool:
        prefix = "ratio_seq_vs_infer" if _first_key(step, "ratio_seq_vs_infer/p50") else "ratio_seq_vs_old"
        if not envelope(ax, step, prefix, "sequence ratio"):
            return False
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.5)
        return True

    return draw


def _draw_kl(step: list[dict]):
    def draw(ax) -> None:
        for key, label in [
            ("kl_train_infer/noisy/k3", "KL(μ‖π perturbed) k3"),
            ("kl_train_infer/clean/k3", "KL(μ‖π clean) k3"),
            ("kl_noise/exact", "noise alone, exact KL(clean‖perturbed)"),
        ]:
            x, y = series(step, key)
            if y:
                ax.plot(x, y, label=label)
        ax.set_yscale("symlog", linthresh=1e-6)

    return draw


def _draw_sigma(step: list[dict], layer_keys: list[str]):
    def draw(ax) -> bool:
        cmap = plt.get_cmap("viridis")
        for i, k in enumerate(layer_keys):
            ax.plot(*series(step, k), color=cmap(i / max(len(layer_keys) - 1, 1)), lw=1)
        ax.set_ylabel("sigma")
        return bool(layer_keys)

    return draw


def _draw_tools(batch: list[dict]):
    def draw(ax) -> None:
        ax.plot(*series(batch, "tools/calls_per_episode"), marker="o", label="tool calls / episode")
        ax.plot(*series(batch, "turns/mean"), marker="x", label="turns / episode")

    return draw


SUMMARY_KEYS = (
    "reward/mean",
    "ratio_token_vs_infer/p99_9",
    "ratio_token_vs_infer/max",
    "ratio_seq_vs_infer/p50",
    "steps_mean/kl_train_infer/noisy/k3",
    "steps_mean/kl_train_infer/clean/k3",
    "sigma/mean",
    "tools/calls_per_episode",
    "skipped_steps_total",
    "time/update",
)


def _summary_md(run_dir: Path, batch: list[dict], ev: list[dict], made: list[str]) -> str:
    lines = [f"# Run report: {run_dir.name}", ""]
    if ev:
        accs = [f"batch {r['step']}: {r.get('accuracy', float('nan')):.3f}" for r in ev]
        lines += ["Held-out accuracy: " + " -> ".join(accs), ""]
    if batch:
        last = batch[-1]
        lines += ["| metric (last batch) | value |", "|---|---|"]
        lines += [f"| {k} | {last[k]:.4g} |" for k in SUMMARY_KEYS if last.get(k) is not None]
        lines.append("")
    if (run_dir / "report.html").is_file() or (run_dir / "episodes.jsonl").is_file():
        lines += ["Episodes token by token, with the ratio tail by turn: [report.html](report.html)", ""]
    lines += [f"![{p}](plots/{p})" for p in made]
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write plots/*.png and report.md into the run directory; returns the report path."""
    m = read_metrics(run_dir)
    batch, step, ev = m.get("batch", []), m.get("step", []), m.get("eval", [])
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    figs = _Figures(plots)
    layer_keys = sorted(
        {k for r in step for k in r if k.startswith("sigma/layer_")}, key=lambda k: int(k.rsplit("_", 1)[1])
    )
    figs.plot("reward.png", "reward and accuracy", "batch", _draw_reward(batch, ev))
    figs.plot("ratio_envelope.png", "sequence importance ratio envelope", "optimizer step", _draw_ratio_envelope(step))
    figs.plot("kl.png", "train-inference KL", "optimizer step", _draw_kl(step))
    title = f"sigma per layer ({len(layer_keys)} layers, dark = first)"
    figs.plot("sigma.png", title, "optimizer step", _draw_sigma(step, layer_keys))
    figs.plot("tools.png", "tool use", "batch", _draw_tools(batch))
    out = run_dir / "report.md"
    out.write_text(_summary_md(run_dir, batch, ev, figs.made), encoding="utf-8")
    return out

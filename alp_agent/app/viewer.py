"""The episode viewer: `<run_dir>/report.html`, one self-contained file (inline CSS, JS and PNG plots; no network).

Every logged episode (alp_agent.train.episode_log) token by token, coloured by role (model / tool output /
template) or, switchable, by its log-ratio trainer-vs-engine, clean theta_old or perturbed (ALP); hovering a token
shows it with the engine's and the trainer's logprobs and the ratio. Above them the tail panel: ratio quantiles and
ESS by model-turn index and for the first tokens after a tool observation (alp_agent.app.ratio_tail).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from alp_agent.app.jsonl import read_records
from alp_agent.app.ratio_tail import TailRow, metrics_tail, tail_table
from alp_agent.train.episode_log import EpisodeLog, read_episodes

ROLE_COLOURS = {"model": "#cfe3ff", "tool": "#d6f5d6", "template": "#e4e4e4"}
MAX_EPISODES = 64  # the newest ones; older episodes stay in episodes.jsonl

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
.legend span.sw{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #aaa;font-family:monospace}
.controls{margin:.6em 0} .controls label{margin-right:1em}
pre.tokens{white-space:pre-wrap;word-break:break-word;font-size:13px;line-height:1.5;border:1px solid #ddd;padding:8px}
.tok{border-radius:2px}
.r-model{background:#cfe3ff} .r-tool{background:#d6f5d6} .r-template{background:#e4e4e4;color:#666}
details.prompt pre{white-space:pre-wrap;color:#555;font-size:12px}
.episode h3{font-size:1em;margin:1.2em 0 .3em}
table.tail{border-collapse:collapse;font-size:13px} table.tail td,table.tail th{border:1px solid #ccc;padding:2px 8px;
text-align:right} table.tail td:first-child{text-align:left}
#tip{position:fixed;display:none;background:#fff;border:1px solid #444;padding:6px;font:12px monospace;
white-space:pre;pointer-events:none;z-index:10;box-shadow:2px 2px 6px #888}
.plots img{max-width:48%;margin-right:1%}
.note{color:#666;font-size:.9em}
"""

JS = """
const toks = () => document.querySelectorAll('.tok');
function ratioColour(lr){
  if (lr === null || isNaN(lr)) return '#f4f4f4';
  const a = Math.min(Math.abs(lr) / 0.5, 1);
  return lr > 0 ? `rgba(220,40,40,${0.12 + 0.88*a})` : `rgba(40,90,220,${0.12 + 0.88*a})`;
}
function num(s){ return s === '' || s === undefined ? null : parseFloat(s); }
function setMode(mode){
  document.body.dataset.mode = mode;
  toks().forEach(t => {
    if (mode === 'role') { t.style.background = ''; return; }
    const tr = num(mode === 'clean' ? t.dataset.c : t.dataset.n);
    t.style.background = t.dataset.role === 'model' && tr !== null ? ratioColour(tr - num(t.dataset.e)) : '#f4f4f4';
  });
}
function fmt(x){ return x === null ? 'n/a' : x.toFixed(4); }
document.addEventListener('DOMContentLoaded', () => {
  document.querySelectorAll('input[name=mode]').forEach(r => r.addEventListener('change', e => setMode(e.target.value)));
  const tip = document.getElementById('tip');
  document.querySelectorAll('pre.tokens').forEach(p => {
    p.addEventListener('mousemove', ev => {
      const t = ev.target.closest('.tok');
      if (!t) { tip.style.display = 'none'; return; }
      const e = num(t.dataset.e), c = num(t.dataset.c), n = num(t.dataset.n);
      const lines = [`token ${JSON.stringify(t.textContent)}  id ${t.dataset.id}  (${t.dataset.role})`];
      if (t.dataset.role === 'model') {
        lines.push(`engine  log mu      ${fmt(e)}`);
        lines.push(`trainer log pi      ${fmt(c)}` + (c === null ? '' : `   ratio ${Math.exp(c - e).toFixed(4)}`));
        if (n !== null) lines.push(`perturbed log pi    ${fmt(n)}   ratio ${Math.exp(n - e).toFixed(4)}`);
      }
      tip.textContent = lines.join('\\n');
      tip.style.display = 'block';
      tip.style.left = (ev.clientX + 14) + 'px'; tip.style.top = (ev.clientY + 14) + 'px';
    });
    p.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
  });
  const start = (location.hash.match(/mode=(role|clean|noisy)/) || [])[1] || 'role';  // e.g. report.html#mode=clean
  document.querySelector(`input[name=mode][value=${start}]`).checked = true;
  setMode(start);
  document.body.dataset.ready = '1';
});
"""


def _attr(x: float | None) -> str:
    return "" if x is None else f"{x:.5g}"


def render_tokens(e: EpisodeLog) -> str:
    """The completion as <span class="tok r-ROLE" data-...> elements, one per token (pieces HTML-escaped)."""
    t = e.tokens
    out = []
    for i, (tid, piece, role) in enumerate(zip(t.ids, t.pieces, t.roles)):
        c = t.clean[i] if t.clean is not None and i < len(t.clean) else None
        n = t.noisy[i] if t.noisy is not None and i < len(t.noisy) else None
        out.append(
            f'<span class="tok r-{html.escape(role)}" data-role="{html.escape(role)}" data-id="{tid}" '
            f'data-e="{_attr(t.engine[i]) if role == "model" else ""}" data-c="{_attr(c) if role == "model" else ""}" '
            f'data-n="{_attr(n) if role == "model" else ""}">{html.escape(piece)}</span>'
        )
    return "".join(out)


def render_episode(e: EpisodeLog, open_: bool) -> str:
    head = (
        f"batch {e.batch} · task {e.task_index} · sample {e.sample_index} · reward {e.reward:.2f} · "
        f"turns {e.num_turns} · tool calls {e.num_tool_calls} · {html.escape(e.finish_reason)} · "
        f"T={e.temperature:g} · policy v{e.policy_version}"
    )
    return (
        f'<div class="episode" data-batch="{e.batch}"><details{" open" if open_ else ""}><summary><b>{head}</b>'
        f'</summary><details class="prompt"><summary>prompt</summary><pre>{html.escape(e.prompt)}</pre></details>'
        f'<pre class="tokens">{render_tokens(e)}</pre></details></div>'
    )


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


COLUMNS = ("p1", "p50", "p99", "p99.9", "max")


def tail_plots(tables: dict[str, list[TailRow]]) -> list[str]:
    """Two PNGs (data URIs): ratio quantiles per token group (log scale) and ESS per group, one series per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"p99": "--", "p99.9": "-"}  # the tail (p50 is ~1 everywhere; the table has p1..max)
    uris = []
    for what in ("quantiles", "ess"):
        fig, ax = plt.subplots(figsize=(5.6, 3.4))
        try:
            for n, (source, rows) in enumerate(tables.items()):
                colour = f"C{n}"
                x = [r.group.replace(" model tokens", "").replace(" after tool", "\nafter tool") for r in rows]
                short = source.split(" (")[0]
                if what == "ess":
                    ax.plot(x, [r.ess for r in rows], marker="o", label=short, color=colour)
                    ax.set_ylim(0, 1.05)
                    continue
                for q, style in styles.items():
                    if all(q in r.quantiles for r in rows):
                        label = short if q == "p99.9" else None  # one legend entry per source
                        ax.plot(x, [r.quantiles[q] for r in rows], style, marker=".", label=label, color=colour)
                ax.set_yscale("log")
                ax.axhline(1.0, color="gray", lw=0.5)
            ax.set_title("ratio pi/mu: p99 (dashed), p99.9" if what == "quantiles" else "normalised ESS of pi/mu")
            ax.tick_params(axis="x", labelsize=8)
            ax.legend(fontsize=7)
            fig.tight_layout()
            uris.append(_png(fig))
        finally:
            plt.close(fig)
    return uris


def _cell(x: float | None, digits: str = ".4f") -> str:
    return "-" if x is None or x != x else format(x, digits)


def render_tail(episodes: Sequence[EpisodeLog], metrics_batches: Sequence[dict] = ()) -> str:
    """The tail table and plots: from the trainer's own metrics (every model token of the last batch) when they
    have the tail panel, and from the logged episodes (theta_old, clean and perturbed)."""
    tables: dict[str, list[TailRow]] = {}
    from_metrics = metrics_tail(metrics_batches)
    if from_metrics is not None and from_metrics[1]:
        tables[f"training (metrics, batch {from_metrics[0]}, every model token)"] = from_metrics[1]
    for kind, label in (("clean", "clean θ_old"), ("noisy", "perturbed")):
        rows = tail_table(episodes, kind)
        if rows:
            tables[f"{label} (logged episodes)"] = rows
    if not tables:
        return '<p class="note">No trainer logprobs logged: no ratio tail to show.</p>'
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    parts = [
        f'<table class="tail"><tr><th>tokens of</th><th>source</th><th>n</th>{head}<th>ESS</th>'
        "<th>mean |log r|</th></tr>"
    ]
    for source, rows in tables.items():
        for r in rows:
            qs = "".join(f"<td>{_cell(r.quantiles.get(c))}</td>" for c in COLUMNS)
            parts.append(
                f"<tr><td>{html.escape(r.group)}</td><td>{html.escape(source)}</td><td>{r.tokens}</td>{qs}"
                f"<td>{_cell(r.ess)}</td><td>{_cell(r.mean_abs_log_ratio)}</td></tr>"
            )
    parts.append("</table>")
    imgs = "".join(f'<img alt="tail plot" src="{u}">' for u in tail_plots(tables))
    parts.append(f'<div class="plots">{imgs}</div>')
    return "".join(parts)


def legend() -> str:
    roles = "".join(f'<span class="sw r-{r}" data-legend="{r}">{r}</span>' for r in ROLE_COLOURS)
    ratio = (
        '<span class="sw" style="background:rgba(40,90,220,1);color:#fff">log r &lt; -0.5</span>'
        '<span class="sw" style="background:rgba(40,90,220,.3)">log r &lt; 0</span>'
        '<span class="sw" style="background:rgba(220,40,40,.3)">log r &gt; 0</span>'
        '<span class="sw" style="background:rgba(220,40,40,1);color:#fff">log r &gt; 0.5</span>'
    )
    return (
        f'<div class="legend" id="legend"><b>roles:</b> {roles} &nbsp; <b>log-ratio trainer vs engine:</b> {ratio}</div>'
        '<div class="controls"><b>colour by:</b> '
        '<label><input type="radio" name="mode" value="role" checked> role</label>'
        '<label><input type="radio" name="mode" value="clean"> log-ratio clean θ_old</label>'
        '<label><input type="radio" name="mode" value="noisy"> log-ratio perturbed (ALP)</label></div>'
    )


def render_html(run_name: str, episodes: Sequence[EpisodeLog], metrics_batches: Sequence[dict] = ()) -> str:
    shown = list(episodes)[-MAX_EPISODES:]
    noisy = any(e.tokens.noisy is not None for e in shown)
    exact = all(e.noisy_is_exact for e in shown if e.tokens.noisy is not None)
    note = (
        "Perturbed logprobs: "
        + (
            "the update's own noise draw."
            if exact
            else "a fresh noise draw at the current σ (the update's distribution, not its exact draw)."
        )
        if noisy
        else "No perturbed logprobs (the algorithm adds no noise)."
    )
    body = "".join(render_episode(e, i < 3) for i, e in enumerate(reversed(shown)))
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>episodes: {html.escape(run_name)}</title>"
        f"<style>{CSS}</style><script>{JS}</script></head><body data-mode='role'>"
        f"<h1>Episodes of run {html.escape(run_name)}</h1>"
        f'<p class="note">{len(shown)} of {len(episodes)} logged episodes (newest first). {note} '
        "Hover a token for its logprobs; r = π/μ = exp(trainer − engine).</p>"
        f"{legend()}<h2>Ratio tail by turn and after tool observations</h2><div id='tail'>{render_tail(shown, metrics_batches)}</div>"
        f"<h2>Episodes</h2><div id='episodes'>{body or '<p>No episodes logged.</p>'}</div><div id='tip'></div>"
        f"<script type='application/json' id='meta'>{json.dumps({'episodes': len(shown)})}</script></body></html>"
    )


def _batch_records(run_dir: Path) -> list[dict]:
    """The `kind: batch` records of metrics.jsonl (none when the run has no metrics yet; bad lines skipped)."""
    path = run_dir / "metrics.jsonl"
    return [r for r in read_records(path) if r.get("kind") == "batch"] if path.is_file() else []


def write_viewer(run_dir: Path) -> Path:
    """Write `<run_dir>/report.html` from `<run_dir>/episodes.jsonl`; returns its path."""
    run_dir = Path(run_dir)
    batches = _batch_records(run_dir)
    out = run_dir / "report.html"
    out.write_text(render_html(run_dir.name, read_episodes(run_dir), batches), encoding="utf-8")
    return out

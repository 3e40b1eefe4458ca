"""The live progress display of `alp-agent train`: phase, batch, reward, KL, ratio tail, ETA (rich).

Falls back to one plain log line per event when stdout is not a terminal (CI logs, pipes), so nothing is lost.
"""

from __future__ import annotations

import sys
import time
from typing import Self

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


class Progress:
    def __init__(self, enabled: bool = True, total: int = 1):
        self.enabled = enabled
        self.total = total
        self.console = Console(stderr=True)
        self.live_mode = enabled and self.console.is_terminal
        self.state: dict = {"phase": "", "batch": 0, "metrics": {}, "eval_acc": None, "eval_hist": []}
        self.t0 = time.time()
        self.batch_times: list[float] = []
        self._live: Live | None = None

    def __enter__(self) -> Self:
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def _render(self) -> Table:
        s, m = self.state, self.state["metrics"]
        t = Table(title="alp-agent train", show_header=False, expand=False)
        t.add_column(style="bold cyan")
        t.add_column()
        elapsed = time.time() - self.t0
        eta = "-"
        if self.batch_times:
            per = sum(self.batch_times) / len(self.batch_times)
            eta = f"{per * max(self.total - s['batch'], 0):.0f}s"
        t.add_row("phase", s["phase"])
        t.add_row("batch", f"{s['batch']}/{self.total}   elapsed {elapsed:.0f}s   ETA {eta}")
        t.add_row("reward", _fmt(m.get("reward/mean")))
        t.add_row("eval accuracy", " -> ".join(_fmt(a, ".3f") for a in s["eval_hist"]) or "-")
        t.add_row("KL train-infer (k3)", _fmt(m.get("steps_mean/kl_train_infer/noisy/k3")))
        tail = m.get("ratio_token_vs_infer/p99_9", m.get("ratio_token_vs_old/p99_9"))
        seq_lo = m.get("ratio_seq_vs_infer/p2", m.get("ratio_seq_vs_infer/p1"))
        t.add_row("token ratio p99.9 / max", f"{_fmt(tail)} / {_fmt(m.get('ratio_token_vs_infer/max'))}")
        t.add_row("seq ratio P2..P98", f"{_fmt(seq_lo)} .. {_fmt(m.get('ratio_seq_vs_infer/p98'))}")
        t.add_row("sigma mean", _fmt(m.get("sigma/mean")))
        t.add_row("tool calls / episode", _fmt(m.get("tools/calls_per_episode")))
        return t

    def _refresh(self, line: str | None = None) -> None:
        if self._live is not None:
            self._live.update(self._render())
        elif self.enabled and line:
            print(f"[alp-agent {time.time() - self.t0:7.1f}s] {line}", file=sys.stderr, flush=True)

    def phase(self, name: str) -> None:
        self.state["phase"] = name
        self._refresh(name)

    def note(self, text: str) -> None:
        if self._live is not None:
            self.console.print(text)
        elif self.enabled:
            self._refresh(text)

    def update(self, batch: int | None = None, metrics: dict | None = None, eval_acc: float | None = None) -> None:
        line = None
        if batch is not None:
            self.batch_times.append(time.time() - self.t0 - sum(self.batch_times))
            self.state["batch"] = batch
            self.state["metrics"] = metrics or {}
            m = self.state["metrics"]
            line = (
                f"batch {batch}/{self.total} reward {_fmt(m.get('reward/mean'))} "
                f"kl {_fmt(m.get('steps_mean/kl_train_infer/noisy/k3'))} "
                f"tok-ratio p99.9 {_fmt(m.get('ratio_token_vs_infer/p99_9'))} "
                f"sigma {_fmt(m.get('sigma/mean'))}"
            )
        if eval_acc is not None:
            self.state["eval_acc"] = eval_acc
            self.state["eval_hist"].append(eval_acc)
            line = f"eval accuracy {eval_acc:.3f}"
        self._refresh(line)


def quiet_third_party() -> None:
    """Hide third-party noise (issue 15.9): FutureWarning/DeprecationWarning from vLLM, torch and transformers, vLLM's
    INFO/WARNING start-up lines (the NUMA-binding and thread-reduction warnings among them) and raw tqdm bars (the GGUF
    conversion's and vLLM's weight loading). Our own progress lines are untouched. `alp-agent --verbose` skips this.
    Environment values a user set win (setdefault); call it before vLLM is imported (it reads its level then)."""
    import logging
    import os
    import warnings

    for cat in (FutureWarning, DeprecationWarning, UserWarning):
        for mod in ("vllm", "torch", "transformers", "gguf", "triton", "huggingface_hub", "pydantic"):
            warnings.filterwarnings("ignore", category=cat, module=mod)
    warnings.filterwarnings("ignore", message=".*reduce_op.*is deprecated.*")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66 reads it: every bar, whoever opens it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # C++ warnings (vLLM's NUMA binding); read when torch loads
    for name in ("vllm", "transformers", "torch", "gguf"):
        logging.getLogger(name).setLevel(logging.ERROR)

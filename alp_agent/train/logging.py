"""The one metrics writer: every record goes to a JSONL file and (optionally) TensorBoard and wandb.

Each JSONL line is {"kind": "step" | "batch" | "eval" | ..., "step": int, "time": unix, **metrics}; TensorBoard tags
are "<kind>/<metric name>".
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(
        self,
        log_dir: str | Path | None,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_config: dict | None = None,
    ) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.log_dir / "tb"))
        if wandb_project:
            import wandb  # optional dependency: pip install alp-agent[wandb]

            self._wandb = wandb.init(
                project=wandb_project, config=run_config or {}, dir=str(self.log_dir) if self.log_dir else None
            )

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        rec = {"kind": kind, "step": int(step), "time": time.time()}
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rec[k] = float(v) if math.isfinite(float(v)) else None  # JSON has no NaN/inf
            else:
                rec[k] = v
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()
        scalars = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

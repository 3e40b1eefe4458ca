"""Reading the JSON-lines files a run writes (metrics, eval records) while the run may still be writing them."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """Every line of `path` that is a JSON object. A half-written line (a run killed or still writing), a line that
    is not an object and bytes that are not UTF-8 are skipped, so readers of a live or damaged run never crash."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out

"""run_info.json of a repro run: the conditions it ran under, written before each launch and completed after.

Why: the mismatch the study measures depends on the CPU (bf16 kernels differ between CPUs with and without native
bf16, AMX, ...), so every run records the CPU model and flags next to the pinned dtypes; a resumed run appends an
attempt, so a run that was continued on another machine says so.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

INFO_FILE = "run_info.json"
# flags that decide which kernels bf16/fp32 matmuls and vLLM's CPU attention use
KEY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8", "fma")


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """Model name, all flags, the key flags above, and the cores this process may use (Linux /proc/cpuinfo)."""
    if cpuinfo is None:
        p = Path("/proc/cpuinfo")
        cpuinfo = p.read_text(encoding="utf-8", errors="replace") if p.is_file() else ""
    model, flags = "", []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value.split()
    model = model or platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": model,
        "cores": cores,
        "key_flags": {f: f in flags for f in KEY_FLAGS},
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "flags": flags,
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "vllm", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is recorded as such
            out[mod] = "not installed"
    return out


def code_version(repo: Path | None = None) -> dict[str, Any]:
    """The commit the run's code came from and whether the tree had uncommitted changes to code (results excluded), so
    runs of one study can be shown to share their code; {} outside a git checkout."""
    repo = repo or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", "alp_agent", "envs", "sandbox", "configs").strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(dirty)} if commit else {}


def start_attempt(run_dir: Path, spec: dict[str, Any], cfg, cmd: list[str]) -> dict[str, Any]:
    """Write (or extend) run_dir/run_info.json before a launch; returns the info with the new attempt last."""
    path = run_dir / INFO_FILE
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        info = {}
    cpu = cpu_info()
    info.update(
        {
            **spec,
            "engine_dtype": cfg.engine.dtype,
            "weight_quantization": cfg.engine.weight_quantization,
            "trainer_dtype": cfg.trainer.update.dtype,
            "cpu": cpu,
            "versions": _versions(),
            "command": cmd,
        }
    )
    info.setdefault("attempts", []).append(
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu_model": cpu["model"],
            "code": code_version(),
        }
    )
    path.write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def finish_attempt(run_dir: Path, info: dict[str, Any], seconds: float, rc: int) -> None:
    """Record the last attempt's wall time and exit code; `seconds` = the sum over attempts."""
    info["attempts"][-1].update({"seconds": round(seconds, 1), "exit": rc})
    info["seconds"] = round(sum(a.get("seconds", 0.0) for a in info["attempts"]), 1)
    (run_dir / INFO_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")

"""What every benchmark records about the machine it ran on (so a JSON result says where its numbers came from)."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path


def machine_info(*modules: str) -> dict:
    """Platform, Python, cores, torch (+ CUDA device), CPU model, and the version of each named module (None if absent)."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name in modules:
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - an optional comparison library may be missing or broken
            info[name] = None
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = None
    return info


# The TRL side's GRPOConfig settings that make its update the same work as ours (both TRL benches): one pass, no KL,
# token-mean loss, our AdamW and clip, constant lr.
TRL_MATCHED_UPDATE = {
    "num_iterations": 1,
    "beta": 0.0,
    "loss_type": "dapo",
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.99,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
}


def with_mimalloc(env: dict[str, str]) -> dict[str, str]:
    """`env` plus LD_PRELOAD of the cmeel-mimalloc wheel's library (both allocator benches); exits if it is absent."""
    from alp_agent.train.hardware import mimalloc_library

    lib = mimalloc_library()
    if lib is None:
        raise SystemExit("mimalloc: pip install cmeel-mimalloc (no libmimalloc.so in this environment)")
    return dict(env, LD_PRELOAD=lib)

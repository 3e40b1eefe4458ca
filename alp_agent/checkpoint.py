"""Atomic training checkpoints and plain Hugging Face export.

A checkpoint is a folder `<dir>/step_<batch:06d>/` holding `trainer.pt` (weights, optimizer, scheduler, log-sigmas,
counters incl. the data cursor, shuffle generator, config) and `rng.pt` (torch CPU/CUDA, python, numpy RNG states).
It is written into `<name>.tmp` and renamed, and `<dir>/latest` (the folder name) is replaced atomically too, so a
crash never leaves a half checkpoint that resume would pick up. Resume restores everything that decides the next
step, so it equals an uninterrupted run (tested).

`export_hf` writes a plain HF folder (config + safetensors [+ tokenizer]) without log-sigmas: transformers and vLLM
load it as is.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

try:  # numpy is optional for us, but present with vllm/transformers
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        st["numpy"] = np.random.get_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st and np is not None:
        np.random.set_state(st["numpy"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(trainer, ckpt_dir: str | Path, keep_last: int | None = None) -> Path:
    """Write the trainer's full state to `<ckpt_dir>/step_<batch>` atomically; returns the folder."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{trainer.batch:06d}"
    tmp = ckpt_dir / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(trainer.state_dict(), tmp / "trainer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpt_dir / "latest", final.name)
    if keep_last:
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep_last]:
            shutil.rmtree(p)
    return final


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The folder named by `<ckpt_dir>/latest`, or None when there is no complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / "latest"
    if not marker.is_file():
        return None
    p = ckpt_dir / marker.read_text().strip()
    return p if (p / "trainer.pt").is_file() else None


def load_checkpoint(trainer, path: str | Path) -> None:
    """Restore a trainer (built with the same config and model architecture) and the global RNGs from `path`."""
    path = Path(path)
    sd = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    trainer.load_state_dict(sd)
    rng = path / "rng.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))


def export_hf(model, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Save a plain HF checkpoint (no log-sigmas: they are not part of the model) atomically to `out_dir`.

    dtype: optionally cast the saved weights (e.g. torch.bfloat16 for serving); the live model is left untouched.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    sd = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
          for k, v in model.state_dict().items()}
    assert not any("log_sigma" in k for k in sd), "log-sigmas leaked into the model state dict"
    model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
    if dtype is not None:
        import json

        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir

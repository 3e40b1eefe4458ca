"""Atomic training checkpoints and plain Hugging Face export.

A checkpoint is a folder `<dir>/step_<batch:06d>/` holding `trainer.pt` (weights, optimizer, scheduler, log-sigmas,
counters incl. the data cursor, shuffle generator, config) and `rng.pt` (torch CPU/CUDA, python, numpy RNG states).
It is written into `<name>.tmp` and renamed, and `<dir>/latest` (the folder name) is replaced atomically too, so a
crash never leaves a half checkpoint that resume would pick up. Resume restores everything that decides the next
step, so it equals an uninterrupted run (tested).

Under torchrun with FSDP2 (no rank holds the whole state) the folder is sharded instead: `dcp/` (model incl.
log-sigmas and optimizer, written by all ranks with torch.distributed.checkpoint), `meta.pt` (scheduler, counters,
shuffle generator, config; rank 0) and `rng_rank<r>.pt`. DCP reshards on load, so such a checkpoint resumes on
another number of ranks, or in one process; `load_policy_weights` reads the HF weights of either format for export.
DDP keeps the single-process format (rank 0 writes it: every rank holds the same state).

`export_hf` writes a plain HF folder (config + safetensors [+ tokenizer]) without log-sigmas: transformers and vLLM
load it as is.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import torch

from alp_agent.train import distributed as D
from alp_agent.train import ranks
from alp_agent.train.hardware import lean_phase
from alp_agent.train.ranks import Command

log = logging.getLogger(__name__)

try:  # numpy is optional for us, but present with vllm/transformers
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]


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
        saved, here = len(st["cuda"]), torch.cuda.device_count()
        if saved != here:
            log.warning("checkpoint saved CUDA RNG states of %d GPUs, this process sees %d: restoring %d", saved, here,
                        min(saved, here))  # fmt: skip
        for i, state in enumerate(st["cuda"][:here]):
            torch.cuda.set_rng_state(state, i)
    if "numpy" in st and np is not None:
        np.random.set_state(st["numpy"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(trainer, ckpt_dir: str | Path, keep_last: int | None = None) -> Path:
    """Write the trainer's full state to `<ckpt_dir>/step_<batch>` atomically; returns the folder.

    Under torchrun: call it on rank 0 (FSDP2: the ranks in `Trainer.follow()` join the sharded write; DDP: rank 0
    writes the single-process format alone)."""
    if getattr(trainer, "sharded", False):
        return _save_sharded(trainer, Path(ckpt_dir), keep_last)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{trainer.batch:06d}"
    tmp = ckpt_dir / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with lean_phase():  # the state dict's weight copies (mostly heap-sized tensors) go back to the OS after it
        torch.save(trainer.state_dict(), tmp / "trainer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    _publish(tmp, final, keep_last)
    return final


def _publish(tmp: Path, final: Path, keep_last: int | None) -> None:
    """Rename the finished `tmp` folder to `final`, point `latest` at it, drop all but the newest `keep_last`."""
    ckpt_dir = final.parent
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpt_dir / "latest", final.name)
    if keep_last:
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep_last]:
            shutil.rmtree(p)


def _save_sharded(trainer, ckpt_dir: Path, keep_last: int | None) -> Path:
    """FSDP2: every rank writes its shards into `<name>.tmp/dcp`; rank 0 writes the metadata and publishes the
    folder only after all ranks finished (barriers), so `latest` never names a partial checkpoint."""
    import torch.distributed.checkpoint as dcp

    ranks.announce(Command.SAVE_CHECKPOINT, (str(ckpt_dir), keep_last))
    final = ckpt_dir / f"step_{trainer.batch:06d}"
    tmp = ckpt_dir / (final.name + ".tmp")
    if D.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    D.barrier()
    dcp.save(trainer.sharded_state(), checkpoint_id=str(tmp / "dcp"))
    torch.save(_rng_state(), tmp / f"rng_rank{D.rank()}.pt")
    if D.is_main():
        torch.save(trainer.meta_state(), tmp / "meta.pt")
    D.barrier()
    if D.is_main():
        _publish(tmp, final, keep_last)
    D.barrier()
    return final


def _is_sharded_checkpoint(path: Path) -> bool:
    return (path / "dcp" / ".metadata").is_file() and (path / "meta.pt").is_file()


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The folder named by `<ckpt_dir>/latest`, or None when there is no complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / "latest"
    if not marker.is_file():
        return None
    p = ckpt_dir / marker.read_text().strip()
    return p if (p / "trainer.pt").is_file() or _is_sharded_checkpoint(p) else None


def load_checkpoint(trainer, path: str | Path) -> None:
    """Restore a trainer (built with the same config and model architecture) and the global RNGs from `path`.

    Under torchrun call it on every rank. A sharded (FSDP2) checkpoint loads into any number of ranks, or into a
    single process; a single-file one into a single process or DDP."""
    path = Path(path)
    if _is_sharded_checkpoint(path):
        _load_sharded(trainer, path)
        return
    sd = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    trainer.load_state_dict(sd)
    rng = path / "rng.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))


def _dcp_load(state: dict, folder: Path, one_process: bool) -> None:
    """Fill `state` in place from a DCP folder; one_process: this process alone reads every shard it needs."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # the intended single process
        dcp.load(state, checkpoint_id=str(folder), no_dist=one_process)


def _load_sharded(trainer, path: Path) -> None:
    state = trainer.sharded_state()  # the template (shapes, shards) that DCP fills in place
    _dcp_load(state, path / "dcp", one_process=not D.is_distributed())
    trainer.load_sharded_state(state, torch.load(path / "meta.pt", map_location="cpu", weights_only=False))
    rng = path / f"rng_rank{D.rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))


def load_policy_weights(model, path: str | Path) -> None:
    """Load the policy weights of a checkpoint (either format) into a plain, unsharded HF model, e.g. for export."""
    path = Path(path)
    if not _is_sharded_checkpoint(path):
        model.load_state_dict(torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)["model"])
        return
    # the keys the trainer saved (Trainer._state_module: the policy under 'policy.'); DCP loads only these
    state = {"model": {f"policy.{k}": v for k, v in model.state_dict().items()}}
    _dcp_load(state, path / "dcp", one_process=True)
    model.load_state_dict({k.removeprefix("policy."): v for k, v in state["model"].items()})


def export_hf(model, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Save a plain HF checkpoint (no log-sigmas: they are not part of the model) atomically to `out_dir`.

    dtype: optionally cast the saved weights (e.g. torch.bfloat16 for serving); the live model is left untouched.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    sd = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
        for k, v in model.state_dict().items()
    }
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


EXPORT_SOURCE = "source_checkpoint.txt"


def export_run(
    run_dir: str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None, dtype: str = "float32"
) -> tuple[Path, Path]:
    """Export a run directory's checkpoint (default: the latest) as a plain HF folder (default: <run_dir>/export).

    The base model comes from the run's own config.yaml; a checkpoint of either format (single file or sharded)
    is loaded into it. Returns (checkpoint used, export folder). Raises ConfigError for a folder that is not a run.
    """
    from alp_agent.config_io import ConfigError, load_run_config
    from alp_agent.models import load_model, load_tokenizer, resolve_model

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_run_config(cfg_path)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"no checkpoint in {run_dir / 'checkpoints'}")
    base = resolve_model(cfg.engine.model)
    model = load_model(base, dtype=torch.float32)
    load_policy_weights(model, ckpt)  # a single-file or a sharded (FSDP2, torchrun) checkpoint
    cast = None if dtype == "float32" else getattr(torch, dtype)
    folder = export_hf(model, out or run_dir / "export", tokenizer=load_tokenizer(base), dtype=cast)
    (folder / EXPORT_SOURCE).write_text(ckpt.name + "\n")  # which checkpoint it holds (eval re-exports a stale one)
    return ckpt, folder

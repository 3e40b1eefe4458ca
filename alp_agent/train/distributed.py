"""Process groups and policy wrapping for training under `torchrun` (several ranks, one trainer per rank).

Why one module: everything that knows about `torch.distributed` lives here, so the trainer reads as the
single-process algorithm plus a handful of calls that are no-ops without torchrun (`world_size() == 1`).

- `init_distributed(cfg)`: joins the process group torchrun describes (RANK / WORLD_SIZE / MASTER_ADDR ...), gloo on
  CPU and nccl on CUDA by default, plus a second gloo group for the command channel between rank 0 (which runs the
  rollout) and the other ranks (which wait for it, possibly for a long time: it gets its own, longer timeout and never
  occupies a GPU while waiting).
- `wrap_policy(model, cfg)`: DDP, or FSDP2 (`fully_shard` per decoder layer, then the root).
- Small collectives used by the trainer: broadcast of Python objects, sum/avg all-reduce, gather of 1-D tensors,
  the global gradient norm of (possibly sharded) parameters.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alp_agent.algo.config import DistConfig

_COMMAND_GROUP: dist.ProcessGroup | None = None


# ---------------------------------------------------------------- who am I
def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher using its env contract) started this process with more than one rank."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """A process group with several ranks is initialised: the trainer must split work and join collectives."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(cfg: DistConfig) -> bool:
    """Join torchrun's process group (idempotent); returns whether this process is now one of several ranks.

    Without torchrun this does nothing, so a single-process run never touches torch.distributed."""
    global _COMMAND_GROUP
    if not launched_by_torchrun():
        return False
    device = local_device()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(resolve_backend(cfg.backend, device), timeout=datetime.timedelta(seconds=cfg.timeout_s))
        atexit.register(shutdown)  # leave the group cleanly however the job ends
    if _COMMAND_GROUP is None:
        _COMMAND_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.command_timeout_s))
    return is_distributed()


_LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@contextlib.contextmanager
def launcher_env_hidden() -> Iterator[None]:
    """Hide torchrun's variables from child processes started inside the block (the vLLM engine on rank 0).

    Why: a child that inherits them takes itself for a torchrun worker; in particular, with
    TORCHELASTIC_USE_AGENT_STORE=True, torch's tcp:// rendezvous (the one vLLM uses for its own one-process group)
    only connects as a client to the store at vLLM's port instead of serving it (torch/distributed/rendezvous.py
    `_create_c10d_store`), so nobody serves it and vLLM waits until its timeout."""
    saved = {k: v for k, v in os.environ.items() if k in _LAUNCHER_VARS or k.startswith("TORCHELASTIC_")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def shutdown() -> None:
    """Leave the process group (end of a torchrun job); safe to call when none is initialised."""
    global _COMMAND_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _COMMAND_GROUP = None


# ---------------------------------------------------------------- wrapping
def wrap_policy(model: nn.Module, cfg: DistConfig) -> nn.Module:
    """Wrap the policy for data parallel training; returns the module the training forward must call.

    ddp: a DistributedDataParallel wrapper (gradients averaged over ranks in backward; the raw model stays usable for
    state dicts and hooks). fsdp2: `fully_shard` on every decoder layer, then on the root, in place (the returned
    module *is* `model`, its parameters are now DTensor shards). none or one rank: `model` unchanged.
    """
    if cfg.strategy == "none" or not is_distributed():
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        # buffers (rotary tables) are identical on every rank: no per-forward broadcast
        return DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False
        )
    if cfg.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        from alp_agent.algo.perturb import find_decoder_layers

        for layer in find_decoder_layers(model):
            fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, reshard_after_forward=cfg.reshard_after_forward)
        return model
    raise ValueError(f"unknown trainer.dist.strategy {cfg.strategy!r}")


def is_sharded(model: nn.Module) -> bool:
    """The model's parameters are FSDP2 DTensor shards (state dicts need the collective helpers)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# ---------------------------------------------------------------- collectives
def broadcast_object(obj: Any = None, src: int = 0, command: bool = False) -> Any:
    """`obj` from rank `src` on every rank (pickled). command=True uses the long-timeout gloo command group."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_COMMAND_GROUP if command else None)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum/avg/max over ranks (avg = sum / world, the way DDP averages gradients)."""
    if not is_distributed():
        return t
    red = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(t, op=red)
    if op == "avg":
        t.div_(world_size())
    return t


def all_reduce_int(x: int, op: str = "sum") -> int:
    """A Python int reduced over ranks (on the default group's device)."""
    if not is_distributed():
        return x
    dev = local_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    return int(all_reduce_(torch.tensor([x], dtype=torch.long, device=dev), op).item())


def gather_cat(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate each named CPU tensor over all ranks (rank order), on every rank: metrics over all tokens."""
    if not is_distributed():
        return tensors
    parts = all_gather_objects({k: v.cpu() for k, v in tensors.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in tensors}


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip to a maximum *global* L2 norm and return that norm, for plain, DDP-replicated or FSDP2-sharded grads.

    With FSDP2 each rank holds gradient shards (DTensor): the norm of the shards is a partial result that
    `full_tensor()` reduces over ranks, so every rank clips with the same, global norm."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)

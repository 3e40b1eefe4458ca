"""Policy weights in shared memory, so an engine in another process reads them without a copy through disk or a pipe.

Why: a process engine (remote.py) must receive a full state dict after every rollout batch. Pickling tensors through
a pipe copies them twice and serialises ~GBs in Python; saving a checkpoint and reloading it costs disk I/O.
Instead the trainer copies its weights once into shared-memory buffers (one flat buffer per dtype, so only a handful
of file descriptors cross the process boundary, once) and every engine process reads views of those buffers in
place. The buffers are sent to a child once (`torch.multiprocessing` passes the storage handle, not the bytes); each
later sync is one memcpy here plus a "load" message.

Floating tensors are stored in `dtype` (the engine's weight dtype, e.g. bfloat16: half the memory and the cast vLLM
would do anyway); other tensors keep theirs. Names are the Hugging Face names of the trainer's state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Slot:
    name: str
    dtype: torch.dtype
    offset: int  # element offset into the flat buffer of `dtype`
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class SharedWeights:
    """A fixed layout (names, shapes, dtypes) of weights in shared-memory flat buffers.

    `SharedWeights.for_state_dict(sd, dtype)` allocates; `fill(sd)` copies new values in (same layout); `views()`
    gives name -> tensor views of the buffers (what an engine loads). Picklable through `torch.multiprocessing`
    (buffers travel as shared-memory handles), which is how a child process gets the same memory.
    """

    def __init__(self, slots: list[_Slot], buffers: dict[torch.dtype, torch.Tensor]):
        self.slots = slots
        self.buffers = buffers

    @classmethod
    def for_state_dict(cls, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> SharedWeights:
        sizes: dict[torch.dtype, int] = {}
        slots = []
        for name, t in state_dict.items():
            dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
            slot = _Slot(name, dt, sizes.get(dt, 0), tuple(t.shape))
            sizes[dt] = slot.offset + slot.numel
            slots.append(slot)
        buffers = {dt: torch.empty(n, dtype=dt).share_memory_() for dt, n in sizes.items()}
        return cls(slots, buffers)

    def matches(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Same names and shapes, in the same order (then `fill` can reuse the buffers)."""
        if len(state_dict) != len(self.slots):
            return False
        return all(s.name == k and s.shape == tuple(v.shape) for s, (k, v) in zip(self.slots, state_dict.items()))

    def fill(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy (and cast) the trainer's tensors into the shared buffers. Works from any device (a CUDA tensor is
        copied to host memory here)."""
        views = self.views()
        with torch.no_grad():
            for s in self.slots:
                views[s.name].copy_(state_dict[s.name].detach())

    def views(self) -> dict[str, torch.Tensor]:
        """name -> view into the shared buffers (no copy)."""
        return {s.name: self.buffers[s.dtype][s.offset : s.offset + s.numel].view(s.shape) for s in self.slots}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

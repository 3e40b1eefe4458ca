"""A second "device" on a CPU-only machine, so tests can catch the mixed-device bugs that otherwise only show on CUDA.

Why: on a CPU-only machine every tensor is on the CPU, so code that forgets `device=` (a mask built on the CPU and
used on the model's tensors, a CUDA index into a CPU tensor, `torch.quantile` with a CPU `q`) passes every test and
then fails on the first GPU (as the tail metrics did on the H200, commit b7d8bbb). Here `VDEV` (= cpu:1) stands for
the accelerator: tensors "on" it are `VTensor` wrappers around real CPU tensors, so the code computes real values,
while every op checks its operands the way CUDA kernels do and raises on a mix:

- a VDEV tensor and a CPU tensor with >= 1 dimension in one op: error (0-dim CPU tensors are allowed, as on CUDA);
- indexing: a VDEV tensor may be indexed by CPU indices (as CUDA allows), a CPU tensor by VDEV indices may not;
- copies between the two (`.to`, `.cpu()`, `copy_`) are allowed; `.numpy()` of a VDEV tensor fails (as on CUDA).

Factory calls with `device=VDEV` (or a VDEV tensor's `.device`) make VDEV tensors. Use as
`with on_virtual_device(): model.to(VDEV); ...`. Known gaps: it does not model CUDA-only numerics (bf16 autocast
differences, nondeterministic kernels), streams, or memory; `torch.autocast` runs with the CPU's rules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

VDEV = torch.device("cpu", 1)
_CPU = torch.device("cpu")
_CROSS_DEVICE_OK = {"_to_copy", "copy_", "copy", "_copy_from", "_copy_from_and_resize", "detach", "alias", "lift_fresh"}
_INDEXING = {"index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}


class VTensor(torch.Tensor):
    """A tensor that reports device VDEV and holds its values in a real CPU tensor (`elem`)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> VTensor:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=VDEV, requires_grad=elem.requires_grad,
        )  # fmt: skip

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:
        return f"VTensor({self.elem!r})"

    def tolist(self):  # CUDA tensors support tolist (a copy to the host)
        return self.elem.tolist()

    def __reduce_ex__(self, protocol):  # torch.save: what torch.load(..., map_location="cpu") gives back
        return (torch.Tensor.clone, (self.elem.detach(),))

    def numpy(self, *a, **k):  # as on CUDA: no implicit host copy
        raise TypeError("can't convert a VDEV (accelerator) tensor to numpy: use .cpu() first")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _is_v(x) -> bool:
    return isinstance(x, VTensor)


def _check(func, args, kwargs) -> None:
    name = func.overloadpacket.__name__
    flat, _ = tree_flatten((args, kwargs))
    ts = [t for t in flat if isinstance(t, torch.Tensor)]
    if name in _CROSS_DEVICE_OK or not any(_is_v(t) for t in ts):
        return
    if name in _INDEXING and args and _is_v(args[0]):
        # CUDA: a CUDA tensor may be indexed by CPU indices; the values put must be on its device (or 0-dim)
        rest = [t for t in tree_flatten((args[2:], kwargs))[0] if isinstance(t, torch.Tensor)]
        ts = [args[0], *rest]
    bad = [t for t in ts if not _is_v(t) and t.dim() > 0]
    if bad:
        shapes = [tuple(t.shape) for t in bad]
        raise RuntimeError(
            f"virtual device: {func} mixes tensors on {VDEV} (the accelerator) with CPU tensors of shapes {shapes}"
        )


def _dispatch(func, args, kwargs):
    _check(func, args, kwargs)
    dev = kwargs.get("device")
    to_v = dev is not None and torch.device(dev) == VDEV
    to_cpu = dev is not None and not to_v
    if to_v:
        kwargs = {**kwargs, "device": _CPU}
    wrappers = {}

    def unwrap(x):
        if _is_v(x):
            wrappers[id(x.elem)] = x
            return x.elem
        return x

    had_v = any(_is_v(t) for t in tree_flatten((args, kwargs))[0])
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if not (to_v or (had_v and not to_cpu)):
        return out

    def wrap(x):
        if not isinstance(x, torch.Tensor) or _is_v(x):
            return x
        w = wrappers.get(id(x))  # in-place ops return their (wrapped) input
        return w if w is not None else VTensor(x)

    return tree_map(wrap, out)


class _FactoryMode(TorchDispatchMode):
    """Routes factory calls with device=VDEV (no tensor argument, so no VTensor sees them) through `_dispatch`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(_is_v(t) for t in tree_flatten((args, kwargs))[0]) or kwargs.get("device") is not None:
            return _dispatch(func, args, kwargs)
        return func(*args, **kwargs)


class _TensorCtorMode(TorchFunctionMode):
    """torch.tensor / as_tensor with device=VDEV: a CPU-type device builds on the CPU in C++ without dispatching a
    copy, so build there and move explicitly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and dev is not None and torch.device(dev) == VDEV:
            return func(*args, **{**kwargs, "device": _CPU}).to(VDEV)
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_virtual_device() -> Iterator[torch.device]:
    """Inside: `x.to(VDEV)`, `module.to(VDEV)`, `torch.zeros(..., device=VDEV)` make checked VDEV tensors; yields
    VDEV. Module parameters are swapped for VDEV ones (swap_module_params_on_conversion) and keep working with
    optimizers and autograd."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _FactoryMode(), _TensorCtorMode():
            yield VDEV
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)

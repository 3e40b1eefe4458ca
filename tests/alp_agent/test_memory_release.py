"""Freed memory between the job's phases (issue 15.6): kept inside a phase, handed back when it ends."""

from __future__ import annotations

import platform

import psutil
import pytest
import torch

from alp_agent.train.hardware import keep_freed_memory, lean_phase, release_freed_memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's"
)


def _rss() -> int:
    return psutil.Process().memory_info().rss


@glibc
def test_freed_buffers_stay_resident_until_released():
    """keep_freed_memory keeps 256 MiB of freed 8 MiB buffers resident (reused by the next micro-batch);
    release_freed_memory hands them back."""
    assert "freed buffers kept" in keep_freed_memory()
    bufs = [torch.ones(2 * 1024**2) for _ in range(32)]  # 32 x 8 MiB, under the 32 MiB mmap threshold: heap
    before_free = _rss()
    del bufs
    kept = _rss()
    assert kept > before_free - 64 * 1024**2, "freed heap buffers should stay resident under keep_freed_memory"
    assert release_freed_memory() is True
    assert _rss() < kept - 192 * 1024**2, "malloc_trim should return most of the 256 MiB"


def test_lean_phase_drops_gradients_after_the_block():
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    with lean_phase(opt):
        model(torch.ones(2, 8)).sum().backward()
        assert model.weight.grad is not None  # inside the phase the gradients are there
        opt.step()
    assert model.weight.grad is None and model.bias.grad is None
    assert opt.state[model.weight]["exp_avg"].abs().sum() > 0  # the optimizer state is untouched


def test_lean_phase_releases_even_when_the_block_fails():
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    with pytest.raises(RuntimeError), lean_phase(opt):
        raise RuntimeError("boom")
    assert model.weight.grad is None


@glibc
def test_mimalloc_preload_runs_torch_and_turns_the_glibc_tuning_off():
    """`ALP_ALLOCATOR=mimalloc bash scripts/quickstart.sh` preloads the cmeel-mimalloc wheel's library: torch runs
    under it, the start-up line names it, and the glibc-only tuning (mmap threshold, malloc_trim) stands aside."""
    import os
    import subprocess
    import sys

    from alp_agent.train.hardware import mimalloc_library

    lib = mimalloc_library()
    assert lib is not None and os.path.basename(lib).startswith("libmimalloc.so"), "cmeel-mimalloc is a dependency"
    code = (
        "import torch\n"
        "from alp_agent.train.hardware import keep_freed_memory, release_freed_memory\n"
        "x = torch.randn(512, 512) @ torch.randn(512, 512)\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(keep_freed_memory(), release_freed_memory(), 'libmimalloc' in maps, bool(torch.isfinite(x).all()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, LD_PRELOAD=lib), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["allocator:", os.path.basename(lib), "(LD_PRELOAD)", "False", "True", "True"]

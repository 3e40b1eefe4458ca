"""What the machine can do fast: CPU capability flags, the compute dtype they call for, and the memory floor.

Why: bf16 matmuls are ~4x *faster* than fp32 on a CPU with native bf16 (avx512_bf16 / AMX) and ~4x *slower* on one
without it (oneDNN then emulates bf16 through fp32 conversions). `update.dtype: auto` picks per machine, and the
choice is a pure function of the flags (tested) so a log line can say why.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still allow native bf16 kernels; lower caps (AVX512_CORE, AVX2, ...)
# make oneDNN behave like a CPU without bf16, which is how the no-bf16 case is imitated on a bf16 machine.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512", "AVX10_2_512", "ALL", "DEFAULT")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str], onednn_max_isa: str | None = None) -> tuple[bool, str]:
    """(has native bf16 matmuls, why). onednn_max_isa: the ONEDNN_MAX_CPU_ISA cap, if any (a cap below
    AVX512_CORE_BF16 disables the bf16 kernels even on a bf16 CPU)."""
    have = [f for f in _BF16_FLAGS if f in flags]
    if not have:
        return False, "CPU lacks avx512_bf16/amx_bf16 (bf16 would be emulated, ~4x slower than fp32)"
    isa = (onednn_max_isa or "").strip().upper()
    if isa and not isa.startswith(_BF16_ISAS):
        return False, f"CPU has {'+'.join(have)} but ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below bf16"
    return True, f"CPU has {'+'.join(have)}"


def choose_compute_dtype(
    requested: str, device_type: str, flags: frozenset[str], onednn_max_isa: str | None = None
) -> tuple[str, str]:
    """The trainer's compute dtype ('float32' | 'bfloat16') for `update.dtype` and why. Pure: no probing.

    auto: bfloat16 on a GPU or a CPU with native bf16, float32 otherwise. An explicit dtype is kept (forced)."""
    if requested != "auto":
        return requested, f"update.dtype={requested} set in the config"
    if device_type == "cuda":
        return "bfloat16", "auto: GPU (bf16 tensor cores)"
    ok, why = native_bf16(flags, onednn_max_isa)
    return ("bfloat16" if ok else "float32"), f"auto: {why}"


def resolve_compute_dtype(requested: str, device_type: str) -> tuple[str, str]:
    """choose_compute_dtype for this machine (reads /proc/cpuinfo and ONEDNN_MAX_CPU_ISA)."""
    return choose_compute_dtype(requested, device_type, cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA"))


@dataclass(frozen=True)
class MemoryFloor:
    """The bytes a job cannot do without: trainer weights, gradients and AdamW moments (fp32), the engine's
    weights and its KV cache. Activations, the Python runtime and libraries come on top."""

    params: int
    trainer_bytes: int
    engine_bytes: int
    kv_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.trainer_bytes + self.engine_bytes + self.kv_bytes

    def describe(self) -> str:
        g = 1024**3
        return (
            f"memory floor {self.total_bytes / g:.2f} GiB = trainer fp32 weights+grads+AdamW "
            f"{self.trainer_bytes / g:.2f} + engine weights {self.engine_bytes / g:.2f} + KV cache {self.kv_bytes / g:.2f}"
            f" ({self.params / 1e6:.1f}M params)"
        )


def memory_floor(params: int, engine_dtype_bytes: int, kv_gib: float, extra_param_copies: int = 0) -> MemoryFloor:
    """fp32 weights + grads + 2 AdamW moments = 16 bytes/param (+4 per extra fp32 copy, e.g. a reference model)."""
    return MemoryFloor(
        params, params * (16 + 4 * extra_param_copies), params * engine_dtype_bytes, int(kv_gib * 1024**3)
    )


def with_compute_dtype(cfg, device_type: str):
    """(a copy of the TrainerConfig with update.dtype resolved, the reason): what the trainer runs and logs."""
    dt, why = resolve_compute_dtype(cfg.update.dtype, device_type)
    return cfg.model_copy(update={"update": cfg.update.model_copy(update={"dtype": dt})}), why


def startup_lines(trainer, engine_cfg) -> list[str]:
    """What the job prints once the trainer exists: the compute dtype and why, and the memory floor."""
    params = sum(p.numel() for p in trainer.model.parameters())
    eng_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}.get(engine_cfg.dtype, 4) * engine_cfg.num_engines
    kv = engine_cfg.cpu_kvcache_space_gib * engine_cfg.num_engines if trainer.device.type == "cpu" else 0
    floor = memory_floor(params, eng_bytes, kv, extra_param_copies=int(trainer.ref_model is not None))
    return [
        f"trainer compute dtype {trainer.cfg.update.dtype} ({trainer.dtype_reason}); engine dtype {engine_cfg.dtype}",
        floor.describe() + "; activations and runtime come on top (target: peak RSS <= floor + 1.5 GiB)",
    ]


def engine_dtype_for(gpu: bool, flags: frozenset[str] | None = None) -> str:
    """engine.dtype bfloat16_if_native: bfloat16 on a GPU or a native-bf16 CPU (vLLM's CPU kernels use the bf16
    instructions directly; ONEDNN_MAX_CPU_ISA does not cap them), float32 otherwise."""
    if gpu:
        return "bfloat16"
    have = flags if flags is not None else cpu_flags()
    return "bfloat16" if any(f in have for f in _BF16_FLAGS) else "float32"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 1024**2  # glibc's largest allowed value (HEAP_MAX_SIZE / 2 on 64-bit)


@contextlib.contextmanager
def lean_phase(optimizer=None):
    """Around a phase of the job (the update, a weight sync): `release_freed_memory()` before and after, and the
    optimizer's gradients dropped after it (`zero_grad(set_to_none=True)`: the next step allocates them anew), so
    neither freed buffers nor 4 bytes/param of gradients stay resident through the rollout and eval."""
    release_freed_memory()
    try:
        yield
    finally:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        release_freed_memory()


def release_freed_memory() -> bool:
    """Hand the free pages inside glibc's heaps back to the kernel (`malloc_trim(0)`), at phase boundaries.

    Why: `keep_freed_memory` keeps freed buffers resident so a micro-batch reuses the previous one's pages; after the
    update that memory (the activations' high-water mark) would stay resident through the rollout and eval, and vLLM's
    stepping thread allocates from its own malloc arena, which cannot reuse the main arena's free chunks, so the two
    high-water marks add up. Trimming when a phase ends (update, weight sync, checkpoint) keeps the reuse inside the
    update and releases it between phases. A few ms; a no-op (False) off glibc or under another allocator."""
    libc = _glibc()
    if libc is None or _other_allocator():
        return False
    return bool(libc.malloc_trim(0))


@functools.cache
def _glibc():
    """ctypes handle of glibc on Linux, else None (looked up once: `platform.libc_ver` reads the executable)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _other_allocator() -> str | None:
    """The LD_PRELOADed allocator's file name (jemalloc, tcmalloc, mimalloc), if any."""
    pre = os.environ.get("LD_PRELOAD", "")
    if any(a in pre for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return os.path.basename(pre.split(":")[0])
    return None


def mimalloc_library() -> str | None:
    """The shared library of the `cmeel-mimalloc` wheel (a dependency on Linux), for LD_PRELOAD; None if absent.

    Why: the allocator has to be chosen before the process starts, so scripts/quickstart.sh preloads it when asked
    (ALP_ALLOCATOR=mimalloc). Against glibc with `keep_freed_memory` it lowers the update's peak RSS by 0.3-0.5 GiB
    but makes the update ~1.25x slower (3x the system time), hence opt-in (bench/README.md "allocators")."""
    import glob
    import sysconfig

    lib_dir = os.path.join(sysconfig.get_paths()["purelib"], "cmeel.prefix", "lib")
    found = sorted(glob.glob(os.path.join(lib_dir, "libmimalloc.so*")), key=len)
    return found[0] if found else None


TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes a C int: 4 GiB silently became 0 (trim on every free) before


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD_MAX) -> str:
    """Stop glibc from handing big freed buffers back to the kernel between micro-batches (issue 15.3).

    By default glibc serves every allocation above its (dynamic, <= 32 MiB) mmap threshold with a fresh mmap and
    unmaps it on free, and trims the heap top above 128 KiB: every micro-batch then faults its activations, logits
    chunks and gradients back in page by page (millions of minor faults, much of the update's system time). Fixing
    the threshold at 32 MiB and raising the trim threshold keeps freed memory in the heap for the next micro-batch.
    Kept memory outlives the update, though (and vLLM's thread cannot reuse it: another malloc arena), so the job
    calls `release_freed_memory()` when a phase ends. Buffers above 32 MiB are still mmapped, which is why the
    chunked log-probs keep their [chunk x vocab] blocks under it. A no-op (says why) when the process runs another
    allocator (LD_PRELOAD) or not glibc. Returns what it did, for the start-up log."""
    other = _other_allocator()
    if other:
        return f"allocator: {other} (LD_PRELOAD)"
    libc = _glibc()
    if libc is None:
        return "allocator: system default (not glibc)"
    trim = min(trim_threshold, TRIM_THRESHOLD_MAX)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, trim)
    return "allocator: glibc, freed buffers kept (mmap threshold 32 MiB)" if ok else "allocator: glibc defaults"

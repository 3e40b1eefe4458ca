"""Hand a CPU vLLM engine's KV cache pages back to the OS while the trainer updates (the CPU form of vLLM's sleep).

Why: on a CPU the KV cache is ordinary process memory (`engine.cpu_kvcache_space_gib`, 1 GiB in the quickstart), and
vLLM zeroes all of it at start-up, so it stays resident for the whole job, also through the update, where nothing
samples and the trainer's gradients, activations and heap set the job's peak. GPU trainers free it for the update
(verl's `free_cache_engine`, vLLM's `sleep(level=1)`); vLLM's CPU worker does not support sleep mode ("sleep mode is
not supported on CPU, ignore it"). So we do what sleep level 1 does to the cache, with the kernel: `madvise(
MADV_DONTNEED)` on the cache tensors' whole pages. Their contents are gone (a private anonymous page reads back as
zeros), the memory is the kernel's again at once, and a page comes back only when the next rollout writes a block on
it. That is safe because the prefix cache is reset first (no block is looked up by its old contents, and after the
update the weights that computed them are gone anyway) and vLLM writes a block before it reads it (it even zeroes
newly allocated blocks, `_zero_block_ids`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

MADV_DONTNEED = 4  # <sys/mman.h>, the same value on every Linux architecture


def kv_cache_ranges(worker) -> list[tuple[int, int]]:
    """(address, bytes) of each distinct storage behind a vLLM worker's KV cache tensors (layers may share one)."""
    seen: dict[int, int] = {}
    for kv in getattr(worker.model_runner, "kv_caches", []) or []:
        caches = kv if isinstance(kv, list | tuple) else [kv]
        for t in caches:
            if t is None or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sorted(seen.items())


def whole_pages(addr: int, nbytes: int) -> tuple[int, int]:
    """[start, end) of the whole pages inside the range (end <= start: none)."""
    page = mmap.PAGESIZE
    return -(-addr // page) * page, (addr + nbytes) // page * page


def release_pages(ranges: list[tuple[int, int]]) -> int:
    """Drop the whole pages inside each (address, bytes) range from this process's memory; returns bytes dropped.

    Only whole pages strictly inside a range are touched, so a neighbouring allocation (or malloc's chunk header)
    sharing the first or last page keeps its contents.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for addr, nbytes in ranges:
        start, end = whole_pages(addr, nbytes)
        if end <= start:
            continue
        if libc.madvise(start, end - start, MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed on the KV cache")
        dropped += end - start
    return dropped


def release_worker_kv_cache(worker) -> int:
    """Run inside a vLLM worker (via `collective_rpc`): release its CPU KV cache; bytes released."""
    return release_pages(kv_cache_ranges(worker))

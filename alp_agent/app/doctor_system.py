"""`alp-agent doctor`, part 3: the sandbox under load and the machine (CPU bf16 support, memory, GPUs)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from alp_agent.app.doctor_checks import FAIL, PASS, WARN, Check

CONCURRENT_SESSIONS = 32
TIMED_CALLS = 8


def sandbox_probe(sandbox, timeout_s: float) -> dict[str, Any]:
    """Open a session, run code (state kept between calls), time `TIMED_CALLS` calls, then one endless loop under
    a 1 s limit (or the configured one when shorter): the limit must end it. Returns the numbers."""
    from sandbox import ExecStatus

    limit = min(1.0, timeout_s)
    out: dict[str, Any] = {}
    with sandbox.session() as s:
        first = s.run("x = 6 * 7\nprint(x)")
        second = s.run("print(x + 1)")
        out["runs"] = first.ok and first.stdout.strip() == "42"
        out["state_kept"] = second.ok and second.stdout.strip() == "43"
        times = []
        for i in range(TIMED_CALLS):
            t0 = time.perf_counter()
            s.run(f"print({i} ** 2)")
            times.append(time.perf_counter() - t0)
        out["p50_call_s"] = statistics.median(times)
        t0 = time.perf_counter()
        r = s.run("while True:\n    pass", timeout=limit)
        out["limit_s"] = limit
        out["limit_elapsed_s"] = time.perf_counter() - t0
        out["limit_enforced"] = r.status == ExecStatus.TIMEOUT
    return out


async def _concurrent(sandbox, n: int) -> list[str]:
    async def one(i: int) -> str:
        async with sandbox.asession() as s:
            r = await s.arun(f"v = {i}\nprint(v * 2)")
            return "" if r.ok and r.stdout.strip() == str(2 * i) else f"session {i}: {r.status} {r.stderr[-120:]!r}"

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    return [r if isinstance(r, str) else f"{type(r).__name__}: {r}" for r in results if r != ""]


def check_sandbox(sandbox, timeout_s: float) -> Check:
    try:
        p = sandbox_probe(sandbox, timeout_s)
        t0 = time.perf_counter()
        errors = asyncio.run(_concurrent(sandbox, CONCURRENT_SESSIONS))
        p["concurrent_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - the backend failing at all is the finding
        return Check("sandbox", FAIL, f"the sandbox failed: {type(e).__name__}: {e}")
    p["concurrent_sessions"], p["concurrent_errors"] = CONCURRENT_SESSIONS, len(errors)
    problems = []
    if not (p["runs"] and p["state_kept"]):
        problems.append("a session did not run code or lost its state between calls")
    if not p["limit_enforced"] or p["limit_elapsed_s"] > p["limit_s"] + 10:
        problems.append(f"an endless loop was not stopped by its {p['limit_s']:g} s limit")
    problems += errors[:3]
    summary = (
        f"session runs and keeps state: {p['runs'] and p['state_kept']}; time limit {p['limit_s']:g} s enforced in "
        f"{p['limit_elapsed_s']:.2f} s: {p['limit_enforced']}; p50 per call {1000 * p['p50_call_s']:.1f} ms; "
        f"{CONCURRENT_SESSIONS} concurrent sessions: {len(errors)} errors ({p['concurrent_s']:.1f} s)"
    )
    return Check("sandbox", FAIL if problems else PASS, summary, p, problems)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def mem_available_gib(meminfo: str | None = None) -> float | None:
    if meminfo is None:
        path = Path("/proc/meminfo")
        meminfo = path.read_text() if path.is_file() else ""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return None


def estimate_peak_gib(n_params: int, cfg, hidden: int, layers: int) -> dict[str, float]:
    """Rough peak host memory of a single-process CPU run: trainer fp32 weights + grads + AdamW moments (16 B per
    parameter) [+ a frozen reference copy], activations of one micro-batch (~34 B x tokens x hidden x layers, ~x0.5
    in bf16 autocast; recomputed with activation checkpointing), the engine's weights in its dtype and its KV cache."""
    gib = 2**30
    train = 16 * n_params + (4 * n_params if cfg.trainer.algo.kl_coef > 0 else 0)
    act_scale = 0.5 if cfg.trainer.update.dtype in ("bfloat16", "auto") else 1.0
    per_layer = 34 * cfg.trainer.update.micro_batch_tokens * hidden * act_scale
    act = per_layer * (1 if cfg.trainer.update.activation_checkpointing else layers)
    eng_bytes = 2 if cfg.engine.dtype in ("bfloat16", "float16") else 4
    kv = float(getattr(cfg.engine, "cpu_kvcache_space_gib", 0) or 0) * gib
    parts = {"trainer": train / gib, "activations": act / gib, "engine": eng_bytes * n_params / gib + kv / gib}
    parts["total"] = sum(parts.values()) + 1.0  # + ~1 GiB of Python, torch and vLLM runtime
    return parts


def check_machine(
    cfg,
    n_params: int,
    hidden: int,
    layers: int,
    flags: set[str] | None = None,
    trainer_dtype: str | None = None,
    free_gib: float | None = None,
) -> Check:
    """trainer_dtype: the compute dtype the trainer resolved (`update.dtype: auto` picks per machine). free_gib:
    MemAvailable measured *before* the doctor built the run's parts (default: now). Below the estimated peak is a
    WARN; below its floor (weights, gradients, optimizer state, engine) a FAIL on a CPU-only machine."""
    import torch

    flags = cpu_flags() if flags is None else flags
    bf16 = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16"))
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    peak = estimate_peak_gib(n_params, cfg, hidden, layers)
    free = mem_available_gib() if free_gib is None else free_gib
    numbers: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_bf16_flags": bf16,
        "engine_dtype": cfg.engine.dtype,
        "trainer_dtype": trainer_dtype or cfg.trainer.update.dtype,
        "mem_available_gib": free,
        "estimated_peak_gib": peak,
        "gpus": gpus,
    }
    problems = []
    uses_bf16 = "bfloat16" in (cfg.engine.dtype, numbers["trainer_dtype"])
    if uses_bf16 and not bf16 and not gpus:
        problems.append("bfloat16 chosen but this CPU has no avx512_bf16/amx_bf16: bf16 math is emulated (slow)")
    status = WARN if problems else PASS
    if free is not None and free < peak["total"]:
        floor = peak["trainer"] + peak["engine"]
        status = FAIL if free < floor and not gpus else WARN
        problems.append(
            f"estimated peak {peak['total']:.1f} GiB (floor {floor:.1f}: weights, gradients, AdamW, engine) exceeds "
            f"the {free:.1f} GiB available"
        )
    summary = (
        f"{os.cpu_count()} CPUs, bf16 support: {', '.join(bf16) or 'none'}; engine {cfg.engine.dtype}, trainer "
        f"{numbers['trainer_dtype']} (update.dtype {cfg.trainer.update.dtype}); memory available {free if free is None else round(free, 1)} GiB vs estimated "
        f"peak {peak['total']:.1f} GiB; GPUs: {', '.join(gpus) or 'none'}"
    )
    return Check("machine", status, summary, numbers, problems)

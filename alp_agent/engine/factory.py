"""make_engine: the one place an EngineConfig becomes an engine (in-process vLLM, a process engine, or a pool).

Also decides what each engine process may use: its GPUs (CUDA_VISIBLE_DEVICES from `devices`) or, on CPU, its own
slice of cores (VLLM_CPU_OMP_THREADS_BIND), so several engines on one machine do not fight over the same cores.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from alp_agent.engine.base import Engine
from alp_agent.engine.config import EngineConfig


class PlacementError(ValueError):
    """The engines cannot start as configured: more GPUs asked for than this process sees, or no vLLM in this Python
    (user errors: the job reports them in one line)."""


def _visible_gpus() -> list[str]:
    """Physical ids of the GPUs this process sees (CUDA_VISIBLE_DEVICES maps index i to entry i)."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None and vis.strip():
        return [v.strip() for v in vis.split(",") if v.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _affinity() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def engine_envs(
    config: EngineConfig, cuda: bool | None = None, gpus: list[str] | None = None, cores: list[int] | None = None
) -> list[dict[str, str]]:
    """Environment of each engine process (index = engine). `cuda`, `gpus` and `cores` default to this machine's;
    they are arguments so the placement arithmetic is testable without a GPU.

    CUDA: engine i gets devices[i*tp:(i+1)*tp] (None -> the first n*tp visible GPUs; a single engine with no
    devices keeps the parent's visibility and shares its GPU). CPU: with cpu_threads_bind unset and at least one
    core per engine, contiguous equal slices of this process's cores."""
    n, tp = config.num_engines, config.tensor_parallel_size
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        if config.devices is None and n == 1:
            return [{}]
        gpus = _visible_gpus() if gpus is None else gpus
        idx = config.devices if config.devices is not None else list(range(n * tp))
        if max(idx) >= len(gpus) or len(idx) < n * tp:
            raise PlacementError(
                f"engine.devices {idx} needs {n * tp} of the {len(gpus)} visible GPUs "
                f"(num_engines {n} x tensor_parallel_size {tp})"
            )
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[j] for j in idx[i * tp : (i + 1) * tp])} for i in range(n)]
    cores = _affinity() if cores is None else cores
    if config.cpu_threads_bind is not None or n == 1 or len(cores) < n:
        return [{} for _ in range(n)]
    per = len(cores) // n
    return [{"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores[i * per : (i + 1) * per])} for i in range(n)]


def make_engine(config: EngineConfig) -> Engine:
    """An Engine for this config: HFEngine (backend transformers), VLLMEngine (placement inprocess), a ProcessEngine,
    or an EnginePool of them.
    Engine processes start in parallel; if one fails, the others are closed and the error raised."""
    if config.backend == "transformers":
        from alp_agent.engine.hf_engine import HFEngine

        return HFEngine(config)
    if importlib.util.find_spec("vllm") is None:
        raise PlacementError(
            "engine.backend vllm: vLLM is not installed in this Python (scripts/setup.sh installs it; "
            "engine.backend=transformers runs without it, slowly)"
        )
    if config.placement == "inprocess":
        from alp_agent.engine.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    from alp_agent.engine.pool import EnginePool
    from alp_agent.engine.remote import ProcessEngine

    engines: list[ProcessEngine] = []
    try:
        for i, env in enumerate(engine_envs(config)):
            # distinct seeds: engines of a pool must not draw the same random streams for unseeded requests
            engines.append(ProcessEngine(config.model_copy(update={"seed": config.seed + i}), env=env, wait=False))
        for e in engines:
            e.wait_ready()
    except BaseException:
        for e in engines:
            e.close()
        raise
    return engines[0] if len(engines) == 1 else EnginePool(engines, routing=config.routing)

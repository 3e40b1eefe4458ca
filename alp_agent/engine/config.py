"""Engine start-up options, validated at the edge (typos in a YAML config fail loudly, not silently)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alp_agent.schema import StrictModel


class EngineConfig(StrictModel):
    """How to start the inference engine. Sampling knobs are per request (SamplingConfig), not here."""

    backend: Literal["vllm", "transformers"] = Field(
        "vllm",
        description="'vllm': the real engine (batched, paged KV cache). 'transformers': HFEngine, transformers' "
        "generate one prompt at a time, for a Python without vLLM (e.g. a GPU image that has torch and transformers "
        "only); slow, exact, in-process, one engine, no weight quantization.",
    )
    model: str = Field("smollm2", description="'smollm2' (embedded default), a Hugging Face id, or a local folder.")
    dtype: Literal["bfloat16", "float16", "float32", "auto", "bfloat16_if_native"] = Field(
        "bfloat16",
        description="Inference dtype. bfloat16 against the float32 trainer is the paper's mismatch setting; float32 "
        "makes vLLM and the trainer agree to ~1e-5 (parity tests). bfloat16_if_native: bfloat16 on a GPU or a CPU "
        "with avx512_bf16/AMX, float32 on other CPUs, where vLLM's bf16 generation is ~1.8x slower (81 vs 143 tok/s "
        "measured on a 2-core Xeon without avx512_bf16); resolved when the config is validated.",
    )
    weight_quantization: Literal["none", "int8", "fp8"] = Field(
        "none",
        description="Quantized-rollout regime (engine/quantize.py): the engine samples with the decoder layers' "
        "linear weights quantize-dequantized per output channel (int8 symmetric, or fp8 e4m3 scaled to its range), "
        "at start-up and on every weight sync; embeddings, LM head and norms unchanged; the trainer keeps full "
        "precision. Weight-only (activations stay in `dtype`), not W8A8. vLLM engines only.",
    )
    max_model_len: int = Field(4096, gt=0, description="Context length (prompt + all turns) the engine accepts.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="CUDA only: fraction of GPU memory for vLLM.")
    cpu_kvcache_space_gib: int = Field(
        1,
        ge=1,
        description="CPU only (VLLM_CPU_KVCACHE_SPACE): KV cache size in whole GiB (vLLM reads an integer: 0.5 "
        "fails at start-up); vLLM's own default grabs 12 GiB.",
    )
    release_kv_cache: bool = Field(
        True,
        description="CPU only: before each update that no rollout overlaps, reset the prefix cache and hand the KV "
        "cache's pages back to the OS (engine/kv_release.py); they come back as the next rollout writes blocks. What "
        "verl's `free_cache_engine` / vLLM's sleep mode (level 1) do on GPUs, which vLLM's CPU worker does not "
        "support. Takes `cpu_kvcache_space_gib` off the update's peak memory for under 1 s of release and page "
        "faults per batch (bench/README.md, memory).",
    )
    cpu_threads_bind: str | None = Field(
        None, description="CPU only (VLLM_CPU_OMP_THREADS_BIND), e.g. '0-1'; None binds all cores of this process."
    )
    enforce_eager: bool = Field(True, description="No CUDA graphs / torch.compile: fast start-up, small models.")
    seed: int = Field(0, description="Engine seed (requests without their own seed draw from it).")
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="CUDA only: GPUs per engine (vLLM tensor parallelism). 1 fits both paper settings (a 7B policy "
        "is 15 GB in bf16); > 1 only for models that do not fit one GPU (weight sync then goes through vLLM's RPC).",
    )
    num_engines: int = Field(
        1,
        ge=1,
        description="Independent vLLM engines, each with a full copy of the weights (data-parallel rollout). The "
        "pool spreads episodes over them (see `routing`) and loads new weights into every one after each batch. "
        "> 1 needs placement 'process'.",
    )
    placement: Literal["inprocess", "process"] = Field(
        "inprocess",
        description="'inprocess': vLLM runs inside the trainer's process (weights swapped in place, no copy). "
        "'process': each engine runs in its own child process; weights travel through shared memory (one copy per "
        "sync, no disk), so engines can sit on their own GPUs/cores and a crash of vLLM does not take the trainer "
        "down.",
    )
    routing: Literal["group", "least_loaded"] = Field(
        "group",
        description="How a pool of engines shares the work. 'group': every turn of every episode of one GRPO group "
        "goes to the same engine (group g -> engine g mod num_engines), so the group's shared prompt and each "
        "episode's growing history hit that engine's prefix cache. 'least_loaded': each request goes to the engine "
        "with the fewest requests in flight (better balance when episode lengths differ a lot, no prefix reuse "
        "across engines).",
    )
    devices: list[int] | None = Field(
        None,
        description="CUDA only, placement 'process': GPU indices (among the visible ones) for the engines, taken in "
        "order, tensor_parallel_size per engine; e.g. [4, 5, 6, 7] with num_engines 4 keeps GPUs 0-3 for the "
        "trainer. None: with one engine it shares the trainer's GPU (gpu_memory_utilization splits it); with "
        "several, the first num_engines x tensor_parallel_size GPUs.",
    )
    max_num_seqs: int = Field(256, ge=1, description="Maximum sequences the scheduler batches at once.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV of shared prefixes (multi-turn episodes resend their history every turn)."
    )
    block_size: int | None = Field(
        None,
        description="KV cache block size. Prefix caching reuses only full blocks, and a multi-turn episode resends "
        "its whole history every turn, so smaller blocks avoid re-prefilling it. None = auto: 32 on CPU (vLLM's CPU "
        "default of 128 made multi-turn rollout re-prefill ~2x the tokens: 0.75x raw throughput vs 0.9x with 32), "
        "vLLM's default (16) on CUDA. CPU needs a multiple of 32.",
    )
    nonfinite_logprobs: Literal["raise", "flag"] = Field(
        "raise",
        description="A NaN/inf sampled-token logprob means broken weights or kernels. 'raise' stops with "
        "NonFiniteLogprobsError; 'flag' returns the generation with info['nonfinite_logprobs'] set (the rollout "
        "then ends that episode with finish_reason 'nonfinite_logprobs').",
    )

    @model_validator(mode="after")
    def _resolve_dtype(self) -> EngineConfig:
        if self.dtype == "bfloat16_if_native":
            from alp_agent.train.hardware import engine_dtype_for

            self.dtype = engine_dtype_for(self.devices is not None or _has_cuda())
        return self

    @model_validator(mode="after")
    def _check_placement(self) -> EngineConfig:
        if self.num_engines > 1 and self.placement != "process":
            raise ValueError(
                "num_engines > 1 needs placement: process (vLLM keeps process-global state: one engine per process)"
            )
        if self.backend == "transformers" and (
            self.placement != "inprocess" or self.num_engines > 1 or self.weight_quantization != "none"
        ):
            raise ValueError(
                "backend: transformers runs one in-process engine without weight quantization (placement: inprocess, "
                "num_engines: 1, weight_quantization: none)"
            )
        if self.devices is not None and len(self.devices) < self.num_engines * self.tensor_parallel_size:
            raise ValueError(
                f"devices lists {len(self.devices)} GPUs; num_engines x tensor_parallel_size needs "
                f"{self.num_engines * self.tensor_parallel_size}"
            )
        return self


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

"""Engine start-up options, validated at the edge (typos in a YAML config fail loudly, not silently)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """How to start the inference engine. Sampling knobs are per request (SamplingConfig), not here."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="'smollm2' (embedded default), a Hugging Face id, or a local folder.")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        "bfloat16",
        description="Inference dtype. bfloat16 against the float32 trainer is the paper's mismatch setting; float32 "
        "makes vLLM and the trainer agree to ~1e-5 (parity tests).",
    )
    max_model_len: int = Field(4096, gt=0, description="Context length (prompt + all turns) the engine accepts.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="CUDA only: fraction of GPU memory for vLLM.")
    cpu_kvcache_space_gib: float = Field(
        1.0, gt=0, description="CPU only (VLLM_CPU_KVCACHE_SPACE): KV cache size; vLLM's own default grabs 12 GiB."
    )
    cpu_threads_bind: str | None = Field(
        None, description="CPU only (VLLM_CPU_OMP_THREADS_BIND), e.g. '0-1'; None binds all cores of this process."
    )
    enforce_eager: bool = Field(True, description="No CUDA graphs / torch.compile: fast start-up, small models.")
    seed: int = Field(0, description="Engine seed (requests without their own seed draw from it).")
    tensor_parallel_size: int = Field(1, ge=1, description="CUDA only: GPUs per engine.")
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

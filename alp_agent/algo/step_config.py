"""Typed configuration of how the trainer turns a rollout batch into steps: the optimizer, the mini/micro-batching and
compute choices of an update, and several processes under torchrun. Part of `TrainerConfig` (alp_agent.algo.config),
which holds the algorithm itself; split out so each module stays readable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alp_agent.schema import StrictModel


class OptimConfig(StrictModel):
    """AdamW on float32 master weights (docs/method.md: same in both reference settings)."""

    lr: float = Field(1e-6, gt=0, description="Policy learning rate ([math] and [tool]: 1e-6).")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas (reference: 0.9, 0.99).")
    weight_decay: float = Field(
        0.01,
        ge=0,
        description="AdamW weight decay on policy weights (reference: 0.01); the s_l: see perturb.sigma_weight_decay.",
    )
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many optimizer steps, then constant.")
    skip_zero_grad_steps: bool = Field(
        True,
        description="Hold a step whose gradients are all exactly 0 (every row of its mini-batch has advantage 0 and "
        "no KL/entropy term): AdamW would still move the weights along its momentum, about 1/(1-beta1) more steps' "
        "worth of the last signal, and decay them, with no new information. Counted as no_signal. The reference "
        "(verl) steps anyway: false restores that.",
    )
    fused: bool = Field(
        True,
        description="The fused AdamW kernel (one pass per tensor; CPU and CUDA): 7x faster than foreach for "
        "SmolLM2-135M on 2 CPU cores and none of foreach's model-sized temporaries. FSDP2 shards use foreach. "
        "Same update rule either way (rounding differences only).",
    )
    grad_clip: float = Field(
        1.0,
        gt=0,
        description="Max global grad norm (reference: 1.0) of the policy weights, and of the s_l with them under "
        "perturb.sigma_clip 'global'.",
    )


class UpdateConfig(StrictModel):
    """How one rollout batch becomes optimizer steps."""

    updates_per_batch: int = Field(
        4, ge=1, description="Mini-batches (= optimizer steps) per rollout batch: the staleness. [math] 16, [tool] 4."
    )
    micro_batch_tokens: int = Field(
        4096,
        ge=1,
        description="Token budget of a micro-batch (gradient accumulation): packed, the sum of its trajectories' "
        "lengths; padded (pack: false), rows x the longest row, with rows bucketed by length.",
    )
    max_micro_batch_size: int = Field(64, ge=1, description="Upper bound on rows per micro-batch.")
    shuffle: bool = Field(True, description="Shuffle trajectories before splitting into mini-batches (seeded).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute dtype: float32, or bfloat16 autocast over float32 master weights. auto: bfloat16 on a "
        "GPU or a CPU with native bf16 (avx512_bf16/AMX flags; ~4x faster than fp32 there), float32 on other CPUs "
        "(where bf16 is emulated, ~4x slower). The choice and its reason are logged at start-up.",
    )
    logprob_chunk_tokens: int = Field(
        128,
        ge=0,
        description="Log-probs and entropy from the last hidden states x lm_head in chunks of this many tokens, "
        "forward and backward (a custom autograd function), so no [tokens x vocab] float32 logits or their gradient "
        "exist for a whole micro-batch. 128 keeps a chunk's [128 x 49k] float32 block under glibc's 32 MiB mmap "
        "threshold, so it is reused instead of faulted in anew (3x fewer page faults measured). 0 = the model's full "
        "logits (needed for logits-target noise and FSDP2).",
    )
    pack: bool = Field(
        True,
        description="Pack several trajectories into one row of a micro-batch (position ids restart per trajectory, "
        "block-diagonal causal attention from transformers' packed-sequence mask), so the model computes no "
        "padding; False: right-padded rows bucketed by length.",
    )
    packed_attention: bool = Field(
        False,
        description="With pack: attention per packed trajectory (SDPA, causal, one call per segment) instead of "
        "dense over the row with a block-diagonal mask, which computes every query-key pair of the row (2.1x the "
        "needed ones on the quickstart's batches). Same results; SDPA models only. Off by default: on 2 CPU cores "
        "the per-segment calls took longer than the dense masked ones (SDPA 5.6 vs 4.7 s over a quickstart batch; "
        "bench/README.md 'trainer throughput'); long rows on a GPU are where it may pay, not measured yet.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute layer activations in backward (HF gradient checkpointing)."
    )
    clean_metrics_every: int = Field(
        1,
        ge=0,
        description="Every N optimizer steps run an extra no-grad, no-noise forward of the mini-batch to log the "
        "train-inference KL without noise, the noise's own KL and the entropy (~+30% step time). 0 = never.",
    )
    noise_kl_rows: int = Field(
        4,
        ge=0,
        description="On clean-metrics steps with noise on: the exact per-position KL(clean || perturbed) over the "
        "vocabulary (kl_noise/exact*), from one extra clean and one extra perturbed no-grad forward of this many "
        "rows of the first micro-batch. 0 = off.",
    )
    seed: int = Field(0, description="Seed of mini-batch shuffling.")


class DistConfig(StrictModel):
    """Several trainer processes under `torchrun` (ignored without it: a plain run is one process)."""

    strategy: Literal["none", "ddp", "fsdp2"] = Field(
        "none",
        description="Data parallelism over torchrun's ranks. ddp: every rank holds the whole model, gradients are "
        "averaged in backward. fsdp2: parameters, gradients and optimizer state are sharded over ranks "
        "(torch fully_shard per decoder layer, then the root); checkpoints become sharded (torch.distributed."
        "checkpoint). none: a single process (torchrun with several ranks then refuses to start).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Process-group backend: auto = nccl on CUDA, gloo on CPU."
    )
    timeout_s: int = Field(1800, ge=1, description="Timeout of the training collectives (seconds).")
    command_timeout_s: int = Field(
        86400,
        ge=1,
        description="Timeout of the command channel on which ranks > 0 wait while rank 0 samples, evaluates and "
        "writes logs (seconds); a separate gloo group, so a long rollout does not trip the training timeout.",
    )
    reshard_after_forward: bool = Field(
        True,
        description="fsdp2: free the gathered layer weights after the forward and gather again in backward (less "
        "memory, more communication); False keeps them until backward.",
    )
    sync_last_micro_only: bool = Field(
        True,
        description="Reduce gradients over ranks only on the last micro-batch of a mini-batch (DDP no_sync, FSDP2 "
        "set_requires_gradient_sync(False) before it): less communication. Under fsdp2 this keeps one unsharded "
        "gradient per rank between micro-batches; False reduce-scatters after every micro-batch instead.",
    )

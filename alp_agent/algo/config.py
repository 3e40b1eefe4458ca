"""Typed configuration of the ALP trainer: the algorithm (ALP or a baseline), the perturbation, the optimizer and the
update schedule. Every field has a default and a description, so `AlgoConfig()` is a runnable configuration.

The method (docs/method.md) has two reference settings; where they differ the comment on the field gives both:
    [math]  single-turn math        [tool]  multi-turn tool use
Our defaults follow the tool-use setting except where the small-scale measurements in docs/method.md say otherwise
(sigma0: 1e-6 is a no-op in float32 at our scale, so the default is 1e-3; see the field).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AlgoName = Literal["alp", "bypass", "grpo", "tis", "mis", "gspo"]
RatioLevel = Literal["token", "sequence", "geo_sequence"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PerturbConfig(_Strict):
    """Layerwise Gaussian perturbation of the training forward (docs/method.md "The perturbation")."""

    enabled: bool | None = Field(
        None,
        description="Add noise in training forwards. None = on for algo 'alp', off for every baseline "
        "('bypass' is exactly ALP with this off). True with a baseline is allowed (ablation).",
    )
    target: Literal["layers", "logits"] = Field(
        "layers",
        description="'layers': noise on the input hidden state of each decoder layer in `layers`; 'logits': the "
        "logits-only ablation (noise on the final logits, one scale of its own).",
    )
    layers: str = Field(
        "all",
        description="Perturbed decoder layers: 'all', 'early' / 'middle' / 'late' (thirds of the stack), "
        "'A:B' (python range, layers A..B-1) or a comma list '0,3,5'. Reference runs: all.",
    )
    sigma0: float = Field(
        1e-3,
        gt=0,
        description="Initial sigma (s_l = log sigma0). [math] 0.02, [tool] 1e-6. Choice: 1e-3 by default because "
        "the spec measured 1e-6 as a no-op in fp32 at 135M scale and 1e-3..5e-3 as the useful range.",
    )
    logits_sigma0: float | None = Field(
        None, gt=0, description="Initial sigma of the logits-only variant; None = sigma0."
    )
    learnable: bool = Field(True, description="Learn s_l with the RL loss (own AdamW group); False = fixed buffer.")
    sigma_lr: float = Field(5e-4, gt=0, description="Learning rate of the s_l group. [math] 1e-2, [tool] 5e-4.")
    scale_aware: bool = Field(
        False,
        description="Noise = sigma_l * RMS(h) * eps with the per-token RMS of the layer input (detached) instead of "
        "the paper's absolute sigma_l * eps. Spec option; default off (absolute, as the paper).",
    )
    sigma_penalty_alpha: float = Field(
        0.0, ge=0, description="alpha in alpha*sigma^2 - beta*log sigma^2 (dev version: 1e-3; released: off)."
    )
    sigma_penalty_beta: float = Field(
        0.0, ge=0, description="beta in alpha*sigma^2 - beta*log sigma^2 (dev version: 1e-3; released: off)."
    )
    seed: int = Field(0, description="Base seed of the noise; eps depends only on (seed, step, micro-batch, layer).")


class AlgoConfig(_Strict):
    """The policy-gradient loss. `name` switches between ALP and every baseline of the paper through one code path."""

    name: AlgoName = Field(
        "alp",
        description="alp: ratio perturbed-train / inference logprobs. bypass: same without noise. grpo: PPO-clip vs "
        "old logprobs recomputed by the trainer. tis: grpo x min(pi_old/mu, C). mis: grpo, masking where pi_old/mu "
        "is outside [1/C, C]. gspo: geometric-mean sequence ratio vs old logprobs, tiny clip.",
    )
    ratio_level: RatioLevel | None = Field(
        None,
        description="token | sequence | geo_sequence (S/|y|). None = 'sequence' for alp/bypass ([math] and [tool] "
        "best), 'token' for grpo/tis/mis, 'geo_sequence' for gspo.",
    )
    clip_low: float | None = Field(None, ge=0, description="eps_low. None = 0.5 ([math] and [tool]); gspo: 3e-4.")
    clip_high: float | None = Field(None, ge=0, description="eps_high. None = 3.0 ([math] and [tool]); gspo: 4e-4.")
    dual_clip: float | None = Field(3.0, description="Dual-clip c (> 1) for A < 0; None = off. [math] 10, [tool] 3.")
    log_ratio_clamp: float = Field(20.0, gt=0, description="Clamp log rho to [-x, x] before exp (reference: 20).")
    loss_agg: Literal["token_mean", "seq_mean"] = Field(
        "token_mean",
        description="token_mean over all valid tokens of the mini-batch (reference) or mean of per-sequence means.",
    )
    is_level: Literal["token", "sequence"] = Field("token", description="Level of the TIS weight / MIS mask.")
    is_threshold: float = Field(
        2.0, gt=1, description="C of TIS truncation min(w, C) and of the MIS band [1/C, C] (spec: 2 to 5)."
    )
    kl_coef: float = Field(
        0.0, ge=0, description="Weight of the KL to a frozen reference. [math] 1e-3, [tool] 0 (off)."
    )
    kl_type: Literal["k1", "k3"] = Field("k3", description="KL estimator of the reference penalty (reference: k3).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight (off in the reference runs).")
    advantage: Literal["grpo", "rloo"] = Field("grpo", description="Group-relative advantage estimator.")
    adv_std_norm: bool = Field(
        True, description="GRPO: divide by the group std (+1e-6). False = Dr.GRPO-style mean only."
    )
    perturb: PerturbConfig = Field(default_factory=PerturbConfig, description="Layerwise perturbation (ALP).")

    @model_validator(mode="after")
    def _check(self) -> AlgoConfig:
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 or null, got {self.dual_clip}")
        return self

    # ---- resolved values (the "None = algorithm default" rules above, in one place) ----
    @property
    def noise_on(self) -> bool:
        if self.perturb.enabled is None:
            return self.name == "alp"
        return self.perturb.enabled

    @property
    def level(self) -> RatioLevel:
        if self.ratio_level is not None:
            return self.ratio_level
        defaults: dict[str, RatioLevel] = {"alp": "sequence", "bypass": "sequence", "gspo": "geo_sequence"}
        return defaults.get(self.name, "token")

    @property
    def eps_low(self) -> float:
        return self.clip_low if self.clip_low is not None else (3e-4 if self.name == "gspo" else 0.5)

    @property
    def eps_high(self) -> float:
        return self.clip_high if self.clip_high is not None else (4e-4 if self.name == "gspo" else 3.0)

    @property
    def uses_old_logprobs(self) -> bool:
        """Baselines whose ratio denominator is pi_{theta_old} recomputed by the trainer (not the engine's mu)."""
        return self.name in ("grpo", "tis", "mis", "gspo")


class OptimConfig(_Strict):
    """AdamW on float32 master weights (docs/method.md: same in both reference settings)."""

    lr: float = Field(1e-6, gt=0, description="Policy learning rate ([math] and [tool]: 1e-6).")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas (reference: 0.9, 0.99).")
    weight_decay: float = Field(
        0.01, ge=0, description="AdamW weight decay on policy weights (reference: 0.01); s_l get none."
    )
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many optimizer steps, then constant.")
    grad_clip: float = Field(1.0, gt=0, description="Max global grad norm of the policy weights (reference: 1.0).")


class UpdateConfig(_Strict):
    """How one rollout batch becomes optimizer steps."""

    updates_per_batch: int = Field(
        4, ge=1, description="Mini-batches (= optimizer steps) per rollout batch: the staleness. [math] 16, [tool] 4."
    )
    micro_batch_tokens: int = Field(
        4096,
        ge=1,
        description="Token budget (rows x padded length) of a micro-batch; sequences are bucketed by length.",
    )
    max_micro_batch_size: int = Field(64, ge=1, description="Upper bound on rows per micro-batch.")
    shuffle: bool = Field(True, description="Shuffle trajectories before splitting into mini-batches (seeded).")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Compute dtype: float32, or bfloat16 autocast over float32 master weights."
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
    seed: int = Field(0, description="Seed of mini-batch shuffling.")


class DistConfig(_Strict):
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


class TrainerConfig(_Strict):
    """Everything `Trainer` needs besides the model."""

    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="Loss, baselines and perturbation.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    update: UpdateConfig = Field(default_factory=UpdateConfig, description="Mini/micro-batching and compute.")
    dist: DistConfig = Field(default_factory=DistConfig, description="Several processes under torchrun (DDP / FSDP2).")

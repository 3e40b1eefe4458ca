"""Typed configuration of the ALP trainer: the algorithm (ALP or a baseline), the perturbation, the optimizer and the
update schedule. Every field has a default and a description, so `AlgoConfig()` is a runnable configuration.

The method (docs/method.md) has two reference settings; where they differ the comment on the field gives both:
    [math]  single-turn math        [tool]  multi-turn tool use
Our defaults follow the tool-use setting except where the small-scale measurements in docs/method.md say otherwise
(sigma0: 1e-6 is a no-op in float32 at our scale, so the default is 1e-3; see the field).

Baseline defaults come from the authors' reference implementation (a verl fork): the clip ranges of its run scripts
`multi-turn/train_*.sh`, the losses of `verl/trainer/ppo/core_algos.py` and the rollout-correction weights of
`rollout_is.py` (docs/method.md "Baselines" gives each default with its source).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alp_agent.algo.step_config import DistConfig, OptimConfig, UpdateConfig
from alp_agent.schema import StrictModel

AlgoName = Literal["alp", "bypass", "grpo", "tis", "mis", "gspo"]
RatioLevel = Literal["token", "sequence", "geo_sequence"]
ISMode = Literal["none", "truncate", "mask", "reject"]

# Per-algorithm defaults of the "None = algorithm default" fields, each with its source.
# (eps_low, eps_high, dual clip c)
_CLIP = {
    "alp": (0.5, 3.0, 3.0),  # spec table [tool]: 0.5 / 3.0 / 3 (reference multi-turn/train_alp*.sh)
    "bypass": (0.5, 3.0, 3.0),  # "same clip as ALP" (spec, Baselines)
    "grpo": (0.2, 0.28, 3.0),  # reference multi-turn/train_grpo.sh: clip_ratio_low/high 0.2/0.28, clip_ratio_c 3
    "tis": (0.2, 0.28, 3.0),  # reference multi-turn/train_tis.sh: same PPO clip as GRPO
    "mis": (0.2, 0.28, 3.0),  # reference multi-turn/train_mis.sh: same PPO clip as GRPO
    "gspo": (3e-4, 4e-4, 100.0),  # reference multi-turn/train_gspo.sh: 3e-4 / 4e-4, clip_ratio_c 100
}
# rollout correction w = pi_old / mu of the GRPO family (rollout_is.py): mode, level
_IS: dict[str, tuple[ISMode, Literal["token", "sequence"]]] = {
    "grpo": ("none", "token"),
    "tis": ("truncate", "sequence"),  # choice, see is_level: the reference TIS script was not available to us
    "mis": ("mask", "sequence"),  # spec: reference MIS runs use sequence level, C = 5, lower = 0 (mask mode)
    "gspo": ("mask", "sequence"),  # spec: the reference GSPO run's sequence-level rollout weight mask at 5.0
}


class PerturbConfig(StrictModel):
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
    sigma0: float | Literal["auto"] = Field(
        1e-3,
        description="Initial sigma (s_l = log sigma0). [math] 0.02, [tool] 1e-6. Choice: 1e-3 by default because "
        "the spec measured 1e-6 as a no-op in fp32 at 135M scale and 1e-3..5e-3 as the useful range. 'auto': on the "
        "first rollout batch, before any update, measure the clean train-vs-engine KL(mu||pi) (k3) on "
        "`auto_rows` episodes and bisect a common sigma0 (scale-aware noise) until the exact clean-vs-perturbed "
        "KL equals it (alp_agent/train/calibrate.py; both KLs logged as calibration/*).",
    )
    auto_rows: int = Field(
        4, ge=1, description="sigma0 'auto': episodes (the batch's first) the calibration forwards run on."
    )
    logits_sigma0: float | None = Field(
        None, gt=0, description="Initial sigma of the logits-only variant; None = sigma0."
    )
    learnable: bool = Field(True, description="Learn s_l with the RL loss (own AdamW group); False = fixed buffer.")
    sigma_lr: float = Field(5e-4, gt=0, description="Learning rate of the s_l group. [math] 1e-2, [tool] 5e-4.")
    scale_aware: bool | None = Field(
        None,
        description="Noise = sigma_l * RMS(h) * eps with the per-token RMS of the layer input (detached) instead of "
        "the paper's absolute sigma_l * eps. None = on with sigma0 'auto' (sigma relative to each layer's scale, so "
        "the noise reaches every layer), off otherwise (absolute, as the paper).",
    )
    sigma_weight_decay: float | None = Field(
        None,
        ge=0,
        description="AdamW weight decay of the s_l group. None = optim.weight_decay, as the reference (the s_l sit "
        "in an AdamW group with decay). Decay pulls s_l = log sigma towards 0 by lr*wd*|s_l| per step (5e-4 x 0.01 "
        "x 6.9 = 3.5e-5 at sigma 1e-3): negligible next to the RL gradient.",
    )
    sigma_clip: Literal["global", "separate"] = Field(
        "global",
        description="global: the s_l gradient is clipped with the policy's under one global norm (optim.grad_clip), "
        "as the reference. separate: clipped on its own to the same max norm (the former choice here).",
    )
    sigma_penalty_alpha: float = Field(
        0.0, ge=0, description="alpha in alpha*sigma^2 - beta*log sigma^2 (dev version: 1e-3; released: off)."
    )
    sigma_penalty_beta: float = Field(
        0.0, ge=0, description="beta in alpha*sigma^2 - beta*log sigma^2 (dev version: 1e-3; released: off)."
    )
    seed: int = Field(0, description="Base seed of the noise; eps depends only on (seed, step, micro-batch, layer).")

    @property
    def auto(self) -> bool:
        return self.sigma0 == "auto"

    @property
    def scale_aware_on(self) -> bool:
        return self.auto if self.scale_aware is None else self.scale_aware

    def sigma_wd(self, policy_weight_decay: float) -> float:
        """The s_l group's weight decay: sigma_weight_decay, or the policy's when unset (the reference)."""
        return policy_weight_decay if self.sigma_weight_decay is None else self.sigma_weight_decay

    @property
    def sigma0_init(self) -> float:
        """The starting sigma0: the configured number, or 1e-3 until 'auto' calibrates it."""
        return 1e-3 if self.sigma0 == "auto" else float(self.sigma0)

    @model_validator(mode="after")
    def _check(self) -> PerturbConfig:
        if self.sigma0 != "auto" and not float(self.sigma0) > 0:
            raise ValueError(f"sigma0 must be > 0 or 'auto', got {self.sigma0}")
        if self.auto and self.scale_aware is False:
            raise ValueError("sigma0 'auto' sizes scale-aware noise: leave perturb.scale_aware unset or true")
        return self


class AlgoConfig(StrictModel):
    """The policy-gradient loss. `name` switches between ALP and every baseline of the paper through one code path."""

    name: AlgoName = Field(
        "alp",
        description="alp: ratio perturbed-train / inference logprobs. bypass: same without noise. grpo: PPO-clip vs "
        "old logprobs recomputed by the trainer. tis: grpo x min(w, C), w = pi_old/mu. mis: grpo x w 1[lower <= w <= "
        "C] (the reference's mask mode keeps the weight). gspo: geometric-mean sequence ratio vs old logprobs, tiny "
        "clip, dual clip 100, sequence-level mask-mode rollout weight at C = 5.",
    )
    ratio_level: RatioLevel | None = Field(
        None,
        description="token | sequence | geo_sequence (S/|y|). None = 'sequence' for alp/bypass ([math] and [tool] "
        "best), 'token' for grpo/tis/mis, 'geo_sequence' for gspo.",
    )
    clip_low: float | None = Field(
        None,
        ge=0,
        description="eps_low. None = per algorithm: alp/bypass 0.5 ([math] and [tool]); grpo/tis/mis 0.2 (reference "
        "multi-turn/train_{grpo,tis,mis}.sh); gspo 3e-4 (reference multi-turn/train_gspo.sh).",
    )
    clip_high: float | None = Field(
        None,
        ge=0,
        description="eps_high. None = per algorithm: alp/bypass 3.0; grpo/tis/mis 0.28; gspo 4e-4 (same sources).",
    )
    dual_clip: float | None = Field(
        None,
        description="Dual-clip c (> 1) for A < 0; 0 = off. None = per algorithm: 3 for alp/bypass ([tool]; [math] "
        "10) and grpo/tis/mis (reference clip_ratio_c 3), 100 for gspo (reference multi-turn/train_gspo.sh).",
    )
    log_ratio_clamp: float = Field(20.0, gt=0, description="Clamp log rho to [-x, x] before exp (reference: 20).")
    loss_agg: Literal["token_mean", "seq_mean"] = Field(
        "token_mean",
        description="token_mean over all valid tokens of the mini-batch (reference) or mean of per-sequence means.",
    )
    is_mode: ISMode | None = Field(
        None,
        description="Rollout correction w = pi_old/mu of the GRPO family (reference rollout_is.py), multiplying the "
        "per-token loss: truncate = min(w, C) (TIS); mask = w 1[lower <= w <= C] (the reference's mask mode keeps "
        "the weight: MIS); reject = 0/1 mask 1[lower <= w <= C] without the weight (our former MIS, kept as a "
        "variant); none. None = per algorithm: grpo none, tis truncate, mis mask, gspo mask. alp/bypass: none only.",
    )
    is_level: Literal["token", "sequence"] | None = Field(
        None,
        description="Level of w: per token, or the sequence's product broadcast to its tokens. None = sequence for "
        "tis, mis and gspo (spec: the reference MIS and GSPO runs use sequence level; Token-MIS is also reported). "
        "TIS: choice, the reference TIS script was not available to us (see docs/method.md 'Baselines').",
    )
    is_threshold: float | None = Field(
        None,
        gt=0,
        description="C, the upper bound of w. None = 5.0 (spec: the reference MIS runs and GSPO's rollout mask use "
        "5; TIS: choice, same as MIS).",
    )
    is_threshold_lower: float | None = Field(
        None,
        ge=0,
        description="lower bound of w for mask/reject. None = 0 for mask (reference MIS runs), 1/C for reject.",
    )
    mask_void_turns: bool = Field(
        True,
        description="SimpleTIR void-turn filter (used in the reference multi-turn runs): every token of an episode "
        "with a void turn (a model turn with neither a tool call nor a final answer, a turn cut at "
        "max_tokens_per_turn included) gets loss weight 0, for every algorithm; group advantages are computed "
        "before, over all episodes. Logged as void/*.",
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
        if self.dual_clip is not None and self.dual_clip != 0 and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, 0 (off) or null (algorithm default), got {self.dual_clip}")
        if self.name in ("alp", "bypass") and self.is_mode not in (None, "none"):
            raise ValueError(f"is_mode {self.is_mode!r} needs pi_old: {self.name} has no rollout correction")
        if self.is_upper < self.is_lower:
            raise ValueError(f"is_threshold_lower {self.is_lower} exceeds is_threshold {self.is_upper}")
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
        return self.clip_low if self.clip_low is not None else _CLIP[self.name][0]

    @property
    def eps_high(self) -> float:
        return self.clip_high if self.clip_high is not None else _CLIP[self.name][1]

    @property
    def dual_clip_c(self) -> float | None:
        """The dual-clip constant in use, None when off."""
        c = self.dual_clip if self.dual_clip is not None else _CLIP[self.name][2]
        return c if c > 0 else None

    @property
    def is_correction(self) -> ISMode:
        if self.is_mode is not None:
            return self.is_mode
        return _IS[self.name][0] if self.name in _IS else "none"

    @property
    def is_granularity(self) -> Literal["token", "sequence"]:
        if self.is_level is not None:
            return self.is_level
        return _IS[self.name][1] if self.name in _IS else "token"

    @property
    def is_upper(self) -> float:
        return self.is_threshold if self.is_threshold is not None else 5.0

    @property
    def is_lower(self) -> float:
        if self.is_threshold_lower is not None:
            return self.is_threshold_lower
        return 1.0 / self.is_upper if self.is_mode == "reject" else 0.0

    @property
    def uses_old_logprobs(self) -> bool:
        """Baselines whose ratio denominator is pi_{theta_old} recomputed by the trainer (not the engine's mu)."""
        return self.name in ("grpo", "tis", "mis", "gspo")


class TrainerConfig(StrictModel):
    """Everything `Trainer` needs besides the model."""

    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="Loss, baselines and perturbation.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    update: UpdateConfig = Field(default_factory=UpdateConfig, description="Mini/micro-batching and compute.")
    dist: DistConfig = Field(default_factory=DistConfig, description="Several processes under torchrun (DDP / FSDP2).")

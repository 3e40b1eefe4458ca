"""The run config: one pydantic model per section, loaded from YAML in configs/ (see config_io for loading).

Each section is the config model of the package that owns it (engine, rollout, trainer, sandbox), so a knob is
defined and documented once, where it is used. `extra="forbid"` everywhere: an unknown key is an error naming its
dotted path, never a silently ignored typo.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from alp_agent.algo.config import TrainerConfig
from alp_agent.engine.config import EngineConfig
from alp_agent.rollout.config import RolloutConfig
from alp_agent.schema import StrictModel
from sandbox.config import SandboxConfig


class EnvSection(StrictModel):
    """Which registered env to train on and its constructor options (validated by the env's own config model)."""

    id: str = Field("alp/MathTool-v0", description="Gymnasium id; `alp-agent envs` lists the registered ones.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to gymnasium.make (e.g. dataset, max_turns, tool_format); unknown keys are rejected by "
        "the env's config model.",
    )
    imports: list[str] = Field(
        default_factory=list, description="Modules imported first, so a user's own env registers itself."
    )


class EvalSection(StrictModel):
    """Held-out evaluation inside training (and the defaults of `alp-agent eval`)."""

    env_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of env.kwargs for the held-out env, merged key by key (default: none, so the "
        "held-out env is the training env; set a held-out split here, e.g. the math env's dataset: {name: "
        "synthetic, seed: 1}).",
    )
    num_tasks: int = Field(32, ge=0, description="Held-out problems per evaluation (the first N). 0 = no eval.")
    samples: int = Field(1, ge=1, description="Samples per problem (avg@k and pass@k use them).")
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    max_turns: int | None = Field(None, ge=1, description="Model turns at eval (paper: 10); None = rollout.max_turns.")
    every: int = Field(0, ge=0, description="Evaluate every N batches during training (0 = only before and after).")
    before_and_after: bool = Field(True, description="Evaluate before the first and after the last batch.")


class RunSection(StrictModel):
    """The outer loop: how many batches, how big, where outputs go."""

    name: str = Field("run", description="Run name; the run directory is out_dir/name.")
    out_dir: str = Field("runs", description="Parent folder of run directories.")
    seed: int = Field(0, description="Seed of the task stream, sampling and model init of tiny models.")
    iterations: int = Field(8, ge=1, description="Rollout batches (each followed by updates_per_batch steps).")
    prompts_per_batch: int = Field(8, ge=1, description="Distinct tasks per rollout batch.")
    samples_per_prompt: int = Field(8, ge=1, description="Episodes per task (the GRPO group size).")
    checkpoint_every: int = Field(1, ge=0, description="Checkpoint every N batches (0 = only at the end / Ctrl-C).")
    checkpoint_at_end: bool = Field(
        True, description="Write a checkpoint after the last batch (repro sweeps turn it off: ~1.6 GB per SmolLM2 run)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    sample_episodes: int = Field(4, ge=0, description="Episodes per batch written to samples.jsonl/.txt.")
    tensorboard: bool = Field(True, description="Also write TensorBoard events (metrics.jsonl is always written).")
    wandb_project: str | None = Field(None, description="Log to Weights & Biases under this project (needs wandb).")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads for the trainer; None = all cores.")
    async_rollout: bool = Field(
        False,
        description="Sample batch k+1 (in a background thread) while the trainer updates on batch k. Weights reach "
        "the engine only between rollouts, so each trajectory's policy_version is the exact version that sampled "
        "it; the trainer then learns from data up to max_staleness versions old (staleness/mean and /max per "
        "batch). Off: rollout and update alternate, staleness 0.",
    )
    max_staleness: int = Field(
        1,
        ge=1,
        description="async_rollout only: most policy versions between the weights that sampled a batch and the "
        "trainer that consumes it. 1 syncs weights after every update; k syncs every k-th (fewer syncs, staler "
        "data).",
    )


class RunConfig(StrictModel):
    """Everything `alp-agent train` needs. `configs/quickstart.yaml` is a complete, commented example."""

    run: RunSection = Field(default_factory=RunSection, description="Outer loop and outputs.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Inference engine and the model.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Multi-turn sampling.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="ALP / baselines, optimizer, batching.")
    env: EnvSection = Field(default_factory=EnvSection, description="Training environment.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Held-out evaluation.")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Sandbox shared by all episodes.")

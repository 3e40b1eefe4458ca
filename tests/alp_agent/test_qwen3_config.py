"""configs/multi_turn_tir_qwen3-8b.yaml (for GPU users) is a valid run config whose env options the env accepts, and
its tool setup does what its notes say under a Qwen3-style template: the python tool's schema reaches the first
prompt through the template's own "# Tools" block, with no system prompt of ours."""

from __future__ import annotations

from pathlib import Path

from alp_agent.rollout.chat import ChatTemplate
from alp_agent.rollout.runner import RolloutRunner
from tests.alp_agent.chat_templates import with_template
from tests.alp_agent.test_rollout_templates import tool_calling_policy
from tests.fakes import ScriptedPolicy

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "multi_turn_tir_qwen3-8b.yaml"


def test_qwen3_config_validates_and_shows_tools_through_the_template(tiny_tokenizer):
    import gymnasium as gym

    from alp_agent.config import RunConfig
    from alp_agent.config_io import deep_merge, load_config
    from envs.math_env import MathEnvConfig

    cfg = load_config(RunConfig, CONFIG)
    assert cfg.engine.model.startswith("Qwen/Qwen3") and cfg.rollout.show_tools == "template"
    assert cfg.trainer.dist.strategy == "fsdp2" and cfg.rollout.top_p == 1.0 and cfg.rollout.top_k == 0
    train_env = MathEnvConfig(**cfg.env.kwargs)  # the env's own config model accepts the options
    eval_env = MathEnvConfig(**deep_merge(cfg.env.kwargs, cfg.eval.env_kwargs))
    assert train_env.tool_format == "json" and eval_env.dataset.name == "aime24"
    assert cfg.rollout.max_turns * cfg.rollout.max_tokens_per_turn < cfg.engine.max_model_len

    tok = with_template(tiny_tokenizer, "qwen3")
    kwargs = {k: v for k, v in cfg.env.kwargs.items() if k != "dataset"}  # no download: one task given inline
    tasks = [{"prompt": "What is 6 times 7?", "answer": "42"}]

    def env_fn():
        return gym.make(cfg.env.id, tasks=tasks, **kwargs)

    rollout_cfg = cfg.rollout.model_copy(update={"max_concurrent_episodes": 1, "seed": 0})
    (t,) = RolloutRunner(ScriptedPolicy(tok, tool_calling_policy), tok, env_fn, rollout_cfg).run([0])
    prompt = ChatTemplate(tok).decode(t.prompt_ids)
    assert prompt.startswith("<|im_start|>system\n# Tools\n") and '"name": "python"' in prompt
    assert "What is 6 times 7?\n\nUse the python tool" in prompt and prompt.endswith("<|im_start|>assistant\n")

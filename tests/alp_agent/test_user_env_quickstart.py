"""A registered env works out of the box, tried as a new user would: the README's own example env (`my/Convert-v0`,
a typed `convert` tool, `tool_format="json"`) trained for one batch from a config that extends the quickstart's.

The tool must reach the model (SmolLM2's template ignores `tools=`, so the rollout writes a tool section into the
system prompt), the quickstart's math options must be clearable (`!replace`), and eval must not assume the math env.
The policy is a scripted engine that calls `convert` only if the prompt shows it, then boxes the tool's output; the
trainer is the real one on the tiny model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.fakes import Reply, ScriptedPolicy

REPO = Path(__file__).resolve().parents[2]


def readme_env_module() -> str:
    """The README's example env, verbatim."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    (block,) = [b for b in blocks if '"my/Convert-v0"' in b]
    return block


def convert_policy(text: str, stop: tuple[str, ...]) -> Reply:
    """Calls `convert` when the prompt describes it (with the <tool_call> format); boxes a tool result it sees."""
    result = re.findall(r"<\|im_start\|>tool\n(.*?)<\|im_end\|>", text, re.DOTALL)
    if result:
        return f"3 km is \\boxed{{{result[-1].strip()}}} meters.", True
    if '"name": "convert"' in text and "<tool_call>" in text:
        # ends on the env's stop string, as vLLM returns it
        return '<tool_call>\n{"name": "convert", "arguments": {"value": 3, "unit": "km"}}\n</tool_call>', False
    return "I cannot convert that.", True


def test_readme_env_trains_one_batch_from_a_quickstart_based_config(tiny_model_dir, tmp_path, monkeypatch):
    import alp_agent.engine.factory as factory
    from alp_agent.app.job import train
    from alp_agent.config import RunConfig
    from alp_agent.config_io import load_config
    from alp_agent.models import load_tokenizer

    (tmp_path / "convert_env_readme.py").write_text(readme_env_module(), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "convert.yaml"
    config.write_text(
        f"""base: {REPO / "configs" / "quickstart.yaml"}
run: {{name: convert, out_dir: {tmp_path / "runs"}, iterations: 1, prompts_per_batch: 1, samples_per_prompt: 2,
      checkpoint_every: 0, checkpoint_at_end: false, sample_episodes: 2, tensorboard: false}}
engine: {{model: {tiny_model_dir}}}
env:
  id: my/Convert-v0
  imports: [convert_env_readme]
  kwargs: !replace {{}}        # drop the quickstart's math options (dataset, answer_fallback, system_prompt, ...)
eval:
  env_kwargs: !replace {{}}
  num_tasks: 1
trainer:
  update: {{updates_per_batch: 1}}
""",
        encoding="utf-8",
    )
    cfg = load_config(RunConfig, config)
    assert cfg.env.kwargs == {} and cfg.eval.env_kwargs == {}
    assert cfg.rollout.max_turns == 3  # the rest of the quickstart is inherited
    policy = ScriptedPolicy(load_tokenizer(tiny_model_dir), convert_policy, max_model_len=2048)
    monkeypatch.setattr(factory, "make_engine", lambda engine_cfg: policy)

    summary = train(cfg, progress=False)

    first = policy.prompts[0]  # the tool, its schema and the call format are in the very first prompt
    assert '"name": "convert"' in first and "Convert a distance to meters." in first and "<tool_call>" in first
    assert first.index('"name": "convert"') < first.index("How many meters are 3 km?")  # in the system prompt
    run_dir = Path(summary["run_dir"])
    episodes = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(episodes) == 2
    for ep in episodes:
        assert (ep["finish_reason"], ep["reward"], ep["num_tool_calls"], ep["num_tool_errors"]) == ("answer", 1.0, 1, 0)
        assert "<|im_start|>tool\n3000<|im_end|>" in ep["text"] and ep["num_void_turns"] == 0
    assert summary["accuracy_before"] == 1.0 and summary["accuracy_after"] == 1.0  # eval on the user's env too
    batches = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(b.get("kind") == "step" for b in batches) and policy.weight_loads >= 1

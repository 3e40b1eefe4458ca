"""A registered env works out of the box, tried as a new user would: the README's own example env (`my/Convert-v0`,
a typed `convert` tool, `tool_format="json"`) trained for one batch from a config that extends the quickstart's.

The tool must reach the model (SmolLM2's template ignores `tools=`, so the rollout writes a tool section into the
system prompt), the quickstart's math options must be clearable (`!replace`), and eval must not assume the math env.
The policy is a scripted engine that calls `convert` only if the prompt shows it, then boxes the tool's output; the
trainer is the real one on the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from alp_agent.engine.base import Engine, Generation

REPO = Path(__file__).resolve().parents[2]


def readme_env_module() -> str:
    """The README's example env, verbatim."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    (block,) = [b for b in blocks if '"my/Convert-v0"' in b]
    return block


class ConvertPolicy(Engine):
    """Calls `convert` when the prompt describes it (with the <tool_call> format); boxes a tool result it sees."""

    max_model_len = 2048

    def __init__(self, tokenizer):
        self.tok, self.prompts, self.weight_loads = tokenizer, [], 0

    def generate(self, prompts, sampling):
        return [asyncio.run(self.agenerate(p, sampling)) for p in prompts]

    async def agenerate(self, prompt, sampling):
        text = self.tok.decode(prompt)
        self.prompts.append(text)
        result = re.findall(r"<\|im_start\|>tool\n(.*?)<\|im_end\|>", text, re.DOTALL)
        call = '<tool_call>\n{"name": "convert", "arguments": {"value": 3, "unit": "km"}}\n</tool_call>'
        if result:
            reply, eos = f"3 km is \\boxed{{{result[-1].strip()}}} meters.", True
        elif '"name": "convert"' in text and "<tool_call>" in text:
            reply, eos = call, False  # ends on the env's stop string, as vLLM returns it
        else:
            reply, eos = "I cannot convert that.", True
        ids = self.tok(reply, add_special_tokens=False)["input_ids"] + ([self.tok.eos_token_id] if eos else [])
        return Generation(ids, [-0.1] * len(ids), "stop", None if eos else "</tool_call>")

    def load_weights(self, state_dict):
        self.weight_loads += 1


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
    policy = ConvertPolicy(load_tokenizer(tiny_model_dir))
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

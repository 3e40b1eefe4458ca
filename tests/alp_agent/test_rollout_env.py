"""Rollout against the real math tool env (envs/) and a real LocalSandbox, with a scripted policy that reads the tool
output out of the ids it is given: proves observations land in the running ids, masks are right and reward flows."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from alp_agent.engine.base import Engine, Generation
from alp_agent.rollout.chat import ChatTemplate
from alp_agent.rollout.config import RolloutConfig
from alp_agent.rollout.runner import RolloutRunner

gym = pytest.importorskip("gymnasium")
envs = pytest.importorskip("envs")


@pytest.fixture(scope="module")
def sandbox():
    from sandbox import SandboxConfig
    from sandbox.local import LocalSandbox

    try:
        box = LocalSandbox(
            SandboxConfig(backend="local", timeout_s=10, memory_mb=512, max_processes=16, pool_size=2, cpu_s=30)
        )
    except Exception as exc:  # noqa: BLE001 - no jail on this machine: skip with the reason
        pytest.skip(f"LocalSandbox unavailable: {exc}")
    yield box
    box.close()


class CodeThenAnswer(Engine):
    """Turn 1: run the task's arithmetic in python (ends on the env's stop string). Turn 2: box the tool output."""

    def __init__(self, tok, exprs: dict[str, str]):
        self.tok, self.exprs, self.max_model_len = tok, exprs, 4096

    def generate(self, prompts, sampling):
        raise NotImplementedError

    async def agenerate(self, prompt, sampling):
        await asyncio.sleep(0)
        text = self.tok.decode(prompt)
        outputs = re.findall(r"```output\n(.*?)\n```", text, re.DOTALL)
        if outputs:
            reply, eos = f"The answer is \\boxed{{{outputs[-1].strip()}}}.", True
        else:
            expr = next(e for q, e in self.exprs.items() if q in text)
            reply, eos = f"Let me compute.\n```python\nprint({expr})" + sampling.stop[0], False
        ids = self.tok(reply, add_special_tokens=False)["input_ids"] + ([self.tok.eos_token_id] if eos else [])
        return Generation(ids, [-0.5] * len(ids), "stop", None if eos else sampling.stop[0])

    def load_weights(self, state_dict):
        pass


def test_rollout_on_math_tool_env(sandbox, tiny_tokenizer):
    from envs.synthetic import SyntheticTasks

    arith = re.compile(r"^(?:Compute|Calculate|Evaluate|What is) ([-+*/() 0-9]+)\??\.?$")
    tasks = SyntheticTasks(10_000, 1)
    picked = [(i, m.group(1)) for i in range(200) if (m := arith.match(tasks[i].prompt))][:2]
    if len(picked) < 2:
        pytest.skip("no plain arithmetic synthetic tasks to script")
    exprs = {tasks[i].prompt: e for i, e in picked}

    def env_fn():
        return gym.make("alp/MathTool-v0", sandbox=sandbox, dataset={"name": "synthetic", "level": 1})

    runner = RolloutRunner(CodeThenAnswer(tiny_tokenizer, exprs), tiny_tokenizer, env_fn, RolloutConfig(seed=0))
    trajs = runner.run([i for i, _ in picked], n_per_task=2)
    chat = ChatTemplate(tiny_tokenizer)
    for t in trajs:
        assert (t.finish_reason, t.reward, t.num_turns, t.num_tool_calls, t.token_drift) == ("answer", 1.0, 2, 1, 0)
        (s0, e0), (s1, e1) = t.turn_spans
        obs = chat.decode(t.completion_ids[e0:s1])  # template end-of-turn + tool message + generation prompt
        assert obs.startswith("<|im_end|>") and "```output" in obs and set(t.loss_mask[e0:s1]) == {0}
        assert set(t.loss_mask[s0:e0]) == {1} and set(t.loss_mask[s1:e1]) == {1} and e1 == len(t.completion_ids)
        env_info = t.info["env_info"]  # the env's final info travels with the trajectory (eval reads it)
        assert env_info["correct"] is True and env_info["end_reason"] == "answer"
        assert env_info["reference_answer"] == tasks[t.info["task_index"]].answer
        json.dumps(t.to_dict())  # trajectories (with env info) serialise for samples.jsonl
    from alp_agent.app.eval import aggregate, problem_records

    m = aggregate(problem_records(trajs))
    assert m["accuracy"] == 1.0 and m["answer_missing_rate"] == 0.0 and m["pass@2"] == 1.0
    assert m["mean_tool_calls"] == 1.0 and m["mean_turns"] == 2.0
    runner.close()

"""Rollout against the real math tool env (envs/) and a real LocalSandbox, with a scripted policy that reads the tool
output out of the ids it is given: proves observations land in the running ids, masks are right and reward flows."""

from __future__ import annotations

import json
import re

import pytest

from alp_agent.rollout.chat import ChatTemplate
from alp_agent.rollout.config import RolloutConfig
from alp_agent.rollout.runner import RolloutRunner
from tests.fakes import Reply, Script, ScriptedPolicy

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


def code_then_answer(exprs: dict[str, str]) -> Script:
    """Turn 1: run the task's arithmetic in python (ends on the env's stop string). Turn 2: box the tool output."""

    def script(text: str, stop: tuple[str, ...]) -> Reply:
        outputs = re.findall(r"```output\n(.*?)\n```", text, re.DOTALL)
        if outputs:
            return f"The answer is \\boxed{{{outputs[-1].strip()}}}.", True
        expr = next(e for q, e in exprs.items() if q in text)
        return f"Let me compute.\n```python\nprint({expr})" + stop[0], False

    return script


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

    runner = RolloutRunner(
        ScriptedPolicy(tiny_tokenizer, code_then_answer(exprs)), tiny_tokenizer, env_fn, RolloutConfig(seed=0)
    )
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

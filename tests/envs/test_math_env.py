"""Scripted policies play whole math episodes against the real sandbox (LocalSandbox)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import gymnasium as gym
import pytest

from envs import MathToolEnv
from envs.synthetic import SyntheticTasks

ARITH = re.compile(r"^(?:What is|Compute) ([\d +*]+)[?.]$")


def arithmetic_task_index(level: int = 1) -> tuple[int, str]:
    """First synthetic task of `level` whose question is a plain expression (so a script can solve it)."""
    tasks = SyntheticTasks(10_000, level)
    for i in range(100):
        m = ARITH.match(tasks[i].prompt)
        if m:
            return i, m.group(1)
    raise AssertionError("no arithmetic task")


def make(sandbox, **kw) -> MathToolEnv:
    kw.setdefault("dataset", {"name": "synthetic", "level": 1})
    return gym.make("alp/MathTool-v0", sandbox=sandbox, **kw)


def output_of(obs: list[dict]) -> str:
    m = re.search(r"```output\n(.*?)\n```", obs[0]["content"], re.DOTALL)
    assert m, obs
    return m.group(1)


def code_turn(code: str) -> str:
    return f"Let me compute this.\n```python\n{code}\n```\n"


def test_correct_tool_use_gets_reward_1(sandbox):
    index, expr = arithmetic_task_index()
    env = make(sandbox)
    obs, info = env.reset(options={"task_index": index})
    assert obs[0]["role"] == "system" and "\\boxed" in obs[0]["content"] and "```python" in obs[0]["content"]
    assert obs[1] == {"role": "user", "content": env.unwrapped.get_task(index).prompt}
    obs, reward, terminated, truncated, info = env.step(code_turn(f"result = {expr}\nprint(result)"))
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert obs[0]["role"] == "tool" and info["tool_calls"] == 1 and info["sandbox_status"] == "ok"
    assert info["void_turn"] is False and info["parse_errors"] == 0 and info["parsed_answer"] is None
    value = output_of(obs)
    obs, reward, terminated, truncated, info = env.step(f"So the answer is \\boxed{{{value}}}.")
    assert (obs, reward, terminated, truncated) == ([], 1.0, True, False)
    assert info["correct"] is True and info["parsed_answer"] == value and info["end_reason"] == "answer"
    assert info["total_tool_calls"] == 1 and info["turn"] == 2
    assert env.unwrapped._session is None  # the episode's session is closed at its end
    with pytest.raises(RuntimeError):
        env.step("more")
    env.close()


def test_variables_persist_across_turns_and_answer_is_graded(sandbox):
    index, expr = arithmetic_task_index(0)
    env = make(sandbox, dataset={"name": "synthetic", "level": 0})
    env.reset(options={"task_index": index})
    obs, *_ = env.step(code_turn(f"x = {expr}"))
    assert "no output" in obs[0]["content"]
    obs, *_ = env.step(code_turn("x"))  # a trailing expression is shown, as in a notebook
    value = output_of(obs)
    _, reward, terminated, _, info = env.step(f"\\boxed{{{int(value):,}}}")  # thousands separators are fine
    assert reward == 1.0 and terminated and info["total_tool_calls"] == 2


def test_wrong_answer_gets_0(sandbox):
    index, expr = arithmetic_task_index()
    env = make(sandbox)
    env.reset(options={"task_index": index})
    obs, *_ = env.step(code_turn(f"print({expr} + 1)"))
    _, reward, terminated, truncated, info = env.step(f"\\boxed{{{output_of(obs)}}}")
    assert (reward, terminated, truncated, info["correct"]) == (0.0, True, False, False)


def test_never_answering_is_truncated_at_max_turns(sandbox):
    env = make(sandbox, max_turns=3, max_tool_calls=10)
    env.reset(seed=1)
    results = [env.step(code_turn("print('still thinking')")) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True]
    assert [r[2] for r in results] == [False, False, False]
    obs, reward, _, _, info = results[-1]
    assert obs == [] and reward == 0.0 and info["end_reason"] == "max_turns" and info["total_tool_calls"] == 3


def test_malformed_calls_get_error_observations(sandbox):
    env = make(sandbox, max_turns=6)
    env.reset(seed=0)
    obs, _, term, trunc, info = env.step("```python\nprint(1)")  # unclosed fence (e.g. hit max tokens)
    assert not (term or trunc) and "not closed" in obs[0]["content"] and obs[0]["role"] == "tool"
    assert info["parse_errors"] == 1 and info["parse_error_kinds"] == ["unclosed_fence"] and info["tool_calls"] == 0
    assert info["void_turn"] is False
    obs, *_, info = env.step(code_turn("1/0"))
    assert "ZeroDivisionError" in obs[0]["content"] and info["tool_errors"] == 1 and info["sandbox_status"] == "error"
    obs, *_, info = env.step(code_turn("print('a')") + code_turn("print('b')"))  # 2 blocks, limit 1 per turn
    assert (
        "a" in obs[0]["content"] and "per turn" in obs[1]["content"] and info["parse_error_kinds"] == ["too_many_calls"]
    )
    obs, *_, info = env.step("```python\nprint('\udcff')\n```\n")  # lone surrogate: repaired, noted, run
    assert "invalid" in obs[0]["content"] and "invalid_text" in info["parse_error_kinds"]
    assert info["total_parse_errors"] == 3 and info["total_tool_errors"] == 1


def test_void_turn_policies(sandbox):
    env = make(sandbox)  # default: a void turn ends the episode with reward 0
    env.reset(seed=0)
    obs, reward, term, trunc, info = env.step("I think the answer is forty-two.")
    assert (obs, reward, term, trunc, info["void_turn"], info["end_reason"]) == ([], 0.0, True, False, True, "void")
    env = make(sandbox, void_turn="hint", void_hint="Use the tool or answer.")
    env.reset(seed=0)
    obs, reward, term, trunc, info = env.step("Hmm.")
    assert obs == [{"role": "user", "content": "Use the tool or answer."}] and not term and info["void_turn"]
    assert info["total_void_turns"] == 1


def test_long_output_is_cut_with_marker(sandbox):
    env = make(sandbox, max_observation_chars=500)
    env.reset(seed=0)
    obs, *_, info = env.step(code_turn("print('x' * 20000 + 'END')"))
    content = obs[0]["content"]
    assert "characters cut" in content and content.rstrip("`\n").endswith("END") and len(content) < 600
    assert info["observation_truncated"] == 1 and info["total_observation_truncated"] == 1


def test_tool_call_budget(sandbox):
    env = make(sandbox, max_tool_calls=1, max_turns=4)
    env.reset(seed=0)
    env.step(code_turn("print(1)"))
    obs, *_, info = env.step(code_turn("print(2)"))
    assert "budget" in obs[0]["content"] and info["tool_calls"] == 0 and info["parse_error_kinds"] == ["call_budget"]


def test_timeout_loses_state_and_episode_continues(sandbox):
    env = make(sandbox, tool_timeout_s=1.0)
    env.reset(seed=0)
    env.step(code_turn("y = 5"))
    obs, *_, info = env.step(code_turn("while True: pass"))
    assert info["sandbox_status"] == "timeout" and "timed out" in obs[0]["content"] and info["tool_errors"] == 1
    obs, *_, info = env.step(code_turn("print('y' in globals())"))
    assert "False" in obs[0]["content"]


def test_json_format_episode(sandbox):
    index, expr = arithmetic_task_index()
    env = gym.make("alp/MathToolJSON-v0", sandbox=sandbox, dataset={"name": "synthetic", "level": 1})
    assert env.stop_strings == ["</tool_call>"]
    assert env.tool_schemas()[0]["function"]["name"] == "python"
    obs, _ = env.reset(options={"task_index": index})
    assert "<tool_call>" in obs[0]["content"]
    payload = json.dumps({"name": "python", "arguments": {"code": f"print({expr})"}})
    call = f"<tool_call>\n{payload}\n</tool_call>"
    obs, *_, info = env.step(call)
    assert obs[0]["role"] == "tool" and info["tool_calls"] == 1 and "```" not in obs[0]["content"]
    _, reward, term, _, _ = env.step(f"\\boxed{{{obs[0]['content'].strip()}}}")
    assert reward == 1.0 and term
    env.reset(seed=0)
    obs, *_, info = env.step('<tool_call>{"name": "shell", "arguments": {"cmd": "ls"}}</tool_call>')
    assert "Unknown tool" in obs[0]["content"] and info["parse_error_kinds"] == ["unknown_tool"]


def test_shaping_terms_off_by_default_and_configurable(sandbox):
    index, expr = arithmetic_task_index()
    env = make(sandbox, format_reward=0.1, tool_use_reward=0.2)
    env.reset(options={"task_index": index})
    obs, *_ = env.step(code_turn(f"print({expr})"))
    _, reward, *_ = env.step(f"\\boxed{{{output_of(obs)}}}")
    assert reward == pytest.approx(1.3)
    env.reset(options={"task_index": index})
    _, reward, *_ = env.step("\\boxed{0}")  # wrong, no tool: format bonus only
    assert reward == pytest.approx(0.1)


def test_reset_is_deterministic(sandbox):
    env = make(sandbox)
    assert env.num_tasks == 10_000
    a, ia = env.reset(seed=123)
    b, ib = env.reset(seed=123)
    assert a == b and ia["task_index"] == ib["task_index"]
    c, ic = env.reset(options={"task_index": 7})
    d, idd = env.reset(seed=999, options={"task_index": 7})
    assert c == d and ic["task_index"] == idd["task_index"] == 7
    with pytest.raises(IndexError):
        env.reset(options={"task_index": 10_000})


def test_astep(sandbox):
    env = make(sandbox)
    env.reset(seed=0)
    obs, *_ = asyncio.run(env.unwrapped.astep(code_turn("print(6 * 7)")))
    assert output_of(obs) == "42"


def test_adversarial_answer_cannot_hang_the_episode(sandbox):
    env = make(sandbox, grading={"timeout_s": 1.0, "workers": 1})
    env.reset(seed=0)
    env.unwrapped.grader.grade("\\sqrt{4}", "2")  # start the worker outside the timed step
    t0 = time.monotonic()
    _, reward, terminated, _, info = env.step("\\boxed{9^{9^{9^{9}}}}")
    assert reward == 0.0 and terminated and info["grade_reason"] in ("timeout", "memory")
    assert time.monotonic() - t0 < 3.0


def test_observations_are_in_the_space_and_actions_may_be_bytes(sandbox):
    env = make(sandbox, void_turn="hint")
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space
    obs, *_, info = env.step(b"```python\nprint('\xc3\xa9')\n```\n")  # UTF-8 bytes are decoded
    assert obs in env.observation_space and output_of(obs) == "é" and info["parse_errors"] == 0
    obs, *_, info = env.step(b"\xff\xfe nothing")
    assert obs in env.observation_space and obs[0]["role"] == "user" and "invalid" in obs[0]["content"]
    with pytest.raises(TypeError):
        env.step(123)  # a caller bug, not model text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 7623.", "7623"),
        ("So the final answer is **1,234**", "1234"),
        ("Answer: -3/4", "-3/4"),
        ("answer = 12.5 and then", "12.5"),
        ("I think the answer is probably large.", None),
        ("The answer is 3. No wait, the answer is 5.", "5"),
        ("The result is \\boxed{9}. The answer is 5.", "9"),  # \\boxed wins
    ],
)
def test_answer_fallback_reads_stated_numbers(text, expected):
    from envs.math_env import MathToolEnv
    from envs.parsing import parse_turn

    env = MathToolEnv(tasks=[{"prompt": "q", "answer": "1"}], answer_fallback=True)
    strict = MathToolEnv(tasks=[{"prompt": "q", "answer": "1"}])
    parsed = parse_turn(text, "fenced", env.tools)
    assert env.extract_answer(parsed) == expected
    assert strict.extract_answer(parsed) == (parsed.answer)  # off by default: only \\boxed counts
    env.close()
    strict.close()

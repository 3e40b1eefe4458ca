"""Gymnasium registry round trip, check_env on the built-ins, and a user-declared tool env in a few lines."""

from __future__ import annotations

import warnings
from typing import Literal

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import MathToolEnv, ToolEnv, register_tool_env
from envs.tools import Tool


def _kwargs(env_id: str, sandbox) -> dict:
    kw = {"sandbox": sandbox}
    if env_id == "alp/Tool-v0":
        kw["tasks"] = [{"prompt": "What is 2 + 2?", "answer": "4"}]
    return kw


@pytest.mark.parametrize("env_id", sorted(envs.BUILTIN_IDS))
def test_builtin_ids_round_trip_and_pass_check_env(env_id, sandbox):
    assert env_id in gym.registry and env_id.startswith("alp/")
    env = gym.make(env_id, **_kwargs(env_id, sandbox))
    assert isinstance(env, ToolEnv) and env.unwrapped is env  # no wrappers: the rollout reads env attributes
    assert env.spec.id == env_id
    clone = env.spec.make()  # kwargs (the live sandbox) pass by reference
    assert clone.unwrapped._shared_sandbox is sandbox
    clone.close()
    with warnings.catch_warnings():
        # The one warning left is "No render fps declared": render is text ('ansi'), fps does not apply.
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*render fps.*")
        check_env(env)
    env.close()


def test_make_with_config_overrides(sandbox):
    env = gym.make("alp/MathTool-v0", sandbox=sandbox, dataset="synthetic", max_turns=2)
    assert isinstance(env, MathToolEnv) and env.config.max_turns == 2 and env.config.dataset.name == "synthetic"
    with pytest.raises(Exception, match="max_turnz"):
        gym.make("alp/MathTool-v0", sandbox=sandbox, max_turnz=2)  # typos are caught at the edge
    assert env.stop_strings == ["\n```\n"]


@pytest.mark.filterwarnings("ignore:.*render fps")  # text render: fps does not apply
def test_user_env_in_a_few_lines(sandbox):
    calls = []

    def convert(value: float, unit: Literal["km", "mi"] = "km") -> str:
        """Convert a distance to meters.

        Args:
            value: The distance.
            unit: Its unit.
        """
        calls.append((value, unit))
        return str(value * (1000 if unit == "km" else 1609.344))

    register_tool_env(
        "my/Convert-v0",
        tools=[convert],
        tasks=[{"prompt": "How many meters are 3 km?", "answer": "3000"}],
        tool_format="json",
        max_turns=3,
    )
    env = gym.make("my/Convert-v0", sandbox=sandbox)
    schema = env.tool_schemas()[0]["function"]
    assert schema["name"] == "convert" and schema["description"] == "Convert a distance to meters."
    assert schema["parameters"]["properties"]["unit"] == {
        "enum": ["km", "mi"],
        "type": "string",
        "description": "Its unit.",
    }
    assert schema["parameters"]["required"] == ["value"]
    env.reset(seed=0)
    obs, *_, info = env.step('<tool_call>{"name": "convert", "arguments": {"value": 3}}</tool_call>')
    # native tool call: the result carries the call's id, and the info has the call in the template's form
    assert obs == [{"role": "tool", "content": "3000", "tool_call_id": "call_1_0", "name": "convert"}]
    assert calls == [(3, "km")] and info["assistant_tool_calls"] == [
        {"id": "call_1_0", "type": "function", "function": {"name": "convert", "arguments": {"value": 3}}}
    ]
    assert env.unwrapped.tool_format == "json" and not env.unwrapped.tools_in_prompt
    from envs.protocol import StepInfo

    end_only = {"end_reason", "correct"}  # set when the episode ends
    assert set(info) == set(StepInfo.__annotations__) - end_only  # the TypedDict names every key the env reports
    obs, *_, info = env.step('<tool_call>{"name": "convert", "arguments": {"value": "x"}}</tool_call>')
    assert "should be number" in obs[0]["content"] and info["parse_error_kinds"] == ["bad_arguments"]
    assert "tool_call_id" not in obs[0] and info["assistant_tool_calls"] == []  # a rejected call has no id
    _, reward, terminated, _, info = env.step("\\boxed{3000}")
    assert reward == 1.0 and terminated and set(info) == set(StepInfo.__annotations__)
    check_env(env)
    del gym.registry["my/Convert-v0"]


def test_subclass_env(sandbox):
    class Echo(ToolEnv):
        default_system_prompt = "Repeat the word in \\boxed{}."

        @property
        def num_tasks(self) -> int:
            return 3

        def get_task(self, index):
            return envs.Task(f"Say word{index}.", f"word{index}")

    envs.register_env("my/Echo-v0", Echo)
    env = gym.make("my/Echo-v0", sandbox=sandbox)
    obs, _ = env.reset(options={"task_index": 2})
    assert obs[0]["content"] == "Repeat the word in \\boxed{}." and obs[1]["content"] == "Say word2."
    assert env.step("\\boxed{WORD2}")[1] == 1.0  # default reward: normalized, case-insensitive exact match
    del gym.registry["my/Echo-v0"]


def test_tool_from_function_and_errors():
    def add(a: int, b: int, note: str | None = None) -> int:
        """Add two integers.

        :param a: first
        :param b: second
        """
        return a + b

    t = Tool.from_function(add)
    assert t.parameters["properties"]["a"] == {"type": "integer", "description": "first"}
    assert t.parameters["required"] == ["a", "b"]
    ctx = envs.ToolContext(session=lambda: None)
    assert t({"a": 1, "b": 2}, ctx).content == "3"
    assert t({"a": 1}, ctx).error
    assert t({"a": 1, "b": True}, ctx).error  # bool is not an integer
    assert t({"a": 1, "b": 2, "c": 3}, ctx).error

    def boom() -> str:
        """Fails."""
        raise ValueError("nope")

    out = Tool(boom)({}, ctx)
    assert out.error and "ValueError: nope" in out.content

"""Rollout logic without vLLM: a scripted engine and a scripted tool env make every mask and truncation exact."""

from __future__ import annotations

import time

from alp_agent.rollout.chat import ChatTemplate
from alp_agent.rollout.config import RolloutConfig
from alp_agent.rollout.runner import RolloutRunner
from tests.fakes import ScriptedEnv, ScriptedPolicy, by_turn

TOOL_TURN = ("Let me compute.\n<tool>print(6*7)</tool>", False)  # (text, ends on EOS): ends on the stop string
ANSWER_TURN = ("The answer is 42.", True)
PROMPT = {"system": "You solve tasks with a Python tool.", "question": "what is 6*7?", "observation": "result {t}: 42"}


def _runner(tok, turns, env_kw=None, **cfg):
    engine = ScriptedPolicy(
        tok, by_turn(*turns), max_model_len=cfg.pop("max_model_len", 4096), delay=cfg.pop("delay", 0.0)
    )
    runner = RolloutRunner(engine, tok, lambda: ScriptedEnv(**PROMPT, **(env_kw or {})), RolloutConfig(seed=0, **cfg))
    return engine, runner


def test_masks_logprobs_and_template_tokens_exact(tiny_tokenizer):
    tok = tiny_tokenizer
    engine, runner = _runner(tok, [TOOL_TURN, TOOL_TURN, ANSWER_TURN])
    (traj,) = runner.run([3], n_per_task=1, policy_version=7)
    chat = ChatTemplate(tok)
    assert traj.finish_reason == "answer" and not traj.truncated
    assert traj.num_turns == 3 and traj.num_tool_calls == 3 and traj.reward == 1.0 and traj.policy_version == 7
    assert traj.token_drift == 0
    # every engine call saw exactly the running ids; model ids are appended untouched with their logprobs
    gens = [g for _, g in engine.calls]
    for (prompt, gen), (s, e) in zip(engine.calls, traj.turn_spans):
        assert prompt == traj.ids[: len(traj.prompt_ids) + s]
        assert traj.completion_ids[s:e] == gen.token_ids
        assert traj.infer_logprobs[s:e] == gen.logprobs
    # mask is 1 exactly on model tokens
    expected_mask = [0] * len(traj.completion_ids)
    for s, e in traj.turn_spans:
        expected_mask[s:e] = [1] * (e - s)
    assert traj.loss_mask == expected_mask
    assert traj.num_model_tokens == sum(len(g.token_ids) for g in gens)
    assert all(lp == 0.0 for lp, m in zip(traj.infer_logprobs, traj.loss_mask) if m == 0)
    # the stop string is part of the model tokens; the template's <|im_end|> after it is a masked, non-model token
    s0, e0 = traj.turn_spans[0]
    assert chat.decode(traj.completion_ids[s0:e0]).endswith("</tool>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert traj.completion_ids[e0] == im_end and traj.loss_mask[e0] == 0
    # the last turn ended on a sampled EOS: that one IS a model token with a logprob
    s2, e2 = traj.turn_spans[2]
    assert traj.completion_ids[e2 - 1] == tok.eos_token_id and traj.loss_mask[e2 - 1] == 1
    # prefix property: the ids decode to exactly the full re-render of the conversation
    messages = [
        {"role": "system", "content": "You solve tasks with a Python tool."},
        {"role": "user", "content": "Task 3: what is 6*7?"},
        {"role": "assistant", "content": TOOL_TURN[0]},
        {"role": "tool", "content": "result 1: 42"},
        {"role": "assistant", "content": TOOL_TURN[0]},
        {"role": "tool", "content": "result 2: 42"},
    ]
    assert chat.decode(traj.ids[: len(traj.prompt_ids) + s2]) == chat.render(messages, add_generation_prompt=True)
    assert traj.temperature == 1.0 and traj.top_p == 1.0 and traj.top_k == 0


def test_group_sampling_ids_and_order(tiny_tokenizer):
    _, runner = _runner(tiny_tokenizer, [TOOL_TURN, ANSWER_TURN])
    trajs = runner.run([5, 2], n_per_task=3)
    assert [t.group_id for t in trajs] == [0, 0, 0, 1, 1, 1]
    assert [t.info["task_index"] for t in trajs] == [5, 5, 5, 2, 2, 2]
    assert [t.info["sample_index"] for t in trajs] == [0, 1, 2] * 2
    m = runner.last_metrics
    assert m["rollout/episodes"] == 6 and m["rollout/token_drift"] == 0 and m["rollout/finish/answer"] == 6


def test_truncation_turn_token_limit(tiny_tokenizer):
    long_turn = ("word " * 50, False)
    _, runner = _runner(tiny_tokenizer, [long_turn], max_tokens_per_turn=10)
    (t,) = runner.run([0])
    assert (t.finish_reason, t.truncated, t.num_turns, t.num_model_tokens) == ("turn_token_limit", True, 1, 10)
    _, runner = _runner(tiny_tokenizer, [long_turn], max_tokens_per_turn=10, on_turn_limit="continue", max_turns=2)
    (t,) = runner.run([0])
    assert (t.finish_reason, t.num_turns, t.info["turn_token_limit_hits"]) == ("max_turns", 2, 2)


def test_truncation_context_limit(tiny_tokenizer):
    _, runner = _runner(tiny_tokenizer, [TOOL_TURN], max_model_len=80, max_turns=10)
    (t,) = runner.run([0])
    assert t.finish_reason == "context_limit" and t.truncated
    assert len(t.ids) <= 80
    assert t.loss_mask[-1] == 1  # an overflowing observation is dropped: the trajectory ends on model tokens


def test_truncation_env_max_turns(tiny_tokenizer):
    _, runner = _runner(tiny_tokenizer, [TOOL_TURN], env_kw={"finish_after": 99, "truncate_at": 2})
    (t,) = runner.run([0])
    assert (t.finish_reason, t.truncated, t.num_turns) == ("max_turns", True, 2)
    _, runner = _runner(tiny_tokenizer, [TOOL_TURN], env_kw={"finish_after": 99}, max_turns=3)
    (t,) = runner.run([0])
    assert (t.finish_reason, t.truncated, t.num_turns) == ("max_turns", True, 3)


def test_truncation_prompt_too_long(tiny_tokenizer):
    engine, runner = _runner(tiny_tokenizer, [TOOL_TURN], max_prompt_tokens=5)
    (t,) = runner.run([0])
    assert (t.finish_reason, t.truncated, t.completion_ids, t.num_turns) == ("prompt_too_long", True, [], 0)
    assert engine.calls == []


def test_slow_tool_call_does_not_stall_others(tiny_tokenizer):
    """Episode of task 0 waits 10x longer on each tool call; the others finish long before it."""
    _, runner = _runner(
        tiny_tokenizer, [TOOL_TURN, TOOL_TURN, ANSWER_TURN], env_kw={"delay": 0.05, "slow_task": 0}, delay=0.01
    )
    done: dict[int, float] = {}
    orig = runner._episode

    async def timed(env, task, *a):
        t = await orig(env, task, *a)
        done[task] = time.perf_counter()
        return t

    runner._episode = timed
    t0 = time.perf_counter()
    trajs = runner.run(list(range(8)))
    wall = time.perf_counter() - t0
    assert all(t.finish_reason == "answer" for t in trajs)
    assert max(done[i] for i in range(1, 8)) < done[0]
    assert wall < 3 * 0.5 + 1.0  # the slow episode's 3 x 0.5 s of tool time, not 8 episodes in series


def test_history_rewriting_template_counts_drift_but_never_ends_the_episode(tiny_tokenizer):
    """A template that rewrites past assistant turns: a full re-render no longer continues our ids (counted in
    token_drift, a diagnostic), but the observation deltas come from a stub conversation, so the episode goes on to
    the env's end and its ids are exactly what the stub deltas say."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n[hidden]"
        "<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    engine, runner = _runner(tok, [TOOL_TURN, TOOL_TURN, ANSWER_TURN])
    (t,) = runner.run([0])
    assert (t.finish_reason, t.truncated, t.num_turns, t.reward) == ("answer", False, 3, 1.0)
    assert t.token_drift == 2 and runner.last_metrics["rollout/token_drift"] == 2  # turns 2 and 3 would drift
    chat = ChatTemplate(tok)
    (s0, e0), (s1, _), _ = t.turn_spans
    obs = chat.decode(t.completion_ids[e0:s1])
    assert obs == "<|im_end|>\n<|im_start|>tool\nresult 1: 42<|im_end|>\n<|im_start|>assistant\n"
    assert "[hidden]" not in chat.decode(t.ids)  # the training context keeps every turn as sampled
    for (prompt, gen), (s, e) in zip(engine.calls, t.turn_spans):
        assert prompt == t.ids[: len(t.prompt_ids) + s] and t.completion_ids[s:e] == gen.token_ids


def test_token_roles_and_void_turns(tiny_tokenizer):
    """token_roles: "m" exactly on sampled ids, "o" on the tool output, "t" on template text."""
    (t,) = _runner(tiny_tokenizer, [TOOL_TURN, TOOL_TURN, ANSWER_TURN])[1].run([0])
    assert len(t.token_roles) == len(t.completion_ids) and t.num_void_turns == 0
    assert [r == "m" for r in t.token_roles] == [m == 1 for m in t.loss_mask]
    chat = ChatTemplate(tiny_tokenizer)
    (_, e0), (s1, _), _ = t.turn_spans
    observed = [i for i in range(e0, s1) if t.token_roles[i] == "o"]
    assert chat.decode([t.completion_ids[i] for i in observed]).strip() == "result 1: 42"
    assert chat.decode(t.completion_ids[e0 : observed[0]]) == "<|im_end|>\n<|im_start|>tool\n"
    # a turn cut at max_tokens_per_turn is a void turn, with on_turn_limit "continue" too (counted once)
    long_turn = ("word " * 50, False)
    _, runner = _runner(tiny_tokenizer, [long_turn], max_tokens_per_turn=10, on_turn_limit="continue", max_turns=2)
    (t,) = runner.run([0])
    assert (t.num_turns, t.num_void_turns) == (2, 2) and runner.last_metrics["rollout/void_turns"] == 2


def test_old_trajectory_dicts_still_load(tiny_tokenizer):
    """Trajectories written before num_void_turns / token_roles existed load with the defaults."""
    from alp_agent.rollout.trajectory import Trajectory

    (t,) = _runner(tiny_tokenizer, [TOOL_TURN, ANSWER_TURN])[1].run([0])
    old = {k: v for k, v in t.to_dict().items() if k not in ("num_void_turns", "token_roles")}
    back = Trajectory.from_dict(old)
    assert back.token_roles == "" and back.num_void_turns == 0 and back.completion_ids == t.completion_ids
    assert Trajectory.from_dict(t.to_dict()) == t


def test_a_template_that_cannot_render_an_observation_ends_the_episode_cleanly(tiny_tokenizer):
    """A template that rejects the tool role: a defined finish reason with the template's message, no crash."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (t,) = _runner(tok, [TOOL_TURN, ANSWER_TURN])[1].run([0])
    assert (t.finish_reason, t.truncated, t.num_turns) == ("template_error", True, 1)
    assert "no tool role" in t.info["template_error"] and t.loss_mask[-1] == 1

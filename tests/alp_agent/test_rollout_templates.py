"""Multi-turn rollout under three chat templates written in the tests (chat_templates.py): SmolLM2's ChatML, a
Qwen3-style `<think>`-normalising one and a DeepSeek-R1-style reasoning-dropping one.

Without vLLM: a scripted policy makes real native tool calls (`<tool_call>` json) in a real json-format ToolEnv; the
calls go into the history with ids, the results come back as `tool` messages with those ids, the tools reach the
first prompt, and the history-rewriting templates never end an episode.
With the real vLLM (fp32, tiny random model): episodes with a tool call every turn reach the env's end; loss masks
cover exactly the sampled ids; the engine's logprobs of those ids equal a teacher-forced fp32 forward (1e-4); a turn
that ended on a stop string is followed by the template's closing text with mask 0.
"""

from __future__ import annotations

import pytest

from alp_agent.rollout.chat import ChatTemplate
from alp_agent.rollout.config import RolloutConfig
from alp_agent.rollout.runner import RolloutRunner
from tests.alp_agent.chat_templates import CLOSING, TEMPLATES, with_template
from tests.fakes import RecordingEngine, Reply, ScriptedPolicy, SyncScriptedEnv

CALL = '<think>\nI should multiply.\n</think>\n<tool_call>\n{"name": "multiply", "arguments": {"a": 6, "b": 7}}\n</tool_call>'
ANSWER = "<think>\nThe tool said 42.\n</think>\n\nThe answer is \\boxed{42}."


def multiply(a: int, b: int) -> str:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return str(a * b)


def tool_calling_policy(text: str, stop: tuple[str, ...]) -> Reply:
    """Turn 1: a native tool call (ends on the env's stop string, as vLLM returns it). Turn 2: the answer + EOS."""
    first = '"a": 6' not in text  # no call of ours in the context yet
    return (CALL, False) if first else (ANSWER, True)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_native_tool_calls_reach_the_env_end_under_each_template(template, tiny_tokenizer):
    import gymnasium as gym

    import envs  # noqa: F401 - registers alp/Tool-v0

    tok = with_template(tiny_tokenizer, template)
    policy = ScriptedPolicy(tok, tool_calling_policy)

    def env_fn():
        tasks = [{"prompt": "What is 6 times 7?", "answer": "42"}]
        return gym.make("alp/Tool-v0", tasks=tasks, tools=[multiply], tool_format="json", max_turns=4)

    runner = RolloutRunner(policy, tok, env_fn, RolloutConfig(seed=0, max_turns=4))
    trajs = runner.run([0], n_per_task=2)
    chat = ChatTemplate(tok)
    for t in trajs:
        assert (t.finish_reason, t.reward, t.num_turns, t.num_tool_calls, t.num_tool_errors) == ("answer", 1.0, 2, 1, 0)
        assert t.num_void_turns == 0 and len(t.token_roles) == len(t.completion_ids)
        assert [r == "m" for r in t.token_roles] == [m == 1 for m in t.loss_mask]
        prompt = chat.decode(t.prompt_ids)  # the tool reached the model: template tools= or a system section
        assert '"name": "multiply"' in prompt and "Multiply two integers." in prompt and "<tool_call>" in prompt
        (s0, e0), (s1, e1) = t.turn_spans
        assert t.completion_ids[s0:e0] == policy.calls[0][1].token_ids  # sampled ids as they were
        obs = chat.decode(t.completion_ids[e0:s1])
        assert obs.startswith(CLOSING.get(template) or chat.closing_text) and set(t.loss_mask[e0:s1]) == {0}
        assert chat.decode([x for x, r in zip(t.completion_ids[e0:s1], t.token_roles[e0:s1]) if r == "o"]) == "42"
        if template == "qwen3":  # the result went in as a native tool message, rendered by the template
            assert (
                obs
                == "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
            )
        assert t.info["env_info"]["end_reason"] == "answer"
    # Qwen3 would re-render the call's <think> and <tool_call>; R1 drops the reasoning: a naive re-render drifts,
    # here it is only counted
    drift = runner.last_metrics["rollout/token_drift"]
    assert drift > 0 if template in ("qwen3", "r1") else drift >= 0
    runner.close()


def test_tools_go_through_the_template_only_where_it_renders_them(tiny_tokenizer):
    schema = {"type": "function", "function": {"name": "multiply", "description": "x", "parameters": {}}}
    assert ChatTemplate(with_template(tiny_tokenizer, "qwen3")).renders_tools()
    assert not ChatTemplate(with_template(tiny_tokenizer, "chatml")).renders_tools()
    assert not ChatTemplate(with_template(tiny_tokenizer, "r1")).renders_tools()
    qwen = ChatTemplate(with_template(tiny_tokenizer, "qwen3"), [schema])
    assert "# Tools" in qwen.render([{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------------------------- real vLLM, fp32


def calling_env(finish_after: int = 3) -> SyncScriptedEnv:
    """Treats every model turn as one native call of `python` (a random model writes no parsable call): replies
    with a `tool` message carrying the call's id, reports the call in the info, terminates after `finish_after`.
    Stepped in a worker thread (no `astep`), as a plain Gymnasium env is."""
    return SyncScriptedEnv(finish_after, stop="</tool_call>", native_calls=True)


@pytest.fixture(scope="module")
def fp32_engine(tiny_model_dir):
    from alp_agent.engine.vllm_engine import VLLMEngine

    eng = VLLMEngine(model=tiny_model_dir, dtype="float32", max_model_len=2048, seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def fp32_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.mark.vllm
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_multiturn_on_vllm_masks_and_teacher_forced_logprobs(template, fp32_engine, fp32_model, tiny_tokenizer):
    import torch

    from alp_agent.train.logprobs import sequence_logprobs

    tok = with_template(tiny_tokenizer, template)
    engine = RecordingEngine(fp32_engine)
    cfg = RolloutConfig(max_tokens_per_turn=16, on_turn_limit="continue", max_turns=6, seed=0, temperature=1.0)
    runner = RolloutRunner(engine, tok, calling_env, cfg)
    trajs = runner.run([0, 1], n_per_task=2)
    sent = {tuple(p) for p, _ in engine.calls}
    for t in trajs:
        assert (t.finish_reason, t.num_turns, t.num_tool_calls, t.reward) == ("answer", 3, 3, 1.0)  # the env's end
        mask = [0] * len(t.completion_ids)
        for s, e in t.turn_spans:
            assert tuple(t.ids[: len(t.prompt_ids) + s]) in sent  # the engine saw exactly the running ids
            mask[s:e] = [1] * (e - s)
        assert t.loss_mask == mask and [r == "m" for r in t.token_roles] == [m == 1 for m in mask]
        with torch.no_grad():
            lp, _ = sequence_logprobs(fp32_model, torch.tensor([t.ids]))
        train = lp[0, len(t.prompt_ids) :].tolist()
        worst = max(abs(train[i] - t.infer_logprobs[i]) for i in range(len(mask)) if mask[i])
        assert worst < 1e-4, (template, worst)
    if template != "chatml":
        assert runner.last_metrics["rollout/token_drift"] > 0  # history rewritten by the template; nothing ended


@pytest.mark.vllm
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_stop_string_turn_gets_closing_text_with_mask_0(template, fp32_engine, tiny_tokenizer):
    """Greedy, stop string = a token the model is known to produce: the turn ends on it (kept, with its logprob), and
    the template's closing text follows as masked template tokens."""
    tok = with_template(tiny_tokenizer, template)
    greedy_cfg = RolloutConfig(temperature=0.0, max_tokens_per_turn=12)
    (probe,) = RolloutRunner(fp32_engine, tok, lambda: calling_env(1), greedy_cfg).run([0])
    greedy = probe.completion_ids[: probe.turn_spans[0][1]]
    texts = [tok.decode([x]) for x in greedy]
    k = next(i for i in range(2, len(texts)) if texts[i].strip() and texts[i] not in "".join(texts[:i]))
    cfg = RolloutConfig(max_tokens_per_turn=12, temperature=0.0, stop_strings=[texts[k]], on_turn_limit="continue")
    (t,) = RolloutRunner(fp32_engine, tok, lambda: calling_env(2), cfg).run([0])
    s, e = t.turn_spans[0]
    assert t.completion_ids[s:e] == greedy[: k + 1] and t.loss_mask[s:e] == [1] * (e - s)
    chat = ChatTemplate(tok)
    closing = chat.encode(CLOSING.get(template) or chat.closing_text)
    assert t.completion_ids[e : e + len(closing)] == closing
    assert t.loss_mask[e : e + len(closing)] == [0] * len(closing) and set(t.token_roles[e : e + len(closing)]) == {"t"}
    assert all(lp == 0.0 for lp in t.infer_logprobs[e : e + len(closing)])
    assert t.finish_reason == "answer"

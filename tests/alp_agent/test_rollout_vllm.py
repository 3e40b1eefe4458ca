"""Multi-turn rollout on the real vLLM engine in bfloat16 (the paper's inference setting) with a scripted tool env:
masks exact against what the engine returned, prefix property every turn, no drift, bf16 logprobs sane vs fp32."""

from __future__ import annotations

import pytest
import torch

from alp_agent.engine.base import SamplingConfig
from alp_agent.rollout.chat import ChatTemplate
from alp_agent.rollout.config import RolloutConfig
from alp_agent.rollout.runner import RolloutRunner
from alp_agent.train.logprobs import sequence_logprobs
from tests.fakes import RecordingEngine, ScriptedEnv

pytestmark = pytest.mark.vllm


def tool_env(finish_after: int = 4) -> ScriptedEnv:
    """Scripted env: a tool observation after every turn, terminates (reward 1) after `finish_after` turns."""
    return ScriptedEnv(finish_after, delay=0.001)


@pytest.fixture(scope="module")
def bf16_engine(tiny_model_dir):
    from alp_agent.engine.vllm_engine import VLLMEngine

    eng = VLLMEngine(model=tiny_model_dir, dtype="bfloat16", max_model_len=1024, seed=0)
    yield eng
    eng.close()


def test_multiturn_masks_prefix_and_drift_on_vllm_bf16(bf16_engine, tiny_tokenizer, tiny_model_dir):
    engine = RecordingEngine(bf16_engine)
    cfg = RolloutConfig(max_tokens_per_turn=12, on_turn_limit="continue", max_turns=6, seed=0, temperature=1.0)
    runner = RolloutRunner(engine, tiny_tokenizer, tool_env, cfg)
    trajs = runner.run([0, 1], n_per_task=3, policy_version=2)
    chat = ChatTemplate(tiny_tokenizer)
    assert len(trajs) == 6 and [t.group_id for t in trajs] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(t.completion_ids) for t in trajs[:3]}) == 3  # group members sample independently
    by_prompt: dict[tuple, list] = {}  # group members share their first prompt
    for p, g in engine.calls:
        by_prompt.setdefault(tuple(p), []).append(g)
    for t in trajs:
        assert t.finish_reason == "answer" and t.num_turns == 4 and t.reward == 1.0 and t.policy_version == 2
        assert t.token_drift == 0 and t.has_finite_logprobs()
        mask = [0] * len(t.completion_ids)
        for s, e in t.turn_spans:
            # prefix property: the engine was prompted with exactly the running ids, and its ids were kept as is
            gens = by_prompt[tuple(t.ids[: len(t.prompt_ids) + s])]
            assert any(t.completion_ids[s:e] == g.token_ids and t.infer_logprobs[s:e] == g.logprobs for g in gens)
            mask[s:e] = [1] * (e - s)
        assert t.loss_mask == mask
    # the ids up to each turn decode to exactly a full re-render of the conversation so far
    for t in trajs:
        msgs = [
            {"role": "system", "content": "Use the python tool."},
            {"role": "user", "content": f"Task {t.info['task_index']}: 6*7?"},
        ]
        for k, (s, e) in enumerate(t.turn_spans):
            assert chat.decode(t.ids[: len(t.prompt_ids) + s]) == chat.render(msgs, add_generation_prompt=True)
            msgs += [
                {"role": "assistant", "content": chat.turn_content(t.completion_ids[s:e])},
                {"role": "tool", "content": f"out[{k + 1}]: 42"},
            ]
    assert runner.last_metrics["rollout/token_drift"] == 0

    # bf16 inference vs the float32 trainer forward: finite, small mismatch (the paper's setting)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, torch.tensor([t.ids]))
    train = lp[0, len(t.prompt_ids) :]
    d = [abs(float(train[i]) - t.infer_logprobs[i]) for i in range(len(t.completion_ids)) if t.loss_mask[i]]
    assert max(d) < 0.5 and sum(d) / len(d) < 0.1


def test_stop_string_turn_on_vllm_then_template_eos_masked(bf16_engine, tiny_tokenizer):
    """Greedy decoding, stop string = a token the model is known to produce: the turn ends on it (kept, with its
    logprob), and the template's <|im_end|> that follows is a masked, non-model token."""
    chat = ChatTemplate(tiny_tokenizer)
    env = tool_env(2)
    first_prompt = chat.encode(chat.render(env.reset(options={"task_index": 0})[0], add_generation_prompt=True))
    greedy = bf16_engine.generate([first_prompt], SamplingConfig(temperature=0.0, max_tokens=12))[0]
    texts = [tiny_tokenizer.decode([x]) for x in greedy.token_ids]
    k = next(i for i in range(2, 12) if texts[i].strip() and texts[i] not in "".join(texts[:i]))
    cfg = RolloutConfig(max_tokens_per_turn=12, temperature=0.0, stop_strings=[texts[k]], on_turn_limit="continue")
    (t,) = RolloutRunner(bf16_engine, tiny_tokenizer, lambda: tool_env(2), cfg).run([0])
    s, e = t.turn_spans[0]
    assert t.completion_ids[s:e] == greedy.token_ids[: k + 1]
    assert t.completion_ids[e] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") and t.loss_mask[e] == 0
    assert t.infer_logprobs[e] == 0.0 and t.token_drift == 0 and t.temperature == 0.0

"""Issue 13 item 4: the trainer's log-probs are those of the distribution vLLM sampled from, truncation included.
Real in-process vLLM (float32) on the tiny random model, sampling at top-p 0.9 / top-k 8; the trainer computes the
same tokens' log-probs through its micro-batch path (packed rows, chunked hidden x lm_head)."""

from __future__ import annotations

import pytest
import torch

from alp_agent.engine.base import SamplingConfig
from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train.batching import collate, rows_from
from alp_agent.train.logprobs import microbatch_logprobs

pytestmark = pytest.mark.vllm

PROMPTS = [[1, 4093, 198, 1780, 314, 216, 34, 27, 35, 47, 2, 198, 1, 520, 9531, 198], list(range(100, 140)), [7, 8]]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (1.0, 8), (0.9, 8)])
def test_trainer_logprobs_match_vllm_truncated_sampling(tiny_vllm_engine, hf_model, top_p, top_k):
    s = SamplingConfig(temperature=0.8, top_p=top_p, top_k=top_k, max_tokens=24, seed=3)
    gens = tiny_vllm_engine.generate(PROMPTS, s)
    trajs = [
        Trajectory(p, g.token_ids, [1] * len(g.token_ids), g.logprobs, temperature=0.8, top_p=top_p, top_k=top_k)
        for p, g in zip(PROMPTS, gens)
    ]
    rows = rows_from(trajs, torch.zeros(len(trajs)))
    mb = collate(rows, torch.device("cpu"), packed=True)
    with torch.no_grad():
        ours, _ = microbatch_logprobs(hf_model, mb, chunk_tokens=16)
        plain, _ = microbatch_logprobs(hf_model, collate(rows, torch.device("cpu"), packed=False), chunk_tokens=0)
    valid = mb.mask > 0
    assert torch.allclose(ours[valid], plain[valid], atol=1e-5)  # packed+chunked == padded full logits
    worst = float((ours - mb.infer)[valid].abs().max())
    assert worst < 1e-4, worst
    # truncation matters here: the untruncated log-probs of the same tokens are clearly lower
    for r in rows:
        r.top_p, r.top_k = 1.0, 0
    with torch.no_grad():
        untrunc, _ = microbatch_logprobs(hf_model, collate(rows, torch.device("cpu"), packed=True), chunk_tokens=16)
    assert float((mb.infer - untrunc)[valid].mean()) > 0.05

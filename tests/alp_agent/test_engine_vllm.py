"""The real vLLM engine on the tiny random model (float32): parity with the trainer's logprobs, stop strings, weight
reload, NaN detection. One engine (conftest.tiny_vllm_engine) for the whole module (start-up costs seconds)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from alp_agent.engine.base import SamplingConfig
from alp_agent.engine.checks import NonFiniteLogprobsError
from alp_agent.train.logprobs import sequence_logprobs

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _hf_logprobs(model, prompt, gen_ids, temperature=1.0):
    ids = torch.tensor([prompt + gen_ids])
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, ids, temperature=temperature)
    return lp[0, len(prompt) :].tolist()


PROMPTS = [[1, 4093, 198, 1780, 314, 216, 34, 27, 35, 47, 2, 198, 1, 520, 9531, 198], list(range(100, 140)), [7, 8]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_hf_forward_fp32(tiny_vllm_engine, hf_model, temperature):
    gens = tiny_vllm_engine.generate(PROMPTS, SamplingConfig(temperature=temperature, max_tokens=24, seed=1))
    worst = 0.0
    for prompt, g in zip(PROMPTS, gens):
        assert len(g.token_ids) == len(g.logprobs) == 24 and g.finish_reason == "length"
        ref = _hf_logprobs(hf_model, prompt, g.token_ids, temperature)
        worst = max(worst, max(abs(a - b) for a, b in zip(g.logprobs, ref)))
    assert worst < 1e-4, worst


def test_stop_string_is_kept_with_its_logprob(tiny_vllm_engine, tiny_tokenizer):
    prompt = PROMPTS[0]
    greedy = tiny_vllm_engine.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=16))[0]
    texts = [tiny_tokenizer.decode([t]) for t in greedy.token_ids]
    # a stop string that first appears inside token k
    k = next(i for i in range(3, 16) if texts[i].strip() and texts[i] not in "".join(texts[:i]))
    stop = texts[k]
    g = tiny_vllm_engine.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=16, stop=(stop,)))[0]
    assert g.finish_reason == "stop" and g.stop_reason == stop
    assert g.token_ids == greedy.token_ids[: k + 1]  # the stop token is in the output...
    assert len(g.logprobs) == k + 1  # ...with its logprob
    assert tiny_tokenizer.decode(g.token_ids).endswith(stop)


def test_weight_update_changes_distribution_and_restores(tiny_vllm_engine, hf_model):
    prompt, s = PROMPTS[1], SamplingConfig(temperature=1.0, max_tokens=16, seed=5)
    base = tiny_vllm_engine.generate([prompt], s)[0]
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    torch.manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    try:
        tiny_vllm_engine.load_weights(perturbed)
        moved = tiny_vllm_engine.generate([prompt], s)[0]
        assert moved.token_ids != base.token_ids or moved.logprobs != base.logprobs
        # the new weights are exactly the perturbed ones: vLLM agrees with an HF forward of the perturbed model
        hf_model.load_state_dict(perturbed)
        ref = _hf_logprobs(hf_model, prompt, moved.token_ids)
        assert max(abs(a - b) for a, b in zip(moved.logprobs, ref)) < 1e-4
    finally:
        hf_model.load_state_dict(original)
        tiny_vllm_engine.load_weights(original)
    back = tiny_vllm_engine.generate([prompt], s)[0]
    assert back.token_ids == base.token_ids
    assert max(abs(a - b) for a, b in zip(back.logprobs, base.logprobs)) < 1e-6


def test_nonfinite_logprobs_are_caught(tiny_vllm_engine, hf_model):
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    broken = dict(original)
    broken["model.norm.weight"] = torch.full_like(original["model.norm.weight"], float("nan"))
    try:
        tiny_vllm_engine.load_weights(broken)
        with pytest.raises(NonFiniteLogprobsError):
            tiny_vllm_engine.generate([PROMPTS[0]], SamplingConfig(max_tokens=4, seed=0))
    finally:
        tiny_vllm_engine.load_weights(original)
    g = tiny_vllm_engine.generate([PROMPTS[0]], SamplingConfig(max_tokens=4, seed=0))[0]
    assert len(g.logprobs) == 4


def test_async_requests_batch_together(tiny_vllm_engine):
    async def main():
        return await asyncio.gather(
            *[tiny_vllm_engine.agenerate(PROMPTS[i % 3], SamplingConfig(max_tokens=8 + i, seed=i)) for i in range(12)]
        )

    gens = asyncio.run(main())
    assert [len(g.token_ids) for g in gens] == [8 + i for i in range(12)]


def test_top_k_top_p_logprobs_are_of_the_truncated_distribution(tiny_vllm_engine, hf_model):
    """Documented semantics: with top-k/top-p the recorded logprob is log of the renormalised truncated
    distribution (vLLM processed_logprobs), not of the full softmax."""
    prompt = PROMPTS[1]
    for s in (
        SamplingConfig(temperature=0.8, top_k=20, max_tokens=6, seed=2),
        SamplingConfig(temperature=1.0, top_p=0.5, max_tokens=6, seed=3),
    ):
        g = tiny_vllm_engine.generate([prompt], s)[0]
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + g.token_ids])).logits[0].float() / s.temperature
        for i, tok in enumerate(g.token_ids):
            row = logits[len(prompt) + i - 1]
            if s.top_k:
                keep = row >= torch.topk(row, s.top_k).values[-1]
            else:
                probs, order = torch.softmax(row, -1).sort(descending=True)
                cut = (probs.cumsum(0) - probs) < s.top_p  # vLLM keeps the smallest prefix with mass >= top_p
                keep = torch.zeros_like(row, dtype=torch.bool)
                keep[order[cut]] = True
            truncated = torch.log_softmax(row.masked_fill(~keep, float("-inf")), -1)[tok].item()
            assert abs(g.logprobs[i] - truncated) < 1e-4
            assert g.logprobs[i] > torch.log_softmax(row, -1)[tok].item()


def _resident_bytes(ranges: list[tuple[int, int]]) -> int:
    """Bytes of the pages inside (address, bytes) ranges that are in RAM now (mincore(2))."""
    import ctypes
    import mmap

    from alp_agent.engine.kv_release import whole_pages

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page, total = mmap.PAGESIZE, 0
    for addr, n in ranges:
        start, end = whole_pages(addr, n)
        vec = ctypes.create_string_buffer((end - start) // page)
        assert libc.mincore(start, end - start, vec) == 0, ctypes.get_errno()
        total += sum(b & 1 for b in vec.raw) * page
    return total


def test_released_kv_cache_leaves_memory_and_samples_the_same(tiny_vllm_engine):
    """release_kv_cache (the CPU form of vLLM's sleep, run before each update) hands the whole 1 GiB cache back to
    the OS, and afterwards the same requests sample exactly the same tokens and logprobs. The prompt spans several
    32-token blocks and was just cached: had the prefix cache not been reset, its blocks (now zero pages) would be
    reused and the logprobs would change."""
    from alp_agent.engine.kv_release import kv_cache_ranges

    prompt, s = PROMPTS[1] * 8, SamplingConfig(temperature=1.0, max_tokens=24, seed=11)
    assert len(prompt) > 3 * 32
    before = tiny_vllm_engine.generate([prompt, prompt[:-5]], s)
    ranges = tiny_vllm_engine._engine.collective_rpc(kv_cache_ranges)[0]
    assert sum(n for _, n in ranges) == tiny_vllm_engine.config.cpu_kvcache_space_gib * 2**30
    assert _resident_bytes(ranges) > 0  # the blocks just written at least
    released = tiny_vllm_engine.release_kv_cache()
    assert released > 0.99 * sum(n for _, n in ranges)
    assert _resident_bytes(ranges) == 0
    after = tiny_vllm_engine.generate([prompt, prompt[:-5]], s)
    assert 0 < _resident_bytes(ranges) < 0.1 * released  # only the blocks this request wrote came back
    for a, b in zip(before, after):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs


def test_a_refused_kv_release_is_logged_and_changes_nothing(tiny_vllm_engine, monkeypatch, caplog):
    """If the kernel refuses the madvise (an unusual mapping), the job goes on: 0 bytes, a warning, same samples."""
    import alp_agent.engine.kv_release as kv_release

    def refuse(ranges):
        raise OSError(22, "madvise(MADV_DONTNEED) failed on the KV cache")

    prompt, s = PROMPTS[1] * 4, SamplingConfig(temperature=1.0, max_tokens=12, seed=4)
    before = tiny_vllm_engine.generate([prompt], s)
    monkeypatch.setattr(kv_release, "release_pages", refuse)
    with caplog.at_level("WARNING"):
        assert tiny_vllm_engine.release_kv_cache() == 0
    assert "stays resident" in caplog.text
    after = tiny_vllm_engine.generate([prompt], s)
    assert before[0].token_ids == after[0].token_ids and before[0].logprobs == after[0].logprobs

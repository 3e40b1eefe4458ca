"""Weight-only quantized rollouts (engine.weight_quantization): per-channel error bounds, which tensors are touched,
and on the tiny model with real vLLM that the int8 engine samples from another distribution than the bf16 one, with a
larger mismatch KL(mu||pi) against the float32 trainer, at start-up and after a weight sync."""

from __future__ import annotations

import math

import pytest
import torch

from alp_agent.app.repro_mismatch import mismatch_stats
from alp_agent.engine.quantize import (
    FP8_MAX,
    is_quantized_weight,
    quantize_dequantize,
    quantize_state_dict,
)


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g) * torch.logspace(-4, 1, 16).unsqueeze(1)  # rows of very different scales
    w[3] = 0.0  # an all-zero row stays zero (no 0/0)
    w[5, 7] = 40.0  # an outlier sets its row's scale
    return w


def test_int8_error_at_most_half_a_step_per_channel():
    w = _weights()
    q = quantize_dequantize(w, "int8")
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert q.dtype == torch.float32 and q.shape == w.shape
    assert torch.all((w - q).abs() <= scale / 2 + 1e-6 * scale)
    assert torch.all(q[3] == 0)
    # at most 255 distinct values per row, all integer multiples of the row's scale, max kept exactly
    k = q[5] / scale[5]
    assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() == pytest.approx(127, abs=1e-4)
    assert (w - q).abs().max() > 0  # it does change the weights


def test_fp8_relative_error_and_range():
    w = _weights(1)
    q = quantize_dequantize(w, "fp8")
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    err = (w - q).abs()
    # e4m3: 3 mantissa bits -> half an ulp = 2^-4 relative for normals; subnormal spacing 2^-9 -> 2^-10 absolute
    assert torch.all(err <= torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5))
    assert torch.isfinite(q).all() and torch.all(q[3] == 0)
    assert q.abs().amax(dim=1).tolist() == pytest.approx(w.abs().amax(dim=1).tolist(), rel=1e-6)
    # a mid-range value is representable only on the 3-bit mantissa grid: error is not zero in general
    assert err.max() > 0


def test_only_decoder_linear_weights_are_touched():
    sd = {
        "model.embed_tokens.weight": torch.randn(50, 8),
        "lm_head.weight": torch.randn(50, 8),
        "model.norm.weight": torch.randn(8),
        "model.layers.0.input_layernorm.weight": torch.randn(8),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(8),
        "model.layers.11.mlp.down_proj.weight": torch.randn(8, 16),
        "model.layers.11.mlp.gate_proj.weight": torch.randn(16, 8),
    }
    out = quantize_state_dict(sd, "int8")
    changed = {k for k in sd if not torch.equal(sd[k], out[k])}
    assert changed == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.11.mlp.down_proj.weight",
        "model.layers.11.mlp.gate_proj.weight",
    }
    assert {k for k, v in sd.items() if is_quantized_weight(k, v)} == changed
    assert quantize_state_dict(sd, "none") == sd
    with pytest.raises(ValueError, match="unknown weight quantization"):
        quantize_dequantize(torch.ones(2, 2), "int4")  # type: ignore[arg-type]


def test_mismatch_stats_hand_computed():
    # two tokens: log r = log 2 and log 0.5
    s = mismatch_stats([0.0, 0.0], [math.log(2), math.log(0.5)])
    assert s["tokens"] == 2
    assert s["kl_k1"] == pytest.approx(0.0)
    assert s["kl_k3"] == pytest.approx(((2 - 1 - math.log(2)) + (0.5 - 1 + math.log(2))) / 2)
    assert s["chi2"] == pytest.approx((4 + 0.25) / 2 - 1)
    assert s["ess"] == pytest.approx(2.5**2 / (2 * 4.25))
    assert s["ratio_max"] == pytest.approx(2.0)
    assert mismatch_stats([], [])["tokens"] == 0
    assert mismatch_stats([0.0, float("nan")], [0.0, 0.0])["tokens"] == 1


# ------------------------------------------------------------------------------------------- real vLLM, tiny model
PROMPTS = [[1, 4093, 198, 1780, 314, 216, 34, 27, 35, 47, 2, 198], list(range(100, 130)), [7, 8, 9]] * 4


def _kl_vs_trainer(engine, hf_model) -> tuple[dict[str, float], list]:
    from alp_agent.engine.base import SamplingConfig
    from alp_agent.train.logprobs import sequence_logprobs

    gens = engine.generate(PROMPTS, SamplingConfig(temperature=1.0, max_tokens=32, seed=3))
    eng, tr = [], []
    for p, g in zip(PROMPTS, gens):
        with torch.no_grad():
            lp, _ = sequence_logprobs(hf_model, torch.tensor([p + g.token_ids]), start=len(p))
        eng += g.logprobs
        tr += lp[0, len(p) :].tolist()
    return mismatch_stats(eng, tr), gens


@pytest.mark.vllm
def test_quantized_engines_have_a_larger_mismatch_than_bf16(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from alp_agent.engine.vllm_engine import VLLMEngine

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    stats, gens = {}, {}
    for mode in ("none", "int8", "fp8"):
        eng = VLLMEngine(model=tiny_model_dir, dtype="bfloat16", max_model_len=512, seed=0, weight_quantization=mode)
        try:
            stats[mode], gens[mode] = _kl_vs_trainer(eng, hf)
            if mode == "int8":
                # a weight sync of the trainer's float32 weights is quantized the same way as the start-up
                eng.load_weights({k: v.detach().clone() for k, v in hf.state_dict().items()})
                again, regen = _kl_vs_trainer(eng, hf)
        finally:
            eng.close()
    first_lp = {m: [g.logprobs[0] for g in gens[m]] for m in gens}
    assert first_lp["none"] != first_lp["int8"]  # same prompts and seed, another sampling distribution
    assert stats["int8"]["kl_k3"] > 2 * stats["none"]["kl_k3"] > 0, stats
    assert stats["fp8"]["kl_k3"] > 2 * stats["none"]["kl_k3"], stats  # e4m3's 3 mantissa bits: coarser still
    print({m: round(s["kl_k3"], 6) for m, s in stats.items()})  # chi2 on ~400 tokens is too noisy to compare
    # after load_weights the int8 engine is the same int8 policy as at start (not the unquantized one)
    assert [g.token_ids for g in regen] == [g.token_ids for g in gens["int8"]]
    assert again["kl_k3"] == pytest.approx(stats["int8"]["kl_k3"], rel=0.05)

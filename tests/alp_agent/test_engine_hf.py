"""HFEngine (transformers generate) and model resolution: fast, no vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alp_agent.engine.base import SamplingConfig
from alp_agent.engine.checks import NonFiniteLogprobsError
from alp_agent.train.logprobs import sequence_logprobs


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    from alp_agent.engine.hf_engine import HFEngine

    return HFEngine(model=tiny_model_dir, dtype="float32", max_model_len=512)


def test_hf_engine_logprobs_are_the_trainer_logprobs(hf_engine):
    prompt = list(range(200, 220))
    for temperature in (1.0, 0.7):
        (g,) = hf_engine.generate([prompt], SamplingConfig(temperature=temperature, max_tokens=10, seed=0))
        assert len(g.token_ids) == len(g.logprobs) == 10 and g.finish_reason == "length"
        with torch.no_grad():
            lp, _ = sequence_logprobs(hf_engine.model, torch.tensor([prompt + g.token_ids]), temperature=temperature)
        ref = lp[0, len(prompt) :].tolist()
        assert max(abs(a - b) for a, b in zip(g.logprobs, ref)) < 1e-5


def test_hf_engine_stop_string_and_weights(hf_engine, tiny_tokenizer):
    prompt = list(range(300, 310))
    greedy = hf_engine.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=12))[0]
    texts = [tiny_tokenizer.decode([t]) for t in greedy.token_ids]
    k = next(i for i in range(2, 12) if texts[i].strip() and texts[i] not in "".join(texts[:i]))
    g = hf_engine.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=12, stop=(texts[k],)))[0]
    assert g.token_ids == greedy.token_ids[: k + 1] and g.finish_reason == "stop" and g.stop_reason == texts[k]

    original = {n: v.clone() for n, v in hf_engine.model.state_dict().items()}
    try:
        hf_engine.load_weights({n: v + 0.05 * torch.randn_like(v) for n, v in original.items()})
        moved = hf_engine.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=12))[0]
        assert moved.token_ids != greedy.token_ids
        broken = dict(original)
        broken["model.norm.weight"] = torch.full_like(original["model.norm.weight"], float("nan"))
        hf_engine.load_weights(broken)
        with pytest.raises(NonFiniteLogprobsError):
            hf_engine.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=3))
    finally:
        hf_engine.load_weights(original)
    assert hf_engine.generate([prompt], SamplingConfig(temperature=0.0, max_tokens=12))[0].token_ids == greedy.token_ids


def test_engine_config_rejects_unknown_fields():
    from pydantic import ValidationError

    from alp_agent.engine.config import EngineConfig

    with pytest.raises(ValidationError):
        EngineConfig(gpu_mem=0.3)
    assert EngineConfig().dtype == "bfloat16"


def test_tiny_model_folder_is_a_normal_hf_model(tiny_model_dir, tiny_llama_dir):
    from transformers import AutoConfig

    for path, arch in ((tiny_model_dir, "qwen2"), (tiny_llama_dir, "llama")):
        cfg = AutoConfig.from_pretrained(path)
        assert cfg.model_type == arch and cfg.num_hidden_layers == 2
        assert (Path(path) / "model.safetensors").is_file() and (Path(path) / "chat_template.jinja").is_file()


def test_smollm2_gguf_converts_to_a_working_safetensors_folder():
    """The embedded default: GGUF -> cached float32 safetensors folder; it answers a trivial question."""
    from transformers import AutoModelForCausalLM

    from alp_agent.models import load_tokenizer, resolve_model

    path = resolve_model("smollm2")
    cfg = json.loads((Path(path) / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    assert resolve_model("default") == path  # cached: the second call is instant
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1] :])


def test_resolve_model_errors_are_clear(tmp_path):
    from alp_agent.models import ModelResolutionError, resolve_model

    with pytest.raises(ModelResolutionError, match="config.json"):
        resolve_model(tmp_path)


def test_backend_transformers_makes_an_hf_engine_and_checks_its_limits(tiny_model_dir):
    """engine.backend=transformers: the job's factory returns HFEngine (a Python without vLLM, e.g. a bare GPU
    image); it is one in-process engine, so pools, process placement and quantized rollouts are refused up front."""
    from pydantic import ValidationError

    from alp_agent.engine.config import EngineConfig
    from alp_agent.engine.factory import make_engine
    from alp_agent.engine.hf_engine import HFEngine

    engine = make_engine(EngineConfig(backend="transformers", model=tiny_model_dir, dtype="float32"))
    assert isinstance(engine, HFEngine)
    (g,) = engine.generate([list(range(200, 210))], SamplingConfig(temperature=1.0, max_tokens=4, seed=0))
    assert len(g.token_ids) == len(g.logprobs) == 4
    for bad in ({"placement": "process"}, {"weight_quantization": "int8"}):
        with pytest.raises(ValidationError, match="backend: transformers runs one in-process engine"):
            EngineConfig(backend="transformers", **bad)


def test_missing_vllm_is_a_one_line_placement_error(monkeypatch, tiny_model_dir):
    import importlib.util

    from alp_agent.engine import factory
    from alp_agent.engine.config import EngineConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(factory.PlacementError, match="vLLM is not installed .* engine.backend=transformers"):
        factory.make_engine(EngineConfig(model=tiny_model_dir))

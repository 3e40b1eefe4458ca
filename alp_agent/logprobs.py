"""The one logprob computation of the project: trainer, tests and parity checks all call this.

Position t of the result is log pi(ids[t] | ids[:t]) with logits divided by the sampling temperature, so it is
directly comparable to the inference engine's sampled-token logprob for the same token.
"""

from __future__ import annotations

import torch


def logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `targets` under `logits` (..., V), computed in float32.

    Uses gather - logsumexp instead of a full log_softmax so only one (..., V) float32 tensor is alive.
    Returns (logprobs, entropy or None), both shaped like `targets`.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - lse
    entropy = None
    if with_entropy:
        p = torch.softmax(logits, dim=-1)
        entropy = lse - (p * logits).sum(-1)
    return logp, entropy


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs of a (B, T) batch of ids under a causal LM.

    Returns (B, T) tensors aligned with input_ids: out[:, t] = log p(ids[:, t] | ids[:, :t]); out[:, 0] = 0
    (the first token has no context). Right padding is expected; padded positions hold garbage to be masked.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, :-1]
    logp, ent = logprobs_from_logits(logits, input_ids[:, 1:], temperature, with_entropy)
    zeros = logp.new_zeros(logp.shape[0], 1)
    logp = torch.cat([zeros, logp], dim=1)
    if ent is not None:
        ent = torch.cat([zeros, ent], dim=1)
    return logp, ent

"""The one logprob computation of the project: trainer, tests and parity checks all call this.

Position t of the result is log pi(ids[t] | ids[:t]) with logits divided by the sampling temperature, so it is
directly comparable to the inference engine's sampled-token logprob for the same token.
"""

from __future__ import annotations

import torch


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of `targets` under `logits` (..., V), computed in float32.

    Uses gather - logsumexp instead of a full log_softmax so only one (..., V) float32 tensor is alive.
    Returns (logprobs, entropy or None), both shaped like `targets`. entropy_grad=False computes the entropy as a
    metric only (no graph: autograd would otherwise keep a (..., V) softmax alive for as long as the entropy lives).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - lse
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
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
    start: int = 1,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs of a (B, T) batch of ids under a causal LM.

    Returns (B, T) tensors aligned with input_ids: out[:, t] = log p(ids[:, t] | ids[:, :t]); out[:, 0] = 0
    (the first token has no context). Right padding is expected; padded positions hold garbage to be masked.
    `start` (>= 1): positions before it are not needed (the shared prompt of the batch) and come back as 0; the LM
    head and the float32 softmax then run only on positions start-1.. (`logits_to_keep`), which saves the vocabulary
    projection of every prompt token (a fifth of SmolLM2's compute per token, more with 150k vocabularies).
    """
    T = input_ids.shape[1]
    start = max(1, min(int(start), T))
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=T - start + 1,
    )
    logits = out.logits[:, :-1]
    logp, ent = logprobs_from_logits(logits, input_ids[:, start:], temperature, with_entropy, entropy_grad)
    zeros = logp.new_zeros(logp.shape[0], start)
    logp = torch.cat([zeros, logp], dim=1)
    if ent is not None:
        ent = torch.cat([zeros, ent], dim=1)
    return logp, ent

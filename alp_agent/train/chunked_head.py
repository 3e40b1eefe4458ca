"""Token log-probs and entropy from hidden states x lm_head, a chunk of tokens at a time, forward *and* backward.

Why: the plain path materialises [tokens x vocab] logits, their float32 copy, the softmax for the entropy and, in
backward, a gradient of the same size: for SmolLM2 (49k vocabulary) and a 4096-token micro-batch that is ~0.8 GB per
tensor, returned to the OS and faulted back in on every micro-batch. Here only one [chunk x vocab] block lives at a
time; backward recomputes the block's logits from the saved hidden states (one extra lm_head matmul per token, ~1/5
of SmolLM2's forward) instead of keeping them.

Sampling truncation (top-k, top-p) is reproduced exactly as vLLM's CPU/PyTorch sampler does it (temperature, then
top-k masking of values below the k-th largest, then top-p masking of the ascending-sorted prefix whose cumulative
probability is <= 1 - p, keeping at least one), so these are log-probs of the distribution the engine sampled from.
The kept set is a constant of the forward (no gradient through the sort); it is stored as a per-token threshold.
Choice: a target token outside the kept set (possible after an update) is added to it, so its log-prob stays finite.
"""

from __future__ import annotations

import torch

_TRUNC_CHUNK = 128  # the sort of top-p holds values + int64 indices of a [chunk x vocab] block: keep it small


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    z = (h @ w.t()).float()
    if b is not None:
        z = z + b.float()
    return z / temperature if temperature != 1.0 else z


def truncation_threshold(z: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Per-row smallest logit vLLM keeps after top-k then top-p (vllm apply_top_k_top_p_pytorch), shape (n,)."""
    thr = torch.full(z.shape[:1], -float("inf"), device=z.device)
    if top_k > 0 and top_k < z.shape[-1]:
        thr = z.topk(top_k, dim=-1).values[:, -1]
    if top_p < 1.0:
        zs, _ = z.masked_fill(z < thr[:, None], -float("inf")).sort(dim=-1)
        cum = zs.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        first_kept = (~drop).to(torch.int8).argmax(dim=-1)
        thr = torch.maximum(thr, zs.gather(1, first_kept[:, None]).squeeze(1))
    return thr


def _kept(z: torch.Tensor, thr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    keep = z >= thr[:, None]
    keep.scatter_(1, t[:, None], True)
    return keep


class HeadLogprobs(torch.autograd.Function):
    """(hidden (N,H), weight (V,H), bias (V,) | None, targets (N,)) -> (logp (N,), entropy (N,)), float32.

    compute_dtype: the matmul dtype (bfloat16 under autocast). Gradients flow to hidden, weight and bias from both
    outputs; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, top_p, top_k, chunk, compute_dtype):
        ctx.set_materialize_grads(False)  # an unused output (the entropy, usually) gets None, not a zero tensor
        trunc = top_p < 1.0 or top_k > 0
        chunk = min(chunk, _TRUNC_CHUNK) if trunc else chunk
        n = hidden.shape[0]
        hc, wc = hidden.to(compute_dtype), weight.to(compute_dtype)
        logp = torch.empty(n, device=hidden.device)
        ent, lse = torch.empty_like(logp), torch.empty_like(logp)
        thr = torch.full_like(logp, -float("inf"))
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                e, t = min(n, s + chunk), targets[s : s + chunk]
                z = _logits(hc[s:e], wc, bias, temperature)
                if trunc:
                    thr[s:e] = truncation_threshold(z, top_p, top_k)
                    z.masked_fill_(~_kept(z, thr[s:e], t), -float("inf"))
                lse[s:e] = torch.logsumexp(z, dim=-1)
                logp[s:e] = z.gather(1, t[:, None]).squeeze(1) - lse[s:e]
                p = (z - lse[s:e, None]).exp_()
                ent[s:e] = lse[s:e] - torch.where(p > 0, p * z, 0.0).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, thr)
        ctx.cfg = (temperature, trunc, chunk, compute_dtype)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent, thr = ctx.saved_tensors
        temperature, trunc, chunk, cdt = ctx.cfg
        hc, wc = hidden.to(cdt), weight.to(cdt)
        g_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        g_w = torch.zeros(weight.shape, device=weight.device) if ctx.needs_input_grad[1] else None
        g_b = torch.zeros(bias.shape, device=bias.device) if bias is not None and ctx.needs_input_grad[2] else None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                e, t = min(hidden.shape[0], s + chunk), targets[s : s + chunk]
                z = _logits(hc[s:e], wc, bias, temperature)
                if trunc:
                    z.masked_fill_(~_kept(z, thr[s:e], t), -float("inf"))
                logq = z.sub_(lse[s:e, None])  # log p, in place (-inf where truncated)
                p = logq.exp()
                # d logp_t/dz = onehot_t - p ; d H/dz = -p (log p + H); masked entries have p = 0
                gz = p * (-g_logp[s:e, None])
                if g_ent is not None:  # None when the entropy is a metric only
                    gz -= g_ent[s:e, None].float() * torch.where(p > 0, p * (logq + ent[s:e, None]), 0.0)
                gz.scatter_add_(1, t[:, None], g_logp[s:e, None])
                if temperature != 1.0:
                    gz /= temperature
                if g_b is not None:
                    g_b += gz.sum(0)
                gzc = gz.to(cdt)
                if g_h is not None:
                    g_h[s:e] = (gzc @ wc).to(hidden.dtype)
                if g_w is not None:
                    g_w += (gzc.t() @ hc[s:e]).float()
        g_w = g_w.to(weight.dtype) if g_w is not None else None
        g_b = g_b.to(bias.dtype) if g_b is not None else None
        return g_h, g_w, g_b, None, None, None, None, None, None


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and the entropy of the (truncated) distribution, from (N, H) hidden states; the
    matmul runs in the autocast dtype when autocast is on (bfloat16 training), float32 otherwise."""
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
    return HeadLogprobs.apply(hidden, weight, bias, targets, float(temperature), float(top_p), int(top_k), chunk, cdt)

"""ALP's layerwise perturbation (docs/method.md "The perturbation"): h_l <- h_l + sigma_l * eps_l on the residual stream
entering each perturbed decoder layer, sigma_l = exp(s_l), eps_l ~ N(0, I) over (batch, position, hidden).

How it maps to the spec:
- **Where**: a forward pre-hook on each decoder layer replaces the layer's input hidden state *before* the layer
  runs, i.e. before its input RMSNorm; HF layers add their input back as the residual, so the noise propagates down
  the stream exactly as in the paper. The layer stack is found generically (no per-architecture code).
- **s_l**: one scalar per perturbed layer in `LayerPerturbation.log_sigma` (nn.Parameter when learnable, buffer when
  fixed). The module is *not* a child of the model, so the s_l are never in `model.state_dict()`, never sent to
  vLLM and never exported.
- **When**: only inside `with perturber.active(step, micro)` *and* with the model in train mode. Rollout, reference,
  evaluation and old-logprob forwards run outside it and are clean.
- **Which eps**: eps depends only on (seed, step, micro-batch, layer[, rank under torchrun]), so activation-checkpoint
  recomputation and reruns draw the same noise. The backward pass of checkpointed layers re-enters the hook, so
  `backward()` must be called inside the same `active()` block (the trainer does).
- **Memory**: `_AddNoise` does not save eps for backward; it regenerates it from its seed (dL/dh = identity,
  dL/ds_l = sum(g * sigma_l * eps)), so ALP keeps no extra activation per layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from alp_agent.algo.config import AlgoConfig

_MASK = (1 << 63) - 1


def noise_seed(base: int, step: int, micro: int, layer: int, rank: int = 0) -> int:
    """A 63-bit seed from (base, step, micro, layer[, rank]): a splitmix-style mix so nearby tuples give unrelated
    streams. rank: the trainer process under torchrun, so ranks training different rows draw independent noise;
    rank 0 mixes nothing extra, so a single process draws exactly the noise it always did."""
    x = 0
    for v in (base, step, micro, layer) + ((rank,) if rank else ()):
        x = (x * 0x9E3779B97F4A7C15 + (v & _MASK) + 0x632BE59BD9B4E019) & _MASK
        x ^= x >> 31
    return x


def gaussian(
    shape: torch.Size, seed: int, device: torch.device, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Standard normal noise that depends only on (shape, seed, device type): drawn in float32, then cast.
    out: a float32 tensor of `shape` to draw into in place (the same values, no copy)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    if out is not None:
        return torch.randn(shape, generator=g, device=device, out=out)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


class RowNoise:
    """eps keyed per (row, position) instead of by the tensor's shape: each trajectory (row key) draws its own
    (length, hidden) block from noise_seed(base, step, ROW_KEY + key, layer, rank) and it lands wherever the
    trajectory sits in the micro-batch (segments: (model row, offset, length, key)), so a packed micro-batch and a
    padded one, or any other split into micro-batches, see the same noise at the same token. Positions outside every
    segment (padding) get none."""

    ROW_KEY = 1 << 40  # keeps the row-keyed streams apart from the (step, micro) ones

    def __init__(self, base: int, step: int, layer: int, rank: int, segments: list[tuple[int, ...]]) -> None:
        self.base, self.step, self.layer, self.rank, self.segments = base, step, layer, rank, segments

    def draw(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Each segment drawn in place (the values `gaussian` gives, without its copy), only the rest zeroed."""
        eps = torch.empty(shape, device=device)
        covered: list[list[tuple[int, int]]] = [[] for _ in range(shape[0])]
        for b, off, n, key in (s[:4] for s in self.segments):
            seed = noise_seed(self.base, self.step, self.ROW_KEY + key, self.layer, self.rank)
            gaussian(torch.Size((n, *shape[2:])), seed, device, torch.float32, out=eps[b, off : off + n])
            covered[b].append((off, off + n))
        for b, spans in enumerate(covered):  # padding and bin tails: no noise
            end = 0
            for s, e in [*sorted(spans), (shape[1], shape[1])]:
                if s > end:
                    eps[b, end:s].zero_()
                end = max(end, e)
        return eps


def _eps(shape: torch.Size, seed: int | RowNoise, device: torch.device) -> torch.Tensor:
    return seed.draw(shape, device) if isinstance(seed, RowNoise) else gaussian(shape, seed, device, torch.float32)


class _AddNoise(torch.autograd.Function):
    """y = h + exp(s) * scale * eps(seed), with eps regenerated in backward instead of saved.

    scale is 1 (absolute sigma, the paper) or the detached per-token RMS of h (scale-aware option): a (..., 1) tensor,
    small next to h. Gradients: dy/dh = I (the scale is treated as a constant), dL/ds = sum(g * exp(s) * scale * eps).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, log_sigma: torch.Tensor, scale: torch.Tensor | None, seed: int) -> torch.Tensor:
        eps = _eps(h.shape, seed, h.device)
        sigma = log_sigma.float().exp()
        noise = sigma * eps if scale is None else sigma * scale.float() * eps
        ctx.seed, ctx.shape, ctx.has_scale = seed, h.shape, scale is not None
        ctx.save_for_backward(log_sigma, scale if scale is not None else log_sigma.new_empty(0))
        return h + noise.to(h.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        log_sigma, scale = ctx.saved_tensors
        grad_s = None
        if ctx.needs_input_grad[1]:
            eps = _eps(ctx.shape, ctx.seed, g.device)
            ge = g.float() * eps
            if ctx.has_scale:
                ge = ge * scale.float()
            grad_s = (ge.sum() * log_sigma.float().exp()).to(log_sigma.dtype)
        return g, grad_s, None, None


def add_noise(
    h: torch.Tensor, log_sigma: torch.Tensor, seed: int | RowNoise, scale_aware: bool = False
) -> torch.Tensor:
    """h + exp(log_sigma) * [RMS(h)] * eps(seed); memory-light (eps regenerated in backward)."""
    scale = h.detach().float().pow(2).mean(-1, keepdim=True).sqrt() if scale_aware else None
    return _AddNoise.apply(h, log_sigma, scale, seed)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer stack of any HF causal LM: the usual `model.model.layers`, else the longest ModuleList of
    identical blocks (length num_hidden_layers when the config says so). Raises if none is found."""
    for path in (
        "model.layers",
        "model.decoder.layers",
        "transformer.h",
        "gpt_neox.layers",
        "model.language_model.layers",
    ):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    n_cfg = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: nn.ModuleList | None = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if n_cfg is not None and len(mod) == n_cfg:
                return mod
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(f"could not find the decoder layer stack of {type(model).__name__}")
    return best


def select_layers(spec: str, n: int) -> list[int]:
    """'all' | 'early' | 'middle' | 'late' | 'A:B' | '0,3,5' -> sorted layer indices in [0, n).

    Thirds: early = [0, n//3), middle = [n//3, 2n//3), late = [2n//3, n). (Choice: the paper's 28-layer ablation
    used 6-layer windows, 0-5 / 12-17 / 23-27; use 'A:B' to reproduce those exactly.)"""
    s = spec.strip().lower()
    if s == "all":
        idx = list(range(n))
    elif s in ("early", "middle", "late"):
        a, b = {"early": (0, n // 3), "middle": (n // 3, 2 * n // 3), "late": (2 * n // 3, n)}[s]
        idx = list(range(a, b))
    elif ":" in s:
        lo, hi = s.split(":")
        idx = list(range(n))[slice(int(lo) if lo else None, int(hi) if hi else None)]
    else:
        idx = sorted({int(x) for x in s.split(",") if x.strip()})
    if not idx or any(i < 0 or i >= n for i in idx):
        raise ValueError(f"perturb.layers={spec!r} selects no valid layer of a {n}-layer model")
    return idx


class LayerPerturbation(nn.Module):
    """Holds the log-sigmas and the hooks. Attach once; toggle noise with `active(step, micro)`.

    target='layers': one s_l per selected layer, pre-hook on the layer. target='logits': one s on the lm_head output.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str = "all",
        sigma0: float = 1e-3,
        learnable: bool = True,
        target: str = "layers",
        scale_aware: bool = False,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.target, self.scale_aware, self.seed, self.rank = target, scale_aware, seed, rank
        stack = find_decoder_layers(model)
        if target == "layers":
            self.layer_ids = select_layers(layers, len(stack))
            modules = [stack[i] for i in self.layer_ids]
        elif target == "logits":
            get_head = getattr(model, "get_output_embeddings", None)  # HF models have it; nn.Module does not
            head = get_head() if callable(get_head) else None
            if head is None:
                raise ValueError("logits-only perturbation needs a model with get_output_embeddings()")
            self.layer_ids = [len(stack)]  # seed slot after the last layer
            modules = [head]
        else:
            raise ValueError(f"unknown perturbation target {target!r}")
        init = torch.full((len(modules),), math.log(sigma0), dtype=torch.float32)
        if learnable:
            self.log_sigma = nn.Parameter(init)
        else:
            self.register_buffer("log_sigma", init)
        self._state: tuple[int, int, list | None] | None = None  # (step, micro, row segments) while active
        self._handles = []
        for k, mod in enumerate(modules):
            if target == "layers":
                h = mod.register_forward_pre_hook(self._make_pre_hook(k), with_kwargs=True)
            else:
                h = mod.register_forward_hook(self._make_post_hook(k))
            self._handles.append(h)

    # ---- hooks ----
    def _on(self, module: nn.Module) -> bool:
        return self._state is not None and module.training

    def _seed(self, k: int) -> int | RowNoise:
        step, micro, segments = self._state  # type: ignore[misc]
        if segments is not None:
            return RowNoise(self.seed, step, self.layer_ids[k], self.rank, segments)
        return noise_seed(self.seed, step, micro, self.layer_ids[k], self.rank)

    def _make_pre_hook(self, k: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self._on(module):
                return None
            # transformers 5.x calls decoder layers with hidden_states positional; accept the kwarg form too.
            if args:
                h = add_noise(args[0], self.log_sigma[k], self._seed(k), self.scale_aware)
                return (h, *args[1:]), kwargs
            h = add_noise(kwargs["hidden_states"], self.log_sigma[k], self._seed(k), self.scale_aware)
            return args, {**kwargs, "hidden_states": h}

        return hook

    def _make_post_hook(self, k: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor):
            if not self._on(module):
                return None
            return add_noise(out, self.log_sigma[k], self._seed(k), self.scale_aware)

        return hook

    # ---- public ----
    @contextlib.contextmanager
    def active(self, step: int, micro: int, segments: list[tuple[int, ...]] | None = None) -> Iterator[None]:
        """Noise on for training forwards (and their backward, for checkpoint recompute) inside this block.
        segments (a collated micro-batch's): eps keyed per (row, position) (RowNoise), else per (micro, shape)."""
        prev, self._state = self._state, (int(step), int(micro), segments)
        try:
            yield
        finally:
            self._state = prev

    @property
    def is_active(self) -> bool:
        return self._state is not None

    def sigmas(self) -> torch.Tensor:
        return self.log_sigma.detach().exp()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- how the trainer optimises the s_l (kept here, beside the parameter they concern) ----
    @property
    def learnable(self) -> bool:
        return isinstance(self.log_sigma, nn.Parameter)

    def optimizer_group(self, lr: float, weight_decay: float = 0.0) -> dict | None:
        """The s_l's own AdamW parameter group (docs/method.md: own learning rate; weight decay as the reference's
        group, perturb.sigma_weight_decay), None when fixed."""
        if not self.learnable:
            return None
        return {"params": [self.log_sigma], "lr": lr, "weight_decay": weight_decay, "name": "log_sigma"}

    def penalty_backward(self, alpha: float, beta: float) -> float | None:
        """Backpropagate the optional alpha*sigma^2 - beta*log sigma^2 penalty; its value, or None when off."""
        if alpha <= 0 and beta <= 0:
            return None
        pen = sigma_penalty(self.log_sigma, alpha, beta)
        if pen.requires_grad:
            pen.backward()
        return float(pen.detach())

    def average_grad(self, all_reduce_avg: Callable[[torch.Tensor], object]) -> None:
        """Under torchrun: the s_l live outside the wrapped model, so DDP/FSDP2 do not reduce their gradient; average
        it over ranks (as DDP does for parameters) so every rank takes the same step and they stay replicated."""
        if not self.learnable:
            return
        if self.log_sigma.grad is None:  # cannot happen with noise on every forward; keep the collective paired
            self.log_sigma.grad = torch.zeros_like(self.log_sigma)
        all_reduce_avg(self.log_sigma.grad)

    def clip_grad(self, max_norm: float) -> tuple[float, torch.Tensor | None]:
        """Clip the s_l gradient on its own (perturb.sigma_clip 'separate'); returns (pre-clip norm, a copy of the
        pre-clip gradient or None). max_norm = inf only measures."""
        if not self.learnable or self.log_sigma.grad is None:
            return 0.0, None
        grad = self.log_sigma.grad.detach().clone()
        return float(torch.nn.utils.clip_grad_norm_([self.log_sigma], max_norm)), grad

    def metrics(self, grad: torch.Tensor | None = None) -> dict[str, float]:
        """sigma per layer (mean/min/max and each layer) and, when given, its gradient."""
        s = self.sigmas().float().cpu()
        m = {"sigma/mean": float(s.mean()), "sigma/min": float(s.min()), "sigma/max": float(s.max())}
        for lid, v in zip(self.layer_ids, s.tolist()):
            m[f"sigma/layer_{lid}"] = v
        if grad is not None:
            g = grad.float().cpu()
            m["sigma_grad/norm"] = float(g.norm())
            for lid, v in zip(self.layer_ids, g.tolist()):
                m[f"sigma_grad/layer_{lid}"] = v
        return m


def sigma_penalty(log_sigma: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Optional penalty alpha*sigma^2 - beta*log sigma^2 summed over layers (a dev version of the paper; off by default)."""
    return (alpha * torch.exp(2 * log_sigma) - beta * 2 * log_sigma).sum()


def build_perturbation(model: nn.Module, cfg: AlgoConfig, rank: int = 0) -> LayerPerturbation | None:
    """From an AlgoConfig: the attached perturbation, or None when noise is off (Bypass and the baselines).
    rank: this trainer process under torchrun (enters the noise seed)."""
    if not cfg.noise_on:
        return None
    p = cfg.perturb
    sigma0 = (p.logits_sigma0 or p.sigma0_init) if p.target == "logits" else p.sigma0_init
    return LayerPerturbation(model, p.layers, sigma0, p.learnable, p.target, p.scale_aware_on, p.seed, rank)

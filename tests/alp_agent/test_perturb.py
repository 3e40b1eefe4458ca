"""Layerwise perturbation: placement, gating, determinism, memory-light autograd, architectures."""

import pytest
import torch
import transformers
from torch import nn

from alp_agent.algo.config import AlgoConfig
from alp_agent.algo.perturb import (
    LayerPerturbation,
    RowNoise,
    add_noise,
    build_perturbation,
    find_decoder_layers,
    gaussian,
    noise_seed,
    select_layers,
)
from alp_agent.train.logprobs import sequence_logprobs

SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "head_dim": 8,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny(arch: str = "Llama", **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{arch}Config")(**{**SMALL, **kw})
    return getattr(transformers, f"{arch}ForCausalLM")(cfg).float()


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def lp(model, **kw):
    return sequence_logprobs(model, IDS, **kw)[0]


# ------------------------------------------------------------------ placement and architectures
@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Qwen3", "Mistral", "Gemma", "Gemma2", "Phi3"])
def test_finds_layers_and_perturbs_every_architecture(arch):
    model = tiny(arch)
    layers = find_decoder_layers(model)
    assert len(layers) == 3
    p = LayerPerturbation(model, sigma0=0.05)
    model.train()
    clean = lp(model)
    with p.active(0, 0):
        noisy = lp(model)
    assert not torch.allclose(clean, noisy)
    assert torch.equal(clean, lp(model))  # outside the context: clean again


def test_noise_enters_layer_input_before_norm():
    """The layer receives h + sigma*eps exactly (captured by a pre-hook registered after ours)."""
    model = tiny()
    p = LayerPerturbation(model, layers="1:2", sigma0=0.1, seed=3)
    seen = {}
    layer1 = find_decoder_layers(model)[1]
    layer1.register_forward_pre_hook(
        lambda m, a, k: seen.update(inp=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    h_clean = {}
    find_decoder_layers(model)[0].register_forward_hook(lambda m, a, o: h_clean.update(out=o))
    model.train()
    with torch.no_grad(), p.active(5, 2):
        model(input_ids=IDS)
    h0 = h_clean["out"][0] if isinstance(h_clean["out"], tuple) else h_clean["out"]
    eps = gaussian(h0.shape, noise_seed(3, 5, 2, 1), h0.device, torch.float32)
    assert torch.allclose(seen["inp"], h0 + 0.1 * eps, atol=1e-6)


def test_fallback_layer_search_on_unusual_module():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(5)])
            self.other = nn.ModuleList([nn.ReLU(), nn.Linear(4, 4)])

    assert len(find_decoder_layers(Odd())) == 5


def test_select_layers():
    assert select_layers("all", 9) == list(range(9))
    assert select_layers("early", 9) == [0, 1, 2]
    assert select_layers("middle", 9) == [3, 4, 5]
    assert select_layers("late", 9) == [6, 7, 8]
    assert select_layers("2:5", 9) == [2, 3, 4]
    assert select_layers("0,4", 9) == [0, 4]
    with pytest.raises(ValueError):
        select_layers("12", 9)


# ------------------------------------------------------------------ gating
def test_no_noise_in_eval_mode_or_outside_context():
    model = tiny()
    p = LayerPerturbation(model, sigma0=0.5)
    model.eval()
    clean = lp(model)
    with p.active(0, 0):
        assert torch.equal(lp(model), clean)  # eval mode gates the hooks off even inside the context
    model.train()
    assert torch.equal(lp(model), clean)  # train mode without the context: clean
    assert not p.is_active


def test_log_sigma_never_in_model_state_dict():
    model = tiny()
    p = LayerPerturbation(model, sigma0=0.1)
    assert not any("sigma" in k for k in model.state_dict())
    assert "log_sigma" in p.state_dict()
    assert all(q is not p.log_sigma for q in model.parameters())


def test_build_perturbation_follows_algo():
    assert build_perturbation(tiny(), AlgoConfig(name="bypass")) is None
    assert build_perturbation(tiny(), AlgoConfig(name="grpo")) is None
    p = build_perturbation(tiny(), AlgoConfig(name="alp", perturb={"layers": "late", "learnable": False}))
    assert p.layer_ids == [2] and not isinstance(p.log_sigma, nn.Parameter)


# ------------------------------------------------------------------ determinism
def test_same_step_micro_same_noise_different_otherwise():
    model = tiny()
    p = LayerPerturbation(model, sigma0=0.05)
    model.train()
    with p.active(3, 1):
        a = lp(model)
    with p.active(3, 1):
        b = lp(model)
    with p.active(3, 2):
        c = lp(model)
    with p.active(4, 1):
        d = lp(model)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_activation_checkpointing_recomputes_same_noise():
    grads = []
    for ckpt in (False, True):
        model = tiny()
        p = LayerPerturbation(model, sigma0=0.05)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with p.active(1, 0):
            out = lp(model).sum()
            out.backward()
        grads.append((out.detach(), p.log_sigma.grad.clone(), model.lm_head.weight.grad.clone()))
    for x, y in zip(grads[0], grads[1]):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ autograd
@pytest.mark.parametrize("scale_aware", [False, True])
def test_custom_backward_equals_naive(scale_aware):
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, requires_grad=True)
    s = torch.tensor(-1.5, requires_grad=True)
    w = torch.randn(2, 5, 8)
    seed = 1234
    y = add_noise(h, s, seed, scale_aware)
    (y * w).sum().backward()
    h2 = h.detach().clone().requires_grad_()
    s2 = s.detach().clone().requires_grad_()
    eps = gaussian(h.shape, seed, h.device, torch.float32)
    scale = h2.detach().pow(2).mean(-1, keepdim=True).sqrt() if scale_aware else 1.0
    y2 = h2 + s2.exp() * scale * eps
    (y2 * w).sum().backward()
    assert torch.allclose(y, y2)
    assert torch.allclose(h.grad, h2.grad)
    assert torch.allclose(s.grad, s2.grad, rtol=1e-5)


def test_sigma_gets_gradient_and_moves():
    model = tiny()
    p = LayerPerturbation(model, sigma0=0.05)
    opt = torch.optim.AdamW([p.log_sigma], lr=0.1)
    before = p.log_sigma.detach().clone()
    model.train()
    with p.active(0, 0):
        loss = -lp(model)[:, 1:].mean()
        loss.backward()
    assert p.log_sigma.grad is not None and (p.log_sigma.grad.abs() > 0).all()
    opt.step()
    assert (p.log_sigma.detach() != before).all()


def test_logits_only_variant():
    model = tiny()
    p = LayerPerturbation(model, target="logits", sigma0=0.3)
    assert p.log_sigma.numel() == 1
    model.train()
    clean = lp(model)
    with p.active(0, 0):
        noisy = lp(model)
        noisy[:, 1:].sum().backward()
    assert not torch.allclose(clean, noisy)
    assert p.log_sigma.grad is not None and p.log_sigma.grad.abs().item() > 0


def test_row_noise_is_each_segments_own_gaussian_and_zero_elsewhere():
    """Packed rows: each trajectory's (length, hidden) block is its own seeded draw, wherever it sits; positions
    outside every segment (a gap, a bin's tail, padding) get no noise."""
    segs = [(0, 3, 20, 5), (0, 23, 11, 9), (1, 0, 40, 2)]
    eps = RowNoise(123, 4, 7, 0, segs).draw(torch.Size((2, 40, 16)), torch.device("cpu"))
    want = torch.zeros(2, 40, 16)
    for b, off, n, key in segs:
        seed = noise_seed(123, 4, RowNoise.ROW_KEY + key, 7, 0)
        want[b, off : off + n] = gaussian(torch.Size((n, 16)), seed, torch.device("cpu"), torch.float32)
    assert torch.equal(eps, want) and eps[0, :3].abs().sum() == 0 and eps[0, 34:].abs().sum() == 0

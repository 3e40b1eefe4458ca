"""Per-segment causal attention for packed rows (issue 15 item 7): same log-probs and gradients as the dense
block-diagonal mask and as the padded layout, only the needed query-key pairs computed, and the switched model stays a
normal transformers model (padded forwards, generation, export)."""

import json

import pytest
import torch
from test_trainer import config, make_batch, tiny

from alp_agent.train import packed_attention as PA
from alp_agent.train.batching import collate, rows_from
from alp_agent.train.logprobs import microbatch_logprobs
from alp_agent.train.trainer import Trainer

CPU = torch.device("cpu")


def test_spans_cover_every_row_with_its_tail():
    segs = [(0, 0, 5, 7), (1, 0, 8, 3), (0, 5, 2, 1)]
    assert PA.spans_of(segs, 2, 8) == (((0, 5), (5, 7), (7, 8)), ((0, 8),))


def _grads_and_logprobs(model, mb):
    model.zero_grad(set_to_none=True)
    lp, ent = microbatch_logprobs(model, mb, True, chunk_tokens=5)
    ((lp * mb.mask).sum() + (ent * mb.mask).sum()).backward()
    return lp.detach(), ent.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_packed_attention_equals_dense_mask_and_padded(monkeypatch):
    m = tiny()
    rows = rows_from(make_batch(m, groups=4, n=4), torch.randn(16))
    packed, padded = collate(rows, CPU, True), collate(rows, CPU, False)
    assert len(packed.segments) > packed.ids.shape[0]  # a row holds several trajectories
    dense = _grads_and_logprobs(m, packed)
    base = _grads_and_logprobs(m, padded)
    calls = []
    real = PA.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        calls.append((q.shape[2], kw.get("is_causal"), mask is None))
        return real(module, q, k, v, mask, **kw)

    monkeypatch.setattr(PA, "sdpa_attention_forward", spy)
    assert PA.enable_packed_attention(m) and PA.uses_packed_attention(m)
    seg = _grads_and_logprobs(m, packed)
    n_layers = m.config.num_hidden_layers
    n_spans = sum(len(r) for r in PA.spans_of(packed.segments, *packed.ids.shape))
    assert len(calls) == n_layers * n_spans  # one causal call per segment and layer (no checkpointing here)
    assert all(causal and no_mask for _, causal, no_mask in calls)
    assert sum(n * (n + 1) // 2 for n, _, _ in calls[:n_spans]) < packed.attn_pairs[0]  # less than the dense row
    for a, b, c in zip(seg, dense, base):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    calls.clear()
    again = _grads_and_logprobs(m, padded)  # a padded forward on the switched model: plain SDPA with its mask
    assert all(not causal for _, causal, _ in calls) and torch.allclose(again[0], base[0], atol=1e-6)


@pytest.mark.parametrize(
    "pack,on,want", [(True, True, True), (True, False, False), (False, True, False), (True, None, False)]
)
def test_trainer_switches_only_packed_models(pack, on, want):
    m = tiny()
    upd = {"pack": pack} if on is None else {"pack": pack, "packed_attention": on}  # None: the default (off)
    Trainer(m, config(update=upd))
    assert PA.uses_packed_attention(m) is want


def test_switched_model_generates_and_exports_as_sdpa(tmp_path):
    m = tiny()
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = m.generate(ids, max_new_tokens=6, do_sample=False)
    Trainer(m, config(update={"packed_attention": True}))
    assert PA.uses_packed_attention(m)
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False), ref)
    m.save_pretrained(tmp_path)
    assert PA.PACKED_SDPA not in json.loads((tmp_path / "config.json").read_text()).values()

"""Packing, chunked log-probs, top-k/top-p truncation and the compute-dtype choice (issue 15 items 1, 4, 5; issue 13
item 4). Real tiny Llama models; every comparison is against the plain, unchunked, padded computation."""

import math

import pytest
import torch
from test_trainer import VOCAB, config, flat, make_batch, tiny

from alp_agent.train.batching import Row, collate, micro_batches, pack, rows_from
from alp_agent.train.chunked_head import head_logprobs
from alp_agent.train.hardware import choose_compute_dtype, memory_floor
from alp_agent.train.logprobs import logprobs_from_logits, microbatch_logprobs, sequence_logprobs
from alp_agent.train.trainer import Trainer

CPU = torch.device("cpu")


# ------------------------------------------------------------------ chunked hidden x lm_head
@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.9, 0), (1.0, 5), (0.8, 20)])
def test_chunked_head_matches_full_logits_values_and_gradients(top_p, top_k):
    g = torch.Generator().manual_seed(0)
    n, h, v, temp = 37, 16, VOCAB, 0.7
    hid = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.5 * torch.randn(v, h, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).requires_grad_()
    tgt = torch.randint(0, v, (n,), generator=g)
    gl, ge = torch.randn(n, generator=g), torch.randn(n, generator=g)

    ref_lp, ref_ent = logprobs_from_logits(hid @ w.t() + b, tgt, temp, True, True, top_p, top_k)
    ref_grads = torch.autograd.grad((ref_lp * gl + ref_ent * ge).sum(), (hid, w, b))
    lp, ent = head_logprobs(hid, w, b, tgt, temp, top_p, top_k, chunk=8)
    grads = torch.autograd.grad((lp * gl + ent * ge).sum(), (hid, w, b))

    assert torch.isfinite(lp).all()
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-5), float((a - r).abs().max())
    if top_p < 1 or top_k > 0:  # truncation really changed something
        full, _ = logprobs_from_logits(hid @ w.t() + b, tgt, temp)
        assert (lp - full).abs().max() > 1e-3


def test_truncation_matches_vllm_sampler_rule():
    """The kept set is vLLM's apply_top_k_top_p_pytorch (sorted ascending, cumsum <= 1 - p dropped, last kept)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    g = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(50, VOCAB, generator=g)
    for p, k in [(0.9, None), (None, 7), (0.5, 10)]:
        ours = []
        for t in range(VOCAB):  # every token as target: its logprob is -inf (vLLM) or finite (kept) alike
            lp, _ = logprobs_from_logits(z, torch.full((50,), t), 1.0, top_p=p or 1.0, top_k=k or 0)
            ours.append(lp)
        ours = torch.stack(ours, 1)
        kp = torch.full((50,), p) if p else None
        kk = torch.full((50,), k) if k else None
        theirs = apply_top_k_top_p_pytorch(z.clone(), kk, kp, allow_cpu_sync=True).log_softmax(-1)
        kept = torch.isfinite(theirs)
        assert torch.allclose(ours[kept], theirs[kept], atol=1e-5)
        assert kept.sum() < kept.numel()  # something was truncated


# ------------------------------------------------------------------ packing
def test_pack_first_fit_decreasing_fills_bins():
    bins = pack([10, 3, 7, 5, 5, 2], 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([10, 3, 7, 5, 5, 2][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 10 | 7+3 | 5+5 | 2


def test_packed_microbatch_logprobs_equal_padded_and_per_row():
    m = tiny()
    trajs = make_batch(m, groups=4, n=4)
    rows = rows_from(trajs, torch.randn(len(trajs)))
    padded, packed = collate(rows, CPU, False), collate(rows, CPU, True)
    assert packed.ids.numel() < padded.ids.numel()  # fewer model positions
    assert packed.pos is not None and packed.attn.sum() == padded.attn.sum()
    with torch.no_grad():
        a, ea = microbatch_logprobs(m, padded, True, chunk_tokens=0)
        b, eb = microbatch_logprobs(m, packed, True, chunk_tokens=5)
        for i, r in enumerate(rows):
            lp, _ = sequence_logprobs(m, torch.tensor([r.ids]))
            sel = padded.mask[i, : len(r.ids)] > 0
            assert torch.allclose(b[i, : len(r.ids)][sel], lp[0][sel], atol=1e-5)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ea, eb, atol=1e-5)
    assert packed.padded().ids.shape == padded.ids.shape and torch.equal(packed.padded().ids, padded.ids)


@pytest.mark.parametrize("algo", ["bypass", "grpo"])
def test_packed_update_equals_padded_update_noise_off(algo):
    """Whole update (old logprobs, several micro-batches, optimizer steps): packed + chunked vs padded + full logits,
    the loss and every weight after the update equal to 1e-5."""
    out = []
    for pack_, chunk in ((False, 0), (True, 16)):
        m = tiny()
        trajs = make_batch(m, groups=4, n=4)
        upd = {"pack": pack_, "logprob_chunk_tokens": chunk, "dtype": "float32"}
        cfg = config(algo={"name": algo}, update=upd, optim={"lr": 1e-3, "adam_eps": 1e-5})  # eps: see below
        tr = Trainer(m, cfg)
        bm = tr.update(trajs)
        out.append((flat(m), bm))
    (w0, m0), (w1, m1) = out
    assert abs(m0["steps_mean/loss/pg"] - m1["steps_mean/loss/pg"]) < 1e-5
    assert torch.allclose(w0, w1, atol=1e-5), float((w0 - w1).abs().max())


@pytest.mark.parametrize("scale_aware", [False, True])
def test_noise_on_packed_equals_padded(scale_aware):
    """ALP with noise on: eps is keyed per (row, position) (perturb.RowNoise), so packed and padded layouts draw the
    same noise for the same token and the whole update is equal to 1e-5 (the learnable sigma included)."""
    out = []
    for pack_, chunk in ((False, 0), (True, 16)):
        m = tiny()
        trajs = make_batch(m, groups=4, n=4)
        cfg = config(
            update={"pack": pack_, "logprob_chunk_tokens": chunk, "dtype": "float32"},
            algo={"perturb": {"sigma0": 0.05, "sigma_lr": 0.05, "scale_aware": scale_aware}},
            # AdamW divides by sqrt(v) + eps: at eps 1e-8 a weight whose gradient is ~1e-9 turns float32 rounding
            # (packed attention sums in another order) into steps of up to lr; 1e-5 keeps the comparison on the signal
            optim={"lr": 1e-3, "adam_eps": 1e-5},
        )
        tr = Trainer(m, cfg)
        bm = tr.update(trajs)
        out.append((flat(m), tr.perturbation.log_sigma.detach().clone(), bm))
    (w0, s0, m0), (w1, s1, m1) = out
    assert abs(m0["steps_mean/loss/pg"] - m1["steps_mean/loss/pg"]) < 1e-5
    assert torch.allclose(w0, w1, atol=1e-5), float((w0 - w1).abs().max())
    assert torch.allclose(s0, s1, atol=1e-6) and not torch.allclose(s0, torch.full_like(s0, math.log(0.05)))


def test_micro_batches_separate_sampling_distributions():
    rows = [Row([1] * n, [1.0] * n, [0.0] * n, 0.0, 0.7, top_p=p) for n, p in [(5, 1.0), (6, 0.9), (7, 1.0)]]
    mbs = micro_batches(rows, 1000, 64, packed=True)
    assert sorted(len(b) for b in mbs) == [1, 2] and all(len({r.top_p for r in b}) == 1 for b in mbs)


# ------------------------------------------------------------------ compute dtype
def test_compute_dtype_auto_is_a_function_of_the_flags():
    plain = frozenset({"avx2", "avx512f", "avx512bw"})
    bf16 = plain | {"avx512_bf16"}
    amx = plain | {"amx_bf16", "amx_tile"}
    assert choose_compute_dtype("auto", "cpu", plain)[0] == "float32"
    assert choose_compute_dtype("auto", "cpu", bf16)[0] == "bfloat16"
    assert choose_compute_dtype("auto", "cpu", amx)[0] == "bfloat16"
    assert choose_compute_dtype("auto", "cuda", plain)[0] == "bfloat16"
    assert choose_compute_dtype("auto", "cpu", bf16, "AVX512_CORE")[0] == "float32"  # oneDNN capped below bf16
    assert choose_compute_dtype("auto", "cpu", bf16, "avx512_core_bf16")[0] == "bfloat16"
    assert choose_compute_dtype("bfloat16", "cpu", plain) == ("bfloat16", "update.dtype=bfloat16 set in the config")
    assert choose_compute_dtype("float32", "cpu", bf16)[0] == "float32"
    assert "lacks" in choose_compute_dtype("auto", "cpu", plain)[1]


def test_trainer_logs_resolved_dtype():
    tr = Trainer(tiny(), config(update={"dtype": "float32"}))
    assert tr.cfg.update.dtype == "float32" and "config" in tr.dtype_reason
    tr = Trainer(tiny(), config(update={"dtype": "auto"}))
    assert tr.cfg.update.dtype in ("float32", "bfloat16") and tr.dtype_reason.startswith("auto")


def test_memory_floor_counts_adamw_and_engine():
    f = memory_floor(100, 2, 1)
    assert f.trainer_bytes == 1600 and f.engine_bytes == 200 and f.kv_bytes == 1024**3
    assert "GiB" in f.describe()


def test_engine_dtype_bf16_if_native():
    from alp_agent.train.hardware import engine_dtype_for

    assert engine_dtype_for(False, frozenset({"avx2"})) == "float32"
    assert engine_dtype_for(False, frozenset({"avx512_bf16"})) == "bfloat16"
    assert engine_dtype_for(True, frozenset()) == "bfloat16"


def test_startup_lines_say_dtype_and_floor():
    from alp_agent.engine.config import EngineConfig
    from alp_agent.train.hardware import startup_lines

    tr = Trainer(tiny(), config(update={"dtype": "float32"}))
    lines = startup_lines(tr, EngineConfig(dtype="float32"))
    assert "float32" in lines[0] and "set in the config" in lines[0] and "memory floor" in lines[1]


def test_packed_micro_batches_fill_the_long_rows_bins():
    """Short rows go into the bins of the longest row (first-fit decreasing over all remaining rows), and collate
    builds exactly those bins: fewer computed positions than bucketing at the same budget."""
    lens = [687, 300, 250, 200, 150, 150, 129, 600, 90]
    rows = [Row([5] * n, [1.0] * n, [0.0] * n, 0.0, 1.0, key=i) for i, n in enumerate(lens)]
    computed = {}
    for packed in (False, True):
        mbs = micro_batches(rows, 2048, 64, packed)
        assert sorted(r.key for g in mbs for r in g) == list(range(len(lens)))
        cols = [collate(g, CPU, packed) for g in mbs]
        assert all(c.ids.numel() <= max(2048, c.ids.shape[1]) for c in cols)
        computed[packed] = sum(c.ids.numel() for c in cols)
    assert computed[True] < computed[False]
    assert 1 - sum(lens) / computed[True] < 0.15  # 2556 tokens in 2874 positions (bucketing: more)

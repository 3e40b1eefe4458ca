"""Trainer: ALP vs Bypass, determinism, every baseline end to end, accumulation, skips, sync, metrics, resume, export."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from alp_agent.algo.config import TrainerConfig
from alp_agent.rollout.trajectory import Trajectory
from alp_agent.train.batching import micro_batches
from alp_agent.train.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from alp_agent.train.logging import MetricsWriter
from alp_agent.train.logprobs import sequence_logprobs
from alp_agent.train.loop import FunctionSampler, LoopConfig, run_training
from alp_agent.train.trainer import Trainer
from tests.fakes import WeightSink

VOCAB = 64


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).float()


def make_batch(model, groups: int = 4, n: int = 4, seed: int = 0, mismatch: float = 0.05) -> list[Trajectory]:
    """Random prompts/completions; engine logprobs = clean model logprobs + Gaussian 'mismatch'."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(groups):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n):
            comp = torch.randint(3, VOCAB, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            mask = [1] * len(comp)
            if len(comp) > 6:  # a tool-output span in the middle
                mask[3:5] = [0, 0]
            reward = float(torch.rand(1, generator=g) > 0.5)
            out.append(Trajectory(prompt, comp, mask, [0.0] * len(comp), reward=reward, group_id=gi, num_turns=1))
    model.eval()
    with torch.no_grad():
        for t in out:
            lp, _ = sequence_logprobs(model, torch.tensor([t.ids]))
            lp = lp[0, len(t.prompt_ids) :] + mismatch * torch.randn(len(t.completion_ids), generator=g)
            t.infer_logprobs = [float(x) if m else 0.0 for x, m in zip(lp, t.loss_mask)]
    return out


def config(**kw) -> TrainerConfig:
    base = {
        "optim": {"lr": 1e-3},
        # float32 pinned: these tests compare updates to 1e-5 (update.dtype auto would pick bf16 on a bf16 CPU)
        "update": {"micro_batch_tokens": 64, "updates_per_batch": 2, "dtype": "float32"},
        "algo": {"perturb": {"sigma0": 0.05, "sigma_lr": 0.05}},
    }
    for k, v in kw.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.__setitem__(k, v)
    return TrainerConfig.model_validate(base)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------ ALP vs Bypass, determinism
def test_alp_without_noise_equals_bypass_exactly():
    res = []
    for algo in ({"name": "alp", "perturb": {"enabled": False}}, {"name": "bypass"}):
        m = tiny()
        tr = Trainer(m, config(algo=algo))
        tr.update(make_batch(tiny()))
        res.append(flat(m))
    assert torch.equal(res[0], res[1])


def test_noise_changes_the_update_and_sigma_moves():
    m_alp, m_byp = tiny(), tiny()
    tr = Trainer(m_alp, config())
    s0 = tr.perturbation.sigmas().clone()
    metrics = tr.update(make_batch(tiny()))
    Trainer(m_byp, config(algo={"name": "bypass"})).update(make_batch(tiny()))
    assert not torch.equal(flat(m_alp), flat(m_byp))
    assert not torch.equal(tr.perturbation.sigmas(), s0)
    assert metrics["steps_mean/sigma_grad/norm"] > 0
    assert metrics["steps_mean/kl_noise/exact"] > 0  # the perturbation measurably changes the policy


def test_same_seed_same_update():
    res = []
    for _ in range(2):
        m = tiny()
        tr = Trainer(m, config())
        tr.update(make_batch(tiny()))
        res.append((flat(m), tr.perturbation.sigmas()))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_activation_checkpointing_gives_same_update():
    res = []
    for ckpt in (False, True):
        m = tiny()
        Trainer(m, config(update={"activation_checkpointing": ckpt})).update(make_batch(tiny()))
        res.append(flat(m))
    assert torch.allclose(res[0], res[1], atol=1e-6)


def test_fused_adamw_gives_the_foreach_update():
    res = []
    for fused in (True, False):
        m = tiny()
        tr = Trainer(m, config(optim={"fused": fused}))
        assert tr.optimizer.defaults["fused"] is (True if fused else None)
        tr.update(make_batch(tiny()))
        res.append((flat(m), tr.perturbation.sigmas()))
    assert torch.allclose(res[0][0], res[1][0], atol=1e-6) and torch.allclose(res[0][1], res[1][1], atol=1e-6)
    assert not torch.equal(res[0][0], flat(tiny()))  # the step moved the weights


def test_micro_batching_equals_one_big_batch():
    res = []
    for budget in (24, 100000):
        m = tiny()
        Trainer(m, config(algo={"name": "bypass"}, update={"micro_batch_tokens": budget})).update(make_batch(tiny()))
        res.append(flat(m))
    assert torch.allclose(res[0], res[1], atol=1e-5)


def test_micro_batches_bucket_by_length_and_budget():
    from alp_agent.train.batching import Row as _Row

    rows = [_Row(list(range(n)), [1.0] * n, [0.0] * n, 0.0, 1.0) for n in (5, 20, 6, 19, 7)]
    mbs = micro_batches(rows, token_budget=40, max_rows=8)
    assert [[len(r.ids) for r in mb] for mb in mbs] == [[20, 19], [7, 6, 5]]
    assert sum(len(mb) for mb in mbs) == 5


# ------------------------------------------------------------------ every algorithm end to end
@pytest.mark.parametrize(
    "algo",
    [
        {"name": "alp"},
        {"name": "alp", "ratio_level": "token"},
        {"name": "alp", "ratio_level": "geo_sequence", "loss_agg": "seq_mean"},
        {"name": "alp", "perturb": {"layers": "early"}},
        {"name": "alp", "perturb": {"target": "logits"}},
        {"name": "alp", "perturb": {"scale_aware": True, "learnable": False}},
        {"name": "alp", "perturb": {"sigma_penalty_alpha": 1e-3, "sigma_penalty_beta": 1e-3}},
        {"name": "bypass", "kl_coef": 1e-3, "entropy_coef": 1e-3},
        {"name": "grpo", "advantage": "rloo"},
        {"name": "tis", "is_level": "sequence"},
        {"name": "mis", "is_threshold": 1.05},
        {"name": "gspo"},
    ],
)
def test_every_algorithm_trains(algo):
    m = tiny()
    before = flat(m)
    tr = Trainer(m, config(algo=algo, update={"dtype": "bfloat16"} if algo["name"] == "tis" else {}))
    metrics = tr.update(make_batch(tiny()))
    assert not torch.equal(before, flat(m))
    for k in ("reward/mean", "steps_mean/grad_norm", "steps_mean/clip_frac/upper", "steps_mean/entropy"):
        assert math.isfinite(metrics[k]), k
    base = "old" if algo["name"] in ("grpo", "tis", "mis", "gspo") else "infer"
    for q in ("p1", "p5", "p25", "p50", "p75", "p95", "p99", "p99_9", "mean", "std", "min", "max"):
        assert f"ratio_token_vs_{base}/{q}" in metrics and f"ratio_seq_vs_{base}/{q}" in metrics
    if algo["name"] == "mis":
        assert metrics["steps_mean/mask/kept_frac"] < 1.0
    if base == "old":
        assert "kl_old_infer/k3" in metrics


@pytest.mark.parametrize("skip", [True, False])
def test_zero_signal_batch_holds_the_weights(skip: bool):
    """A batch of all-equal groups has advantage 0 everywhere, so every gradient is exactly 0. Held (the default),
    the weights and the s_l stay put; stepped (the reference), AdamW keeps moving them along its momentum."""
    m = tiny()
    tr = Trainer(m, config(optim={"skip_zero_grad_steps": skip}))
    tr.update(make_batch(tiny()))  # a batch with signal first: AdamW now has momentum
    before, sig_before = flat(m), tr.perturbation.log_sigma.detach().clone()
    flat_batch = make_batch(tiny(), seed=1)
    for t in flat_batch:
        t.reward = 1.0
    metrics = tr.update(flat_batch)
    assert metrics["adv/zero_adv_group_frac"] == 1.0 and metrics["steps_mean/grad_norm"] == 0.0
    assert metrics["no_signal_steps"] == (2.0 if skip else 0.0) and metrics["skipped_steps"] == 0.0
    assert torch.equal(before, flat(m)) == skip
    assert torch.equal(sig_before, tr.perturbation.log_sigma.detach()) == skip
    assert tr.step == 4  # held steps still advance the step counter (the noise seed)


def test_nonfinite_grad_skips_step_and_counts():
    m = tiny()
    tr = Trainer(m, config(update={"updates_per_batch": 1}))
    before = flat(m)
    h = m.model.embed_tokens.weight.register_hook(lambda g: g * float("nan"))
    metrics = tr.update(make_batch(tiny()))
    h.remove()
    assert metrics["skipped_steps"] == 1 and tr.skipped_steps == 1
    assert torch.equal(before, flat(m))
    assert tr.step == 1  # the step counter (noise seed) still advances


def test_unusable_trajectories_dropped_and_zero_groups_counted():
    m = tiny()
    batch = make_batch(tiny())
    batch[0].infer_logprobs[0] = float("nan")
    for t in batch[4:8]:
        t.reward = 1.0  # group 1: all equal
    metrics = Trainer(m, config()).update(batch)
    assert metrics["batch/dropped"] == 1
    assert metrics["adv/zero_adv_groups"] >= 1


# ------------------------------------------------------------------ weights out
def test_sync_weights_without_log_sigma_and_version():
    m = tiny()
    tr = Trainer(m, config())
    tr.update(make_batch(tiny()))
    eng = WeightSink()
    tr.sync_weights(eng)
    assert tr.policy_version == 1
    assert set(eng.loaded) == set(m.state_dict())
    assert not any("sigma" in k for k in eng.loaded)
    assert torch.equal(eng.loaded["lm_head.weight"], m.lm_head.weight.detach())


def test_export_loads_in_transformers(tmp_path):
    m = tiny()
    tr = Trainer(m, config())
    tr.update(make_batch(tiny()))
    out = export_hf(m, tmp_path / "export")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any("sigma" in k for k in f.keys())  # noqa: SIM118 - safe_open is not iterable
    loaded = AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = torch.tensor([make_batch(tiny())[0].ids])
    m.eval()
    assert torch.allclose(sequence_logprobs(loaded, ids)[0], sequence_logprobs(m, ids)[0], atol=1e-6)


def test_export_bf16_with_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    m = LlamaForCausalLM(cfg).float()
    Trainer(m, config()).update(make_batch(m))
    out = export_hf(m, tmp_path / "export", dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.embed_tokens.weight, m.model.embed_tokens.weight.detach().bfloat16())
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert m.model.embed_tokens.weight.dtype == torch.float32  # the live model is untouched


# ------------------------------------------------------------------ metrics writer
def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path)
    tr = Trainer(tiny(), config(), writer=w)
    tr.update(make_batch(tiny()))
    w.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds.count("step") == 2 and kinds.count("batch") == 1
    step = recs[0]
    for k in (
        "ratio_token_vs_infer/p99_9",
        "ratio_seq_vs_infer/p50",
        "clip_frac/dual",
        "kl_train_infer/noisy/k3",
        "kl_train_infer/clean/k1",
        "kl_noise/exact",
        "entropy",
        "sigma/layer_0",
        "sigma_grad/layer_2",
        "grad_norm",
        "time/step",
    ):
        assert k in step, k
    assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


# ------------------------------------------------------------------ checkpoints
def _run(batches, trainer):
    for b in batches:
        trainer.update(b)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = config(optim={"warmup_steps": 3})
    data = [make_batch(tiny(), seed=s) for s in range(3)]
    m_ref = tiny()
    ref = Trainer(m_ref, cfg)
    _run(data, ref)

    m1 = tiny()
    t1 = Trainer(m1, cfg)
    _run(data[:1], t1)
    t1.data_cursor = 17
    save_checkpoint(t1, tmp_path)
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.name == "step_000001"
    m2 = tiny(seed=123)  # different init: everything must come from the checkpoint
    t2 = Trainer(m2, cfg)
    load_checkpoint(t2, path)
    assert t2.data_cursor == 17 and t2.step == 2 and t2.policy_version == 1
    _run(data[1:], t2)
    assert torch.equal(flat(m_ref), flat(m2))
    assert torch.equal(ref.perturbation.sigmas(), t2.perturbation.sigmas())
    assert not list(tmp_path.glob("*.tmp"))


# ------------------------------------------------------------------ a real RL loop on an easy synthetic task
def sample(model, prompts: list[list[int]], n: int, length: int, gen: torch.Generator):
    """Plain sampler at temperature 1 (no noise: eval mode, no perturbation context). Returns ids and logprobs."""
    model.eval()
    ids = torch.tensor([p for p in prompts for _ in range(n)])
    lps = []
    with torch.no_grad():
        for _ in range(length):
            logits = model(input_ids=ids).logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            nxt = torch.multinomial(logp.exp(), 1, generator=gen)
            lps.append(logp.gather(-1, nxt))
            ids = torch.cat([ids, nxt], 1)
    return ids, torch.cat(lps, 1)


def test_short_real_loop_raises_reward(tmp_path):
    """Reward = fraction of sampled tokens with an even id (chance level 0.5). ALP (learnable sigma) must raise it."""
    m = tiny(seed=1)
    cfg = config(optim={"lr": 1e-2}, update={"updates_per_batch": 2, "micro_batch_tokens": 512})
    writer = MetricsWriter(tmp_path / "logs", tensorboard=False)
    tr = Trainer(m, cfg, writer=writer)
    gen = torch.Generator().manual_seed(0)
    prompts = [[3 + i, 10 + i, 20 + i] for i in range(8)]
    L = 6

    def rollout(tasks, n, version):
        ids, lps = sample(m, [prompts[t] for t in tasks], n, L, gen)
        out = []
        for row, (seq, lp) in enumerate(zip(ids.tolist(), lps.tolist())):
            comp = seq[3:]
            out.append(
                Trajectory(
                    seq[:3],
                    comp,
                    [1] * L,
                    lp,
                    reward=sum(x % 2 == 0 for x in comp) / L,
                    group_id=row // n,
                    policy_version=version,
                )
            )
        return out

    loop = LoopConfig(8, 15, 8, 8, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=5)
    hist = run_training(tr, FunctionSampler(rollout), WeightSink(), loop)
    writer.close()
    first = sum(h["reward/mean"] for h in hist[:2]) / 2
    last = sum(h["reward/mean"] for h in hist[-2:]) / 2
    assert first < 0.65 and last > 0.85, (first, last)  # measured: 0.52 -> 0.99
    assert latest_checkpoint(tmp_path / "ckpt").name == "step_000015"
    assert tr.data_cursor == 15 * 8


# ------------------------------------------------------------------ vLLM loads the export with the same logprobs
@pytest.mark.vllm
def test_export_loads_in_vllm_with_same_logprobs(tmp_path, tiny_model_dir):
    from alp_agent.engine.base import SamplingConfig
    from alp_agent.engine.vllm_engine import VLLMEngine
    from alp_agent.models import load_tokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tr = Trainer(m, config(optim={"lr": 1e-2}))
    tr.update(make_batch(m, mismatch=0.0))
    out = export_hf(m, tmp_path / "export", tokenizer=load_tokenizer(tiny_model_dir))
    eng = VLLMEngine(model=str(out), dtype="float32", max_model_len=256)
    try:
        prompt = [5, 17, 42, 9]
        g = eng.generate([prompt], SamplingConfig(temperature=1.0, max_tokens=16, seed=0))[0]
    finally:
        eng.close()
    m.eval()
    lp, _ = sequence_logprobs(m, torch.tensor([prompt + g.token_ids]))
    ours = lp[0, len(prompt) :]
    assert torch.allclose(ours, torch.tensor(g.logprobs), atol=1e-3), (ours, g.logprobs)


@pytest.mark.vllm
def test_sync_weights_into_vllm_in_place(tiny_model_dir):
    """After an update, sync_weights() makes vLLM (float32) sample with the trainer's new logprobs."""
    from alp_agent.engine.base import SamplingConfig
    from alp_agent.engine.vllm_engine import VLLMEngine

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    eng = VLLMEngine(model=tiny_model_dir, dtype="float32", max_model_len=256)
    try:
        tr = Trainer(m, config(optim={"lr": 1e-2}))
        tr.update(make_batch(m, mismatch=0.0))
        tr.sync_weights(eng)
        prompt = [5, 17, 42, 9]
        g = eng.generate([prompt], SamplingConfig(temperature=1.0, max_tokens=16, seed=0))[0]
    finally:
        eng.close()
    m.eval()
    lp, _ = sequence_logprobs(m, torch.tensor([prompt + g.token_ids]))
    assert torch.allclose(lp[0, len(prompt) :], torch.tensor(g.logprobs), atol=1e-3)


def test_logprobs_from_start_equal_full_forward_after_start():
    """`start` skips the LM head on the shared prompt: later positions are unchanged, earlier ones are 0."""
    m = tiny().eval()
    ids = torch.randint(3, VOCAB, (3, 15), generator=torch.Generator().manual_seed(0))
    full, ent_full = sequence_logprobs(m, ids, with_entropy=True)
    part, ent_part = sequence_logprobs(m, ids, with_entropy=True, start=6)
    assert torch.allclose(part[:, 6:], full[:, 6:], atol=1e-5)
    assert torch.allclose(ent_part[:, 6:], ent_full[:, 6:], atol=1e-5)
    assert torch.all(part[:, :6] == 0)

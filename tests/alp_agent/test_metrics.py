"""The divergence estimators against their exact values (docs/method.md "What to watch").

A known sampler mu and policy pi over 50 symbols; 400k tokens drawn from mu (seed 0), as the engine samples them.
Each estimate must be within 5 % of the exact value computed from the two distributions."""

import math

import pytest
import torch

from alp_agent.train.metrics import divergence_stats, ess, exact_kl, kl_stats

N_TOKENS, VOCAB = 400_000, 50


def distributions():
    g = torch.Generator().manual_seed(0)
    log_mu = torch.log_softmax(1.5 * torch.randn(VOCAB, generator=g, dtype=torch.float64), -1)
    log_pi = torch.log_softmax(log_mu + 0.3 * torch.randn(VOCAB, generator=g, dtype=torch.float64), -1)
    return log_mu, log_pi


def exact_values(log_mu, log_pi):
    mu, pi = log_mu.exp(), log_pi.exp()
    kl = float((mu * (log_mu - log_pi)).sum())  # KL(mu || pi)
    chi2 = float((pi * pi / mu).sum() - 1)  # chi2(pi || mu) = E_mu[(pi/mu)^2] - 1
    return kl, chi2


def samples(log_mu, log_pi):
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(log_mu.exp(), N_TOKENS, replacement=True, generator=g)
    return log_pi[y], log_mu[y]


def test_estimators_within_5_percent_of_exact():
    log_mu, log_pi = distributions()
    kl, chi2 = exact_values(log_mu, log_pi)
    assert kl > 0.01 and chi2 > 0.01  # a mismatch large enough to be read
    logp, logmu = samples(log_mu, log_pi)
    m = divergence_stats(logp, logmu, "d")
    print(f"exact KL {kl:.6f} k1 {m['d/k1']:.6f} k3 {m['d/k3']:.6f}; chi2 {chi2:.6f} est {m['d/chi2']:.6f}; "
          f"ESS exact {1 / (1 + chi2):.6f} est {m['d/ess_token']:.6f}")  # fmt: skip
    assert m["d/k1"] == pytest.approx(kl, rel=0.05)
    assert m["d/k3"] == pytest.approx(kl, rel=0.05)
    assert m["d/chi2"] == pytest.approx(chi2, rel=0.05)
    assert m["d/ess_token"] == pytest.approx(1 / (1 + chi2), rel=0.05)


def test_former_estimators_were_wrong_on_the_same_samples():
    """What the previous kl_stats read (issue 13): k1 = mean(log pi - log mu) ~ -KL, k3' = mean(e^x - x - 1) with
    x = log mu - log pi, which estimates chi2-ish terms, not KL. The sound ones differ from both."""
    log_mu, log_pi = distributions()
    kl, chi2 = exact_values(log_mu, log_pi)
    logp, logmu = samples(log_mu, log_pi)
    x = logmu - logp
    old_k1, old_k3 = float((-x).mean()), float((x.exp() - x - 1).mean())
    assert old_k1 == pytest.approx(-kl, rel=0.05)
    assert abs(old_k3 - kl) > 0.05 * kl
    assert kl_stats(logp, logmu, "d")["d/k1"] == pytest.approx(-old_k1)


def test_sequence_ess_and_scale_invariance():
    # 4 sequences with log weights [0, 0, 0, log 3]: (1+1+1+3)^2 / (4 (1+1+1+9)) = 36/48 = 0.75
    lw = torch.tensor([0.0, 0.0, 0.0, math.log(3.0)], dtype=torch.float64)
    assert ess(lw) == pytest.approx(0.75)
    assert ess(lw + 500.0) == pytest.approx(0.75)  # huge weights stay finite
    m = divergence_stats(torch.zeros(3), torch.zeros(3), "p", seq_log_w=lw)
    assert m["p/ess_seq"] == pytest.approx(0.75) and m["p/ess_token"] == pytest.approx(1.0)
    assert m["p/k1"] == 0.0 and m["p/k3"] == 0.0 and m["p/chi2"] == pytest.approx(0.0)


def test_exact_kl_matches_direct_sum_in_chunks():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(37, 50, generator=g), torch.randn(37, 50, generator=g)
    lp, lq = torch.log_softmax(p.double() / 0.7, -1), torch.log_softmax(q.double() / 0.7, -1)
    direct = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.allclose(exact_kl(p, q, 0.7, chunk=8), direct, atol=1e-6)
    assert torch.allclose(exact_kl(p, p, 1.0), torch.zeros(37, dtype=torch.float64))
    log_mu, log_pi = distributions()
    kl, _ = exact_values(log_mu, log_pi)
    assert float(exact_kl(log_mu[None], log_pi[None])[0]) == pytest.approx(kl, rel=1e-5)  # float32 softmax


def test_legacy_correction_recovers_the_sound_estimators_from_old_logs():
    """results/repro's old step records hold k1' = mean(log pi - log mu) and the ratio's mean/std/count: the sound
    k1, k3, chi2 and ESS follow from them exactly (alp_agent.app.repro_legacy)."""
    from alp_agent.app.repro_legacy import corrected_step
    from alp_agent.train.metrics import summarize

    log_mu, log_pi = distributions()
    logp, logmu = samples(log_mu, log_pi)
    logp, logmu = logp[:5000], logmu[:5000]
    lr = logp - logmu
    rec = {"kl_train_infer/noisy/k1": float(lr.mean()), "tokens": float(lr.numel())}
    rec.update(summarize(lr.exp(), "ratio_token_vs_infer"))
    got, want = corrected_step(rec), divergence_stats(logp, logmu, "d")
    for k, w in (("k1", "d/k1"), ("k3", "d/k3"), ("chi2", "d/chi2"), ("ess", "d/ess_token")):
        assert got[k] == pytest.approx(want[w], rel=1e-9, abs=1e-12), k

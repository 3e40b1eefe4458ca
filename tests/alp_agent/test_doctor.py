"""`alp-agent doctor`: every check on real parts of the tiny model (vLLM, trainer, sandbox, SmolLM2's template),
and each one broken on purpose and seen reported: a history-rewriting template without the delta path, a mask bug,
a temperature mismatch, a closed sandbox, a bf16 run on a CPU without bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alp_agent.app.doctor_checks import FAIL, PASS, WARN, check_masks, check_template, scripted_conversation
from alp_agent.rollout.chat import ChatTemplate, Delta
from alp_agent.rollout.transcript import Transcript

REPO = Path(__file__).resolve().parents[2]
OBS = [[{"role": "user", "content": "```output\n408\n```"}], [{"role": "user", "content": "```output\n409\n```"}]]


def _rewriting_tokenizer(tok):
    """SmolLM2's tokenizer with a Qwen3-style template that drops <think> blocks of earlier assistant turns."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% for m in messages %}{% set c = m['content'] %}"
        "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] %}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return t


class RenderAndDiff(Transcript):
    """The naive appender a rollout without the stub-delta path has: the delta is the full re-render minus the
    running text, and there is none when the template rewrote history (the pre-issue-16 behaviour)."""

    def observation(self, new_messages, tool_calls=None):
        full = self.chat.render(self.messages + [dict(m) for m in new_messages], add_generation_prompt=True)
        if not full.startswith(self.text):
            return None
        piece = full[len(self.text) :]
        ids = self.chat.encode(piece)
        return Delta(piece, ids, "t" * len(ids))


def test_template_append_only_passes(tiny_tokenizer):
    c = check_template(ChatTemplate(tiny_tokenizer), scripted_conversation(OBS), Transcript)
    assert c.status == PASS and c.numbers["history_rewrites"] == 0 and c.numbers["observation_turns"] == 2


def test_history_rewriting_template_needs_the_delta_path(tiny_tokenizer):
    chat = ChatTemplate(_rewriting_tokenizer(tiny_tokenizer))
    conv = scripted_conversation(OBS)
    handled = check_template(chat, conv, Transcript)
    assert handled.status == PASS and handled.numbers["history_rewrites"] == 2, handled
    broken = check_template(chat, conv, RenderAndDiff)
    assert broken.status == FAIL and broken.numbers["rollout_handles_it"] is False
    assert "rewrites history (2/2 turns)" in broken.summary and "refused the delta" in broken.details[0]


# ------------------------------------------------------------------------------------------- real episodes
@pytest.fixture(scope="module")
def run_cfg(tiny_model_dir):
    from alp_agent.config_io import load_run_config

    return load_run_config(
        REPO / "configs/quickstart.yaml",
        [
            f"engine.model={tiny_model_dir}",
            "engine.dtype=float32",
            "trainer.update.dtype=float32",
            "env.kwargs.void_turn=hint",  # a random model's turns are void: a hint follows, so episodes are multi-turn
        ],
    )


@pytest.fixture(scope="module")
def episodes(run_cfg, tiny_vllm_engine, tiny_model_dir):
    """Episodes of the quickstart env sampled by the real vLLM (fp32) at T=0.7 through a recording engine."""
    from alp_agent.app.doctor import RecordingEngine
    from alp_agent.app.job import make_env_fn
    from alp_agent.models import load_tokenizer
    from alp_agent.rollout.runner import RolloutRunner
    from sandbox import make_sandbox

    box = make_sandbox(run_cfg.sandbox)
    env_fn, _ = make_env_fn(run_cfg, box)
    rec = RecordingEngine(tiny_vllm_engine)
    rcfg = run_cfg.rollout.model_copy(update={"max_tokens_per_turn": 24, "seed": 0, "on_turn_limit": "continue"})
    runner = RolloutRunner(rec, load_tokenizer(tiny_model_dir), env_fn, rcfg)
    try:
        trajs = runner.run([0, 1], 2, 0)
    finally:
        runner.close()
        box.close()
    assert len(trajs) == 4 and all(t.num_turns >= 2 for t in trajs)
    return trajs, rec.records


@pytest.mark.vllm
def test_masks_pass_then_a_mask_bug_is_reported(episodes):
    import copy

    trajs, records = episodes
    ok = check_masks(trajs, records)
    assert ok.status == PASS and ok.numbers["completion_tokens"] == sum(len(t.completion_ids) for t in trajs)
    bad = copy.deepcopy(trajs)
    t = bad[0]
    t.loss_mask[t.token_roles.index("t")] = 1  # the bug: a template token (the closing <|im_end|>) trained on
    c = check_masks(bad, records)
    assert c.status == FAIL and c.numbers["tool_or_template_with_mask1"] == 1
    assert c.numbers["mask1_not_sampled"] == 1 and "not sampled" in c.details[0]
    t.loss_mask[t.turn_spans[0][0]] = 0  # and a sampled token left out
    assert check_masks(bad, records).numbers["sampled_mask0"] == 1


@pytest.mark.vllm
def test_parity_passes_at_matching_temperature_and_fails_on_a_mismatch(episodes, run_cfg, tiny_model_dir):
    import torch

    from alp_agent.app.doctor_numbers import check_parity, model_token_pairs, parity_stats, trainer_logprobs
    from alp_agent.models import load_model
    from alp_agent.train.trainer import Trainer

    trajs, _ = episodes
    trainer = Trainer(load_model(tiny_model_dir, dtype=torch.float32), run_cfg.trainer)
    stats = parity_stats(*model_token_pairs(trajs, trainer_logprobs(trainer, trajs)))
    good = check_parity(stats, "float32", "float32")
    assert good.status == PASS and stats["mean_abs"] < 2e-6 and stats["tokens"] > 0, good.summary
    assert "expected 1e-06 for float32 engine vs float32 trainer" in good.summary
    wrong = parity_stats(*model_token_pairs(trajs, trainer_logprobs(trainer, trajs, temperature=1.0)))
    bad = check_parity(wrong, "float32", "float32")
    assert bad.status == FAIL and wrong["mean_abs"] > 1e-3 and "temperature" in bad.details[0]
    assert wrong["kl_k3"] > stats["kl_k3"] >= 0.0


@pytest.mark.vllm
def test_noise_kl_per_group_is_measured_and_restores_sigma(episodes, run_cfg, tiny_model_dir):
    import torch

    from alp_agent.app.doctor_numbers import check_noise, layer_groups, noise_kl_by_group
    from alp_agent.models import load_model
    from alp_agent.train.trainer import Trainer

    trajs, _ = episodes
    tcfg = run_cfg.trainer.model_copy(deep=True)
    tcfg.algo.perturb.sigma0 = 0.01
    trainer = Trainer(load_model(tiny_model_dir, dtype=torch.float32), tcfg)
    before = trainer.perturbation.log_sigma.detach().clone()
    kl = noise_kl_by_group(trainer, trajs)
    assert torch.equal(trainer.perturbation.log_sigma.detach(), before)
    assert list(kl) == ["all (2 layers)"] and kl["all (2 layers)"] > 0
    assert set(layer_groups(list(range(6)))) == {
        "early (layers 0-1)",
        "middle (layers 2-3)",
        "late (layers 4-5)",
        "all (6 layers)",
    }
    c = check_noise(kl, mismatch_kl=kl["all (2 layers)"], sigma=0.01, learnable=True)
    assert c.status == PASS and "KL(clean||perturbed)" in c.summary
    assert check_noise(kl, mismatch_kl=kl["all (2 layers)"] * 1000, sigma=0.01, learnable=True).status == WARN
    assert check_noise(None, 0.0, 0.01, True).status == "SKIP"


def test_sandbox_check_on_the_real_sandbox_and_a_closed_one():
    from alp_agent.app.doctor_system import check_sandbox
    from sandbox import SandboxConfig, make_sandbox

    box = make_sandbox(SandboxConfig(backend="local", timeout_s=5))
    try:
        c = check_sandbox(box, 5)
        assert c.status == PASS, c.details
        assert c.numbers["limit_enforced"] and c.numbers["concurrent_errors"] == 0 and c.numbers["p50_call_s"] > 0
    finally:
        box.close()
    assert check_sandbox(box, 5).status == FAIL  # a closed sandbox cannot open sessions


def test_machine_check_flags_bf16_without_cpu_support(run_cfg):
    from alp_agent.app.doctor_system import check_machine, cpu_flags, estimate_peak_gib, mem_available_gib

    bf16 = run_cfg.model_copy(update={"engine": run_cfg.engine.model_copy(update={"dtype": "bfloat16"})})
    assert check_machine(bf16, 1_000_000, 128, 2, flags={"avx2"}).status in (WARN, "FAIL")
    assert "emulated" in check_machine(bf16, 1_000_000, 128, 2, flags={"avx2"}).details[0]
    ok = check_machine(bf16, 1_000_000, 128, 2, flags={"avx512_bf16"})
    assert ok.numbers["cpu_bf16_flags"] == ["avx512_bf16"]
    assert cpu_flags("flags\t: fpu avx512_bf16 amx_bf16\n") == {"fpu", "avx512_bf16", "amx_bf16"}
    assert mem_available_gib("MemAvailable:   2097152 kB\n") == 2.0
    tight = check_machine(bf16, 135_000_000, 576, 30, flags={"avx512_bf16"}, free_gib=0.5)
    assert tight.status == FAIL and "exceeds the 0.5 GiB available" in tight.details[0]
    peak = estimate_peak_gib(135_000_000, bf16, 576, 30)
    between = check_machine(bf16, 135_000_000, 576, 30, flags={"avx512_bf16"}, free_gib=peak["total"] - 0.1)
    assert between.status == WARN  # above the floor, below the estimated peak
    assert pytest.approx(peak["trainer"]) == 135e6 * 16 / 2**30 and peak["total"] > peak["trainer"]


@pytest.mark.vllm
def test_doctor_cli_json_and_exit_code(tiny_model_dir, capsys):
    from alp_agent.app.cli import main

    args = [
        "doctor",
        "-c",
        str(REPO / "configs/quickstart.yaml"),
        "--json",
        f"engine.model={tiny_model_dir}",
        "engine.dtype=float32",
        "trainer.update.dtype=float32",
        "rollout.max_tokens_per_turn=16",
        "engine.max_model_len=1024",
    ]
    rc = main(args)
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, [(c["name"], c["summary"], c["details"]) for c in report["checks"] if c["status"] == FAIL]
    names = [c["name"] for c in report["checks"]]
    assert names == ["machine", "template", "masks", "logprob parity", "ALP noise", "sandbox"]
    assert report["status"] in (PASS, WARN) and all(c["status"] != FAIL for c in report["checks"])


def test_exit_code_is_1_on_any_fail_only():
    from alp_agent.app.doctor import exit_code, format_report
    from alp_agent.app.doctor_checks import Check

    checks = [Check("a", PASS, "fine"), Check("b", WARN, "hm", details=["why"]), Check("c", "SKIP", "off")]
    assert exit_code(checks) == 0
    assert exit_code([*checks, Check("d", FAIL, "broken")]) == 1
    text = format_report([*checks, Check("d", FAIL, "broken")])
    assert "FAIL  d" in text and "      - why" in text and text.strip().endswith("-> FAIL")


@pytest.mark.slow
@pytest.mark.vllm
def test_doctor_passes_on_the_shipped_quickstart(capsys):
    """The embedded SmolLM2 with the quickstart's bf16 engine, trainer, env and sandbox: exit 0 (1.5 min on 2 CPUs)."""
    from alp_agent.app.cli import main

    assert main(["doctor", "-c", str(REPO / "configs/quickstart.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    parity = next(c for c in report["checks"] if c["name"] == "logprob parity")
    assert 0 < parity["numbers"]["mean_abs"] < 2 * parity["numbers"]["expected_mean_abs"]

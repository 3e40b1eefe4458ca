"""`alp-agent repro`: plans validate and expand into distinct runs, the table's numbers come from metrics.jsonl as
stated, and an end-to-end plan on a tiny model runs each arm once (a rerun keeps finished runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alp_agent.app.cli import main
from alp_agent.app.repro import execute, load_plan, plan_runs
from alp_agent.app.repro_report import summarize_run, write_results
from alp_agent.config_io import ConfigError
from alp_agent.train.logging import MetricsWriter
from tests.procs import foreground_cli, output_after_stop, wait_for_first_batch

REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "configs" / "repro"


def test_shipped_plans_expand_into_distinct_valid_runs(tmp_path):
    plan, cfg = load_plan(PLANS / "default.yaml")
    runs = plan_runs(plan)
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 16  # seq_alp/stale4 is in 'main' and 'layers' but runs once
    assert names.index("stale8_seq_alp_s0") > max(names.index(n) for n in names if n.startswith("stale4"))
    # every run's config validates (a dry run builds each one) and nothing is written
    status = execute(plan, cfg, tmp_path / "out", dry_run=True, log=lambda *_: None)
    assert [s["state"] for s in status] == ["dry-run"] * 16 and not (tmp_path / "out" / "runs").exists()
    sweep, _ = load_plan(PLANS / "sweep.yaml")
    assert "seq_alp" in sweep.arms and len(plan_runs(sweep)) == 4
    seeds, _ = load_plan(PLANS / "seeds.yaml")
    assert {r.seed for r in plan_runs(seeds)} == {0, 1, 2}


def test_plan_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"config: {PLANS / 'base.yaml'}\narms: {{a: {{trainer.algo.name: alp}}}}\n"
        "settings: {s: {}}\ngroups: [{name: g, arms: [b], settings: [s]}]\n"
    )
    with pytest.raises(ConfigError, match="unknown arm 'b'"):
        load_plan(bad)
    bad.write_text(
        f"config: {PLANS / 'base.yaml'}\narms: {{a: {{trainer.algo.nmae: alp}}}}\n"
        "settings: {s: {}}\ngroups: [{name: g, arms: [a], settings: [s]}]\n"
    )
    plan, cfg = load_plan(bad)
    with pytest.raises(ConfigError, match="arm 'a'.*trainer.algo.nmae"):
        execute(plan, cfg, tmp_path / "out", dry_run=True, log=lambda *_: None)


def _fake_run(run_dir: Path, kl: list[float], acc: list[float], steps_per_batch: int = 2) -> None:
    w = MetricsWriter(run_dir, tensorboard=False)
    w.write("eval", 0, {"accuracy": acc[0]})
    for i, k in enumerate(kl, 1):
        w.write(
            "step",
            i,
            {
                "kl_train_infer/clean/k3": k,
                "ratio_token_vs_infer/p99_9": 1.0 + k,
                "ratio_token_vs_infer/max": 2.0 + k,
                "entropy": 0.5 + i,
            },
        )
        if i % steps_per_batch == 0:
            b = i // steps_per_batch
            w.write(
                "batch",
                b,
                {
                    "reward/mean": 0.1 * b,
                    "ratio_seq_vs_infer/p2": 0.5,
                    "ratio_seq_vs_infer/p98": 1.0 + b,
                    "skipped_steps_total": 1.0,
                    "tools/calls_per_episode": 0.5 * b,
                    "adv/zero_adv_group_frac": 1.0 / b,
                },
            )
            w.write("eval", b, {"accuracy": acc[b]})
    w.close()
    (run_dir / "summary.json").write_text(
        json.dumps({"batches": len(kl) // steps_per_batch, "interrupted": False, "accuracy_after": acc[-1]})
    )


def test_summary_numbers_and_table(tmp_path):
    plan, _ = load_plan(PLANS / "default.yaml")
    plan = plan.model_copy(update={"kl_spike_threshold": 0.1})  # this test's numbers, whatever the shipped plan says
    runs = tmp_path / "runs"
    _fake_run(runs / "stale4_seq_alp_s0", kl=[0.001, 0.2, 0.003, 0.5], acc=[0.2, 0.6, 0.4])
    _fake_run(runs / "stale4_grpo_s0", kl=[0.001, 0.001, 0.001, 0.001], acc=[0.2, 0.3, 0.5])
    _fake_run(runs / "stale4_tis_s0", kl=[0.001, 0.001], acc=[0.2, 0.3])
    (runs / "stale4_tis_s0" / "summary.json").unlink()  # still running: not a result yet
    s = summarize_run(runs / "stale4_seq_alp_s0", kl_threshold=plan.kl_spike_threshold)
    assert s["kl_peak"] == 0.5 and s["kl_spikes"] == 2 and s["kl_mean"] == pytest.approx(0.176)
    assert (s["acc_before"], s["acc_final"], s["acc_best"]) == (0.2, 0.4, 0.6)
    assert s["tok_ratio_max"] == pytest.approx(2.5) and s["tok_ratio_p99_9"] == pytest.approx(1.5)
    assert s["seq_width_end"] == pytest.approx(2.5) and s["skipped"] == 1.0
    assert s["entropy_end"] == pytest.approx(4.0)  # mean over the last batch's two steps (3.5, 4.5)
    assert s["kl_step0"] == 0.001 and s["kl_batch1_growth"] == pytest.approx(200.0)  # 0.2 / 0.001 at batch 1's end
    assert s["seq_width_mean"] == pytest.approx(2.0) and s["collapsed"] == 0.0  # widths 1.5, 2.5; 0.4 >= 0.2
    assert s["tools_end"] == pytest.approx(0.75) and s["zero_adv_mean"] == pytest.approx(0.75)  # (0.5+1)/2, (1+.5)/2
    table = write_results(plan, tmp_path, command="alp-agent repro", name="default")
    text = table.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| seq_alp |"))
    assert "| 0.200 | 0.400 | 0.600 |" in row and "| 2 |" in row
    assert "| mis | 0/1 | -" in text  # missing runs are shown as missing, not dropped
    assert "| tis | 0/1 (+1 incomplete) | -" in text
    assert (tmp_path / "plots" / "main_stale4.png").stat().st_size > 0
    assert json.loads((tmp_path / "default.json").read_text())["stale4_grpo_s0"]["kl_spikes"] == 0


@pytest.mark.slow
@pytest.mark.vllm
def test_repro_end_to_end_on_tiny_model_keeps_finished_runs(tiny_model_dir, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"config: {PLANS / 'base.yaml'}\nout_dir: {tmp_path / 'out'}\n"
        "arms: {seq_alp: {trainer.algo.name: alp}, grpo: {trainer.algo.name: grpo}}\n"
        "settings: {stale2: {trainer.update.updates_per_batch: 2}}\n"
        "groups: [{name: main, arms: [seq_alp, grpo], settings: [stale2]}]\n"
    )
    small = [
        f"engine.model={tiny_model_dir}",
        "run.iterations=1",
        "run.prompts_per_batch=2",
        "run.samples_per_prompt=2",
        "eval.num_tasks=2",
        "rollout.max_tokens_per_turn=16",
        "engine.max_model_len=1024",
    ]
    assert main(["repro", "-c", str(plan), *small]) == 0
    out = tmp_path / "out"
    for name in ("stale2_seq_alp_s0", "stale2_grpo_s0"):
        assert json.loads((out / "runs" / name / "summary.json").read_text())["batches"] == 1
        assert not (out / "runs" / name / "checkpoints").exists()  # checkpoint_at_end: false in the repro config
        assert json.loads((out / "runs" / name / "summary.json").read_text())["accuracy_after"] is not None
    table = (out / "plan.md").read_text()
    assert "| seq_alp | 1/1 |" in table and "| grpo | 1/1 |" in table
    info = json.loads((out / "runs" / "stale2_grpo_s0" / "run_info.json").read_text())
    assert (info["engine_dtype"], info["trainer_dtype"], info["weight_quantization"]) == ("bfloat16", "float32", "none")
    assert info["cpu"]["model"] and info["cpu"]["flags"] and info["attempts"][0]["exit"] == 0 and info["seconds"] > 0
    before = (out / "runs" / "stale2_grpo_s0" / "metrics.jsonl").stat().st_mtime
    capsys.readouterr()
    assert main(["repro", "-c", str(plan), *small]) == 0
    assert capsys.readouterr().out.count("done, kept") == 2
    assert (out / "runs" / "stale2_grpo_s0" / "metrics.jsonl").stat().st_mtime == before
    assert (out / "commands.txt").read_text().splitlines() == [f"alp-agent repro -c {plan} " + " ".join(small)] * 2


@pytest.mark.slow
@pytest.mark.vllm
def test_mismatch_per_regime_on_tiny_model(tiny_model_dir, tmp_path):
    from alp_agent.app.repro_mismatch import measure_regimes

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(
        f"config: {PLANS / 'base.yaml'}\nout_dir: {tmp_path}\narms: {{b: {{trainer.algo.name: bypass}}}}\n"
        "settings: {bf16: {engine.weight_quantization: none}, int8: {engine.weight_quantization: int8}}\n"
        "groups: [{name: g, arms: [b], settings: [bf16, int8]}]\n"
    )
    small = [f"engine.model={tiny_model_dir}", "run.prompts_per_batch=2", "run.samples_per_prompt=2"]
    plan, cfg = load_plan(plan_file, [*small, "rollout.max_tokens_per_turn=16", "engine.max_model_len=1024"])
    md = measure_regimes(plan, cfg, tmp_path, log=lambda *_: None)
    res = json.loads((tmp_path / "mismatch.json").read_text())
    assert [res[k]["weight_quantization"] for k in ("bf16", "int8")] == ["none", "int8"]
    for r in res.values():
        assert r["tokens"] > 0 and r["kl_k3"] >= 0 and r["ratio_max"] >= r["ratio_p99_9"] >= r["ratio_p99"] > 0
        assert (r["engine_dtype"], r["trainer_dtype"]) == ("bfloat16", "float32")  # pinned by default
    assert "| int8 | bfloat16 | int8 | float32 |" in md.read_text()


@pytest.mark.slow
@pytest.mark.vllm
def test_ctrl_c_stops_the_plan_after_a_checkpoint_and_a_rerun_resumes(tiny_model_dir, tmp_path):
    """Ctrl-C at the terminal (SIGINT to the runner's process group) used to kill the running train process at once
    (subprocess.call), losing its batch and checkpoint, and a run stopped on its own let the plan go on to the next.
    Now the run ends its batch, checkpoints, and the plan stops; the next invocation resumes that run."""
    import os
    import signal
    import subprocess
    import sys

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"config: {PLANS / 'base.yaml'}\nout_dir: {tmp_path / 'out'}\n"
        "arms: {a: {trainer.algo.name: alp}, b: {trainer.algo.name: grpo}}\n"
        "settings: {s: {trainer.update.updates_per_batch: 2}}\n"
        "groups: [{name: main, arms: [a, b], settings: [s]}]\n"
    )
    small = [
        f"engine.model={tiny_model_dir}",
        "run.iterations=1000",
        "run.prompts_per_batch=2",
        "run.samples_per_prompt=2",
        "eval.num_tasks=0",
        "rollout.max_tokens_per_turn=16",
        "engine.max_model_len=1024",
        "trainer.algo.mask_void_turns=false",
    ]
    cmd = foreground_cli("repro", "-c", str(plan), *small)
    # its own process group, as a foreground job has: the Ctrl-C below goes to that group, like the terminal's
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0)
    first = tmp_path / "out" / "runs" / "s_a_s0"
    wait_for_first_batch(proc, first / "metrics.jsonl")
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    out = output_after_stop(proc, "Ctrl-C to the plan")
    assert proc.returncode == 130, out
    assert "stopping: the run finishes its batch" in out and "rerun the command to resume" in out
    summary = json.loads((first / "summary.json").read_text())
    assert summary["interrupted"] is True and 1 <= summary["batches"] < 1000
    from alp_agent.train.checkpoint import latest_checkpoint

    assert latest_checkpoint(first / "checkpoints").name == f"step_{summary['batches']:06d}"
    assert not (tmp_path / "out" / "runs" / "s_b_s0").exists()  # the plan stopped
    info = json.loads((first / "run_info.json").read_text())
    assert info["attempts"][0]["exit"] == 0
    plan_out = subprocess.run(
        [sys.executable, "-m", "alp_agent.app.cli", "repro", "-c", str(plan), "--dry-run", *small],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "s_a_s0: resuming" in plan_out and "--resume" in plan_out

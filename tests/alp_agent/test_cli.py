"""CLI smoke tests on a tiny random model with the real vLLM, sandbox and env: train 2 iterations, resume,
eval, export, report; config errors give one clear line and exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alp_agent.app.cli import main
from tests.procs import foreground_cli, output_after_stop, wait_for_first_batch

REPO = Path(__file__).resolve().parents[2]
# Local benchmark copies come through $ALP_DATA_DIR (scripts/test.sh sets it when ../shared/data exists).
DATA = Path(os.environ.get("ALP_DATA_DIR") or REPO / "no-data-dir")


def _small(tiny: str, out: Path, name: str = "smoke") -> list[str]:
    return [
        f"engine.model={tiny}",
        f"run.out_dir={out}",
        f"run.name={name}",
        "run.prompts_per_batch=2",
        "run.samples_per_prompt=2",
        "eval.num_tasks=2",
        "rollout.max_tokens_per_turn=16",
        "engine.max_model_len=1024",
        "run.tensorboard=false",
        "trainer.update.updates_per_batch=2",
        # a random tiny model's turns are all void (cut at 16 tokens, no call, no answer): with the void-turn filter
        # on, no token would train; this plumbing test needs real optimizer steps
        "trainer.algo.mask_void_turns=false",
    ]


def test_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  algo:\n    nmae: alp\n")
    assert main(["train", "-c", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.algo.nmae" in err[0] and "unknown key" in err[0]

    assert main(["train", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err

    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [1, 2\n")
    assert main(["train", "-c", str(broken)]) == 2
    assert "invalid YAML" in capsys.readouterr().err

    assert main(["train", "trainer.optim.lr=-1"]) == 2
    assert "trainer.optim.lr" in capsys.readouterr().err

    assert main(["train", "engine.model=/nonexistent/model/dir", "run.out_dir=" + str(tmp_path)]) == 2
    assert "engine.model" in capsys.readouterr().err

    assert main(["train", "rollout.temperature=0", "run.out_dir=" + str(tmp_path)]) == 2
    assert "rollout.temperature" in capsys.readouterr().err


def test_every_shipped_config_validates():
    from alp_agent.app.repro import load_plan
    from alp_agent.config import RunConfig
    from alp_agent.config_io import load_config, read_yaml_with_base

    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files
    for f in files:
        if "groups" in read_yaml_with_base(f):  # a repro plan (configs/repro/*.yaml besides its training config)
            load_plan(f)
        else:
            load_config(RunConfig, f)


def test_envs_lists_builtins(capsys):
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    assert "alp/MathTool-v0" in out and "alp/MathToolJSON-v0" in out


@pytest.mark.vllm
def test_train_resume_export_report_eval(tiny_model_dir, tmp_path, capsys):
    args = _small(tiny_model_dir, tmp_path)
    assert main(["train", "-c", str(REPO / "configs/quickstart.yaml"), "--quiet", *args, "run.iterations=1"]) == 0
    run = tmp_path / "smoke"
    out = capsys.readouterr().out
    assert "held-out accuracy before training" in out and "after training" in out
    for f in ("config.yaml", "metrics.jsonl", "samples.jsonl", "samples.txt", "summary.json"):
        assert (run / f).is_file(), f
    # a second start without --resume refuses to overwrite
    assert main(["train", "-c", str(REPO / "configs/quickstart.yaml"), "--quiet", *args, "run.iterations=2"]) == 2
    capsys.readouterr()
    # resume continues from batch 1 to 2
    assert (
        main(["train", "-c", str(REPO / "configs/quickstart.yaml"), "--quiet", "--resume", *args, "run.iterations=2"])
        == 0
    )
    batches = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in batches if r["kind"] == "batch"] == [1, 2]
    steps = [r["step"] for r in batches if r["kind"] == "step"]
    assert steps and steps == sorted(steps) and len(steps) == len(set(steps))  # no step repeated after resume

    assert main(["report", str(run)]) == 0
    assert (run / "report.md").is_file() and (run / "plots" / "reward.png").is_file()
    assert (run / "plots" / "ratio_envelope.png").is_file()

    assert main(["export", str(run)]) == 0
    export = run / "export"
    assert (export / "config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(next(export.glob("*.safetensors"))), "pt") as f:
        assert not any("sigma" in k for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__

    capsys.readouterr()
    evals = tmp_path / "evals"
    assert (
        main(
            [
                "eval",
                "--model",
                str(run),
                "-b",
                "synthetic",
                "--limit",
                "3",
                "--k",
                "2",
                "--max-turns",
                "2",
                "--out",
                str(evals),
                "rollout.max_tokens_per_turn=16",
                "engine.max_model_len=1024",
            ]
        )
        == 0
    )
    rows = json.loads((evals / "summary.json").read_text())
    assert rows[0]["problems"] == 3 and "pass@2" in rows[0] and 0.0 <= rows[0]["accuracy"] <= 1.0
    per_problem = (evals / "synthetic-k2-t1.jsonl").read_text().splitlines()
    assert len(per_problem) == 3 and len(json.loads(per_problem[0])["correct"]) == 2


@pytest.mark.vllm
@pytest.mark.skipif(not DATA.is_dir(), reason="ALP_DATA_DIR (local benchmark copies) not set")
def test_eval_gsm8k_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    common = [
        "eval",
        "--model",
        tiny_model_dir,
        "-b",
        "gsm8k",
        "--out",
        str(out),
        "--data-dir",
        str(DATA),
        "--max-turns",
        "1",
        "rollout.max_tokens_per_turn=8",
        "engine.max_model_len=1024",
    ]
    assert main([*common, "--limit", "2"]) == 0
    path = out / "gsm8k-k1-t0.jsonl"
    first = path.read_text().splitlines()
    assert len(first) == 2
    assert main([*common, "--limit", "3"]) == 0  # only problem 3 is computed
    lines = path.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3


def test_baseline_configs_extend_the_quickstart(tmp_path):
    from alp_agent.config import RunConfig
    from alp_agent.config_io import ConfigError, load_config

    quick = load_config(RunConfig, REPO / "configs/quickstart.yaml")
    for name, algo in [("bypass", "bypass"), ("grpo", "grpo"), ("tis", "tis"), ("mis", "mis"), ("gspo", "gspo")]:
        cfg = load_config(RunConfig, REPO / f"configs/baselines/{name}.yaml")
        assert cfg.trainer.algo.name == algo
        assert cfg.run.iterations == quick.run.iterations and cfg.engine == quick.engine  # inherited, not copied
    loop = tmp_path / "a.yaml"
    loop.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(RunConfig, loop)


@pytest.mark.vllm
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_checkpoints_and_exits_cleanly(tiny_model_dir, tmp_path, sig):
    """Ctrl-C, or SIGTERM (kill, a scheduler), in the middle of a run: the batch ends, a checkpoint is written, exit 0.
    The signal lands wherever the run is (rollout, update, sync) and must never be lost (it once was, see signals.py).
    """
    import os
    import signal
    import subprocess

    args = _small(tiny_model_dir, tmp_path, "interrupt")
    cmd = foreground_cli(
        "train",
        "-c",
        str(REPO / "configs/quickstart.yaml"),
        "--quiet",
        *args,
        "run.iterations=1000",
        "run.checkpoint_every=0",
        "eval.num_tasks=0",
    )
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wait_for_first_batch(proc, tmp_path / "interrupt" / "metrics.jsonl")
    proc.send_signal(getattr(signal, sig))
    out = output_after_stop(proc, sig)
    assert proc.returncode == 0, out
    assert "interrupted: checkpoint written" in out
    summary = json.loads((tmp_path / "interrupt" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["batches"] >= 1
    from alp_agent.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path / "interrupt" / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{summary['batches']:06d}"  # a whole batch, never half of one


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(not DATA.is_dir(), reason="ALP_DATA_DIR (local benchmark copies) not set")
def test_smollm2_short_gsm8k_eval_reports_sane_numbers(tmp_path):
    """The embedded SmolLM2 on a few GSM8K problems with the tool: completes, numbers in range (accuracy not asserted)."""
    out = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "--model",
                "smollm2",
                "-b",
                "gsm8k",
                "--limit",
                "4",
                "--k",
                "2",
                "--max-turns",
                "2",
                "--out",
                str(out),
                "--data-dir",
                str(DATA),
                "rollout.max_tokens_per_turn=96",
                "engine.max_model_len=2048",
            ]
        )
        == 0
    )
    (row,) = json.loads((out / "summary.json").read_text())
    assert row["problems"] == 4 and row["samples"] == 8
    for k in ("accuracy", "pass@1", "pass@2", "tool_error_rate", "answer_missing_rate"):
        assert 0.0 <= row[k] <= 1.0, (k, row[k])
    assert row["pass@2"] >= row["pass@1"]
    assert 1.0 <= row["mean_turns"] <= 2.0 and row["mean_response_tokens"] > 0
    records = [json.loads(line) for line in (out / "gsm8k-k2-t1.jsonl").read_text().splitlines()]
    assert [r["task_index"] for r in records] == [0, 1, 2, 3]
    assert all(r["reference"] for r in records)  # GSM8K references (after ####) travel into the records

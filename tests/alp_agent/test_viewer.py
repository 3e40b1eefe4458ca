"""Episode log and viewer: per-token roles from a real chat-template transcript, the trainer's theta_old logprobs,
the ratio-tail statistics, and report.html opened in a real headless Chromium (DOM and screenshot)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from alp_agent.app.ratio_tail import normalized_ess, quantile, tail_table
from alp_agent.app.viewer import render_html
from alp_agent.rollout.chat import ChatTemplate
from alp_agent.rollout.trajectory import Trajectory
from alp_agent.rollout.transcript import Transcript
from alp_agent.train.episode_log import read_episodes, write_episode_batch

REPO = Path(__file__).resolve().parents[2]
SYSTEM = [{"role": "system", "content": "Use python."}, {"role": "user", "content": "What is 12 * 34?"}]
TOOL_OUT = "```output\n408\n```"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def two_turn_trajectory(tok, lp: float = -0.5) -> Trajectory:
    """Model turn (stops on a stop string) -> tool output -> model turn with EOS, through the real template path."""
    tr = Transcript(ChatTemplate(tok), SYSTEM)
    first = tok("```python\nprint(12 * 34)\n```", add_special_tokens=False)["input_ids"]
    tr.add_model_turn(first, [lp] * len(first))
    obs = [{"role": "user", "content": TOOL_OUT}]
    tr.add_observation(obs, tr.observation(obs), check=False)
    second = tok("The answer is \\boxed{408}.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    tr.add_model_turn(second, [lp] * len(second))
    return Trajectory(
        tr.prompt_ids,
        tr.completion_ids,
        tr.loss_mask,
        tr.logprobs,
        reward=1.0,
        turn_spans=tr.turn_spans,
        num_turns=2,
        num_tool_calls=1,
        finish_reason="answer",
        temperature=0.7,
        token_roles="".join(tr.roles),
        info={"task_index": 3, "sample_index": 0},
    )


@pytest.mark.parametrize("recorded", [True, False], ids=["token_roles", "derived_from_mask"])
def test_roles_split_model_tool_and_template_tokens(tiny_tokenizer, tmp_path, recorded):
    t = two_turn_trajectory(tiny_tokenizer)
    if not recorded:
        t.token_roles = ""  # a trajectory written before the field existed: roles from the mask and the pieces
    assert write_episode_batch(tmp_path, 5, [t], tiny_tokenizer, None, None, n=4) == 1
    (e,) = read_episodes(tmp_path)
    roles, pieces = e.tokens.roles, e.tokens.pieces
    assert len(roles) == len(t.completion_ids) and e.tokens.clean is None
    assert [r == "model" for r in roles] == [m == 1 for m in t.loss_mask]
    assert "".join(p for p, r in zip(pieces, roles) if r == "tool") == TOOL_OUT
    template = "".join(p for p, r in zip(pieces, roles) if r == "template")
    assert template == "<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    assert e.batch == 5 and e.task_index == 3 and e.turn_spans == [tuple(s) for s in t.turn_spans]


def test_recorded_roles_are_what_is_shown(tiny_tokenizer, tmp_path):
    t = two_turn_trajectory(tiny_tokenizer)
    t.token_roles = "t" * len(t.completion_ids)
    write_episode_batch(tmp_path, 0, [t], tiny_tokenizer, None, None, n=1)
    assert set(read_episodes(tmp_path)[0].tokens.roles) == {"template"}


def test_trainer_logprobs_are_theta_old_clean_and_perturbed(tiny_model_dir, tiny_tokenizer, tmp_path):
    import torch

    from alp_agent.algo.config import TrainerConfig
    from alp_agent.models import load_model
    from alp_agent.train.episode_log import log_sampled_episodes
    from alp_agent.train.logprobs import sequence_logprobs
    from alp_agent.train.trainer import Trainer

    torch.manual_seed(0)
    cfg = TrainerConfig.model_validate(
        {"algo": {"name": "alp", "perturb": {"sigma0": 0.05}}, "update": {"dtype": "float32"}}
    )
    trainer = Trainer(load_model(tiny_model_dir, dtype=torch.float32), cfg)
    trajs = [two_turn_trajectory(tiny_tokenizer) for _ in range(3)]
    before = trainer.model.training
    assert log_sampled_episodes(tmp_path, 0, trajs, tiny_tokenizer, trainer, n=2) == 2
    assert trainer.model.training == before  # the train/eval mode is restored
    e = read_episodes(tmp_path)[0]
    with torch.no_grad():
        ref, _ = sequence_logprobs(trainer.model.eval(), torch.tensor([trajs[0].ids]), None, 0.7)
    want = ref[0, len(trajs[0].prompt_ids) :].tolist()
    assert e.tokens.clean == pytest.approx(want, abs=1e-5)
    diff = [abs(a - b) for a, b in zip(e.tokens.noisy, e.tokens.clean)]
    assert max(diff) > 1e-4  # the perturbation at sigma 0.05 moves them


def test_tail_statistics_by_turn_and_after_tool(tiny_tokenizer, tmp_path):
    t = two_turn_trajectory(tiny_tokenizer, lp=-1.0)
    clean = [(-1.0 if m else 0.0) for m in t.loss_mask]
    a, b = t.turn_spans[1]
    clean[a] = -1.0 + math.log(4.0)  # the first token after the tool output: ratio 4
    write_episode_batch(tmp_path, 0, [t], tiny_tokenizer, [clean], None, n=1)
    rows = {r.group: r for r in tail_table(read_episodes(tmp_path))}
    assert rows["turn 1"].quantiles["p99.9"] == pytest.approx(1.0) and rows["turn 1"].ess == pytest.approx(1.0)
    assert rows["turn 2"].tokens == b - a and rows["turn 2"].quantiles["p99.9"] > 3.9
    first = rows["first 8 after tool"]
    assert first.tokens == 8 and first.ess == pytest.approx(normalized_ess([4.0] + [1.0] * 7))
    assert quantile([1.0, 2.0, 3.0], 0.5) == 2.0 and normalized_ess([1.0, 0.0, 0.0]) == pytest.approx(1 / 3)


def test_html_escapes_tokens_and_says_when_nothing_is_logged(tiny_tokenizer, tmp_path):
    assert "No episodes logged" in render_html("empty", [])
    t = two_turn_trajectory(tiny_tokenizer)
    write_episode_batch(tmp_path, 0, [t], tiny_tokenizer, None, None, n=1)
    page = render_html("r", read_episodes(tmp_path))
    assert "&lt;|im_end|&gt;" in page and "<|im_end|>" not in page.split("<body", 1)[1]
    assert "No trainer logprobs logged" in page


def _browser_check(html_file: Path, shot: Path) -> str:
    chrome = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1600"]
    dom = subprocess.run(
        [chrome, *flags, "--virtual-time-budget=3000", "--dump-dom", html_file.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    subprocess.run([chrome, *flags, f"--screenshot={shot}", html_file.as_uri()], capture_output=True, timeout=120)
    return dom


@pytest.mark.vllm
@pytest.mark.skipif(
    _chromium() is None, reason="chromium not installed (scripts/test.sh installs it: apt-get install chromium)"
)
def test_report_html_of_a_trained_run_in_headless_chromium(tiny_model_dir, tmp_path, capsys):
    from alp_agent.app.cli import main

    args = [
        f"engine.model={tiny_model_dir}",
        f"run.out_dir={tmp_path}",
        "run.name=view",
        "run.iterations=1",
        "run.prompts_per_batch=2",
        "run.samples_per_prompt=2",
        "run.sample_episodes=3",
        "run.tensorboard=false",
        "eval.num_tasks=0",
        "rollout.max_tokens_per_turn=24",
        "engine.max_model_len=1024",
        "trainer.update.updates_per_batch=1",
    ]
    assert main(["train", "-c", str(REPO / "configs/quickstart.yaml"), "--quiet", *args]) == 0
    run = tmp_path / "view"
    episodes = read_episodes(run)
    assert len(episodes) == 3 and all(e.tokens.clean is not None and e.tokens.noisy is not None for e in episodes)
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = run / "report.html"
    assert not re.search(r"""(src|href)=["']https?://""", page.read_text())  # self-contained
    shot = tmp_path / "shot.png"
    dom = _browser_check(page, shot)
    assert dom.count('class="episode"') == 3
    for role in ("model", "tool", "template"):
        assert f'data-legend="{role}"' in dom
    n_model = sum(e.tokens.roles.count("model") for e in episodes)
    assert dom.count('data-role="model"') == n_model
    assert 'id="tail"' in dom and "<table" in dom.split('id="tail"', 1)[1]
    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("ALP_VIEWER_SCREENSHOT"):  # refresh docs/ with: ALP_VIEWER_SCREENSHOT=docs/...png pytest ...
        shutil.copy(shot, os.environ["ALP_VIEWER_SCREENSHOT"])
    assert 'data-ready="1"' in dom  # the page's own script ran to the end


def test_tail_panel_reads_the_trainers_own_tail_metrics():
    import torch

    from alp_agent.app.ratio_tail import metrics_tail
    from alp_agent.train.tail import tail_metrics

    log_r = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    tags = torch.tensor([0, 0, 0, 3, 2, -1])  # turn 0 (3 tokens), turn 1: one head token, one other; one untagged
    rec = {"kind": "batch", "step": 7, **tail_metrics(log_r, tags)}
    step, rows = metrics_tail([{"kind": "batch", "step": 6}, rec, {"kind": "batch", "step": 8}])
    by = {r.group: r for r in rows}
    assert step == 7 and list(by) == ["turn 1", "turn 2", "first 8 after tool", "other model tokens"]
    assert by["turn 1"].tokens == 3 and by["turn 1"].quantiles["max"] == pytest.approx(1.0)
    assert by["first 8 after tool"].quantiles["p50"] == pytest.approx(math.exp(0.5))
    assert by["turn 2"].ess == pytest.approx(normalized_ess([math.exp(0.5), 1.0]))
    page = render_html("r", [], [rec])
    assert "training (metrics, batch 7, every model token)" in page and "No trainer logprobs" not in page
    assert metrics_tail([{"kind": "batch", "step": 1}]) is None

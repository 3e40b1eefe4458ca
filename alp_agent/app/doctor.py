"""`alp-agent doctor -c CONFIG`: build the run's real parts and check, before spending compute, what silently
spoils RL runs. Each check is PASS / WARN / FAIL with the numbers behind it; exit code 1 on any FAIL.

- template: prefix behaviour over a multi-turn tool conversation (the env's own prompt and tool results); whether
  the template rewrites history, and that the rollout's appender keeps every sampled id and observation anyway;
- masks: on a few sampled episodes, mask 1 exactly on the ids the engine returned (recorded at the engine), no
  tool/template token with mask 1;
- logprob parity at lr 0: engine vs trainer on the same ids with the run's temperature / top-p / top-k;
- ALP noise: KL(clean||perturbed) per layer group at the configured sigma, next to the measured mismatch;
- sandbox: a session runs, keeps state, has its time limit enforced; p50 per call; 32 concurrent sessions;
- machine: CPU bf16 support and the dtypes chosen, free memory vs an estimated peak, GPUs.

The checks themselves live in doctor_checks / doctor_numbers / doctor_system as functions of small inputs.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict
from typing import Any

from alp_agent.app.doctor_checks import FAIL, PASS, SKIP, WARN, Check, check_masks, check_template, worst
from alp_agent.app.doctor_checks import scripted_conversation as _conversation
from alp_agent.config import RunConfig
from alp_agent.engine.base import Engine, Generation, SamplingConfig

SYMBOL = {PASS: "PASS", WARN: "WARN", FAIL: "FAIL", SKIP: "SKIP"}


class RecordingEngine(Engine):
    """The run's engine, unchanged, with every (prompt ids, sampled ids) it returns recorded: the ground truth the
    mask check compares the trajectories' masks against."""

    def __init__(self, inner: Engine, records: list | None = None):
        self.inner = inner
        self.records: list[tuple[list[int], list[int]]] = records if records is not None else []
        self.max_model_len = getattr(inner, "max_model_len", None)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        gens = self.inner.generate(prompts, sampling)
        self.records += [(list(p), list(g.token_ids)) for p, g in zip(prompts, gens)]
        return gens

    async def agenerate(self, prompt: list[int], sampling: SamplingConfig) -> Generation:
        g = await self.inner.agenerate(prompt, sampling)
        self.records.append((list(prompt), list(g.token_ids)))
        return g

    def route(self, key: Hashable) -> Engine:
        return RecordingEngine(self.inner.route(key), self.records)

    def load_weights(self, state_dict: Mapping) -> None:
        self.inner.load_weights(state_dict)


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """A check that raises is reported as FAIL with the error, never a traceback that hides the other checks."""
    t0 = time.perf_counter()
    try:
        c = fn()
    except Exception as e:  # noqa: BLE001 - every failure is a finding of the doctor
        c = Check(
            name, FAIL, f"the check itself failed: {type(e).__name__}: {e}", details=[traceback.format_exc(limit=3)]
        )
    c.numbers.setdefault("seconds", round(time.perf_counter() - t0, 2))
    return c


def env_conversation(env_fn: Callable[[], Any]) -> list[dict]:
    """The scripted conversation with the env's own prompt and two real tool results (python calls run in the
    sandbox); a fixed one when the env cannot produce them."""
    env = env_fn()
    try:
        messages, _ = env.reset(seed=0, options={"task_index": 0})
        observations = []
        for k in range(2):
            obs, _, terminated, truncated, _ = env.step(f"```python\nprint(12 * 34 + {k})\n```")
            if not obs:
                break
            observations.append(obs)
            if terminated or truncated:
                break
        conv = _conversation(observations or [[{"role": "user", "content": "```output\n408\n```"}]])
        return [*messages, *conv[2:]]
    finally:
        env.close()


def sample_episodes(comps, prompts: int, samples: int):
    """A few episodes of the run's env with the run's rollout settings, through a recording view of its engine."""
    from alp_agent.rollout.runner import RolloutRunner

    rec = RecordingEngine(comps.engine)
    runner = RolloutRunner(rec, comps.tokenizer, comps.runner.env_fn, comps.runner.config)
    try:
        trajs = runner.run(list(range(min(prompts, comps.num_tasks))), samples, 0)
    finally:
        runner.close()
    return trajs, rec.records


def run_checks(cfg: RunConfig, prompts: int = 2, samples: int = 2) -> list[Check]:
    """Build the run's parts (sandbox, engine, tokenizer, rollout, trainer) and run every check."""
    import torch

    from alp_agent.app.doctor_numbers import check_parity, model_token_pairs, parity_stats, trainer_logprobs
    from alp_agent.app.doctor_system import check_machine, check_sandbox, mem_available_gib
    from alp_agent.app.job import build_inference
    from alp_agent.models import load_model
    from alp_agent.rollout.chat import ChatTemplate
    from alp_agent.rollout.transcript import Transcript
    from alp_agent.train.distributed import local_device
    from alp_agent.train.trainer import Trainer

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    free_gib = mem_available_gib()  # before this process holds the engine and the trainer
    comps = build_inference(cfg)
    try:
        model = load_model(comps.model_dir, dtype=torch.float32, device=local_device())  # cuda:0 on a GPU machine
        trainer = Trainer(model, cfg.trainer)
        hf = model.config
        n_params = sum(p.numel() for p in model.parameters())
        checks = [
            _guard(
                "machine",
                lambda: check_machine(
                    cfg, n_params, hf.hidden_size, hf.num_hidden_layers, None, trainer.cfg.update.dtype, free_gib
                ),
            )
        ]
        chat = ChatTemplate(comps.tokenizer)
        conv = env_conversation(comps.runner.env_fn)
        checks.append(_guard("template", lambda: check_template(chat, conv, Transcript)))
        trajs, records = sample_episodes(comps, prompts, samples)
        checks.append(_guard("masks", lambda: check_masks(trajs, records)))
        stats: dict[str, float] = {}

        def parity() -> Check:
            stats.update(parity_stats(*model_token_pairs(trajs, trainer_logprobs(trainer, trajs))))
            r = cfg.rollout
            return check_parity(stats, cfg.engine.dtype, trainer.cfg.update.dtype, r.top_p, r.top_k)

        checks.append(_guard("logprob parity", parity))
        checks.append(_guard("ALP noise", lambda: _noise_check(cfg, trainer, trajs, stats.get("kl_k3", float("nan")))))
        checks.append(_guard("sandbox", lambda: check_sandbox(comps.sandbox, cfg.sandbox.timeout_s)))
        return checks
    finally:
        comps.close()


def _noise_check(cfg: RunConfig, trainer, trajs, mismatch_kl: float) -> Check:
    """The noise at the sigma the trainer starts with (its log-sigmas: sigma0, or 1e-3 before 'auto' calibrates)."""
    from alp_agent.app.doctor_numbers import check_noise, noise_kl_by_group

    p = cfg.trainer.algo.perturb
    if trainer.perturbation is None:
        return check_noise(None, mismatch_kl, 0.0, p.learnable)
    sigma = float(trainer.perturbation.sigmas().mean())
    c = check_noise(noise_kl_by_group(trainer, trajs), mismatch_kl, sigma, p.learnable, trainer.cfg.update.dtype)
    if p.sigma0 == "auto":
        c.details.append("sigma0 is 'auto': the trainer calibrates σ to the measured mismatch on its first batch")
    return c


def format_report(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{SYMBOL[c.status]}  {c.name:15s} {c.summary}")
        lines += [f"      - {d.strip()}" for d in c.details if d.strip()]
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL, SKIP)}
    lines.append(
        f"doctor: {counts[PASS]} PASS, {counts[WARN]} WARN, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP -> "
        f"{worst([c.status for c in checks])}"
    )
    return "\n".join(lines) + "\n"


def report_json(checks: list[Check]) -> str:
    return json.dumps(
        {"status": worst([c.status for c in checks]), "checks": [asdict(c) for c in checks]}, indent=1, default=str
    )


def run_doctor(cfg: RunConfig, as_json: bool = False, prompts: int = 2, samples: int = 2) -> int:
    """The command: run the checks, print them (text or JSON); 1 if any check failed, else 0."""
    if as_json:  # vLLM and friends log to stdout: keep it for the JSON alone
        with contextlib.redirect_stdout(sys.stderr):
            checks = run_checks(cfg, prompts, samples)
    else:
        checks = run_checks(cfg, prompts, samples)
    print(report_json(checks) if as_json else format_report(checks), end="" if not as_json else "\n")
    return exit_code(checks)


def exit_code(checks: list[Check]) -> int:
    """1 when any check failed (WARN and SKIP do not fail a run), else 0."""
    return 1 if any(c.status == FAIL for c in checks) else 0

"""Per-token episode log of a run: what the episode viewer (`alp-agent report` -> report.html) shows.

One JSON line per sampled episode in `<run_dir>/episodes.jsonl`: every completion token with its id, decoded piece,
role (model / tool / template), the engine's logprob (mu, the sampler) and the trainer's logprobs of the same token
at theta_old, clean and, where ALP runs, perturbed. The log-ratio trainer-vs-engine of each token is then
`clean - engine` (and `noisy - engine`): where the importance-ratio tail lives, token by token.

Roles: `Trajectory.token_roles` when the rollout records them; otherwise derived from the loss mask (1 = model) and,
for mask-0 tokens, the tokenizer's special tokens: special tokens, the role header after a turn-start token and the
newline after a turn-end token are template, the rest tool output (exact for ChatML templates such as SmolLM2's and
Qwen's; elsewhere the template/tool split of mask-0 tokens is approximate).

Trainer logprobs: passed in when the trainer exposes its first-step per-row logprobs; otherwise
`trainer_logprobs(trainer, trajs)` computes them for the few logged episodes just before the update (the trainer is
at theta_old then): the clean ones exactly, the perturbed ones with a fresh noise draw at the current sigma (the same
distribution as the update's, not the same draw).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alp_agent.rollout.trajectory import Trajectory

EPISODES_FILE = "episodes.jsonl"
ROLES = ("model", "tool", "template")
RECORDED_ROLES = {"m": "model", "o": "tool", "t": "template"}  # Trajectory.token_roles characters -> viewer roles
RowLogprobs = Sequence[Sequence[float] | None] | None  # per trajectory: completion-token logprobs, or None


@dataclass
class TokenLog:
    """The completion tokens of one episode, position-aligned lists (trainer lists are None when not measured)."""

    ids: list[int]
    pieces: list[str]
    roles: list[str]
    engine: list[float]
    clean: list[float] | None = None
    noisy: list[float] | None = None


@dataclass
class EpisodeLog:
    batch: int
    task_index: int | None
    sample_index: int | None
    reward: float
    finish_reason: str
    num_turns: int
    num_tool_calls: int
    policy_version: int
    temperature: float
    prompt: str
    turn_spans: list[tuple[int, int]]
    tokens: TokenLog
    noisy_is_exact: bool = False  # True when the perturbed logprobs are the update's own (not a fresh draw)
    info: dict[str, Any] = field(default_factory=dict)


def choose_episodes(n_total: int, n: int) -> list[int]:
    """Indices of the `n` episodes logged out of `n_total`: evenly spaced, so several groups are represented."""
    if n <= 0 or n_total <= 0:
        return []
    return list(range(0, n_total, max(1, n_total // n)))[:n]


def _decode_pieces(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def derive_roles(loss_mask: Sequence[int], pieces: Sequence[str], special: set[str]) -> list[str]:
    """Roles from the loss mask and the decoded pieces (used when the trajectory has no `token_roles`)."""
    roles: list[str] = []
    header = after_end = False
    for m, p in zip(loss_mask, pieces):
        if m:
            roles.append("model")
            header = after_end = False
            continue
        if p in special:
            roles.append("template")
            header = p.endswith("start|>") or p.startswith("<|start")
            after_end = not header
        elif header or (after_end and p.strip() == ""):
            roles.append("template")
            header = header and "\n" not in p
            after_end = False
        else:
            roles.append("tool")
            after_end = False
    return roles


def roles_of(t: Trajectory, pieces: Sequence[str], tokenizer) -> list[str]:
    """`t.token_roles` when the rollout recorded them ("m"/"o"/"t" per token: model/observation/template), else
    derived from the loss mask and the pieces."""
    recorded = getattr(t, "token_roles", None)
    if recorded and len(recorded) == len(t.completion_ids):
        return [RECORDED_ROLES.get(str(r), str(r)) for r in recorded]
    special = {str(s) for s in getattr(tokenizer, "all_special_tokens", [])}
    special |= {str(s) for s in getattr(tokenizer, "additional_special_tokens", []) or []}
    return derive_roles(t.loss_mask, pieces, special)


def episode_log(
    t: Trajectory,
    batch: int,
    tokenizer,
    clean: Sequence[float] | None = None,
    noisy: Sequence[float] | None = None,
    noisy_is_exact: bool = False,
) -> EpisodeLog:
    pieces = _decode_pieces(tokenizer, t.completion_ids)
    tokens = TokenLog(
        ids=list(t.completion_ids),
        pieces=pieces,
        roles=roles_of(t, pieces, tokenizer),
        engine=[float(x) for x in t.infer_logprobs],
        clean=[float(x) for x in clean] if clean is not None else None,
        noisy=[float(x) for x in noisy] if noisy is not None else None,
    )
    return EpisodeLog(
        batch=batch,
        task_index=t.info.get("task_index"),
        sample_index=t.info.get("sample_index"),
        reward=float(t.reward),
        finish_reason=t.finish_reason,
        num_turns=t.num_turns,
        num_tool_calls=t.num_tool_calls,
        policy_version=t.policy_version,
        temperature=float(t.temperature),
        prompt=tokenizer.decode(t.prompt_ids, skip_special_tokens=False),
        turn_spans=[(int(a), int(b)) for a, b in t.turn_spans],
        tokens=tokens,
        noisy_is_exact=noisy_is_exact,
    )


def write_episode_batch(
    run_dir: str | Path,
    batch: int,
    trajectories: Sequence[Trajectory],
    tokenizer,
    train_logprobs_clean: RowLogprobs,
    train_logprobs_noisy: RowLogprobs,
    n: int,
    noisy_is_exact: bool = False,
) -> int:
    """Append `n` evenly chosen episodes of a rollout batch to `<run_dir>/episodes.jsonl`; returns how many.

    train_logprobs_clean / _noisy: per trajectory (aligned with `trajectories`), the trainer's logprobs of its
    completion tokens, or None (per list or per entry) where not measured."""
    chosen = choose_episodes(len(trajectories), n)
    if not chosen:
        return 0

    def pick(rows: RowLogprobs, i: int) -> Sequence[float] | None:
        return rows[i] if rows is not None and i < len(rows) else None

    logs = [
        episode_log(
            trajectories[i],
            batch,
            tokenizer,
            pick(train_logprobs_clean, i),
            pick(train_logprobs_noisy, i),
            noisy_is_exact,
        )
        for i in chosen
    ]
    with open(Path(run_dir) / EPISODES_FILE, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(e)) + "\n" for e in logs)
    return len(logs)


def read_episodes(run_dir: str | Path) -> list[EpisodeLog]:
    """Every logged episode of a run (half-written or malformed lines are skipped); [] when none were logged."""
    path = Path(run_dir) / EPISODES_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
            d["tokens"] = TokenLog(**d["tokens"])
            d["turn_spans"] = [tuple(s) for s in d.get("turn_spans", [])]
            out.append(EpisodeLog(**d))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def truncation_supported() -> bool:
    """Whether the trainer's logprob path applies the engine's top-k/top-p truncation (then the trajectory's own
    top_p/top_k are passed, as the trainer does)."""
    import inspect

    from alp_agent.train.logprobs import sequence_logprobs

    return "top_p" in inspect.signature(sequence_logprobs).parameters


def trainer_logprobs(trainer, trajs: Sequence[Trajectory]) -> tuple[list[list[float]], list[list[float]] | None]:
    """The trainer's clean (and, with ALP, perturbed) logprobs of each trajectory's completion tokens, one row at a
    time under the trainer's compute dtype (its resolved `update.dtype`) and the trajectory's sampling settings; the
    model's train/eval mode is restored. Cheap for the few logged episodes."""
    import contextlib

    import torch

    from alp_agent.train.logprobs import sequence_logprobs

    model, pert = trainer.model, getattr(trainer, "perturbation", None)
    device = next(model.parameters()).device
    bf16 = trainer.cfg.update.dtype == "bfloat16"
    was_training = model.training
    clean: list[list[float]] = []
    noisy: list[list[float]] | None = [] if pert is not None else None

    truncation = truncation_supported()

    def run(t: Trajectory, noise: bool) -> list[float]:
        ids = torch.tensor([t.ids], device=device)
        model.train(noise)  # the perturbation hooks fire only in train mode inside active()
        ctx = pert.active(trainer.step, 0) if noise and pert is not None else contextlib.nullcontext()
        kw: dict[str, Any] = {"top_p": float(t.top_p), "top_k": int(t.top_k)} if truncation else {}
        with torch.no_grad(), ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            lp, _ = sequence_logprobs(model, ids, None, float(t.temperature), start=max(1, len(t.prompt_ids)), **kw)
        return lp[0, len(t.prompt_ids) :].float().cpu().tolist()

    try:
        for t in trajs:
            clean.append(run(t, False))
            if noisy is not None:
                noisy.append(run(t, True))
    finally:
        model.train(was_training)
    return clean, noisy


def log_sampled_episodes(run_dir: str | Path, batch: int, trajs: Sequence[Trajectory], tokenizer, trainer, n: int):
    """The training job's hook before each update (the trainer is at theta_old): log `n` episodes with the trainer's
    logprobs, computed here for those episodes only (trainer=None, or an FSDP2-sharded trainer: engine logprobs
    only)."""
    chosen = choose_episodes(len(trajs), n)
    if not chosen:
        return 0
    if trainer is not None and getattr(trainer, "sharded", False):
        trainer = None  # FSDP2: a forward on rank 0 alone would wait for the other ranks' shards forever
    clean_c, noisy_c = trainer_logprobs(trainer, [trajs[i] for i in chosen]) if trainer is not None else ([], None)
    clean: list[list[float] | None] = [None] * len(trajs)
    noisy: list[list[float] | None] = [None] * len(trajs)
    for k, i in enumerate(chosen):
        clean[i] = clean_c[k] if clean_c else None
        noisy[i] = noisy_c[k] if noisy_c else None
    return write_episode_batch(run_dir, batch, trajs, tokenizer, clean, noisy, n)

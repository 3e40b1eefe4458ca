"""`alp-agent doctor`, part 1: the check result type and the token-level checks (chat template, loss masks).

Pure functions over small inputs (a tokenizer, a conversation, trajectories, the engine's recorded generations), so
each can be tested on the tiny model and broken on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alp_agent.rollout.trajectory import Trajectory

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
_ORDER = {SKIP: 0, PASS: 1, WARN: 2, FAIL: 3}


@dataclass
class Check:
    """One doctor check: its verdict, one line with the numbers behind it, the numbers themselves, and details."""

    name: str
    status: str
    summary: str
    numbers: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)


def worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=lambda s: _ORDER[s], default=PASS)


# ---------------------------------------------------------------------------------------------------- template
def scripted_conversation(observations: Sequence[Sequence[dict]]) -> list[dict]:
    """A multi-turn tool conversation: system + user, then per observation an assistant turn (reasoning in a
    <think> block, a python call) and the observation messages, then a final assistant answer. The <think> blocks
    make history-rewriting templates (Qwen3, DeepSeek-R1 style) show themselves."""
    conv: list[dict] = [
        {"role": "system", "content": "You are a math solver with a Python interpreter."},
        {"role": "user", "content": "What is 12 * 34 + 5?"},
    ]
    for k, obs in enumerate(observations):
        conv.append({"role": "assistant", "content": f"<think>step {k}</think>```python\nprint(12 * 34 + {k})\n```"})
        conv.extend(dict(m) for m in obs)
    conv.append({"role": "assistant", "content": "<think>done</think>The answer is \\boxed{413}."})
    return conv


def _split_turns(conv: list[dict]) -> tuple[list[dict], list[tuple[dict, list[dict]]]]:
    """(prompt messages, [(assistant message, observation messages after it)])."""
    first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
    turns: list[tuple[dict, list[dict]]] = []
    for m in conv[first:]:
        if m["role"] == "assistant":
            turns.append((m, []))
        else:
            turns[-1][1].append(m)
    return conv[:first], turns


def history_rewrites(chat, conv: list[dict]) -> int:
    """Turns where the template's full render of the conversation does not extend the running text (prompt, then
    each assistant turn's content as the model would have written it): 0 for append-only templates."""
    prompt, turns = _split_turns(conv)
    msgs = list(prompt)
    text = chat.render(msgs, add_generation_prompt=True)
    rewrites = 0
    for assistant, obs in turns:
        if not obs:
            break
        text += assistant["content"]
        msgs += [assistant, *obs]
        full = chat.render(msgs, add_generation_prompt=True)
        if not full.startswith(text):
            rewrites += 1
            text = full  # continue from the template's own text, to count each turn once
        else:
            text = full
    return rewrites


def rollout_handles(chat, conv: list[dict], transcript_factory: Callable) -> tuple[bool, list[str]]:
    """Run the rollout's own appender (`transcript_factory(chat, prompt_messages)`, e.g. rollout.transcript.
    Transcript) over the conversation with each assistant turn as sampled ids. It handles the template when every
    sampled id stays where it was appended, every observation's content lands in the ids after its turn, and no
    delta is refused. Returns (ok, problems)."""
    prompt, turns = _split_turns(conv)
    problems: list[str] = []
    try:
        tr = transcript_factory(chat, prompt)
        for k, (assistant, obs) in enumerate(turns):
            ids = chat.encode(assistant["content"])
            start = len(tr.completion_ids)
            tr.add_model_turn(ids, [-1.0] * len(ids))
            if list(tr.completion_ids[start : start + len(ids)]) != ids:
                problems.append(f"turn {k + 1}: the sampled ids were changed")
            if not obs:
                continue
            delta = tr.observation(obs)
            if delta is None:
                problems.append(f"turn {k + 1}: the template rewrote history and the rollout refused the delta")
                return False, problems
            tr.add_observation(obs, delta, check=False)
            appended = chat.decode(list(tr.completion_ids[start + len(ids) :]))
            missing = [m["content"] for m in obs if isinstance(m.get("content"), str) and m["content"] not in appended]
            if missing:
                problems.append(f"turn {k + 1}: observation text missing from the appended ids: {missing[0][:40]!r}")
        earlier = [chat.encode(a["content"]) for a, _ in turns]
        spans = list(tr.turn_spans)
        for k, (ids, (a, b)) in enumerate(zip(earlier, spans)):
            if list(tr.completion_ids[a:b]) != ids:
                problems.append(f"turn {k + 1}: its ids differ at the end of the episode (history rewritten)")
    except Exception as e:  # noqa: BLE001 - any failure of the appender is what this check reports
        problems.append(f"the rollout's appender failed: {type(e).__name__}: {e}")
    return not problems, problems


def check_template(chat, conv: list[dict], transcript_factory: Callable) -> Check:
    rewrites = history_rewrites(chat, conv)
    ok, problems = rollout_handles(chat, conv, transcript_factory)
    n_obs = sum(1 for _, obs in _split_turns(conv)[1] if obs)
    numbers = {"observation_turns": n_obs, "history_rewrites": rewrites, "rollout_handles_it": ok}
    kind = "append-only (prefix-invariant)" if rewrites == 0 else f"rewrites history ({rewrites}/{n_obs} turns)"
    if not ok:
        return Check("template", FAIL, f"template {kind}; the rollout does not handle it", numbers, problems)
    how = "" if rewrites == 0 else "; the rollout's stub deltas keep every sampled id"
    return Check("template", PASS, f"template {kind} over {n_obs} tool turns{how}", numbers)


# ---------------------------------------------------------------------------------------------------- masks
def sampled_positions(t: Trajectory, generations: Sequence[tuple[Sequence[int], Sequence[int]]]) -> set[int]:
    """Completion positions of `t` that the engine returned, from its recorded (prompt ids, sampled ids) calls."""
    ids, p0 = t.ids, len(t.prompt_ids)
    out: set[int] = set()
    for prompt, sampled in generations:
        n, m = len(prompt), len(sampled)
        if m and n >= p0 and n + m <= len(ids) and ids[n : n + m] == list(sampled) and ids[:n] == list(prompt):
            out.update(range(n - p0, n - p0 + m))
    return out


def check_masks(
    trajs: Sequence[Trajectory], generations: Sequence[tuple[Sequence[int], Sequence[int]]] | None
) -> Check:
    """Loss mask 1 exactly on the tokens the engine sampled (from its recorded calls when given, else the
    trajectory's turn spans); no tool-output or template token (token_roles, when recorded) with mask 1."""
    extra = missing = role_bad = zero_lp = tokens = 0
    details: list[str] = []
    for i, t in enumerate(trajs):
        if generations is not None:
            sampled = sampled_positions(t, generations)
        else:
            sampled = {p for a, b in t.turn_spans for p in range(a, b)}
        masked = {p for p, m in enumerate(t.loss_mask) if m}
        tokens += len(t.completion_ids)
        e, mi = len(masked - sampled), len(sampled - masked)
        extra, missing = extra + e, missing + mi
        if e or mi:
            details.append(f"episode {i}: {e} mask-1 tokens not sampled, {mi} sampled tokens with mask 0")
        roles = getattr(t, "token_roles", "") or ""
        if roles:
            bad = sum(1 for p in masked if roles[p] != "m")
            role_bad += bad
            if bad:
                details.append(f"episode {i}: {bad} tool/template tokens with mask 1")
        zero_lp += sum(1 for p in masked if t.infer_logprobs[p] == 0.0)
    numbers = {
        "episodes": len(trajs),
        "completion_tokens": tokens,
        "mask1_not_sampled": extra,
        "sampled_mask0": missing,
        "tool_or_template_with_mask1": role_bad,
        "mask1_with_logprob_exactly_0": zero_lp,
        "source": "engine calls" if generations is not None else "turn spans",
    }
    if not trajs:
        return Check("masks", WARN, "no episodes sampled: masks not checked", numbers)
    summary = (
        f"{len(trajs)} episodes, {tokens} tokens: {extra} mask-1 not sampled, {missing} sampled with mask 0, "
        f"{role_bad} tool/template tokens with mask 1"
    )
    return Check("masks", FAIL if extra or missing or role_bad else PASS, summary, numbers, details[:5])

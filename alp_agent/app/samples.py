"""Sample episodes as readable text: `alp-agent rollout` prints them, the job appends a few per batch to
samples.jsonl / samples.txt (model tokens and tool/template tokens marked apart; decoded for display only, never fed
back to the model)."""

from __future__ import annotations

import json
from pathlib import Path

from alp_agent.rollout.trajectory import Trajectory


def render_episode(t: Trajectory, tokenizer) -> str:
    """Readable text of one episode: model tokens and tool/template tokens marked apart (decoded for display only)."""
    lines = [
        (
            f"=== task {t.info.get('task_index')} sample {t.info.get('sample_index')} | reward {t.reward:.2f} | "
            f"turns {t.num_turns} | tool calls {t.num_tool_calls} (errors {t.num_tool_errors}) | {t.finish_reason}"
        ),
        "--- prompt ---",
        tokenizer.decode(t.prompt_ids),
    ]
    i, ids, mask = 0, t.completion_ids, t.loss_mask
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        lines.append("--- model ---" if mask[i] else "--- tool / template ---")
        lines.append(tokenizer.decode(ids[i:j]))
        i = j
    return "\n".join(lines) + "\n"


def write_samples(run_dir: Path, batch: int, trajs: list[Trajectory], tokenizer, n: int) -> None:
    """Append n episodes spread over the batch to samples.jsonl (with the trajectory) and samples.txt."""
    if n <= 0 or not trajs:
        return
    chosen = trajs[:: max(1, len(trajs) // n)][:n]
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"batch": batch, "text": render_episode(t, tokenizer), **t.to_dict()}) + "\n" for t in chosen
        )
    with open(run_dir / "samples.txt", "a", encoding="utf-8") as f:
        f.write(f"\n##### batch {batch}\n")
        f.writelines(render_episode(t, tokenizer) for t in chosen)

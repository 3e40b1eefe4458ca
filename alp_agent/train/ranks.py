"""The command protocol between rank 0 and the other trainer ranks under torchrun.

Rank 0 runs the whole job (sampler, env, eval, logs) and trains; ranks > 0 only train. Whenever rank 0 enters a
collective the others must join (an update, a full-weight gather, a sharded checkpoint save), it first announces the
command on the long-timeout gloo command channel (`alp_agent.train.distributed`); the followers wait in
`Trainer.follow()` and run the same method with rank 0's payload. Every command that crosses ranks is named here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from alp_agent.train import distributed as D


class Command(StrEnum):
    START = "start"  # (job) payload: (model_dir, checkpoint or None): build the trainer, then follow
    UPDATE = "update"  # payload: the rollout batch (list[Trajectory]): Trainer.update on every rank
    POLICY_STATE_DICT = "policy_state_dict"  # FSDP2: join the full-weight gather for the engine
    SAVE_CHECKPOINT = "save_checkpoint"  # payload: (checkpoint_dir, keep_last): join the sharded save
    STOP = "stop"  # rank 0 is done (or failed): followers return


def announce(command: Command, payload: Any = None) -> None:
    """On rank 0 under torchrun: tell the followers to join `command` with rank 0's payload. A no-op elsewhere, so the
    same code runs on every rank and in a single process."""
    if D.is_distributed() and D.rank() == 0:
        D.broadcast_object((command.value, payload), command=True)


def receive() -> tuple[Command, Any]:
    """On a follower: the next command from rank 0 and its payload."""
    command, payload = D.broadcast_object(None, command=True)
    try:
        return Command(command), payload
    except ValueError:
        raise RuntimeError(f"unknown command from rank 0: {command!r}") from None

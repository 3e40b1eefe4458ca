"""The base of every alp-agent config model.

Strict on purpose: an unknown key is an error that names its dotted path (a typo never silently falls back to a
default), and assigning a field re-validates it. Every section of RunConfig, the trainer's configs and the repro
plans derive from it. (sandbox/ and envs/ sit below alp_agent and keep their own `extra="forbid"` models.)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown keys and validates assignments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

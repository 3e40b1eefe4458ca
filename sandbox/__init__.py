"""Sandboxed, persistent Python sessions for model-written tool calls."""

from sandbox.base import ExecResult, ExecStatus, Sandbox, Session, make_sandbox
from sandbox.config import SandboxConfig

__all__ = ["ExecResult", "ExecStatus", "Sandbox", "SandboxConfig", "Session", "make_sandbox"]

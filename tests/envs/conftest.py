"""Fixtures for env tests: one real LocalSandbox per module (starting sessions is the slow part), data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import envs  # noqa: F401  (registers the alp/ ids)
from sandbox import SandboxConfig
from tests.procs import descendants  # noqa: F401 - re-exported for the tests of this folder

# Local benchmark copies (gsm8k_test.jsonl, math500.jsonl, ...) come through $ALP_DATA_DIR; scripts/test.sh sets it
# when ../shared/data exists beside the checkout.
DATA_DIR = Path(os.environ["ALP_DATA_DIR"]) if os.environ.get("ALP_DATA_DIR") else None
FAST_SANDBOX = {
    "timeout_s": 10,
    "memory_mb": 512,
    "max_processes": 16,
    "max_output_bytes": 64 * 1024,
    "pool_size": 2,
    "cpu_s": 30,
}


@pytest.fixture(scope="module")
def sandbox():
    """A real LocalSandbox shared by a test module's envs."""
    from sandbox.local import LocalSandbox

    box = LocalSandbox(SandboxConfig(backend="local", **FAST_SANDBOX))
    yield box
    box.close()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if DATA_DIR is None or not DATA_DIR.is_dir():
        pytest.skip(f"no local benchmark copies: set ALP_DATA_DIR to a folder with them (now {DATA_DIR})")
    return DATA_DIR.resolve()


@pytest.fixture(autouse=True, scope="module")
def _close_process_wide_sandboxes():
    """Envs made without a sandbox use the process-wide one (sandbox.shared_sandbox); close it after each test
    module so its warm jails do not outlive the env tests (the sandbox tests count server processes)."""
    yield
    try:
        from sandbox.factory import _close_shared
    except ImportError:  # before the sandbox factory moved out of sandbox.pool
        from sandbox.pool import _close_shared

    _close_shared()

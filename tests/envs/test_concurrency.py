"""Many episodes step at once on one shared sandbox, and nothing is left running afterwards."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import gymnasium as gym

from sandbox import SandboxConfig, make_sandbox
from tests.envs.conftest import FAST_SANDBOX, descendants

N = 64


def _live(pids: set[int]) -> set[int]:
    """Leak candidates: ignore the process-wide grader workers (they are shared and closed at exit)."""
    out = set()
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"_grade_worker" not in cmd:
            out.add(pid)
    return out


async def _step_all(envs, actions):
    """What the rollout does: every episode awaits its own `astep`, all at once."""
    return await asyncio.gather(*(env.astep(a) for env, a in zip(envs, actions)))


def test_64_envs_step_concurrently_without_leaks():
    before = _live(descendants())
    config = SandboxConfig(**{**FAST_SANDBOX, "pool_size": 4, "max_sessions": 128})
    sandbox = make_sandbox(config)
    envs = [
        gym.make("alp/MathTool-v0", sandbox=sandbox, dataset={"name": "synthetic", "level": 0}).unwrapped
        for _ in range(N)
    ]
    try:
        first = [env.reset(options={"task_index": i}) for i, env in enumerate(envs)]
        exprs = [re.match(r"What is (.+)\?", obs[-1]["content"]).group(1) for obs, _ in first]
        # every episode sleeps 1 s in its sandbox: run one after another this would take > 64 s
        actions = [f"```python\nimport time\ntime.sleep(1)\nprint({e})\n```\n" for e in exprs]
        t0 = time.monotonic()
        results = asyncio.run(_step_all(envs, actions))
        elapsed = time.monotonic() - t0
        assert all(r[4]["sandbox_status"] == "ok" for r in results), [r[4] for r in results]
        assert elapsed < 30, f"64 concurrent 1 s tool calls took {elapsed:.1f} s"
        outputs = [re.search(r"```output\n(.*)\n```", r[0][0]["content"]).group(1) for r in results]
        finals = asyncio.run(_step_all(envs, [f"\\boxed{{{o}}}" for o in outputs]))
        assert [r[1] for r in finals] == [1.0] * N and all(r[2] for r in finals)
        assert all(env._session is None for env in envs)  # sessions closed at episode end
    finally:
        for env in envs:
            env.close()
        sandbox.close()
    leaked = _live(descendants()) - before
    assert not leaked, f"processes left after close: {leaked}"


def test_envs_without_sandbox_share_the_process_wide_one():
    from sandbox import shared_sandbox

    env = gym.make("alp/MathTool-v0", sandbox_config={"pool_size": 1})
    other = gym.make("alp/MathTool-v0", sandbox_config={"pool_size": 1})
    env.reset(seed=0)
    obs, *_ = env.step("```python\nprint(2 ** 10)\n```\n")
    assert "1024" in obs[0]["content"]
    sb = env.unwrapped.sandbox
    assert other.unwrapped.sandbox is sb  # one warm pool per config, not one per env
    sessions_before_close = _live(descendants())
    env.close()
    env.close()  # twice is fine
    other.close()
    # the episode's session is gone; only the shared warm pool (closed at exit) may remain
    assert _live(descendants()) <= sessions_before_close
    shared = shared_sandbox(env.unwrapped.config.sandbox_config)
    assert shared is sb
    s = shared.session()
    assert s.run("1 + 1").stdout.strip() == "2"  # still usable by other envs after one env closed
    s.close()

"""Sessions close without leaving processes/containers; many sessions run concurrently from threads and asyncio."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from sandbox import ExecStatus

from .conftest import descendants


def _alive(sb, session) -> bool:
    w = session.worker
    if sb.backend == "local":
        return Path(f"/proc/{w.proc.pid}").exists() and w.proc.poll() is None
    w.container.reload()
    return w.container.status == "running"


def _gone(sb, worker) -> bool:
    if sb.backend == "local":
        return worker.proc.poll() is not None and not (worker.cgroup and worker.cgroup.path.exists())
    import docker.errors

    try:
        worker.container.reload()
    except docker.errors.NotFound:
        return True
    return False


def test_context_manager_leaves_nothing(sb):
    before = descendants(os.getpid())
    with sb.session() as s:
        s.run(
            "import subprocess\np = subprocess.Popen(['sleep', '300'])\nimport os\nos.fork() or os._exit(0) if False else None"
        )
        assert _alive(sb, s)
        worker = s.worker
    assert _gone(sb, worker)
    if sb.backend == "local":
        leaked = descendants(os.getpid()) - before
        assert not [
            p
            for p in leaked
            if Path(f"/proc/{p}/cmdline").exists() and b"sleep" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]


def test_timeout_leaves_nothing(sb):
    with sb.session() as s:
        s.run("import subprocess\nsubprocess.Popen(['sleep', '300'])")
        worker = s.worker
        assert s.run("import time\ntime.sleep(60)", timeout=0.5).status == ExecStatus.TIMEOUT
        assert _gone(sb, worker)


def test_closed_session_reports_error(sb):
    s = sb.session()
    s.close()
    assert s.run("1").status == ExecStatus.SANDBOX_ERROR


def test_threads_do_not_block_each_other(sb):
    results: dict[int, object] = {}

    def work(i: int) -> None:
        with sb.session() as s:
            s.run(f"n = {i}")
            if i == 0:
                assert s.run("while True: pass", timeout=2).status == ExecStatus.TIMEOUT  # must not hold the others
                assert s.run(f"n = {i}").state_lost
            results[i] = s.run("n * 10").stdout

    t = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert results == {i: f"{i * 10}\n" for i in range(8)}
    assert time.perf_counter() - t < 30


def test_asyncio_many_sessions_wait_concurrently(sb):
    async def episode(i: int) -> str:
        async with sb.asession() as s:
            await s.arun(f"k = {i}")
            await s.arun("import time\ntime.sleep(1.0)")  # waiting cells overlap instead of queueing
            return (await s.arun("k")).stdout

    async def main() -> list[str]:
        return await asyncio.gather(*(episode(i) for i in range(24)))

    t = time.perf_counter()
    out = asyncio.run(main())
    assert out == [f"{i}\n" for i in range(24)]
    assert time.perf_counter() - t < 20  # sequentially it would be 24 s of sleeping alone

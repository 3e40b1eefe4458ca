"""Sandbox latency benchmark: per-call p50/p99 and calls/s, 1 and 8 concurrent sessions, local and Docker,
against the naive `subprocess.run([python, "-c", code])` baseline measured in the same run.

    python bench/sandbox.py [--calls 300] [--backends local,docker] [--out bench/results/sandbox.json]

Why these numbers: a tool-using episode makes many small calls, so per-call overhead (not start-up) decides how
much of the machine the sandbox eats; 8 concurrent sessions show whether calls from many episodes queue.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox import SandboxConfig

CODE = "x = globals().get('x', 0) + 1\nx * 2"  # a typical tiny tool call with a trailing expression


def _stats(lat: list[float], wall: float) -> dict:
    lat = sorted(lat)
    return {
        "calls": len(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "calls_per_s": len(lat) / wall,
    }


def _concurrent(n_workers: int, calls: int, one_call) -> dict:
    """Run `calls` calls in each of n_workers threads; one_call(i) makes one call for worker i."""
    lat: list[float] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        mine = []
        for _ in range(calls):
            t = time.perf_counter()
            one_call(i)
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_workers)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return _stats(lat, time.perf_counter() - t0)


def bench_baseline(n: int, calls: int) -> dict:
    def call(_i: int) -> None:
        r = subprocess.run(
            [sys.executable, "-c", CODE.replace("\nx * 2", "\nprint(x * 2)")], capture_output=True, check=False
        )
        assert r.returncode == 0

    return _concurrent(n, calls, call)


def bench_sandbox(backend: str, n: int, calls: int) -> dict:
    from sandbox import make_sandbox

    cfg = SandboxConfig(backend=backend, pool_size=max(2, n), max_sessions=64)
    with make_sandbox(cfg) as sb:
        time.sleep(1.0 if backend == "local" else 3.0)  # let the warm pool fill
        t = time.perf_counter()
        sessions = [sb.session() for _ in range(n)]
        start_ms = 1000 * (time.perf_counter() - t) / n
        for s in sessions:  # warm-up call (first call also pays for the first pipe/socket round trip)
            assert s.run(CODE).ok
        res = _concurrent(n, calls, lambda i: sessions[i].run(CODE))
        for s in sessions:
            s.close()
        cold = []
        for _ in range(3):  # what a session start costs when the warm pool is empty
            t = time.perf_counter()
            w = sb._start_worker()
            cold.append(time.perf_counter() - t)
            w.kill()
    res["session_start_ms"] = start_ms
    res["cold_start_ms"] = 1000 * statistics.median(cold)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="calls per session (baseline: a tenth of it)")
    ap.add_argument("--backends", default="local,docker")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox.json"))
    args = ap.parse_args()

    rows = []
    for n in (1, 8):
        base_calls = max(10, args.calls // 10)
        rows.append(
            {"backend": "baseline python -c", "sessions": n, **bench_baseline(n, base_calls // (1 if n == 1 else 2))}
        )
    for backend in args.backends.split(","):
        if backend == "docker":
            from sandbox.docker import docker_unavailable_reason

            reason = docker_unavailable_reason()
            if reason:
                print(f"skipping docker: {reason}")
                continue
        for n in (1, 8):
            rows.append({"backend": backend, "sessions": n, **bench_sandbox(backend, n, args.calls)})
    base = {r["sessions"]: r["p50_ms"] for r in rows if r["backend"].startswith("baseline")}
    for r in rows:
        r["speedup_p50_vs_baseline"] = base[r["sessions"]] / r["p50_ms"]

    hdr = (
        f"{'backend':<20}{'sessions':>9}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>10}{'x base':>8}"
        f"{'warm start ms':>15}{'cold start ms':>15}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        warm = f"{r['session_start_ms']:.1f}" if "session_start_ms" in r else "-"
        cold = f"{r['cold_start_ms']:.0f}" if "cold_start_ms" in r else "-"
        print(
            f"{r['backend']:<20}{r['sessions']:>9}{r['calls']:>7}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['calls_per_s']:>10.0f}{r['speedup_p50_vs_baseline']:>8.1f}{warm:>15}{cold:>15}"
        )
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": __import__("os").cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "code": CODE, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

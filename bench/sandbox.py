"""Sandbox latency benchmark: per-call p50/p99 and calls/s, 1 and 8 concurrent sessions, local and Docker,
against the naive `subprocess.run([python, "-c", code])` baseline measured in the same run, and the local backend
against an earlier revision of `sandbox/` (default: the bind-the-whole-host jail before the allowlist), in the same run.

    python bench/sandbox.py [--calls 300] [--backends local,docker] [--compare-rev REV|none] [--rounds 2]
                            [--out bench/results/sandbox.json]

Each local measurement runs in a fresh child process (`--child`), alternating current and REV for `--rounds`
rounds; a row reports the median over rounds. REV's `sandbox/` comes from `git archive` into a temporary folder.

Why these numbers: a tool-using episode makes many small calls, so per-call overhead (not start-up) decides how
much of the machine the sandbox eats; 8 concurrent sessions show whether calls from many episodes queue.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/ (this file is also called sandbox)
if "--sandbox-root" in sys.argv:  # a child measuring another revision's sandbox/ package
    sys.path.insert(0, sys.argv[sys.argv.index("--sandbox-root") + 1])

from sandbox import SandboxConfig  # noqa: E402

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
    t = time.perf_counter()
    sb = make_sandbox(cfg)
    init_ms = 1000 * (time.perf_counter() - t)  # incl. the local jail's one-off interpreter/package probe
    with sb:
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
        for _ in range(5):  # what a session start costs when the warm pool is empty
            t = time.perf_counter()
            w = sb._start_worker()
            cold.append(time.perf_counter() - t)
            w.kill()
    res["init_ms"] = init_ms
    res["session_start_ms"] = start_ms
    res["cold_start_ms"] = 1000 * statistics.median(cold)
    return res


def _old_sandbox(rev: str) -> str:
    """`sandbox/` of git revision `rev` in a temporary folder (for a same-run comparison)."""
    if rev == "auto":  # the parent of the commit that introduced the allowlisted jail
        added = subprocess.run(
            ["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "--", "sandbox/jail.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        rev = f"{added[-1]}~1"
    root = tempfile.mkdtemp(prefix="alp-bench-sandbox-")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "sandbox"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", root], input=archive.stdout, check=True)
    return root


def _child(backend: str, n: int, calls: int, sandbox_root: str | None) -> dict:
    """One measurement in a fresh process (so both revisions start equally cold)."""
    cmd = [sys.executable, __file__, "--child", backend, str(n), "--calls", str(calls)]
    if sandbox_root:
        cmd += ["--sandbox-root", sandbox_root]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def _median_rows(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"rounds": len(runs)}


def bench_local_vs_rev(n: int, calls: int, rev: str, rounds: int) -> list[dict]:
    """Current and `rev`'s local backend, alternating in fresh processes; medians over the rounds."""
    if rev == "none":
        return [{"backend": "local", "sessions": n, **_median_rows([_child("local", n, calls, None)])}]
    old_root = _old_sandbox(rev)
    cur, old = [], []
    for r in range(rounds):
        first, second = ((None, cur), (old_root, old)) if r % 2 == 0 else ((old_root, old), (None, cur))
        for root, runs in (first, second):
            runs.append(_child("local", n, calls, root))
    cur_row = {"backend": "local", "sessions": n, **_median_rows(cur)}
    old_row = {"backend": f"local@{rev}", "sessions": n, **_median_rows(old)}
    cur_row["p50_vs_rev"] = cur_row["p50_ms"] / old_row["p50_ms"]
    return [cur_row, old_row]


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def _print_table(rows: list[dict]) -> None:
    hdr = (
        f"{'backend':<24}{'sessions':>9}{'calls':>7}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>10}{'x base':>8}"
        f"{'vs rev':>8}{'warm start ms':>15}{'cold start ms':>15}{'init ms':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        opt = functools.partial(_cell, r)
        print(
            f"{r['backend']:<24}{r['sessions']:>9}{r['calls']:>7.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['calls_per_s']:>10.0f}{r['speedup_p50_vs_baseline']:>8.1f}{opt('p50_vs_rev', '.2f'):>8}"
            f"{opt('session_start_ms', '.1f'):>15}{opt('cold_start_ms', '.0f'):>15}{opt('init_ms', '.0f'):>9}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300, help="calls per session (baseline: a tenth of it)")
    ap.add_argument("--backends", default="local,docker")
    ap.add_argument(
        "--compare-rev",
        default="auto",
        help="git revision of sandbox/ to compare local against; "
        "'auto': the one before the allowlisted jail; 'none': no comparison",
    )
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of current vs --compare-rev")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox.json"))
    ap.add_argument("--child", nargs=2, metavar=("BACKEND", "SESSIONS"), help=argparse.SUPPRESS)
    ap.add_argument("--sandbox-root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(bench_sandbox(args.child[0], int(args.child[1]), args.calls)))
        return

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
            if backend == "local":
                rows += bench_local_vs_rev(n, args.calls, args.compare_rev, args.rounds)
            else:
                rows.append({"backend": backend, "sessions": n, **bench_sandbox(backend, n, args.calls)})
    base = {r["sessions"]: r["p50_ms"] for r in rows if r["backend"].startswith("baseline")}
    for r in rows:
        r["speedup_p50_vs_baseline"] = base[r["sessions"]] / r["p50_ms"]
    _print_table(rows)
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "code": CODE, "compare_rev": args.compare_rev, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

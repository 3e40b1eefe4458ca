"""Memory of the main job: peak RSS of the whole process tree, by phase, against the printed floor (issue 15.6).

What it answers: does `alp-agent train --config configs/quickstart.yaml` stay within floor + 1.5 GiB, and where does
every GiB go. It runs the real job (same model, micro-batch size, KV cache, eval of 64 problems, a checkpoint) for a
few iterations in a child process and samples, every `--interval` seconds:

  tree RSS   sum of RSS over the job's process and all its descendants (vLLM runs in process; sandbox workers are
             children). This is what the goal counts: it is what `ps`/`top` users add up, and it over-counts pages
             shared between processes (libraries mapped by every sandbox worker), so it is the conservative figure.
  tree PSS   sum of PSS (shared pages split between their sharers): the true physical footprint. Sampled every
             5th tick (smaps_rollup walks page tables).
  main anon / file / shmem   the job process's PSS by kind at its phase peak: anonymous (tensors, heap, KV cache),
             file-backed (libraries, mmapped weights), shared memory.

The child tags phases by wrapping the job's own functions from here (nothing in alp_agent/ changes): model resolve
(GGUF conversion when not cached), engine start, trainer build, eval, rollout, update (fwd/bwd and the AdamW step
apart), weight sync, checkpoint. At the end of each tagged call it reports glibc's `mallinfo2` (bytes free inside
malloc's heaps: memory the process holds that no object uses).

Variants (`--variants a,b`; each a fresh job, run one after the other in this invocation):

  base            the job as shipped
  before          the job before this bench's changes (nothing released between phases, trim threshold 0)
  glibc_default   without `keep_freed_memory()` (glibc's own mmap/trim thresholds)
  no_trim         with `release_freed_memory()` (the malloc_trim after each phase) disabled
  foreach_off     AdamW with foreach=False (no whole-model temporaries in the step)
  kv_kept         the engine's KV cache stays resident through the update (engine.release_kv_cache=false: the job
                  before the sixth session)
  mimalloc        the job under mimalloc (LD_PRELOAD of the `cmeel-mimalloc` wheel's library; sandboxed code runs
                  with a clean environment, so only the job and its helpers use it)

    python bench/memory.py                                   # base, no-bf16 CPU settings: bench/results/memory.json
    python bench/memory.py --variants base,no_trim --out bench/results/memory_trim.json
    python bench/memory.py --cpu native                      # this CPU's own dtypes (bf16 where native)

`--cpu no-bf16` (default) reproduces the choices of a CPU without avx512_bf16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE and
engine.dtype=float32): the floor the issue quotes (~3.5 GiB). Any other argument is a run-config override.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import with_mimalloc  # bench/ is sys.path[0] when run as python bench/X.py

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
MARK = "@@mem "  # the child's phase markers on stderr


# --------------------------------------------------------------------------------------------- child: the job + tags
def _mallinfo() -> dict[str, int]:
    """glibc mallinfo2 summed over all arenas: heap bytes (arena), in use (uordblks), free (fordblks), mmapped."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        ] + [("keepcost", ctypes.c_size_t)]

    try:
        f = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    f.restype = MallInfo2
    m = f()
    return {"heap": m.arena, "in_use": m.uordblks, "free": m.fordblks, "mmapped": m.hblkhd}


_stack: list[str] = []


def _mark(kind: str, name: str, extra: dict | None = None) -> None:
    print(
        MARK + json.dumps({"t": time.time(), "kind": kind, "name": name, **(extra or {})}), file=sys.stderr, flush=True
    )


def _tag(owner, attr: str, name: str) -> None:
    """Wrap owner.attr so its calls are tagged `name` (nested calls restore the enclosing phase on return)."""
    fn = getattr(owner, attr)

    def wrapped(*a, **k):
        _stack.append(name)
        _mark("begin", name)
        try:
            return fn(*a, **k)
        finally:
            _stack.pop()
            _mark("end", name, {"malloc": _mallinfo(), "back_to": _stack[-1] if _stack else "other"})

    setattr(owner, attr, wrapped)


def _apply_variant(variant: str) -> None:
    import torch

    from alp_agent.train import hardware

    if variant == "before":  # the job before issue 15.6's changes: nothing released between phases, and the trim
        # threshold that mallopt's C int truncated to 0 (4 GiB was asked for)
        import contextlib

        import alp_agent.train.checkpoint as checkpoint
        import alp_agent.train.trainer as trainer

        keep = hardware.keep_freed_memory
        hardware.keep_freed_memory = lambda *a, **k: keep(0) + " (bench variant before: trim threshold 0)"
        for mod in (trainer, checkpoint):
            mod.lean_phase = lambda *a, **k: contextlib.nullcontext()
    elif variant == "glibc_default":
        hardware.keep_freed_memory = lambda *a, **k: "allocator: glibc defaults (bench variant glibc_default)"
    elif variant == "no_trim" and hasattr(hardware, "release_freed_memory"):
        hardware.release_freed_memory = lambda *a, **k: 0
    elif variant == "foreach_off":
        init = torch.optim.AdamW.__init__

        def no_foreach(self, *a, **k):
            k["foreach"] = False
            init(self, *a, **k)

        torch.optim.AdamW.__init__ = no_foreach
    elif variant not in ("base", "mimalloc", "kv_kept"):  # these two: run_variant's environment / overrides
        raise SystemExit(f"unknown variant {variant!r}")


def child(variant: str, job_args: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    import alp_agent.app.job as job
    import alp_agent.engine.factory as factory
    import alp_agent.models as models
    import alp_agent.train.checkpoint as checkpoint
    import alp_agent.train.loop as loop
    from alp_agent.app.cli import main
    from alp_agent.train.trainer import Trainer

    _apply_variant(variant)
    _tag(models, "convert_gguf", "model resolve (GGUF conversion)")
    _tag(factory, "make_engine", "engine start")
    _tag(job, "build_trainer", "trainer build")
    _tag(job, "run_eval", "eval")
    _tag(loop, "_start_rollout", "rollout")
    _tag(Trainer, "update", "update: fwd/bwd")
    _tag(Trainer, "_fill_clean", "update: old/ref logprobs")
    _tag(Trainer, "_apply_gradients", "update: AdamW step")
    _tag(Trainer, "sync_weights", "weight sync")
    _tag(checkpoint, "save_checkpoint", "checkpoint")
    _mark("begin", "imports done")
    return main(["train", "--config", "configs/quickstart.yaml", *job_args])


# --------------------------------------------------------------------------------------------- parent: sampling
def _rollup(pid: int) -> dict[str, int]:
    """Selected /proc/<pid>/smaps_rollup fields in bytes (empty if the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Anonymous"):
                    out[k] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _minflt(pid: int) -> int | None:
    """Minor page faults of the process so far (/proc/<pid>/stat field 10)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return None


class Sampler:
    """Samples the tree every `interval` s; keeps per-phase peaks (the phase is set by the stderr reader)."""

    def __init__(self, pid: int, interval: float) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.cmdline = self.root.cmdline()
        self.interval = interval
        self.phase = "python start + imports"
        self.phases: dict[str, dict] = {}
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def _tree(self) -> list:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def tick(self, i: int) -> None:
        import psutil

        procs, rss_main, rss_kids, forking = self._tree(), 0, 0, 0
        for p in list(procs):
            try:
                # a child between (v)fork and exec still runs the job's command line and reports the job's own
                # memory (vfork: the very same pages): counting it would double the job for one sample. The command
                # line is read *before* the RSS: read after, an exec completing between the two reads showed the
                # new program's command line next to the job's RSS (sixth session: one-sample spikes to 42 GiB when
                # 36 sandbox sessions started at once)
                cmdline = p.cmdline() if p.pid != self.root.pid else None
                r = p.memory_info().rss
                if cmdline == self.cmdline and r > 64 * 1024**2:
                    procs.remove(p)
                    forking += 1
                    continue
            except psutil.NoSuchProcess:
                continue
            if p.pid == self.root.pid:
                rss_main = r
            else:
                rss_kids += r
        s = {"t": time.time(), "phase": self.phase, "rss": rss_main + rss_kids, "rss_main": rss_main}
        s["minflt"] = _minflt(self.root.pid)
        s.update(rss_children=rss_kids, children=len(procs) - 1, forking=forking)
        if i % 5 == 0:
            rolls = [_rollup(p.pid) for p in procs]
            s["pss"] = sum(r.get("Pss", 0) for r in rolls)
            s["main"] = rolls[0] if rolls else {}
        self.samples.append(s)
        ph = self.phases.setdefault(self.phase, {"peak_rss": 0, "samples": 0, "peak_pss": 0})
        ph["samples"] += 1
        if self.samples[:-1] and s["minflt"] is not None and self.samples[-2]["minflt"] is not None:
            ph["minflt"] = ph.get("minflt", 0) + s["minflt"] - self.samples[-2]["minflt"]
        if s["rss"] > ph["peak_rss"]:
            ph.update(peak_rss=s["rss"], rss_main=rss_main, rss_children=rss_kids, children=s["children"])
        if "pss" in s and s["pss"] > ph["peak_pss"]:
            ph.update(peak_pss=s["pss"], main_rollup=s["main"])

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.tick(i)
            i += 1
            self.stop.wait(self.interval)


def run_variant(variant: str, args, overrides: list[str]) -> dict:
    """One fresh job under the sampler; returns its per-phase table and timeline summary."""
    out_dir = tempfile.mkdtemp(prefix="alp-mem-")
    job_args = [
        f"run.iterations={args.iterations}",
        f"run.out_dir={out_dir}",
        f"run.name=mem_{variant}",
        f"run.checkpoint_every={args.iterations}",
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu == "no-bf16":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE"
        job_args.append("engine.dtype=float32")
    if variant == "mimalloc":
        env = with_mimalloc(env)
    if variant == "kv_kept":
        job_args.append("engine.release_kv_cache=false")
    if args.fresh_cache:
        env["ALP_CACHE"] = tempfile.mkdtemp(prefix="alp-cache-")  # the GGUF conversion runs (and is measured)
    cmd = [sys.executable, __file__, "--child", variant, "--", *job_args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    sampler = Sampler(proc.pid, args.interval)
    th = threading.Thread(target=sampler.run, daemon=True)
    th.start()
    floor, marks, log_tail = None, [], []
    for line in proc.stderr:
        if line.startswith(MARK):
            m = json.loads(line[len(MARK) :])
            marks.append(m)
            sampler.phase = m["name"] if m["kind"] == "begin" else m["back_to"]
            continue
        log_tail = (log_tail + [line.rstrip()])[-40:]
        if "memory floor" in line:
            floor = float(re.search(r"memory floor ([\d.]+) GiB", line).group(1))
        if args.echo:
            print(line, end="", file=sys.stderr)
    rc = proc.wait()
    sampler.stop.set()
    th.join()
    update_s = _update_times(Path(out_dir) / f"mem_{variant}" / "metrics.jsonl")
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints are ~1.5 GB each
    if rc != 0:
        print("\n".join(log_tail), file=sys.stderr)
    return {**summarize(variant, rc, time.time() - t0, floor, sampler, marks), "update_s": update_s}


def _update_times(metrics: Path) -> list[float]:
    """time/update (all optimizer steps of a batch) of every batch, from the job's metrics.jsonl."""
    out = []
    try:
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "batch" and "time/update" in rec.get("metrics", rec):
                out.append(round(rec.get("metrics", rec)["time/update"], 1))
    except (OSError, ValueError):
        pass
    return out


def summarize(variant: str, rc: int, wall: float, floor, sampler: Sampler, marks: list[dict]) -> dict:
    heap_free = {}
    durations: dict[str, float] = {}
    begins: dict[str, float] = {}
    for m in marks:
        if m["kind"] == "begin":
            begins[m["name"]] = m["t"]
        else:
            durations[m["name"]] = durations.get(m["name"], 0.0) + m["t"] - begins.get(m["name"], m["t"])
            if m.get("malloc"):
                heap_free[m["name"]] = max(heap_free.get(m["name"], 0), m["malloc"]["free"])
    phases = {}
    for name, ph in sampler.phases.items():
        roll = ph.get("main_rollup", {})
        phases[name] = {
            "seconds": round(durations.get(name, 0.0), 1),
            "peak_rss_gib": ph["peak_rss"] / GIB,
            "rss_main_gib": ph.get("rss_main", 0) / GIB,
            "rss_children_gib": ph.get("rss_children", 0) / GIB,
            "children": ph.get("children", 0),
            "peak_pss_gib": ph["peak_pss"] / GIB,
            "main_pss_anon_gib": roll.get("Pss_Anon", 0) / GIB,
            "main_pss_file_gib": roll.get("Pss_File", 0) / GIB,
            "main_pss_shmem_gib": roll.get("Pss_Shmem", 0) / GIB,
            "malloc_free_at_end_gib": heap_free.get(name, 0) / GIB,
            "main_minor_faults": ph.get("minflt", 0),
        }
    peak = max((s["rss"] for s in sampler.samples), default=0)
    peak_pss = max((s.get("pss", 0) for s in sampler.samples), default=0)
    timeline = [
        {k: (round(v / GIB, 3) if k.startswith("rss") else v) for k, v in s.items() if k not in ("main", "pss")}
        for s in sampler.samples[::5]
    ]
    return {
        "variant": variant,
        "rc": rc,
        "wall_s": round(wall, 1),
        "floor_gib": floor,
        "peak_rss_gib": peak / GIB,
        "peak_pss_gib": peak_pss / GIB,
        "target_gib": None if floor is None else floor + 1.5,
        "phases": phases,
        "marks": [{k: v for k, v in m.items() if k != "back_to"} for m in marks],
        "timeline": timeline,
    }


def table(r: dict) -> str:
    hdr = "| phase | s | peak tree RSS | main | children (n) | tree PSS | main anon/file/shmem | malloc free | faults |"
    rows = [hdr, "|" + "---|" * 9]
    for name, p in r["phases"].items():
        rows.append(
            f"| {name} | {p['seconds']:.0f} | {p['peak_rss_gib']:.2f} | {p['rss_main_gib']:.2f} | "
            f"{p['rss_children_gib']:.2f} ({p['children']}) | {p['peak_pss_gib']:.2f} | "
            f"{p['main_pss_anon_gib']:.2f}/{p['main_pss_file_gib']:.2f}/{p['main_pss_shmem_gib']:.2f} | "
            f"{p['malloc_free_at_end_gib']:.2f} | {p['main_minor_faults'] / 1e6:.2f} M |"
        )
    fl = r["floor_gib"]
    rows.append(
        f"\n{r['variant']}: peak tree RSS {r['peak_rss_gib']:.2f} GiB, PSS {r['peak_pss_gib']:.2f} GiB; floor "
        f"{fl} GiB, target {r['target_gib']} GiB; wall {r['wall_s']:.0f} s; update s per batch {r.get('update_s')};"
        f" rc {r['rc']}"
    )
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[4:]))
    sys.path.insert(0, str(ROOT / "bench"))
    from _common import machine_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="base")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--cpu", choices=("no-bf16", "native"), default="no-bf16")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--fresh-cache", action="store_true", help="convert the GGUF anew (measures the conversion)")
    ap.add_argument("--echo", action="store_true", help="show the job's output")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    args, overrides = ap.parse_known_args()
    flags = subprocess.run("lscpu", capture_output=True, text=True).stdout
    info = {**machine_info("vllm", "transformers"), "avx512_bf16": "avx512_bf16" in flags, "cpu_mode": args.cpu}
    results = []
    for v in args.variants.split(","):
        r = run_variant(v, args, overrides)
        print(table(r), flush=True)
        results.append(r)
        Path(args.out).write_text(json.dumps({"machine": info, "overrides": overrides, "runs": results}, indent=1))


if __name__ == "__main__":
    main()

"""Answer extraction and equivalence grading: a fast exact path in-process, math-verify in killable subprocesses.

Why two paths: most answers in RL on math are plain numbers, and comparing them needs no sympy; everything else
(LaTeX, intervals, sets, tuples, radicals) goes to math-verify. math-verify's own timeouts use SIGALRM, which works only
in the main thread and cannot interrupt C code (sympy evaluating ``9^{9^{9^9}}`` never returns), so grades run in a
small pool of worker processes that are killed when they overrun. A hung grade is a 0 with reason ``"timeout"``,
never a stuck episode. The pool is thread-safe: many episodes grade at once.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field

_WORKER = Path(__file__).with_name("_grade_worker.py")


class GradingConfig(BaseModel):
    """How answers are compared and how long a comparison may take."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(5.0, gt=0, description="Hard wall-clock limit of one grade; overrun -> 0 'timeout'.")
    workers: int = Field(2, ge=1, description="Grader subprocesses (each grades one answer at a time).")
    memory_mb: int = Field(1024, ge=0, description="Address-space limit of a grader subprocess, MiB (0: none).")
    float_rounding: int = Field(6, ge=0, description="Decimal places math-verify rounds floats to before comparing.")
    max_answer_chars: int = Field(1000, gt=0, description="Longer answers are graded 0 ('too_long') without parsing.")


@dataclass
class GradeResult:
    """Outcome of one grade. `reason` says why, for logs and tests ('exact', 'math_verify', 'timeout', ...)."""

    correct: bool
    reason: str
    duration_s: float = 0.0


# --------------------------------------------------------------------------------------------------- extraction


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``, or ``\boxed 5``) in `text`; None if there is none.

    Braces are matched by depth, so ``\boxed{\frac{1}{2}}`` yields ``\frac{1}{2}``. An unclosed box yields None.
    """
    if not isinstance(text, str):
        return None
    best: str | None = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{|\s+(\S+))", text):
        if m.group(1) != "{":  # \boxed 5
            best = m.group(2).rstrip("$.,")
            continue
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                i += 2
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth == 0:
            best = text[m.end() : i - 1].strip()
    return best


# --------------------------------------------------------------------------------------------------- fast path

_STRIP_RE = [
    (re.compile(r"\\text\{\s*([^{}]*)\}"), r" \1"),
    (re.compile(r"\\(?:mathrm|textbf|mathbf)\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\^\s*\{?\\circ\}?|°|\\degree"), ""),
    (re.compile(r"\\[,;!: ]|~|\\left|\\right|\\?\$"), ""),
    (re.compile(r"\\%|%"), ""),
    (re.compile(r"\\[dt]frac"), r"\\frac"),
]
_UNIT_WORDS = re.compile(  # only a tail after a number: "12 cm", "5 \\text{ dollars}"
    r"(?<=[\d}])\s*(?:(?:dollars?|cents?|units?|degrees?|percent|meters?|cm|km|mm|m|inches|inch|feet|foot|ft|miles?|"
    r"hours?|minutes?|seconds?|days?|years?|kg|g|pounds?|lbs?|square|sq|cubic)\b\.?\s*)+$",
    re.IGNORECASE,
)
_INT_RE = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)")
_NUM_RE = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}|([+-]?[\d.]+)/([\d.]+)")
_SCI_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE]([+-]?\d+)")  # 1e3, 2.5e-3, -.5E+2
# The same literal inside a larger answer; not part of a word, a decimal or a LaTeX command (\sec, 2e, x1e3).
_SCI_TOKEN = re.compile(r"(?<![\w.\\])(\d+\.?\d*|\.\d+)[eE]([+-]?\d+)(?![\w.])")
MAX_SCI_EXPONENT = 400  # 1e999999999 is not expanded in-process; math-verify (killable) gets it as 10^{...}


def normalize(answer: str) -> str:
    r"""Strip what never changes a numeric value: ``$``, ``\text{units}``, degrees, percent, spacing, ``x =``."""
    s = answer.strip()
    for pattern, repl in _STRIP_RE:
        s = pattern.sub(repl, s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s.strip())  # "x = 5"
    s = _UNIT_WORDS.sub("", s).strip().rstrip(".").strip()
    return s.replace("{,}", ",").replace(" ", "")


def _number(s: str) -> Fraction | None:
    """Exact value of an int/decimal/fraction literal (after normalize); None for anything else."""
    if not s or len(s) > 200:
        return None
    if _NUM_RE.fullmatch(s) and any(ch.isdigit() for ch in s):
        return Fraction(s.replace(",", ""))
    m = _SCI_RE.fullmatch(s)
    if m:
        return Fraction(s) if abs(int(m.group(2))) <= MAX_SCI_EXPONENT else None
    m = _FRAC_RE.fullmatch(s)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
        n, d = _number(num), _number(den)
        if n is not None and d:
            return (-1 if sign == "-" else 1) * n / d
    return None


def _fast(pred: str, ref: str) -> bool | None:
    """True/False when both sides are plain numbers (exact compare); None when math-verify must decide.

    A mismatch is only final when both sides are integer literals: "0.5" vs "50\\%" or "1/3" vs "0.333333" are left to
    math-verify's rounding and percent rules.
    """
    p, r = normalize(pred), normalize(ref)
    if p == r and p:
        return True
    a, b = _number(p), _number(r)
    if a is None or b is None:
        return None
    if a == b:
        return True
    if _integer_literal(p, a) and _integer_literal(r, b):
        return False
    return None


def _integer_literal(s: str, value: Fraction) -> bool:
    """An exact integer as written: `1234`, `1,234`, or scientific notation with an integer value (`1e3`)."""
    return bool(_INT_RE.fullmatch(s)) or (bool(_SCI_RE.fullmatch(s)) and value.denominator == 1)


def expand_scientific(answer: str) -> str:
    r"""Rewrite ``1e3`` / ``2.5e-3`` as ``(1\times10^{3})`` / ``(2.5\times10^{-3})`` for math-verify, whose LaTeX
    parser reads ``1e3`` as the product 1·e·3 (Euler's number)."""
    return _SCI_TOKEN.sub(lambda m: f"({m.group(1)}\\times10^{{{int(m.group(2))}}})", answer)


# --------------------------------------------------------------------------------------------------- subprocess pool


class _Worker:
    """One grader subprocess speaking line-delimited JSON over pipes."""

    def __init__(self, memory_mb: int, startup_timeout_s: float = 60.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(_WORKER), str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self._buf = b""
        if self._readline(time.monotonic() + startup_timeout_s) is None:
            self.kill()
            raise RuntimeError("grader subprocess did not start (is math-verify installed?)")

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:  # died
                    return None
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def request(self, payload: dict, timeout_s: float) -> dict | None:
        """The reply, or None when the worker overran `timeout_s` or died (the caller then kills it)."""
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self._readline(time.monotonic() + timeout_s)
        return json.loads(line) if line else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


class Grader:
    """Thread-safe answer grader. `grade(pred, ref)` never raises and never takes much longer than timeout_s."""

    def __init__(self, config: GradingConfig | None = None):
        self.config = config or GradingConfig()
        self._idle: list[_Worker] = []
        self._live = 0
        self._cond = threading.Condition()
        self._closed = False

    def grade(self, pred: str | None, ref: str) -> GradeResult:
        t0 = time.monotonic()
        res = self._grade(pred, str(ref))
        res.duration_s = time.monotonic() - t0
        return res

    def _grade(self, pred: str | None, ref: str) -> GradeResult:
        if pred is None or not str(pred).strip():
            return GradeResult(False, "no_answer")
        pred = str(pred).encode("utf-8", "replace").decode("utf-8")
        if len(pred) > self.config.max_answer_chars:
            return GradeResult(False, "too_long")
        fast = _fast(pred, ref)
        if fast is not None:
            return GradeResult(fast, "exact" if fast else "mismatch")
        return self._subprocess_grade(expand_scientific(pred), expand_scientific(ref))

    def _subprocess_grade(self, pred: str, ref: str) -> GradeResult:
        try:
            worker = self._acquire()
        except RuntimeError as exc:
            return GradeResult(False, f"error: {exc}")
        payload = {
            "pred": pred,
            "ref": ref,
            "timeout": self.config.timeout_s,
            "float_rounding": self.config.float_rounding,
        }
        reply = worker.request(payload, self.config.timeout_s)
        if reply is None:  # overran or died: kill it and start a replacement in the background
            worker.kill()
            threading.Thread(target=self._replace, daemon=True, name="alp-grader-respawn").start()
            return GradeResult(False, "timeout")
        self._release(worker)
        return GradeResult(bool(reply.get("correct")), str(reply.get("reason", "")))

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("grader is closed")
                if self._idle:
                    return self._idle.pop()
                if self._live < self.config.workers:
                    self._live += 1
                    break
                self._cond.wait()
        try:
            return _Worker(self.config.memory_mb)
        except Exception:
            self._release(None)
            raise

    def _replace(self) -> None:
        """Start a worker for a killed one (its slot in `_live` is kept), so the next grade pays no startup."""
        try:
            worker = _Worker(self.config.memory_mb)
        except Exception:  # noqa: BLE001  the next _acquire will try again and report the reason
            self._release(None)
            return
        self._release(worker)

    def _release(self, worker: _Worker | None) -> None:
        with self._cond:
            if worker is None:
                self._live -= 1
            elif self._closed:
                worker.kill()
                self._live -= 1
            else:
                self._idle.append(worker)
            self._cond.notify()

    def pids(self) -> list[int]:
        """Pids of the idle grader subprocesses (for leak tests)."""
        with self._cond:
            return [w.proc.pid for w in self._idle]

    def close(self) -> None:
        """Kill idle workers now; busy ones are killed when their grade returns."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._cond.notify_all()
        for w in idle:
            w.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: dict[str, Grader] = {}
_shared_lock = threading.Lock()


def shared_grader(config: GradingConfig | None = None) -> Grader:
    """One process-wide Grader per distinct config, so 64 envs share a few subprocesses; closed at exit."""
    config = config or GradingConfig()
    key = config.model_dump_json()
    with _shared_lock:
        grader = _shared.get(key)
        if grader is None or grader._closed:
            grader = _shared[key] = Grader(config)
        return grader


@atexit.register
def _close_shared() -> None:
    for g in list(_shared.values()):
        g.close()


def grade_answer(pred: str | None, ref: str, config: GradingConfig | None = None) -> GradeResult:
    """Grade `pred` (the content of \\boxed{}, not the whole response) against the reference answer `ref`."""
    return shared_grader(config).grade(pred, ref)

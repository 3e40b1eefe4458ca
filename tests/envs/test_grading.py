"""Answer equivalence tables, boxed extraction, and the hard time limit of a grade."""

from __future__ import annotations

import os
import threading
import time

import pytest

from envs.grading import Grader, GradingConfig, extract_boxed


@pytest.fixture(scope="module")
def grader():
    g = Grader(GradingConfig(timeout_s=3.0, workers=2))
    yield g
    g.close()


EQUIVALENT = [
    ("1,234", "1234"),
    ("1234", "1,234"),
    ("1\\,234", "1234"),
    ("-7", "-7"),
    ("42.0", "42"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\tfrac34", "\\frac{3}{4}"),
    ("1/3", "\\frac{1}{3}"),
    ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("-\\frac{1}{2}", "-0.5"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt3}{2}"),
    ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("30°", "30"),
    ("50\\%", "50"),
    ("50%", "50"),
    ("5 \\text{ cm}", "5"),
    ("12 cm", "12"),
    ("\\$5.00", "5"),
    ("18 dollars", "18"),
    ("x = 5", "5"),
    ("[1,2)", "[1, 2)"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("(1, 2)", "(1,2)"),
    ("(3, -4, 5)", "(3,-4,5)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\pi", "\\pi"),
    ("2\\pi", "2 \\pi"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\frac{14}{3}", "4\\frac{2}{3}"),
    ("10^{3}", "1000"),
    ("3\\times 10^2", "300"),
    # scientific notation (math-verify alone reads 1e3 as 1*e*3)
    ("1e3", "1000"),
    ("2.5e-3", "0.0025"),
    ("1000", "1e3"),
    ("-1.5E+2", "-150"),
    ("1e-3", "\\frac{1}{1000}"),
    ("(1e3, 2)", "(1000, 2)"),
    ("x = 6.02e2", "602"),
    # simple closed forms
    ("e^{i\\pi}", "-1"),
    ("e^{i\\pi}+1", "0"),
    ("e^{2\\pi i}", "1"),
    ("(1+i)^2", "2i"),
    ("\\sqrt{-1}", "i"),
    ("\\sqrt{4}", "2"),
    ("\\cos(0)", "1"),
    ("\\sin(\\pi/6)", "\\frac{1}{2}"),
    ("\\ln(e^2)", "2"),
    ("\\log_{10} 1000", "3"),
    ("5!", "120"),
    ("\\binom{5}{2}", "10"),
]

NOT_EQUIVALENT = [
    ("3", "4"),
    ("1,235", "1234"),
    ("0.3333", "\\frac{1}{3}"),
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("(1, 2)", "(2, 1)"),
    ("[1,2)", "(1,2)"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("\\sqrt{2}", "\\sqrt{3}"),
    ("\\pi", "3"),
    ("-5", "5"),
    ("5", "(5, 5)"),
    ("hello", "5"),
    ("1e3", "1003"),
    ("1e3", "100"),
    ("2.5e-3", "0.025"),
    ("1e3", "3e"),
    ("e^{i\\pi}", "1"),
    ("e^{i\\pi/2}", "1"),
    ("i", "-1"),
    ("\\sqrt{4}", "-2"),
    ("\\cos(0)", "0"),
    ("x + 1", "x + 2"),
    ("", "5"),
    (None, "5"),
]


@pytest.mark.parametrize("pred,ref", EQUIVALENT)
def test_equivalent(grader, pred, ref):
    res = grader.grade(pred, ref)
    assert res.correct, (pred, ref, res)


@pytest.mark.parametrize("pred,ref", NOT_EQUIVALENT)
def test_not_equivalent(grader, pred, ref):
    res = grader.grade(pred, ref)
    assert not res.correct, (pred, ref, res)


@pytest.mark.parametrize(
    "text,boxed",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed 7.", "7"),
        ("\\fbox{9}", "9"),
        ("\\boxed{unclosed", None),
        ("no box", None),
        ("", None),
    ],
)
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


def test_plain_numbers_skip_the_subprocess(grader):
    assert grader.grade("1,234", "1234").reason == "exact"
    assert grader.grade("3", "4").reason == "mismatch"
    assert grader.grade("1e3", "1000").reason == "exact"
    assert grader.grade("1e3", "1003").reason == "mismatch"
    assert grader.grade("2.5e-3", "0.0025").reason == "exact"


def test_hung_grade_is_zero_with_reason_within_the_limit():
    """sympy never returns on 9^{9^{9^9}} (C-level bigint pow): the worker is killed at the deadline."""
    with Grader(GradingConfig(timeout_s=1.0, workers=1)) as g:
        assert g.grade("2", "\\frac{4}{2}").correct  # worker started; its startup is not in the deadline below
        t0 = time.monotonic()
        res = g.grade("9^{9^{9^{9}}}", "1")
        elapsed = time.monotonic() - t0
        # "timeout" (killed at the deadline), or "memory"/"mismatch" when the worker's address-space cap made sympy
        # give up first; either way a 0, fast. The slack covers a loaded CI machine.
        assert not res.correct and res.reason in ("timeout", "memory", "mismatch"), res
        assert elapsed < 6.0, elapsed
        # the grader recovers: a fresh worker answers the next grade
        assert g.grade("\\sqrt{8}", "2\\sqrt{2}").correct


def test_grades_from_many_threads(grader):
    cases = EQUIVALENT[:16]
    results: list = [None] * len(cases)

    def work(i):
        results[i] = grader.grade(*cases[i]).correct

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(results), results


def test_close_kills_workers():
    g = Grader(GradingConfig(workers=1))
    assert g.grade("\\sqrt{4}", "2").correct
    pids = g.pids()
    assert pids
    g.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not g.grade("\\sqrt{4}", "3").correct  # closed grader: a reason, not an exception


def test_orphaned_hung_worker_dies_on_its_own(tmp_path):
    """If the trainer dies while a grade hangs, the worker's per-grade CPU limit still ends it."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "orphan.py"
    script.write_text(
        "import os, sys, threading, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from envs.grading import Grader, GradingConfig\n"
        "g = Grader(GradingConfig(timeout_s=1.0, workers=1))\n"
        "g.grade('\\\\sqrt4', '2')\n"
        "print(g.pids()[0], flush=True)\n"
        "threading.Thread(target=lambda: g.grade('9^{9^{9^{9}}}', '1'), daemon=True).start()\n"
        "time.sleep(0.3)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 60  # 5 s of CPU time; wall time is longer on a loaded machine
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        stat = (
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else ""
        )
        if stat == "Z":
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    raise AssertionError("orphaned grader worker still running after 60 s")

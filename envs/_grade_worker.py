"""Grader subprocess: reads one JSON request per line on stdin, writes one JSON reply per line on stdout.

Runs as a standalone script (``python _grade_worker.py``) so it needs nothing from this repository on its path, only
``math_verify``. It lives in its own process because sympy can hang in C code (a huge integer power, a pathological
simplification) where no signal or thread can interrupt it: the parent kills this process when a grade overruns its
deadline and starts a fresh one. Request: ``{"pred": str, "ref": str, "timeout": float, "float_rounding": int}``.
Reply: ``{"correct": bool, "reason": str}``; reason ``closed_form`` when only the numeric check of two constants
(with ``i`` as the imaginary unit) found them equal.
"""

from __future__ import annotations

import json
import sys


def _limit_cpu(seconds: float) -> None:
    """Let the next grade use at most `seconds` more CPU time, then SIGXCPU kills this process.

    The parent kills an overrunning worker itself; this bound also holds when the parent is gone (an orphan stuck in
    sympy would otherwise spin forever). It is set per request, so a long-lived worker is never killed for CPU it
    used on earlier grades. (PR_SET_PDEATHSIG is no substitute: it fires when the *thread* that spawned us exits.)
    """
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = usage.ru_utime + usage.ru_stime
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = int(used + seconds) + 1
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    except (ImportError, ValueError, OSError):
        return


def _limit_memory(memory_mb: int) -> None:
    """Cap the address space so `9^{9^{9^9}}` raises MemoryError instead of swapping the host."""
    if memory_mb <= 0:
        return
    try:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # the parent's hard timeout still bounds a runaway grade
        return


def _grade(req: dict) -> dict:
    from math_verify import parse, verify

    seconds = max(1, int(req.get("timeout", 5)))
    # Both sides are wrapped in \boxed{} so the extraction rules are the same for reference and prediction.
    gold = parse("\\boxed{" + req["ref"] + "}", parsing_timeout=seconds)
    pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=seconds)
    if not gold:
        return {"correct": False, "reason": "unparsable_reference"}
    if not pred:
        return {"correct": False, "reason": "unparsable_answer"}
    ok = verify(gold, pred, float_rounding=int(req.get("float_rounding", 6)), timeout_seconds=seconds)
    if ok:
        return {"correct": True, "reason": "math_verify"}
    if _closed_forms_equal(gold, pred):
        return {"correct": True, "reason": "closed_form"}
    return {"correct": False, "reason": "mismatch"}


def _constant(parsed: list):
    """The parsed answer as a constant sympy expression, with the symbol `i` read as the imaginary unit; None for
    anything else (sets, intervals, tuples, equations, expressions with variables)."""
    import sympy

    expr = next((x for x in parsed if isinstance(x, sympy.Expr)), None)
    if expr is None:
        return None
    expr = expr.subs({s: sympy.I for s in expr.free_symbols if getattr(s, "name", "") == "i"})
    return None if expr.free_symbols else expr


def _closed_forms_equal(gold: list, pred: list, rel_tol: float = 1e-10) -> bool:
    r"""Numeric equality of two constants math-verify left unequal: its parser reads ``i`` as a plain symbol, so
    ``e^{i\pi}`` vs ``-1`` or ``(1+i)^2`` vs ``2i`` fail there. Evaluated to 30 digits; the parent's hard
    timeout still bounds a pathological expression."""
    import sympy

    a, b = _constant(gold), _constant(pred)
    if a is None or b is None:
        return False
    try:
        va, vb = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
    except (TypeError, ValueError, ArithmeticError):
        return False
    return abs(va - vb) <= rel_tol * max(1.0, abs(va))


def main() -> None:
    _limit_memory(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    import logging

    logging.disable(logging.CRITICAL)  # math_verify logs warnings on every unparsable input
    import math_verify  # noqa: F401  (import before "ready" so the first grade's deadline excludes it)
    from math_verify import parse

    parse("\\boxed{\\frac{1}{2}}", parsing_timeout=5)  # warm the LaTeX parser and sympy
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            _limit_cpu(3 * float(req.get("timeout", 5)) + 2)
            reply = _grade(req)
        except MemoryError:
            reply = {"correct": False, "reason": "memory"}
        except Exception as exc:  # noqa: BLE001  a grade is never an exception for the caller, only a reason
            name = type(exc).__name__
            reply = {"correct": False, "reason": "timeout" if "Timeout" in name else f"error: {name}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

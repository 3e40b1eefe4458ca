"""What a session can read of the host, on both backends: only what tool code needs.

Model-written code must not read the benchmark's answer key (reward hacking), the checkout, the virtualenv or
whatever a user keeps world-readable (tokens under /srv or /home). Token files are planted in real host
directories for the test and removed afterwards; an `extra_ro_paths` entry is the one thing that is readable.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from sandbox import ExecStatus

from .conftest import BACKENDS, make_backend

REPO = Path(__file__).resolve().parents[2]
SECRET = "alp-isolation-" + secrets.token_hex(8)
PEEK = """
import os, json
def peek(p):
    try:
        if os.path.isdir(p):
            return ["dir", sorted(os.listdir(p))]
        with open(p, "rb") as f:
            return ["file", f.read(4096).decode("utf-8", "replace")]
    except OSError as e:
        return ["error", type(e).__name__]
"""


def _plant(base: str) -> Path | None:
    """A world-readable token file in a fresh directory under `base` (None where the test cannot write)."""
    try:
        d = Path(tempfile.mkdtemp(prefix="alp-isolation-", dir=base))
    except OSError:
        return None
    d.chmod(0o755)
    f = d / "token.txt"
    f.write_text(SECRET)
    f.chmod(0o644)
    return f


@pytest.fixture(scope="module")
def planted():
    """Tokens under /srv, /home and beside the checkout (standing in for ../shared/data), plus an allowed dir."""
    tokens = {name: _plant(base) for name, base in (("srv", "/srv"), ("home", "/home"), ("data", str(REPO.parent)))}
    allowed = Path(tempfile.mkdtemp(prefix="alp-extra-ro-", dir="/var/tmp"))
    allowed.chmod(0o755)
    (allowed / "notes.txt").write_text("readable by design")
    (allowed / "notes.txt").chmod(0o644)
    yield tokens, allowed
    for f in [*tokens.values(), allowed / "x"]:
        if f is not None:
            shutil.rmtree(f.parent, ignore_errors=True)


@pytest.fixture(scope="module", params=BACKENDS)
def jailed(request, planted):
    box = make_backend(request.param, extra_ro_paths=[str(planted[1])])
    yield box
    box.close()


def _peek(session, path: str | Path) -> list:
    r = session.run(PEEK + f"print(json.dumps(peek({str(path)!r})))")
    assert r.status == ExecStatus.OK, r
    return json.loads(r.stdout)


def test_planted_tokens_are_unreadable(jailed, planted):
    tokens, _ = planted
    assert any(tokens.values()), "could not plant a single token file"
    with jailed.session() as s:
        for name, f in tokens.items():
            if f is None:
                continue
            assert _peek(s, f)[0] == "error", name
            kind, listing = _peek(s, f.parent.parent)
            assert kind == "error" or f.parent.name not in listing, name
            assert SECRET not in json.dumps(_peek(s, f.parent))


def test_host_etc_passwd_is_not_the_hosts(jailed):
    with jailed.session() as s:
        kind, text = _peek(s, "/etc/passwd")
    assert kind == "error" or text != Path("/etc/passwd").read_text()[:4096]


def test_checkout_venv_and_package_are_invisible(jailed):
    import alp_agent

    paths = [
        REPO / "pyproject.toml",
        REPO / "README.md",
        Path(alp_agent.__file__),
        REPO / "configs",
        Path(sys.prefix) / "pyvenv.cfg",
        *Path(sys.prefix).glob("lib/python3*/site-packages/alp_agent-*.dist-info"),
        *Path(sys.prefix).glob("lib/python3*/site-packages/torch"),
    ]
    shared_data = REPO.parent / "shared" / "data"  # the real benchmark answers, where this machine has them
    paths += sorted(shared_data.glob("*.jsonl"))[:2]
    with jailed.session() as s:
        for p in paths:
            assert _peek(s, p)[0] == "error", p
        r = s.run("import sys\n[p for p in sys.path if 'site-packages' in p and __import__('os').listdir(p)]")
        assert r.stdout == "[]\n", r  # only the tool packages' own directory has anything importable
        for mod in ("alp_agent", "envs", "torch", "pydantic"):
            r = s.run(f"import {mod}")
            assert r.status == ExecStatus.ERROR and "ModuleNotFoundError" in r.stderr, (mod, r)


def test_extra_ro_path_is_readable_not_writable(jailed, planted):
    allowed = planted[1]
    with jailed.session() as s:
        assert _peek(s, allowed / "notes.txt") == ["file", "readable by design"]
        r = s.run(f"open({str(allowed / 'x')!r}, 'w').write('x')")
        assert r.status == ExecStatus.ERROR and ("Read-only" in r.stderr or "Permission" in r.stderr), r
    assert not (allowed / "x").exists()


def test_numpy_and_sympy_compute(jailed):
    with jailed.session() as s:
        r = s.run("import numpy as np\nnp.linalg.solve(np.array([[2.0, 1.0], [1.0, 3.0]]), np.array([3.0, 5.0]))")
        assert r.status == ExecStatus.OK and r.stdout == "array([0.8, 1.4])\n", r
        r = s.run(
            "import sympy as sp\nx = sp.Symbol('x')\n(sp.solve(x**2 - 4, x), sp.integrate(sp.sin(x), (x, 0, sp.pi)))"
        )
        assert r.status == ExecStatus.OK and r.stdout == "([-2, 2], 2)\n", r
        r = s.run("import mpmath\nmpmath.mp.dps = 30\nstr(mpmath.sqrt(2))")
        assert r.stdout == "'1.41421356237309504880168872421'\n", r

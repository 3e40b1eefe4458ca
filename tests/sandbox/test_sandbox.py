"""Behaviour of sandbox sessions on both backends: notebook semantics, hostile cells, and nothing leaking."""

from __future__ import annotations

import time

from sandbox import ExecStatus

from .conftest import SECRET_NAME, SECRET_VALUE, TEST_CONFIG


def test_persistence_and_echo(session):
    assert session.run("import math\nx = 41").stdout == ""
    r = session.run("x += 1\nmath.sqrt(x * x)")
    assert r.status == ExecStatus.OK and r.stdout == "42.0\n" and not r.state_lost
    assert session.run("None").stdout == ""
    assert session.run("print('a')\n'b'").stdout == "a\n'b'\n"
    assert session.run("def f(n):\n    return n * 2\nf(x)").stdout == "84\n"


def test_error_traceback_is_text_and_state_kept(session):
    session.run("y = 5")
    r = session.run("def g():\n    return 1 / 0\ng()")
    assert r.status == ExecStatus.ERROR
    assert "ZeroDivisionError" in r.stderr and "<cell-" in r.stderr and "server.py" not in r.stderr
    assert session.run("y").stdout == "5\n"
    assert session.run("def (:").status == ExecStatus.ERROR  # SyntaxError is an error, not a crash


def test_nul_and_invalid_utf8(session):
    r = session.run(
        "import sys, os\nprint('a\\x00b')\nsys.stdout.buffer.write(b'\\xff\\xfe\\x00z')\nos.write(1, b'\\x80')"
    )
    assert r.status == ExecStatus.OK
    assert "a\x00b" in r.stdout and "\ufffd" in r.stdout and r.stdout.count("z") == 1
    assert session.run("'\\udc80'").status == ExecStatus.OK  # lone surrogate in a repr


def test_100mb_output_is_capped(session):
    t = time.perf_counter()
    r = session.run(
        "import sys\nfor _ in range(100): sys.stdout.write('x' * 1_000_000)\nprint('y' * 10**6, file=sys.stderr)"
    )
    assert r.status == ExecStatus.OUTPUT_LIMIT and r.truncated
    assert len(r.stdout) + len(r.stderr) <= TEST_CONFIG["max_output_bytes"]
    assert time.perf_counter() - t < 15
    r = session.run("import os\nos.write(1, b'z' * 10_000_000)")  # fd-level output is capped too
    assert r.truncated and len(r.stdout) <= TEST_CONFIG["max_output_bytes"]
    assert session.run("1").stdout == "1\n"


def test_fork_bomb_is_contained(sb, session):
    r = session.run("import os\nwhile True:\n    os.fork()", timeout=10)
    assert r.status in (ExecStatus.ERROR, ExecStatus.TIMEOUT, ExecStatus.CRASHED), r
    if r.status == ExecStatus.ERROR:
        assert "BlockingIOError" in r.stderr or "Resource temporarily unavailable" in r.stderr
    with sb.session() as other:  # another session is unaffected
        assert other.run("2 + 2").stdout == "4\n"
    assert session.run("3").stdout == "3\n"


def test_memory_bomb(session):
    session.run("keep = 1")
    r = session.run("x = bytearray(4 * 1024**3)")
    assert r.status == ExecStatus.MEMORY and "MemoryError" in r.stderr
    r = session.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024**2))")
    assert r.status == ExecStatus.MEMORY
    assert session.run("del chunks\nkeep").stdout == "1\n"


def test_timeout_kills_and_next_call_reports_state_lost(sb, session):
    session.run("z = 1")
    t = time.perf_counter()
    r = session.run("while True: pass", timeout=1)
    assert r.status == ExecStatus.TIMEOUT and time.perf_counter() - t < 8  # generous: CI shares 2 cores
    r = session.run("z")
    assert r.state_lost and r.status == ExecStatus.ERROR and "NameError" in r.stderr
    assert session.run("z = 2\nz").stdout == "2\n" and not session.run("z").state_lost


def test_kill_parent(session):
    r = session.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n'alive'")
    assert r.status in (ExecStatus.OK, ExecStatus.ERROR, ExecStatus.CRASHED), r
    assert session.run("1 + 1").stdout == "2\n"


def test_kill_everything_only_kills_the_session(sb, session):
    with sb.session() as other:
        other.run("o = 1")
        r = session.run("import os, signal\nos.kill(-1, signal.SIGKILL)")  # every process this uid may signal
        assert r.status in (ExecStatus.CRASHED, ExecStatus.OK, ExecStatus.ERROR), r
        assert other.run("o").stdout == "1\n" and not other.run("o").state_lost
    assert session.run("2").stdout == "2\n"


def test_no_host_secrets(session):
    r = session.run(
        "import os\nprint(sorted(os.environ))\n"
        "for p in ['/proc/1/environ', '/proc/self/environ']:\n"
        "    try: print(open(p, 'rb').read())\n"
        "    except OSError as e: print(e)"
    )
    assert SECRET_NAME not in r.stdout and SECRET_VALUE not in r.stdout
    r = session.run("open('/etc/shadow').read()")
    assert r.status == ExecStatus.ERROR and ("PermissionError" in r.stderr or "FileNotFoundError" in r.stderr)


def test_filesystem(session):
    r = session.run("open('/etc/alp_pwned', 'w').write('x')")
    assert r.status == ExecStatus.ERROR and ("Read-only" in r.stderr or "Permission" in r.stderr)
    r = session.run("open('/tmp/ok.txt', 'w').write('hello')\nopen('/tmp/ok.txt').read()")
    assert r.status == ExecStatus.OK and r.stdout == "'hello'\n"
    r = session.run("open('/tmp/big', 'wb').write(b'x' * 200 * 1024**2)")  # bigger than the tmpfs
    assert r.status in (ExecStatus.ERROR, ExecStatus.MEMORY)
    assert session.run("import os; os.remove('/tmp/big') if os.path.exists('/tmp/big') else None").ok


def test_no_network(session):
    r = session.run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)")
    assert r.status == ExecStatus.ERROR and "OSError" in r.stderr


def test_sys_exit_keeps_session(session):
    session.run("w = 7")
    r = session.run("import sys\nsys.exit(3)")
    assert r.status == ExecStatus.EXITED and r.exit_code == 3
    assert session.run("exit()").status == ExecStatus.EXITED
    assert session.run("w").stdout == "7\n"


def test_segfault(session):
    session.run("v = 1")
    r = session.run("import ctypes\nctypes.string_at(0)")
    assert r.status == ExecStatus.CRASHED and "SIGSEGV" in r.stderr
    r = session.run("1")
    assert r.state_lost and r.stdout == "1\n"


def test_os_exit_is_a_crash(session):
    r = session.run("import os\nos._exit(4)")
    assert r.status == ExecStatus.CRASHED and r.exit_code == 4
    assert session.run("'ok'").state_lost


def test_protocol_cannot_be_corrupted_by_stdout_games(session):
    r = session.run("import os, sys\nos.close(1)\nos.close(0)\nsys.stdout.write('still here')")
    assert r.status in (ExecStatus.OK, ExecStatus.ERROR)
    assert session.run("print('next')").stdout == "next\n"
    r = session.run(
        "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'ALP1garbage')\n    except OSError: pass"
    )
    assert r.status in (ExecStatus.OK, ExecStatus.ERROR, ExecStatus.CRASHED)
    assert session.run("1 + 1").stdout == "2\n"

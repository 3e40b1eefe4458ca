"""Local-backend specifics: the no-bwrap fallback, the session bound, the CPU limit, cgroup clean-up."""

from __future__ import annotations

import pytest

from sandbox import ExecStatus, SandboxConfig, local
from sandbox.local import LocalSandbox


def test_fallback_without_bwrap_still_limits(monkeypatch, caplog):
    monkeypatch.setattr(local, "bwrap_works", lambda path: "bwrap disabled for this test")
    cfg = SandboxConfig(pool_size=1, max_processes=16, memory_mb=256, allow_unisolated=True)
    with LocalSandbox(cfg) as sb:
        assert sb.isolation == "rlimits" and "falling back" in caplog.text
        with sb.session() as s:
            assert s.run("a = 2\na * 21").stdout == "42\n"
            assert s.run("bytearray(2 * 1024**3)").status == ExecStatus.MEMORY
            if sb.use_cgroup or sb.drop_uid:
                r = s.run("import os\nwhile True:\n    os.fork()")
                assert r.status != ExecStatus.OK
            assert s.run("while True: pass", timeout=0.5).status == ExecStatus.TIMEOUT
            assert s.run("a").state_lost


def test_max_sessions_bounds_open_sessions():
    with LocalSandbox(SandboxConfig(pool_size=1, max_sessions=2)) as sb:
        a, b = sb.session(), sb.session()
        with pytest.raises(TimeoutError):
            sb.session(timeout=0.2)
        a.close()
        with sb.session(timeout=5) as c:
            assert c.run("1").ok
        b.close()


def test_cpu_limit_kills_session():
    with LocalSandbox(SandboxConfig(pool_size=1, cpu_s=1)) as sb, sb.session() as s:
        r = s.run("while True: pass", timeout=120)  # wall clock is generous: only the CPU limit may end it
        assert r.status == ExecStatus.TIMEOUT and "CPU" in r.stderr


def test_fork_bomb_hits_the_pids_limit():
    with LocalSandbox(SandboxConfig(pool_size=1, max_processes=10)) as sb, sb.session() as s:
        if not sb.use_cgroup:
            pytest.skip("no writable pids cgroup on this machine")
        r = s.run("import os\nwhile True:\n    os.fork()")
        assert r.status == ExecStatus.ERROR and "BlockingIOError" in r.stderr
        # RLIMIT_NPROC (per-session uid) or the cgroup's pids.max refused the fork, whichever came first
        peak = s.worker.cgroup.path / "pids.peak"
        if peak.exists():
            assert int(peak.read_text()) <= sb.config.max_processes + 3


def test_cgroups_removed_on_close():
    with LocalSandbox(SandboxConfig(pool_size=1)) as sb:
        if not sb.use_cgroup:
            pytest.skip("no writable pids cgroup on this machine")
        with sb.session() as s:
            s.run("1")
            path = s.worker.cgroup.path
            assert path.exists()
            assert int((path / "pids.max").read_text()) == sb.config.max_processes + 3
        assert not path.exists()


def test_shared_sandbox_is_one_per_config():
    from sandbox import shared_sandbox

    cfg = SandboxConfig(pool_size=1, timeout_s=7)
    a, b = shared_sandbox(cfg), shared_sandbox(SandboxConfig(pool_size=1, timeout_s=7))
    assert a is b and shared_sandbox(SandboxConfig(pool_size=1, timeout_s=8)) is not a
    with a.session() as s:
        assert s.run("6 * 7").stdout == "42\n"
    from sandbox.factory import _close_shared

    _close_shared()
    assert shared_sandbox(cfg) is not a
    _close_shared()


def test_refuses_to_start_without_bwrap(monkeypatch):
    monkeypatch.setattr(local, "bwrap_works", lambda path: "bwrap disabled for this test")
    with pytest.raises(RuntimeError) as e:
        LocalSandbox(SandboxConfig(pool_size=1))
    msg = str(e.value)
    assert "\n" not in msg and "bwrap disabled for this test" in msg and "allow_unisolated" in msg


def test_missing_extra_ro_path_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="extra_ro_paths do not exist"):
        LocalSandbox(SandboxConfig(pool_size=1, extra_ro_paths=[str(tmp_path / "nope")]))


def test_interpreter_runs_from_its_base_prefix_without_the_venv():
    import sys

    with LocalSandbox(SandboxConfig(pool_size=1)) as sb, sb.session() as s:
        r = s.run(
            "import sys, os\n(sys.prefix == sys.base_prefix, sys.prefix, os.path.exists(sys.prefix + '/pyvenv.cfg'))"
        )
        assert r.stdout == f"(True, {sys.base_prefix!r}, False)\n", r
        assert s.run("import json, ssl, sqlite3, ctypes, decimal, zoneinfo\n'ok'").stdout == "'ok'\n"


def test_only_the_listed_packages_are_importable():
    with LocalSandbox(SandboxConfig(pool_size=1, packages=["sympy"])) as sb, sb.session() as s:
        assert s.run("import sympy, mpmath\nsympy.factorint(360)").stdout == "{2: 3, 3: 2, 5: 1}\n"  # + dependency
        r = s.run("import numpy")
        assert r.status == ExecStatus.ERROR and "ModuleNotFoundError" in r.stderr


def test_uninstalled_package_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not installed.*no-such-dist-alp"):
        LocalSandbox(SandboxConfig(pool_size=1, packages=["numpy", "no-such-dist-alp"]))


def test_cgroup_without_a_pids_controller_falls_back_once(monkeypatch, caplog):
    """A hierarchy that takes mkdir but refuses pids.max below our root (cgroup v2 without the controller delegated,
    seen on a GPU machine) is found by the probe once: the sandbox runs on per-uid limits and warns once, instead of
    failing every session start."""
    from sandbox import cgroups

    def refuse(root):
        raise PermissionError(13, "Permission denied", str(root / "probe" / "pids.max"))

    monkeypatch.setattr(cgroups, "_probe", refuse)
    monkeypatch.setattr(cgroups.PidsCgroup, "_checked", False)
    monkeypatch.setattr(cgroups.PidsCgroup, "_root", None)
    assert cgroups.PidsCgroup.root() is None
    with LocalSandbox(SandboxConfig(pool_size=1)) as sb:
        assert sb.describe()["pids_cgroup"] is False
        with sb.session() as s:
            assert s.run("6 * 7").stdout == "42\n"
    assert sum("no writable pids cgroup" in r.message for r in caplog.records) == 1

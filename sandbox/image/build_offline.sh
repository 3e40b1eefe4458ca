#!/usr/bin/env bash
# Build the Docker sandbox image (default alp-agent-sandbox:latest) with no registry: copy the host's installed
# Debian python3 package closure into a root filesystem, add the tool packages, and `docker import` it (seconds).
#
# Tool packages (PACKAGES, default "numpy sympy", plus their dependencies such as mpmath) get into the image without
# a registry in one of two ways:
#   * default: copied from the host's installed site-packages: the directories each distribution's RECORD lists
#     (numpy/, numpy.libs/, numpy-*.dist-info/, ...), found by `$PYTHON sandbox/jail.py PACKAGES`, into
#     /usr/local/lib/python3.X/dist-packages of the image, plus the shared libraries their extension modules load
#     (ldd). $PYTHON (default: python3 on PATH, e.g. the project's venv) must have the image's Python minor version.
#   * WHEELHOUSE=dir: wheels fetched earlier on a machine with a registry, e.g.
#       pip download --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 -d dir numpy sympy
#     are unpacked into the same directory (a wheel is a zip of its installed files).
# Users with internet can instead: docker build -t alp-agent-sandbox:latest sandbox/image
# Usage: build_offline.sh [IMAGE]   (FORCE=1 rebuilds an image that already has the wanted packages)
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${1:-alp-agent-sandbox:latest}
PACKAGES=${PACKAGES:-numpy sympy}
PYTHON=${PYTHON:-python3}
LABEL=alp-agent-sandbox.packages
if [ -z "${FORCE:-}" ] && [ "$(docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$IMAGE" 2>/dev/null)" = "$PACKAGES" ]; then
  echo "image $IMAGE exists with $PACKAGES (FORCE=1 to rebuild)"; exit 0
fi
command -v dpkg-query >/dev/null || { echo "build_offline.sh needs a Debian/Ubuntu host (dpkg)"; exit 1; }
[ -x /usr/bin/python3 ] || { echo "build_offline.sh needs the Debian python3 package installed"; exit 1; }
pyver=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
work=$(mktemp -d /tmp/alp-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
site=$root/usr/local/lib/python$pyver/dist-packages
mkdir -p "$root" "$site"

# 1. The tool packages: from a wheelhouse, or the host's installed copies (same Python minor version only).
if [ -n "${WHEELHOUSE:-}" ]; then
  /usr/bin/python3 - "$WHEELHOUSE" "$site" <<'PY'
import glob, os, shutil, sys, zipfile
wheels = glob.glob(os.path.join(sys.argv[1], "*.whl"))
if not wheels:
    sys.exit(f"no wheels in {sys.argv[1]}")
for w in wheels:
    zipfile.ZipFile(w).extractall(sys.argv[2])
for d in glob.glob(os.path.join(sys.argv[2], "*.data")):  # scripts and headers: not needed to import
    shutil.rmtree(d)
print(f"{len(wheels)} wheels unpacked", file=sys.stderr)
PY
  : >"$work/entries"
else
  hostver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$hostver" != "$pyver" ]; then
    echo "$PYTHON is Python $hostver but the image's python3 is $pyver: set PYTHON to a $pyver interpreter with" \
      "$PACKAGES installed, or WHEELHOUSE to a folder of $pyver wheels"; exit 1
  fi
  # shellcheck disable=SC2086
  "$PYTHON" sandbox/jail.py $PACKAGES >"$work/entries" || { echo "cannot locate $PACKAGES with $PYTHON"; exit 1; }
  while read -r e; do cp -a "$e" "$site/"; done <"$work/entries"
fi

# 2. The installed closure of the Debian packages we need and every file they own, plus the shared libraries the
#    tool packages' extension modules load (ldd gives the whole closure; numpy needs libstdc++, libgcc_s, libz).
/usr/bin/python3 - "$work/files" "$site" python3 dash coreutils libc-bin <<'PY'
import subprocess, sys, os
out, site, todo, seen = sys.argv[1], sys.argv[2], list(sys.argv[3:]), set()
def installed(p):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
    return r.returncode == 0 and "installed" in r.stdout and "not-installed" not in r.stdout
while todo:
    p = todo.pop()
    if p in seen: continue
    seen.add(p)
    deps = subprocess.run(["dpkg-query", "-W", "-f=${Depends},${Pre-Depends}", p], capture_output=True, text=True).stdout
    for dep in deps.split(","):
        alts = [a.strip().split(" ")[0].split(":")[0] for a in dep.split("|") if a.strip()]
        for a in alts:
            if installed(a):
                todo.append(a); break
files = set()
for p in sorted(seen):
    for f in subprocess.run(["dpkg", "-L", p], capture_output=True, text=True).stdout.splitlines():
        if not f.startswith("/") or f.startswith(("/usr/share/doc", "/usr/share/man", "/usr/share/locale", "/usr/share/info")):
            continue
        if os.path.islink(f) and os.path.isdir(f) and f.count("/") == 1:
            continue  # usrmerge top-level links (/bin -> usr/bin): recreated below
        f = os.path.join(os.path.realpath(os.path.dirname(f)), os.path.basename(f))
        if os.path.lexists(f):
            files.add(f)
sos = [os.path.join(r, n) for r, _, ns in os.walk(site) for n in ns if n.endswith(".so") or ".so." in n]
if sos:
    ldd = subprocess.run(["ldd", *sos], capture_output=True, text=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        lib = parts[2] if len(parts) > 2 and parts[1] == "=>" else ""
        if lib.startswith("/") and not lib.startswith(site) and os.path.exists(lib):
            lib = os.path.join(os.path.realpath(os.path.dirname(lib)), os.path.basename(lib))
            files |= {lib, os.path.realpath(lib)}
files |= {"/etc/ld.so.cache"}
open(out, "w").write("\n".join(sorted(files)) + "\n")
print(f"{len(seen)} packages, {len(files)} paths", file=sys.stderr)
PY
tar -C / --no-recursion -cf - -T <(sed 's|^/||' "$work/files") 2>/dev/null | tar -C "$root" -xf -
# usrmerge: /bin, /lib, ... are symlinks on bookworm
for l in bin sbin lib lib64; do
  if [ -L "/$l" ] && [ ! -e "$root/$l" ]; then cp -P "/$l" "$root/$l"; fi
done

# 3. What a container needs on top: users, a writable /tmp, python3 on PATH. (The session server is not baked
#    in: DockerSandbox sends it with `python3 -c` at container start, so the image never goes stale.)
mkdir -p "$root/tmp" "$root/etc" "$root/proc" "$root/sys" "$root/dev"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
[ -e "$root/usr/bin/python3" ] || ln -s "$(readlink /usr/bin/python3)" "$root/usr/bin/python3"
find "$root/usr/local/lib" -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true

tar -C "$root" -cf - . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1' \
  --change "LABEL $LABEL=\"$PACKAGES\"" \
  --change 'USER 65534:65534' --change 'WORKDIR /tmp' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
check="import json, ctypes, socket, numpy, sympy; assert numpy.linalg.det(numpy.eye(2)) == 1.0; print('image ok')"
docker run --rm --network none "$IMAGE" python3 -c "$check" || { echo "image $IMAGE does not run python3 with $PACKAGES"; exit 1; }
echo "built $IMAGE with $PACKAGES ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"

#!/usr/bin/env bash
# Build the Docker sandbox image (default alp-agent-sandbox:latest) with no registry: copy the host's installed
# Debian python3 package closure into a root filesystem and `docker import` it. Takes a few seconds.
# Users with internet can instead: docker build -t alp-agent-sandbox:latest sandbox/image
# Usage: build_offline.sh [IMAGE]   (FORCE=1 rebuilds an existing image)
set -euo pipefail
IMAGE=${1:-alp-agent-sandbox:latest}
if docker image inspect "$IMAGE" >/dev/null 2>&1 && [ -z "${FORCE:-}" ]; then
  echo "image $IMAGE exists (FORCE=1 to rebuild)"; exit 0
fi
command -v dpkg-query >/dev/null || { echo "build_offline.sh needs a Debian/Ubuntu host (dpkg)"; exit 1; }
[ -x /usr/bin/python3 ] || { echo "build_offline.sh needs the Debian python3 package installed"; exit 1; }
work=$(mktemp -d /tmp/alp-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"

# 1. The installed closure of the packages we need, and every file they own.
/usr/bin/python3 - "$work/files" python3 dash coreutils libc-bin <<'PY'
import subprocess, sys, os
out, todo, seen = sys.argv[1], list(sys.argv[2:]), set()
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
files |= {"/etc/ld.so.cache"}
open(out, "w").write("\n".join(sorted(files)) + "\n")
print(f"{len(seen)} packages, {len(files)} paths", file=sys.stderr)
PY
tar -C / --no-recursion -cf - -T <(sed 's|^/||' "$work/files") 2>/dev/null | tar -C "$root" -xf -
# usrmerge: /bin, /lib, ... are symlinks on bookworm
for l in bin sbin lib lib64; do
  if [ -L "/$l" ] && [ ! -e "$root/$l" ]; then cp -P "/$l" "$root/$l"; fi
done

# 2. What a container needs on top: users, a writable /tmp, python3 on PATH. (The session server is not baked
#    in: DockerSandbox sends it with `python3 -c` at container start, so the image never goes stale.)
mkdir -p "$root/tmp" "$root/etc" "$root/proc" "$root/sys" "$root/dev"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
[ -e "$root/usr/bin/python3" ] || ln -s "$(readlink /usr/bin/python3)" "$root/usr/bin/python3"

tar -C "$root" -cf - . | docker import \
  --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1' \
  --change 'USER 65534:65534' --change 'WORKDIR /tmp' --change 'CMD ["python3"]' - "$IMAGE" >/dev/null
docker run --rm --network none "$IMAGE" python3 -c "import json, ctypes, socket; print('image ok')" \
  || { echo "image $IMAGE does not run python3"; exit 1; }
echo "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"

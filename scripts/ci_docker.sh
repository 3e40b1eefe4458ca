#!/usr/bin/env bash
# Bring up a real Docker engine on a machine without systemd and build the sandbox image offline.
# Used by .ci/run; safe to run by hand. Prints one line and returns 0 even when Docker cannot start
# (the docker tests then skip with the reason).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! docker version >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io) \
      >/tmp/alp-docker-install.log 2>&1 || { echo "docker: install failed (see /tmp/alp-docker-install.log)"; exit 0; }
  fi
  nohup dockerd --host=unix:///var/run/docker.sock --bridge=none --iptables=false --ip-forward=false \
    --ip-masq=false >/tmp/alp-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
fi
if ! docker version >/dev/null 2>&1; then echo "docker: engine did not start (see /tmp/alp-dockerd.log)"; exit 0; fi
if [ -f sandbox/image/build_offline.sh ]; then
  # numpy/sympy are copied into the image from the project's venv (same Python minor version as Debian's python3)
  venv_python="${ALP_VENV:-.venv}/bin/python"
  [ -x "$venv_python" ] && export PYTHON=${PYTHON:-$venv_python}
  bash sandbox/image/build_offline.sh || echo "docker: offline image build failed"
fi
echo "docker: engine up"

#!/usr/bin/env bash
# Install everything and run the test suite. This is the README's second command and exactly what .ci/run runs.
# Under CI (CI=true) or with ALP_DOCKER_TESTS=1 it also brings up a real Docker engine so the Docker sandbox tests run;
# elsewhere they skip with the reason. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${CI:-}" = true ] || [ "${ALP_DOCKER_TESTS:-}" = 1 ]; then bash scripts/ci_docker.sh; fi
. "${ALP_VENV:-.venv}/bin/activate"
exec python -m pytest -q "$@"

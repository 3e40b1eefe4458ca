#!/usr/bin/env bash
# Install everything, run the static checks (scripts/lint.sh) and then the test suite. This is the README's second
# command and exactly what .ci/run runs.
# Under CI (CI=true) or with ALP_DOCKER_TESTS=1 it also brings up a real Docker engine so the Docker sandbox tests run;
# elsewhere they skip with the reason. Benchmark tests read local copies of the data sets from $ALP_DATA_DIR; when it
# is unset and a ../shared/data folder sits beside the checkout, that folder is used (the project ships no data files;
# without either those tests skip). Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${CI:-}" = true ] || [ "${ALP_DOCKER_TESTS:-}" = 1 ]; then bash scripts/ci_docker.sh; fi
if [ -z "${ALP_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  ALP_DATA_DIR="$(cd ../shared/data && pwd)"
  export ALP_DATA_DIR
fi
# The episode viewer's test opens report.html in a headless Chromium (Debian's package; not part of the user setup):
# installed here under CI or with ALP_BROWSER_TESTS=1 when missing; elsewhere that test skips with the reason.
if { [ "${CI:-}" = true ] || [ "${ALP_BROWSER_TESTS:-}" = 1 ]; } && ! command -v chromium >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
bash scripts/lint.sh
. "${ALP_VENV:-.venv}/bin/activate"
exec python -m pytest -q "$@"

#!/usr/bin/env bash
# Static checks, run by scripts/test.sh (and so by CI) before the tests:
#   ruff check (rules in pyproject's [tool.ruff.lint]), ruff format --check, mypy (files and settings in pyproject's
#   [tool.mypy]), and that docs/config_reference.md is what the config models generate.
# Every check runs even when an earlier one fails, so one run shows everything; the exit status is 1 if any failed.
# Uses the project's venv (ALP_VENV, default .venv) when it exists, so the tool versions are the dev extra's.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${ALP_VENV:-.venv}"
# shellcheck disable=SC1091
if [ -f "$VENV/bin/activate" ]; then . "$VENV/bin/activate"; fi
failed=()
run() {
  local name=$1
  shift
  echo "lint: $name" >&2
  if ! "$@"; then failed+=("$name"); fi
}
run "ruff check" ruff check --quiet .
run "ruff format" ruff format --check --quiet .
run "mypy" mypy
run "config reference" python scripts/config_reference.py --check
if [ ${#failed[@]} -gt 0 ]; then
  echo "lint failed: ${failed[*]}" >&2
  exit 1
fi
echo "lint: all checks passed" >&2

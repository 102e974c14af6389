#!/usr/bin/env bash
# Run the linters (ruff check, ruff format --check, mypy) in .venv-test, the
# environment that scripts/test.sh uses, with the 'dev' extra installed.
# Runs all three and fails if any of them does.
# PYTHON picks the interpreter that creates the environment (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv-test
extra="[dev]"
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh

status=0
"$venv/bin/python" -m ruff check shmflush tests scripts || status=1
"$venv/bin/python" -m ruff format --check shmflush tests scripts || status=1
"$venv/bin/python" -m mypy || status=1
exit "$status"

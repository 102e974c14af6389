#!/usr/bin/env bash
# Run the test suite (python -m pytest) in its own virtual environment,
# .venv-test at the repository root.  Arguments go to pytest (e.g. -k, -x, -m "not slow").
# pytest's exit status is the script's: 5 (no tests collected) counts as failure.
# PYTHON picks the interpreter that creates the environment (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv-test
extra="[test]"
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh

exec "$venv/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# Run the shmflush demo (python -m shmflush demo) in its own virtual environment,
# .venv-demo at the repository root.  Arguments go to the demo; try --help.
# PYTHON picks the interpreter that creates the environment (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv-demo
extra=""
# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh

exec "$venv/bin/python" -m shmflush demo "$@"

#!/usr/bin/env bash
# The test command: set up ./.venv from the repository's files, then run the CPU test suite on two
# workers (pytest-xdist, one module per worker at a time: tests/conftest.py says why).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"

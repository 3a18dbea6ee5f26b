#!/usr/bin/env bash
# The test command: set up ./.venv from the repository's files, then run the CPU test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"

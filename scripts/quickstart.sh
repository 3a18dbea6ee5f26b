#!/usr/bin/env bash
# The main job on the embedded default: set up ./.venv from the repository's files, then run the whole
# system (synthetic videos -> shards -> tiny pipeline -> torchrun training -> export -> inpaint).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m fff_vdi.quickstart "$@"

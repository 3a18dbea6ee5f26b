#!/usr/bin/env bash
# Create ./.venv from the repository's own files (idempotent: a second run only checks).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
# pip's warnings about this machine's local index folders are noise; its errors still show.
pipq() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v 'is ignored' >&2); }
if [ ! -x .venv/bin/python ]; then
  echo "setup_env: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup_env: installing requirements.txt into .venv (a few minutes the first time)"
  pipq -r requirements.txt
  pipq --no-deps --no-build-isolation -e .
  .venv/bin/python -c "import torch, torchvision, diffusers, transformers, hydra, nvidia.dali, webdataset" \
    || { echo "setup_env: the environment is incomplete; see pip's output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

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
  .venv/bin/python -c "import torch, torchvision, diffusers, transformers, hydra, nvidia.dali, webdataset, gradio, playwright" \
    || { echo "setup_env: the environment is incomplete; see pip's output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# The browser test (tests/test_app_browser.py) drives Debian's chromium through Playwright: install it when it
# is missing and this can (root with apt-get); otherwise that test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup_env: installing chromium (apt-get) for the browser test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
      || echo "setup_env: apt-get could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup_env: chromium is missing (installing it needs root and apt-get): the browser test will be skipped" >&2
  fi
fi

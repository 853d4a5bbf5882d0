#!/usr/bin/env bash
# Set up knnlm in ./.venv on a fresh machine (idempotent): Python deps with the CPU build
# of torch pinned, the package in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.knnlm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"   # CPU build; unpinned torch pulls CUDA
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# A headless browser for the inspector page's tests (tests/test_page.py): Debian's chromium and
# its driver, installed when missing and we may (root with apt-get); elsewhere those tests skip.
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } \
      >/tmp/knnlm-setup-chromium.log 2>&1; then
    echo "setup: could not install chromium (see /tmp/knnlm-setup-chromium.log): the browser tests will skip" >&2
  fi
fi

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

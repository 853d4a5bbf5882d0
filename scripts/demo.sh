#!/usr/bin/env bash
# One command from a fresh clone to a kNN-LM: install, then `knnlm demo` on the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/knnlm demo "$@"

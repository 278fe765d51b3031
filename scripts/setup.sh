#!/usr/bin/env bash
# Create .venv and install the project with its development extras. Idempotent: reinstalls
# only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # The CPU build of torch first: a looser requirement could pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/pip install --quiet -e ".[dev]"
  touch "$stamp"
fi

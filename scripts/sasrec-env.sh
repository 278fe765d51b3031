#!/usr/bin/env bash
# Create .venv-sasrec: the interpreter bench/peers.py runs its SASRec peer in (rectools 0.19
# requires numpy < 2, which the service's own environment does not have).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv-sasrec/bin/python ]; then
  echo "creating .venv-sasrec"
  "$python" -m venv .venv-sasrec
fi
# The CPU build of torch first: a looser requirement could pull a multi-GB CUDA build.
.venv-sasrec/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv-sasrec/bin/pip install --quiet "numpy>=1.26,<2" "rectools[torch]==0.19.0"

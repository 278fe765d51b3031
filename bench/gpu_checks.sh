#!/usr/bin/env bash
# Every GPU path in a few minutes, on the device machine: two-tower training steps (both
# user towers) and the ranker's forward pass, each against the CPU in the same run, a FAISS
# GPU search, then the index lifecycle's GPU test. The image's python3 holds what
# bench/gpu_checks.py imports (torch, numpy, pandas, safetensors, tqdm); faiss-gpu, and
# whatever else a test needs, travels as wheels in .whl/ (carry it), installed below; the
# FAISS rows say so and skip without it.
#   bench/gpu_checks.sh            writes $OUT/gpu_checks.json and $OUT/gpu_checks.log
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_checks}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu_checks.log"
python3 bench/gpu_checks.py --json "$out/gpu_checks.json" 2>&1 | tee -a "$out/gpu_checks.log"
python3 -m pytest -q -p no:cacheprovider tests/test_index_lifecycle.py -k gpu 2>&1 \
  | tee -a "$out/gpu_checks.log"

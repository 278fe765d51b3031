#!/usr/bin/env bash
# Set up, train demo artifacts if none exist, and serve in embedded mode.
# DATASET=movielens-100k:../shared/data/movielens-100k scripts/run.sh trains on MovieLens.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
artifacts="${RECSYS_ARTIFACTS:-artifacts}"
.venv/bin/recsys train --if-missing --dataset "${DATASET:-synthetic}" --out "$artifacts"
exec .venv/bin/recsys serve --artifacts "$artifacts"

#!/usr/bin/env bash
# Lint and format check, as CI runs it (scripts/test.sh calls this first).
# Usage: scripts/lint.sh [--fix]   (--fix rewrites what ruff can: imports, formatting)
set -euo pipefail
cd "$(dirname "$0")/.."
ruff="${RUFF:-.venv/bin/ruff}"
if [ "${1:-}" = "--fix" ]; then
  "$ruff" check --fix .
  "$ruff" format .
else
  "$ruff" check .
  "$ruff" format --check .
fi

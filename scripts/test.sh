#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what the tests need (redis-server
# from Debian's packages, the Python environment), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing redis-server"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"

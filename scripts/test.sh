#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what the tests need (redis-server,
# openssl for the TLS test's certificates, chromium and chromium-driver for the inspector
# page's browser test, from Debian's packages; the Python environment), checks lint and
# formatting (scripts/lint.sh), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null || ! command -v openssl >/dev/null \
  || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing redis-server, openssl, chromium and chromium-driver"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server openssl chromium chromium-driver >/dev/null
fi
scripts/setup.sh
scripts/lint.sh
exec .venv/bin/python -m pytest "$@"

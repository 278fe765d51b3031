#!/usr/bin/env bash
# Generate the Python gRPC code under service/proto_gen/ from proto/.
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$out"
protos=$(cd proto && find . -name '*.proto' | sed 's|^\./|service/proto_gen/|' | sort)
# The virtual path maps proto/ onto service/proto_gen/, so generated imports are absolute.
"$python" -m grpc_tools.protoc -Iservice/proto_gen=proto \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" $protos
for d in service/proto_gen service/proto_gen/recsys service/proto_gen/recsys/v1; do : > "$out/$d/__init__.py"; done

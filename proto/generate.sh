#!/usr/bin/env bash
# Regenerates the Python stubs under client/kmsapi/ from proto/kmsapi/. The proto path mirrors the Python
# package path (proto/kmsapi/v1/x.proto -> kmsapi/v1/x_pb2.py), so the stubs import each other as
# `kmsapi.v1.x_pb2` with no sys.path tricks. Type stubs (.pyi) for messages and services come from
# mypy-protobuf, so servers and clients type-check under mypy --strict. The output is committed;
# tests/unit/test_proto_drift.py fails when it differs from what this script produces with the locked tools.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/client}
bin=$(dirname "$(command -v python)")
python -m grpc_tools.protoc -I"$root/proto" \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "$root"/proto/kmsapi/v1/*.proto
touch "$out/kmsapi/__init__.py" "$out/kmsapi/v1/__init__.py" "$out/kmsapi/py.typed"

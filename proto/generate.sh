#!/usr/bin/env bash
# Regenerates the Python stubs under client/kmsapi/ from proto/kmsapi/. The proto path mirrors the Python
# package path (proto/kmsapi/v1/x.proto -> kmsapi/v1/x_pb2.py), so the stubs import each other as
# `kmsapi.v1.x_pb2` with no sys.path tricks. The output is committed; tests/unit/test_proto_drift.py fails
# when it differs from what this script produces with the locked grpcio-tools.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/client}
python -m grpc_tools.protoc -I"$root/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root"/proto/kmsapi/v1/*.proto
touch "$out/kmsapi/__init__.py" "$out/kmsapi/v1/__init__.py" "$out/kmsapi/py.typed"

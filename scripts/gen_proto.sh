#!/usr/bin/env bash
# Regenerate the committed Python code for the wire contract: proto/pipeweaver/v1/*.proto ->
# pipeweaver/v1/*_pb2.py, *_pb2.pyi (mypy-protobuf), *_pb2_grpc.py and *_pb2_grpc.pyi.
# The output is deterministic; CI runs this and fails on `git diff --exit-code pipeweaver/v1`.
#
# Usage: scripts/gen_proto.sh            (uses .venv/bin/python if present, else python3)
#        GEN_PROTO_PYTHON=/path/to/python scripts/gen_proto.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${GEN_PROTO_PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The mypy-protobuf plugins are console scripts installed beside the interpreter (no need to activate a venv).
bin_dir="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
for plugin in protoc-gen-mypy protoc-gen-mypy_grpc; do
  if [[ ! -x "$bin_dir/$plugin" ]]; then
    echo "error: $bin_dir/$plugin not found; install the dev extra: pip install -e '.[dev]'" >&2
    exit 1
  fi
done

out=pipeweaver/v1
# Start clean so a renamed or deleted .proto leaves no stale module behind; __init__.py is hand-written.
find "$out" -maxdepth 1 -name '*_pb2*.py*' -delete

# Sorted input list: protoc output does not depend on the shell's glob order or locale.
mapfile -t protos < <(find proto/pipeweaver/v1 -name '*.proto' | LC_ALL=C sort)

"$PYTHON" -m grpc_tools.protoc \
  -Iproto \
  --plugin=protoc-gen-mypy="$bin_dir/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bin_dir/protoc-gen-mypy_grpc" \
  --python_out=. \
  --mypy_out=. \
  --grpc_python_out=. \
  --mypy_grpc_out=. \
  "${protos[@]}"

echo "regenerated: $(find "$out" -maxdepth 1 -name '*_pb2*.py*' | LC_ALL=C sort | tr '\n' ' ')"

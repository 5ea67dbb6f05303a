#!/usr/bin/env bash
# The device command of the 4-GPU end-to-end comparison (issue 10), from the repository root:
#
#   bash benchmarks/gpu/run_e2e.sh [more e2e_compare.py flags]        # carry: [".whl"]  (benchmarks/gpu/fetch_wheels.sh)
#
# Installs the sidecar's wheels (.whl/, no index), sets the environment (NVLink multicast off for NCCL, torch and
# the sidecar alike), and runs e2e_compare.py on 4 GPUs. Results: $OUT/e2e.json and $OUT/e2e_traces/. The script's
# own deadline (--total-s, 400 s from its start) and this timeout keep the whole call under about 8 minutes; the
# JSON is rewritten after every schedule, so a cut run still leaves what it measured. Files back: e2e.json, e2e.log,
# e2e_traces/{pipeweaver,interleaved-1f1b}_it3.trace.json.gz, e2e_traces/sidecar.log (the device returns 8 at most).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/e2e_out}
mkdir -p "$OUT"

t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v -e "Running pip as the 'root' user" -e "^$"
export PYTHONPATH=/tmp/site:$PWD
echo "wheels: $(( $(date +%s) - t0 )) s; $(python3 -c 'import grpc, google.protobuf as p, ortools as o; print("grpcio", grpc.__version__, "protobuf", p.__version__, "ortools", o.__version__)')"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OMP_NUM_THREADS=4
export NUMBA_CACHE_DIR=/tmp/numba-cache  # the sidecar's compiled kernels (a fresh machine compiles them once)
export GLOO_SOCKET_IFNAME=lo  # the gloo group (objects, waits) stays on loopback: one host, no outside network

export PYTHONUNBUFFERED=1
timeout --signal=TERM --kill-after=15 455 python3 -m torch.distributed.run --nproc-per-node 4 \
  benchmarks/gpu/e2e_compare.py --out "$OUT/e2e.json" "$@" 2>&1 | tee "$OUT/e2e.log"
rc=${PIPESTATUS[0]}
echo "e2e_compare exit $rc after $(( $(date +%s) - t0 )) s"
ls -la "$OUT" "$OUT/e2e_traces" 2>/dev/null | tail -n 20
exit $rc

#!/usr/bin/env bash
# The device command of the 4-GPU end-to-end comparison (issue 10), from the repository root:
#
#   bash benchmarks/gpu/run_e2e.sh --total-s 330 [more e2e_compare.py flags]   # carry: [".whl"]  (fetch_wheels.sh)
#
# Installs the sidecar's wheels (.whl/, no index), sets the environment (NVLink multicast off for NCCL, torch and
# the sidecar alike), and runs e2e_compare.py on 4 GPUs. Results: $OUT/e2e.json and $OUT/e2e_traces/.
# Time: the script's own deadline (--total-s, from its start) ends a normal run; the whole call, relaunches
# included, stays within E2E_WALL_S (default 455 s from this script's start: about 8 minutes with the machine's
# start and the transfers). The JSON is rewritten after every schedule and on the way out, so a cut run still leaves
# what it measured.
# Relaunch: when e2e_compare ends early on purpose (75: a hung schedule, by its watchdog; 76: an iteration failed
# part way; 143: SIGTERM, e.g. another rank died) and its JSON still lists pending schedules, they run again in a
# fresh job with --resume (the hung schedule is not tried again), while at least 75 s are left.
# Files back: e2e.json, e2e.log, e2e_traces/{pipeweaver,interleaved-1f1b}_it3.trace.json.gz, e2e_traces/sidecar.log
# (the device returns 8 at most).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/e2e_out}
WALL=${E2E_WALL_S:-455}
mkdir -p "$OUT"

t0=$(date +%s)
end=$((t0 + WALL))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v -e "Running pip as the 'root' user" -e "^$"
export PYTHONPATH=/tmp/site:$PWD
echo "wheels: $(( $(date +%s) - t0 )) s; $(python3 -c 'import grpc, google.protobuf as p, ortools as o; print("grpcio", grpc.__version__, "protobuf", p.__version__, "ortools", o.__version__)')"

# Every kernel loaded when the context starts: a lazy first load mid-iteration waits for the GPU to drain, which
# NCCL receives waiting on a peer never do (pipeweaver/client/cuda_env.py).
export CUDA_MODULE_LOADING=EAGER
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Stream-ordered allocation: a cudaMalloc (or an expandable segment growing) synchronizes the device, which waits
# for NCCL receives whose peers may be waiting for this rank (pipeweaver/client/cuda_env.py).
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync OMP_NUM_THREADS=4
export PATH=/tmp/site/bin:$PATH  # py-spy, for the watchdog
export NUMBA_CACHE_DIR=/tmp/numba-cache  # the sidecar's compiled kernels (a fresh machine compiles them once)
export GLOO_SOCKET_IFNAME=lo  # the gloo group (objects, waits) stays on loopback: one host, no outside network

export PYTHONUNBUFFERED=1
: >"$OUT/e2e.log"
extra=()
attempt=1
last_pending=""
while :; do
  left=$((end - $(date +%s)))
  timeout --signal=TERM --kill-after=15 "$left" python3 -m torch.distributed.run --nproc-per-node 4 \
    benchmarks/gpu/e2e_compare.py --out "$OUT/e2e.json" "$@" ${extra[@]+"${extra[@]}"} 2>&1 | tee -a "$OUT/e2e.log"
  rc=${PIPESTATUS[0]}
  echo "e2e_compare attempt $attempt exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/e2e.log"
  [ "$rc" -eq 0 ] && break
  pending=$(python3 -c 'import json, sys; print(",".join(json.load(open(sys.argv[1])).get("pending") or []))' \
    "$OUT/e2e.json" 2>/dev/null || true)
  left=$((end - $(date +%s)))
  if [ -z "$pending" ] || [ "$pending" = "$last_pending" ] || [ "$left" -lt 75 ]; then
    break
  fi
  last_pending=$pending
  attempt=$((attempt + 1))
  echo "relaunching with --resume for $pending, $left s left" | tee -a "$OUT/e2e.log"
  extra=(--resume --total-s $((left - 25)))
done
ls -la "$OUT" "$OUT/e2e_traces" 2>/dev/null | tail -n 20
exit "$rc"

"""End-to-end dynamic trace on pp GPUs (issue 10): PipelineExecutor running precomputed plans, vs SEMU.

    torchrun --nproc-per-node 4 benchmarks/gpu/e2e_dynamic.py --plans benchmarks/gpu/data/e2e_plans.json.gz \
        --schedule pipeweaver --out $OUT/e2e_pipeweaver.json

Plans (PipeWeaver's and the baselines', one per iteration of the dynamic trace) come from `e2e_plans.py`, run on
CPU beforehand (the GPU image has no ortools); batches are rebuilt from the JSON (not resampled). One schedule
per process group: an OOM in one schedule does not lose the others. Each iteration: barrier, synchronize, t0,
`run_iteration(plan, batch)` (plan check, synthetic inputs, compute, p2p, synchronize), t1; max over ranks.
Warm-up: `--warmup` iterations of the first plans, not counted. bf16 parameters and activations, no optimizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bare_client  # noqa: F401  (before pipeweaver.client: no grpc on the GPU image)
from e2e_workload import SCALED_WORKLOADS
from executor_overhead import env_info

from pipeweaver.client.executor import PipelineExecutor
from pipeweaver.plan.export import plan_from_dict
from pipeweaver.spec.batch import BatchMetadata, Document, MediaItem, Microbatch
from pipeweaver.spec.model import Modality


def batch_from_json(d: dict[str, Any]) -> BatchMetadata:
    return BatchMetadata(
        iteration=int(d["iteration"]),
        dp_replica=int(d["dp_replica"]),
        microbatches=tuple(
            Microbatch(
                tuple(
                    Document(
                        text_tokens=int(t), media=tuple(MediaItem(Modality(m), int(n), int(k)) for m, n, k in media)
                    )
                    for t, media in mb
                )
            )
            for mb in d["microbatches"]
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", required=True)
    ap.add_argument("--schedule", required=True)
    ap.add_argument("--iterations", type=int, default=0, help="0: every iteration in the plans file")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="fast", choices=["fast", "reference"])
    ap.add_argument("--pg-timeout-s", type=float, default=45.0, help="NCCL timeout: a hung p2p aborts with a dump")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.attention == "fast":
        from fast_attention import use_fast_attention

        use_fast_attention()

    with gzip.open(args.plans, "rt") as f:
        data = json.load(f)
    build = SCALED_WORKLOADS[str(data.get("workload_key", "vlm"))]  # files from before --workload: the VLM
    wl = build(microbatches=int(data["microbatches"]), tiny=bool(data["tiny"]))
    entries = data["iterations"][: args.iterations or None]

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timedelta(seconds=args.pg_timeout_s)
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != wl.parallel.pp:
        raise SystemExit(f"run with {wl.parallel.pp} ranks (the plans' pp), not {world}")
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

    t_load = time.perf_counter()
    batches = [batch_from_json(e["batch"]) for e in entries]
    plans = [plan_from_dict(e["plans"][args.schedule]) for e in entries]
    load_s = time.perf_counter() - t_load
    placement = plans[0].header.placement
    assert all(p.header.placement == placement for p in plans)
    ex = PipelineExecutor(wl.model, placement, rank, device=device, dtype=dtype)
    ex.warm_up()

    def timed(k: int) -> tuple[float, float]:
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stats = ex.run_iteration(plans[k], batches[k])
        if cuda:
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - t0) * 1e3
        x = torch.tensor([ms, stats.loss], dtype=torch.float64, device=device)
        y = x[:1].clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX)
        dist.all_reduce(x)
        return float(y), float(x[1])

    for k in range(min(args.warmup, len(plans))):
        ms, _ = timed(k)
        if rank == 0:
            print(json.dumps({"schedule": args.schedule, "warmup": k, "ms": round(ms, 1)}), flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rows: list[dict[str, Any]] = []
    for k in range(len(plans)):
        ms, loss = timed(k)
        pred = float(entries[k]["predicted_ms"][args.schedule])
        rows.append(
            {"iteration": k, "measured_ms": round(ms, 3), "predicted_ms": round(pred, 3), "loss": round(loss, 5)}
        )
        if rank == 0:
            print(json.dumps({"schedule": args.schedule, **rows[-1]}), flush=True)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    mems = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(mems, torch.tensor([mem], dtype=torch.float64, device=device))
    measured = [r["measured_ms"] for r in rows]
    predicted = [r["predicted_ms"] for r in rows]
    ape = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]
    peak_pred = [max(e["predicted_peak_gib"][args.schedule][r] for e in entries) for r in range(world)]
    result = {
        "benchmark": "e2e_dynamic",
        "env": env_info(device),
        "schedule": args.schedule,
        "attention": args.attention,
        "workload": wl.name,
        "plans_file": {k: data[k] for k in ("hardware", "calibration", "budget_ms", "date", "command", "seed")},
        "iterations": len(rows),
        "warmup": args.warmup,
        "measured_mean_ms": statistics.fmean(measured),
        "measured_median_ms": statistics.median(measured),
        "measured_total_s": sum(measured) / 1e3,
        "predicted_mean_ms": statistics.fmean(predicted),
        "predicted_total_s": sum(predicted) / 1e3,
        "semu_mape_pct": 100.0 * statistics.fmean(ape),
        "semu_mean_signed_err_pct": 100.0
        * statistics.fmean((p - m) / m for p, m in zip(predicted, measured, strict=True)),
        "peak_mem_gib_per_rank": [float(m) for m in mems],
        "predicted_peak_gib_per_rank": peak_pred,
        "plan_load_s": load_s,
        "rows": rows,
    }
    if rank == 0:
        brief = {k: v for k, v in result.items() if k not in ("rows", "env", "plans_file")}
        print(json.dumps(brief), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

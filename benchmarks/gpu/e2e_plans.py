"""Precompute the end-to-end run's plans on CPU (issue 10): PipeWeaver plans and baseline plans, with SEMU's
predictions, for N iterations of the dynamic trace. The GPU image has no ortools, so the Planner runs here.

    .venv/bin/python benchmarks/gpu/e2e_plans.py --out benchmarks/gpu/data/e2e_plans.json.gz
    .venv/bin/python benchmarks/gpu/e2e_plans.py --tiny --iterations 4 --out /tmp/e2e_tiny.json.gz

`--workload`: a key of `e2e_workload.SCALED_WORKLOADS` (default `vlm`). SEMU uses the workload's planning hardware
with efficiency factors fitted (`calibration.fit_factors`) on
benchmarks/results/layer_profile_h100.json (profile_layers.py on an H100, torch 2.11). The prediction stored for a
baseline is SEMU's simulation of exactly the plan the executor runs (no recompute); for PipeWeaver it is the
planner's `predicted_ms` of the compiled plan (its own recompute choices).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_workload import BASELINES, SCALED_WORKLOADS

from pipeweaver.datagen import describe, dynamic_batch
from pipeweaver.plan.export import plan_to_dict
from pipeweaver.search.baselines import build_baseline_plan
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.simulator.calibration import fit_factors, load_profile
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.hardware import CPU

ROOT = Path(__file__).resolve().parents[2]


def batch_to_json(batch: BatchMetadata) -> dict[str, Any]:
    return {
        "iteration": batch.iteration,
        "dp_replica": batch.dp_replica,
        "microbatches": [
            [[d.text_tokens, [[m.modality.value, m.tokens, m.merged_tokens] for m in d.media]] for d in mb.documents]
            for mb in batch.microbatches
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-ms", type=float, default=1000.0)
    ap.add_argument("--profile", default=str(ROOT / "benchmarks/results/layer_profile_h100.json"))
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--workload", default="vlm", choices=sorted(SCALED_WORKLOADS), help="e2e_workload.py's model")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    wl = SCALED_WORKLOADS[args.workload](microbatches=args.microbatches, tiny=args.tiny)
    if args.tiny:
        hardware, factors, calibration = CPU, None, "uncalibrated (cpu preset)"
    else:
        hardware = wl.hardware
        factors = fit_factors(load_profile(args.profile).rows, hardware)
        calibration = os.path.relpath(args.profile, ROOT)
    planner = Planner(
        wl.model, wl.parallel, hardware, factors=factors,
        config=SearchConfig(budget_ms=args.budget_ms, compare_baselines=BASELINES),
    )  # fmt: skip
    out: dict[str, Any] = {
        "format": "pipeweaver.e2e_plans/1",
        "workload": wl.name,
        "workload_key": args.workload,
        "tiny": args.tiny,
        "microbatches": args.microbatches,
        "seed": args.seed,
        "hardware": hardware.name,
        "calibration": calibration,
        "budget_ms": args.budget_ms,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "iterations": [],
    }
    placement = None
    for k in range(args.iterations):
        batch = dynamic_batch(wl, seed=args.seed, iteration=k)
        t0 = time.perf_counter()
        res = planner.plan(batch)
        plan_s = time.perf_counter() - t0
        if placement is None:
            placement = res.plan.header.placement
        assert res.plan.header.placement == placement, "PipeWeaver's placement changed between iterations"
        entry: dict[str, Any] = {
            "iteration": k,
            "batch": batch_to_json(batch),
            "summary": {
                kk: v
                for kk, v in describe(batch).items()
                if kk in ("documents", "images", "text_tokens", "image_tokens", "text_only_microbatches")
            },
            "plans": {"pipeweaver": plan_to_dict(res.plan)},
            "predicted_ms": {"pipeweaver": res.predicted_ms},
            "predicted_peak_gib": {"pipeweaver": [x / 2**30 for x in res.peak_memory_bytes]},
            "semu_baseline_ms_with_recompute_fit": res.baseline_ms,
            "lower_bound_ms": res.lower_bound_ms,
            "search_ms": res.search_ms,
            "plan_wall_s": plan_s,
        }
        for name in BASELINES:
            plan = build_baseline_plan(
                name, model=wl.model, parallel=wl.parallel, batch=batch, tensors_dtype="bfloat16"
            )
            sim = planner.simulate_plan(plan, batch)
            entry["plans"][name] = plan_to_dict(plan)
            entry["predicted_ms"][name] = sim.makespan_ms
            entry["predicted_peak_gib"][name] = [float(x) / 2**30 for x in sim.peak_memory_bytes]
        out["iterations"].append(entry)
        brief = {
            "iteration": k,
            **entry["summary"],
            "predicted_ms": {n: round(v, 1) for n, v in entry["predicted_ms"].items()},
            "peak_gib": {n: round(max(v), 1) for n, v in entry["predicted_peak_gib"].items()},
            "search_ms": round(res.search_ms),
        }
        print(json.dumps(brief), flush=True)
    planner.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt") as f:
        json.dump(out, f)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

"""More search workers, same budget: does the planner find plans at least as good, and how many more interleavings?

The issue's rule for the parallel search (`SearchConfig.workers`, `pipeweaver/search/parallel.py`): more workers
must find better or equal plans in the same time. This plans the same sampled batches of each workload once per
worker count, at one budget, with the full search (every level) and no baselines, and reports per worker count the
mean predicted iteration time, the interleavings evaluated (MCTS rollouts, all workers together) and the wall time
per plan, with each batch's ratio to one worker. Each planner plans one unmeasured batch first, so that the
measured plans find warm kernels and a warm pool, as in the service.

Meant for a many-core host (on 2 cores a second worker competes with the main process):

    python benchmarks/bench_search_workers.py --workloads vlm-s,t2v-s --batches 4 --budget-ms 1000 \\
        --workers 1,4,14 --out benchmarks/results/search_workers_16core.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pipeweaver.datagen import sample_batch
from pipeweaver.presets import workload
from pipeweaver.search.planner import Planner, SearchConfig

WARM_ITERATION = 10_000
"""The unmeasured batch each planner plans first (not one of the measured iterations)."""


def plan_all(name: str, workers: int, iterations: list[int], budget_ms: float, repeats: int) -> list[dict[str, Any]]:
    w = workload(name)
    config = SearchConfig(budget_ms=budget_ms, compare_baselines=(), workers=workers)
    planner = Planner(w.model, w.parallel, w.hardware, config=config)  # spawns and warms its workers now
    rows = []
    try:
        planner.plan(sample_batch(w, seed=0, iteration=WARM_ITERATION))
        for i in [i for i in iterations for _ in range(repeats)]:
            t0 = time.perf_counter()
            result = planner.plan(sample_batch(w, seed=0, iteration=i))
            rows.append(
                {
                    "iteration": i,
                    "predicted_ms": round(result.predicted_ms, 3),
                    "lower_bound_ms": round(result.lower_bound_ms, 3),
                    "evaluations": result.evaluations,
                    "wall_ms": round((time.perf_counter() - t0) * 1e3, 1),
                    "start": result.start,
                }
            )
            print(name, f"workers={workers}", json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        planner.close()
    return rows


def summarize(by_workers: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    # A repeated batch is compared with the reference's first plan of it.
    one: dict[int, float] = {}
    for r in by_workers[min(by_workers)]:
        one.setdefault(r["iteration"], r["predicted_ms"])
    out: dict[str, Any] = {}
    for workers, rows in by_workers.items():
        ratios = [r["predicted_ms"] / one[r["iteration"]] for r in rows]
        out[str(workers)] = {
            "mean_predicted_ms": round(statistics.fmean(r["predicted_ms"] for r in rows), 2),
            "mean_gap_to_bound": round(statistics.fmean(r["predicted_ms"] / r["lower_bound_ms"] - 1 for r in rows), 4),
            "mean_evaluations": round(statistics.fmean(r["evaluations"] for r in rows), 1),
            "mean_wall_ms": round(statistics.fmean(r["wall_ms"] for r in rows), 1),
            "ratio_to_fewest_workers": {
                "mean": round(statistics.fmean(ratios), 4),
                "worst": round(max(ratios), 4),
                "batches_worse": sum(x > 1.0 + 1e-9 for x in ratios),
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="vlm-s,t2v-s")
    parser.add_argument("--batches", type=int, default=4, help="iterations 0 .. N-1 of the workload's trace")
    parser.add_argument("--iterations", help="comma-separated iterations instead of --batches")
    parser.add_argument("--repeats", type=int, default=1, help="plans of each batch per worker count")
    parser.add_argument("--budget-ms", type=float, default=1000.0)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (the first is the reference)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        counts = [int(x) for x in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers {args.workers!r}: comma-separated positive integers, e.g. 1,4,14")
    if not counts or min(counts) < 1:
        parser.error(f"--workers {args.workers!r}: every count must be at least 1")
    if args.batches < 1:
        parser.error(f"--batches {args.batches}: at least 1")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    try:
        iterations = [int(x) for x in args.iterations.split(",")] if args.iterations else list(range(args.batches))
    except ValueError:
        parser.error(f"--iterations {args.iterations!r}: comma-separated integers, e.g. 0,1,2")
    names = args.workloads.split(",")
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_search_workers.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "machine": platform.processor() or platform.machine(),
        "budget_ms": args.budget_ms,
        "workloads": {},
    }
    for name in names:
        by_workers = {n: plan_all(name, n, iterations, args.budget_ms, args.repeats) for n in counts}
        report["workloads"][name] = {
            "summary": summarize(by_workers),
            "plans": {str(n): r for n, r in by_workers.items()},
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

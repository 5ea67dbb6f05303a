"""Planning latency (issue 5): wall time of `Planner.plan` per batch of the dynamic trace, everything included.

Target on 2 cores: p50 <= 1 s and p99 <= 3 s for vlm-s; vlm-l and t2v-l reported. Each workload gets one planner
(created once per job, as the service does; its construction is reported apart), one warm-up plan on a batch
outside the measured ones (the service warms its workers the same way; the cold plan's time is reported too),
then `Planner.plan` on iterations 0..N-1 of `pipeweaver.datagen.dynamic_trace` (seed 0), timed from the call to
its return: preparation, search, memory programs, compile, SEMU simulation, validation and the baseline
comparison. Two runs per workload: without baselines (the plan alone: `pipeweaver plan`, `pipeweaver bench`) and
with `1f1b`, the one the planner service compares every plan with by default (`--baselines` to change).

    .venv/bin/python benchmarks/bench_planning_latency.py [--quick] [--budget-ms MS] [--out PATH]

Writes benchmarks/results/planning_latency.json by default. On a machine shared with other work, read the load
averages recorded with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeweaver.datagen import dynamic_batch
from pipeweaver.presets import workload
from pipeweaver.search.planner import Planner, SearchConfig

DEFAULT_BUDGET_MS = 700.0
FULL = {"vlm-s": 40, "vlm-l": 6, "t2v-l": 10}
QUICK = {"vlm-s": 30, "vlm-l": 2, "t2v-l": 3}


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 1),
        "p90": round(float(np.percentile(a, 90)), 1),
        "p99": round(float(np.percentile(a, 99)), 1),
        "max": round(float(a.max()), 1),
        "mean": round(float(a.mean()), 1),
    }


def run_workload(name: str, batches: int, budget_ms: float, baselines: tuple[str, ...], seed: int) -> dict[str, Any]:
    w = workload(name)
    t0 = time.perf_counter()
    planner = Planner(
        w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=budget_ms, compare_baselines=baselines)
    )
    construct_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    planner.plan(dynamic_batch(w, seed=seed, iteration=batches))  # warm-up: numba kernels, SEMU's cost cache
    cold_ms = (time.perf_counter() - t0) * 1e3
    rows = []
    load_before = os.getloadavg()
    for i in range(batches):
        batch = dynamic_batch(w, seed=seed, iteration=i)
        t0 = time.perf_counter()
        result = planner.plan(batch)
        wall = (time.perf_counter() - t0) * 1e3
        rows.append(
            {
                "iteration": i,
                "wall_ms": round(wall, 1),
                "search_ms": round(result.search_ms, 1),
                "rollouts": result.evaluations,
                "actions": sum(len(rp.actions) for rp in result.plan.ranks),
                "predicted_ms": round(result.predicted_ms, 2),
                "lower_bound_ms": round(result.lower_bound_ms, 2),
                "memory_solve_ms": [round(t, 2) for t in result.memory_solve_ms],
            }
        )
        print(f"{name} {i}: {wall:.0f} ms, {result.evaluations} rollouts", file=sys.stderr)
    planner.close()
    walls = [r["wall_ms"] for r in rows]
    solves = [t for r in rows for t in r["memory_solve_ms"]]
    return {
        "batches": batches,
        "planner_construction_ms": round(construct_ms, 1),
        "cold_plan_ms": round(cold_ms, 1),
        "wall_ms": _percentiles(walls),
        "search_ms": _percentiles([r["search_ms"] for r in rows]),
        "rollouts_mean": round(statistics.fmean(r["rollouts"] for r in rows), 1),
        "predicted_mean_ms": round(statistics.fmean(r["predicted_ms"] for r in rows), 2),
        "memory_programs": {
            "count": len(solves),
            "median_ms": round(statistics.median(solves), 2) if solves else None,
            "p90_ms": round(float(np.percentile(solves, 90)), 2) if solves else None,
        },
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"fewer batches: {QUICK}")
    parser.add_argument("--budget-ms", type=float, default=DEFAULT_BUDGET_MS)
    parser.add_argument(
        "--baselines", default=";1f1b", help="baseline sets, semicolon-separated, each comma-separated (empty: none)"
    )
    parser.add_argument("--workloads", default=",".join(FULL), help="comma-separated workloads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, help="batches per workload (default: by workload, see --quick)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/planning_latency.json"))
    args = parser.parse_args()
    counts = QUICK if args.quick else FULL
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "git": _git(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "budget_ms": args.budget_ms,
        "trace": f"pipeweaver.datagen.dynamic_batch(seed={args.seed}, iteration=0..N-1)",
        "runs": [],
    }
    for spec in args.baselines.split(";"):
        baselines = tuple(b for b in spec.split(",") if b)
        run: dict[str, Any] = {"compare_baselines": list(baselines), "workloads": {}}
        report["runs"].append(run)
        for name in args.workloads.split(","):
            batches = args.batches or counts.get(name, 10)
            run["workloads"][name] = run_workload(name, batches, args.budget_ms, baselines, args.seed)
            summary = {k: v for k, v in run["workloads"][name].items() if k != "rows"}
            print(name, list(baselines), json.dumps(summary), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

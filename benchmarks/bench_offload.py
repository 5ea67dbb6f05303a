"""Activation offloading side by side: the planner without and with it, on the same batches (SEMU, CPU).

    .venv/bin/python benchmarks/bench_offload.py [--workload t2v-s] [--batches 4] [--configs base,26,50]
        [--host-memory-gb 200] [--out FILE]

Per i.i.d. batch (seed 0, iterations 0..N-1: the batches of `pipeweaver bench --batches N`) of the workload, with
the H800 model and a 700 ms budget (`--budget-ms`), `Planner.plan` is run under each configuration: ``base`` (no
offloading) and ``G`` (offloading on, a host link of G GB/s per GPU and direction). Each row has the predicted
makespan, the lower bound (with offload strategies in its memory argument when offloading is on), the peak device
memory, the pinned host memory the plan needs per GPU (``host_peak_gb``; the planner refuses plans above ``--host-
memory-gb``), the time the busiest rank's host link spends copying each way (``d2h_s``), the stage pairs offloaded,
and the starting point the search refined. Baselines are not simulated (`pipeweaver bench --offload` does that).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeweaver.datagen import sample_batch
from pipeweaver.presets import workload
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.spec.hardware import GB


def run(name: str, batches: int, configs: list[str], host_memory_gb: float, budget_ms: float = 700) -> dict[str, Any]:
    w = workload(name)
    report: dict[str, Any] = {"workload": name, "batches": batches, "budget_ms": budget_ms, "runs": {}}
    for config in configs:
        offload = config != "base"
        hardware = replace(w.hardware, host_memory_bytes=host_memory_gb * GB)
        if offload:
            hardware = replace(hardware, host_link_bandwidth=float(config) * GB)
        planner = Planner(
            w.model,
            w.parallel,
            hardware,
            config=SearchConfig(budget_ms=budget_ms, compare_baselines=(), offload=offload),
        )
        rows = []
        for i in range(batches):
            batch = sample_batch(w, seed=0, iteration=i)
            t0 = time.perf_counter()
            result = planner.plan(batch)
            sim = result.simulation
            assert sim is not None
            host = sim.host_peak_bytes
            rows.append(
                {
                    "iteration": i,
                    "predicted_ms": round(result.predicted_ms, 3),
                    "lower_bound_ms": round(result.lower_bound_ms, 3),
                    "peak_memory_gb": round(max(result.peak_memory_bytes) / GB, 2),
                    "host_peak_gb": round(float(np.max(host)) / GB, 1) if host is not None else 0.0,
                    "d2h_s": round(float(np.max(sim.host_copy_ms)) / 1e3, 2) if sim.host_copy_ms is not None else 0.0,
                    "offloaded_pairs": len(result.plan.offloaded()),
                    "start": result.start,
                    "wall_s": round(time.perf_counter() - t0, 2),
                }
            )
            print(config, rows[-1], file=sys.stderr, flush=True)
        planner.close()
        predicted = float(np.mean([r["predicted_ms"] for r in rows]))
        bound = float(np.mean([r["lower_bound_ms"] for r in rows]))
        report["runs"][config] = {
            "host_link_gbps": None if not offload else float(config),
            "mean_predicted_ms": round(predicted, 3),
            "mean_lower_bound_ms": round(bound, 3),
            "gap_to_lower_bound": round(predicted / bound - 1, 4),
            "rows": rows,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="t2v-s")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--configs", default="base,26,50", help="comma list: base and host link GB/s values")
    parser.add_argument("--host-memory-gb", type=float, default=200.0, help="pinned host memory per GPU")
    parser.add_argument("--budget-ms", type=float, default=700.0, help="the search budget per batch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = run(args.workload, args.batches, args.configs.split(","), args.host_memory_gb, args.budget_ms)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    for config, r in report["runs"].items():
        print(
            f"{config}: mean {r['mean_predicted_ms'] / 1e3:.3f} s, bound {r['mean_lower_bound_ms'] / 1e3:.3f} s, "
            f"gap {r['gap_to_lower_bound']:.1%}"
        )


if __name__ == "__main__":
    main()

"""SEMU's spatial-temporal reuse cache over a dynamic trace: hit rate per iteration and cumulatively.

One `Planner` (one `StageCostCache`) plans the costs of 100 iterations of the vlm-s dynamic trace (the image load
rises and falls like the paper's Fig. 8b). Spatial reuse: identical layers, chunks and ranks are costed once;
temporal reuse: token signatures repeat across rollouts and iterations.

    .venv/bin/python benchmarks/bench_reuse.py [--workload vlm-s] [--iterations 100]
"""

from __future__ import annotations

import argparse
import json
import time

from pipeweaver.datagen import dynamic_batch
from pipeweaver.plan.ir import PlanSource, Recompute
from pipeweaver.presets import workload
from pipeweaver.search.planner import Planner, SearchConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="vlm-s")
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    w = workload(args.workload)
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(compare_baselines=()))
    cache = planner.cache
    per_iteration = []
    t0 = time.perf_counter()
    for i in range(args.iterations):
        batch = dynamic_batch(w, seed=0, iteration=i)
        h0, m0 = cache.hits, cache.misses
        header = planner.header_for(batch, job_id="", source=PlanSource.SEARCH, schedule="bench")
        for rc in Recompute:  # what one plan() costs: every stage under every strategy
            planner.cost.header_costs(header, batch, rc)
        hits, misses = cache.hits - h0, cache.misses - m0
        per_iteration.append(round(hits / (hits + misses), 4) if hits + misses else 0.0)
    elapsed = time.perf_counter() - t0
    report = {
        "workload": w.name,
        "iterations": args.iterations,
        "cumulative_hit_rate": round(cache.hit_rate, 4),
        "first_iteration_hit_rate": per_iteration[0],
        "last_10_mean_hit_rate": round(sum(per_iteration[-10:]) / min(10, len(per_iteration)), 4),
        "per_iteration_hit_rate": per_iteration,
        "entries": len(cache),
        "seconds": round(elapsed, 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()

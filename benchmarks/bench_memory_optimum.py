"""Where memory binds, how far is the optimum from the lower bound? Reduced T2V instances solved by CP-SAT (CPU).

    .venv/bin/python benchmarks/bench_memory_optimum.py [--workload t2v-s] [--microbatches 4] [--seeds 0,1,2] \
        [--fractions 0.5,0.75] [--time-limit-s 120] [--out FILE]

The planner's gap to the lower bound is large exactly where device memory binds (t2v-s, t2v-l, vlm-l), and the
bound's memory argument is a fluid relaxation (`pipeweaver.search.bounds`, argument 3). Is the gap the search's or
the bound's? On instances small enough for CP-SAT to solve with memory (the workload's stage costs and strategies,
`--microbatches` microbatches of its data mix), this reports for each seed and memory fraction:

- ``bound_ms``: the planner's lower bound (all three arguments);
- ``cp_best_ms`` and ``cp_lower_ms``: CP-SAT on the interleaving problem with per-pair strategies (none,
  selective, full recompute) and each rank's activations within its budget at every instant
  (`bounds.exact_makespan`, 2 workers, `--time-limit-s`): its best schedule and its own proven bound, so the
  optimum lies between them (equal when ``proven_optimal``);
- ``planned_ms``: `Planner.plan` at 700 ms, SEMU's makespan (which also queues transfers on links, so it can only
  be above the same schedule's interleaved makespan).

``recompute_per_rank``: per rank, how many stage pairs run under each strategy in CP-SAT's best schedule and in
the planner's plan.

Ratios: ``cp_lower_over_bound`` (the optimum is at least this far above our bound: how loose the bound is, proven),
``planned_over_cp_lower`` (the planner is at most this far above the optimum) and ``planned_over_cp_best``.

The memory is set so that it binds: the device holds the fullest rank's static bytes plus `fraction` of the largest
activation peak of the unconstrained schedule without recompute (SEMU's peak, the planner with 10x memory).
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
from pipeweaver.plan.ir import PlanSource, Recompute
from pipeweaver.presets import workload
from pipeweaver.search.bounds import _pairs, exact_makespan, lower_bound_parts
from pipeweaver.search.planner import STRATEGIES, Planner, recompute_map


def one(name: str, microbatches: int, seed: int, fraction: float, time_limit_s: float) -> dict[str, Any]:
    w = workload(name)
    w = replace(w, parallel=replace(w.parallel, microbatches=microbatches))
    batch = sample_batch(w, seed=seed, iteration=0)
    roomy = Planner(w.model, w.parallel, replace(w.hardware, memory_bytes=10 * w.hardware.memory_bytes))
    free = roomy.plan(batch, budget_ms=700)
    static = np.array(roomy.partition.static_memory_bytes)
    assert free.simulation is not None
    activations = np.asarray(free.simulation.peak_memory_bytes) - static
    memory = float(static.max() + fraction * activations.max())
    planner = Planner(w.model, w.parallel, replace(w.hardware, memory_bytes=memory))
    planned = planner.plan(batch, budget_ms=700)
    header = planner.header_for(batch, job_id="", source=PlanSource.SEARCH, schedule="pipeweaver")
    prep = planner._prepare(batch, header, Recompute.NONE)
    planner._pairs(prep, batch)
    n = len(prep.pairs.keys) if prep.pairs is not None else 0
    uniform = [planner._problem_for(prep, np.full(n, code, dtype=np.int64)) for code in range(len(STRATEGIES))]
    cap = planner._device_budget_bytes().tolist()
    parts = lower_bound_parts(prep.problem, uniform, cap)
    t = time.perf_counter()
    cp = exact_makespan(prep.problem, time_limit_s=time_limit_s, workers=2, strategies=uniform, cap_bytes=cap)
    solve_s = time.perf_counter() - t
    p = prep.problem
    pairs = _pairs(p)
    planned_map = recompute_map(planned.plan)
    counts: list[dict[str, dict[str, int]]] = []
    for r in range(p.pp):
        cp_count: dict[str, int] = {rc.value: 0 for rc in STRATEGIES}
        plan_count: dict[str, int] = {rc.value: 0 for rc in STRATEGIES}
        for k in np.flatnonzero(p.rank[pairs.forward] == r):
            s = p.stages[pairs.forward[k]]
            cp_count[STRATEGIES[cp.strategy[k]].value] += 1
            plan_count[planned_map.get((s.pipeline, s.chunk, s.microbatch, s.sub), Recompute.NONE).value] += 1
        counts.append({"cp_sat": cp_count, "planner": plan_count})
    return {
        "workload": name,
        "microbatches": microbatches,
        "seed": seed,
        "memory_fraction": fraction,
        "stages": prep.problem.n,
        "device_gb": round(memory / 1e9, 2),
        "unconstrained_ms": round(free.predicted_ms, 1),
        "bound_ms": round(parts.best_ms, 1),
        "bound_parts_ms": {
            "chain": round(parts.chain_ms, 1),
            "rank": round(parts.rank_ms, 1),
            "memory": round(parts.memory_ms, 1),
        },
        "cp_best_ms": round(cp.best_ms, 1),
        "cp_lower_ms": round(cp.lower_ms, 1),
        "proven_optimal": cp.proven,
        "solve_s": round(solve_s, 1),
        "planned_ms": round(planned.predicted_ms, 1),
        "planned_over_bound": round(planned.predicted_ms / parts.best_ms - 1.0, 4),
        "cp_lower_over_bound": round(cp.lower_ms / parts.best_ms - 1.0, 4),
        "planned_over_cp_lower": round(planned.predicted_ms / cp.lower_ms - 1.0, 4),
        "planned_over_cp_best": round(planned.predicted_ms / cp.best_ms - 1.0, 4),
        "recompute_per_rank": counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="t2v-s")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fractions", default="0.5,0.75")
    ap.add_argument("--time-limit-s", type=float, default=120.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for fraction in (float(f) for f in args.fractions.split(",")):
            row = one(args.workload, args.microbatches, seed, fraction, args.time_limit_s)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    def mean(key: str) -> float:
        return round(float(np.mean([r[key] for r in rows])), 4)

    out = {
        "benchmark": "memory_optimum",
        "rows": rows,
        "mean": {
            k: mean(k)
            for k in ("planned_over_bound", "cp_lower_over_bound", "planned_over_cp_lower", "planned_over_cp_best")
        },
        "proven": sum(r["proven_optimal"] for r in rows),
    }
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

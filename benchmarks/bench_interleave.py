"""Wall time of one call of the interleaver's numba kernel on full-size problems (the search's inner loop).

For each workload, batch `--iteration` of its trace prepared as `Planner.plan` does, with no recompute, the memory
gate at each rank's budget and the heuristic priorities, under each policy: the mean of `--repeats` calls after one
warm call, with the makespan and a checksum of the start times (equal across versions when the kernel's results
are).

    python benchmarks/bench_interleave.py [--workloads vlm-l,t2v-s,vlm-s] [--repeats 5] [--out FILE]
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
from pipeweaver.search import planner as planner_module
from pipeweaver.search.interleave import interleave
from pipeweaver.search.mcts import priorities_from_order
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.search.problem import Policy, stage_priorities


def measure(name: str, iteration: int, repeats: int) -> dict[str, Any]:
    w = workload(name)
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(compare_baselines=()))
    batch = sample_batch(w, seed=0, iteration=iteration)
    header = planner.header_for(batch, job_id="", source=PlanSource.SEARCH, schedule="pipeweaver")
    prep = planner._prepare(batch, header, Recompute.NONE)
    pipelines = tuple(p.name for p in header.placement.pipelines)
    groups = priorities_from_order(planner_module.heuristic_group_order(prep.problem, pipelines))
    planner._pairs(prep, batch)
    assert prep.pairs is not None
    budget = planner._budget_bytes(prep)
    none = planner._problem_for(prep, np.zeros(len(prep.pairs.keys), dtype=np.int64))
    out: dict[str, Any] = {"stages": prep.problem.n}
    for policy in (Policy.ALTERNATE, Policy.EARLIEST):
        problem = replace(none, mem_cap_bytes=budget, policy=policy)
        priority = stage_priorities(problem, groups)
        interleave(problem, priority)  # compiled or loaded from the cache
        t0 = time.perf_counter()
        for _ in range(repeats):
            _, start, _, makespan = interleave(problem, priority)
        out[policy.name.lower()] = {
            "ms_per_call": round((time.perf_counter() - t0) / repeats * 1e3, 2),
            "makespan_ms": round(float(makespan), 3),
            "start_checksum": round(float(np.nansum(start)), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="vlm-l,t2v-s,vlm-s")
    parser.add_argument("--iteration", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    report = {
        "command": "python benchmarks/bench_interleave.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "workloads": {name: measure(name, args.iteration, args.repeats) for name in args.workloads.split(",")},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

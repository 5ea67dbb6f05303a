"""What freeing a search's structures costs in a worker, and whether it still delays the result.

A search worker's task (`work.plan_batch`) holds its search's result back (`work.release_held`) so that the pool
sends the plan before freeing it. This runs vlm-s searches in this process as a worker would and reports, per
search, the time between the task's own end (`PlanOutcome.worker_span`) and its return to the caller (what the
caller still waits for), and what the release then costs (what it would wait for if the task freed it).

    .venv/bin/python benchmarks/bench_plan_release.py [--searches 6] [--budget-ms 300]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=int, default=6)
    parser.add_argument("--budget-ms", type=float, default=300.0)
    args = parser.parse_args()

    from pipeweaver.datagen import dynamic_batch
    from pipeweaver.presets import workload
    from pipeweaver.server import work
    from pipeweaver.wire import batch_to_proto

    w = workload("vlm-s")
    spec = work.JobSpec(model=w.model, parallel=replace(w.parallel, dp=16), hardware=w.hardware)
    registered = work.register_job(work.Job("bench", spec))
    assert isinstance(registered, work.Registered)
    job = work.Job("bench", spec, registered.partition)
    work.warm_up(0.0)
    rows = []
    for i in range(args.searches):
        batch = batch_to_proto(dynamic_batch(w, seed=0, iteration=i)).SerializeToString()
        outcome = work.plan_batch(work.PlanTask(job, batch, "search", args.budget_ms))
        returned = time.perf_counter()
        assert isinstance(outcome, work.PlanOutcome)
        work.release_held()
        released = time.perf_counter()
        rows.append(
            {
                "worker_ms": round(outcome.worker_ms, 1),
                "end_to_return_ms": round((returned - outcome.worker_span[1]) * 1e3, 3),
                "release_ms": round((released - returned) * 1e3, 3),
            }
        )
    print(json.dumps({"workload": "vlm-s", "budget_ms": args.budget_ms, "searches": rows}, indent=1))


if __name__ == "__main__":
    main()

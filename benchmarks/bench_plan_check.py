"""What checking a plan costs the trainer's host, part by part (issue: trainer client and executor).

On the 4-GPU runs every iteration is host-bound (docs/gpu.md section 7): the work of the executor's idle hook
(checking the next plan before its iteration) adds to the iteration instead of overlapping the device's. This
times each part of that check on one searched plan of a workload, on this machine:

- the stage graph and the validator's dry run of every rank's actions (`validate`);
- the transfer shapes of every send and receive against the batch (`TransferShapes`);
- the ranks' vote digest two ways: the `repr` of the whole plan (what a plan built locally votes with) and the
  blake2b of the service's reply bytes (`Plan.wire_digest`, what a served plan votes with).

    .venv/bin/python benchmarks/bench_plan_check.py [--workload t2v-s] [--repeats 5] > result.json

`--workload e2e-t2v` / `e2e-vlm` take the scaled models of the 4-GPU runs (benchmarks/gpu/e2e_workload.py).
Each number is the median of `--repeats` runs, in ms.

`--gc N` adds what Python's garbage collector does to the check (`pipeweaver.client.host_gc`): the whole check
(graph, validation, shapes) run N times with the collector as Python leaves it (median, max, full passes), and
the cost of one full pass over this process's objects before and after `settle_host_objects`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeweaver.client.data import stable_seed
from pipeweaver.client.host_gc import CollectorClock, settle_host_objects, unsettle_host_objects
from pipeweaver.datagen import representative_batch
from pipeweaver.plan.graph import stage_graph
from pipeweaver.plan.ir import CommBatch, Plan
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.plan.validator import validate
from pipeweaver.presets import workload as preset
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.workload import Workload
from pipeweaver.wire import plan_to_proto


def _workload(name: str) -> Workload:
    if name.startswith("e2e-"):
        sys.path.insert(0, str(Path(__file__).parent / "gpu"))
        import e2e_workload

        return e2e_workload.scaled_t2v() if name == "e2e-t2v" else e2e_workload.scaled_vlm()
    return preset(name)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 2)


def _planned(w: Workload, budget_ms: float) -> tuple[BatchMetadata, Plan]:
    """The workload's representative batch and its searched plan."""
    batch = representative_batch(w.model, w.parallel, w.hardware, seed=0)
    if batch is None:
        raise SystemExit(f"workload '{w.name}' has no image or video module to draw a batch for")
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(compare_baselines=()))
    return batch, planner.plan(batch, job_id="bench", budget_ms=budget_ms).plan


def _transfer_shapes(w: Workload, batch: BatchMetadata, plan: Plan) -> None:
    """The receive shapes of every transfer of the plan, as the executor computes them."""
    shapes = TransferShapes(w.model, batch, plan.header, dtype="float32")
    for rp in plan.ranks:
        for action in rp.actions:
            if isinstance(action, CommBatch):
                for op in action.ops:
                    shapes.tensors(op.src, op.dst)


def measure(w: Workload, *, budget_ms: float, repeats: int) -> dict[str, Any]:
    batch, plan = _planned(w, budget_ms)
    wire = plan_to_proto(plan)

    def wire_digest() -> None:  # what `planner_client._reply` adds per reply, for all ranks' replies
        for rp in wire.ranks:
            hashlib.blake2b(rp.SerializeToString(deterministic=True), digest_size=16).digest()

    return {
        "workload": w.name,
        "actions_per_rank": [len(rp.actions) for rp in plan.ranks],
        "ms": {
            "stage_graph": _median_ms(lambda: stage_graph(plan.header), repeats),
            "validate": _median_ms(lambda: validate(plan, graph=stage_graph(plan.header)), repeats),
            "transfer_shapes": _median_ms(lambda: _transfer_shapes(w, batch, plan), repeats),
            "digest_repr": _median_ms(lambda: stable_seed("plan", repr(plan)), repeats),
            "digest_wire": _median_ms(wire_digest, repeats),
        },
    }


def measure_gc(w: Workload, *, budget_ms: float, checks: int) -> dict[str, Any]:
    """The check with the collector on (times and full passes per check), then one full pass before and after
    settling this process's objects. Leaves the process unsettled."""
    batch, plan = _planned(w, budget_ms)

    def check() -> None:
        validate(plan, graph=stage_graph(plan.header))
        _transfer_shapes(w, batch, plan)

    unsettle_host_objects()
    times, full = [], 0
    with CollectorClock() as clock:
        for _ in range(checks):
            t0 = time.perf_counter()
            check()
            times.append((time.perf_counter() - t0) * 1e3)
            full += clock.take().collections[2]

    def one_full_pass_ms() -> float:
        t0 = time.perf_counter()
        gc.collect()
        return round((time.perf_counter() - t0) * 1e3, 2)

    tracked = len(gc.get_objects())
    before = one_full_pass_ms()
    settle_host_objects()
    after = one_full_pass_ms()
    unsettle_host_objects()
    return {
        "checks": checks,
        "check_ms_collector_on": {"median": round(statistics.median(times), 2), "max": round(max(times), 2)},
        "full_passes_during_checks": full,
        "objects_tracked": tracked,
        "full_pass_ms": {"before_settling": before, "after_settling": after},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="e2e-t2v", help="a preset name, or e2e-t2v / e2e-vlm")
    ap.add_argument("--budget-ms", type=float, default=300.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gc", type=int, default=0, metavar="N", help="also measure the collector over N checks")
    a = ap.parse_args()
    if a.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {a.repeats}")
    w = _workload(a.workload)
    out = measure(w, budget_ms=a.budget_ms, repeats=a.repeats)
    if a.gc > 0:
        out["gc"] = measure_gc(w, budget_ms=a.budget_ms, checks=a.gc)
    out["env"] = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Planner choices measured on SEMU: the service's fallback plan, the interleaving policies of the search's
starting points, and the chunks' order over the ranks. Prints one JSON object.

    .venv/bin/python benchmarks/bench_planner_variants.py [--only fallback|policies|placement]

- fallback: on the scaled VLM of the 4-GPU runs (`benchmarks/gpu/e2e_workload.py`, dynamic trace, seed 0), each
  batch's makespan with a trainer's own fallback (lean memory cap), the planner's (`Planner.fallback_plan`: an
  uncapped order first when it fits), and Optimus's coarse schedule; whether the uncapped order fit.
- policies: `Planner.plan` at 700 ms on i.i.d. batches (seed 0) with `BASE_POLICIES` as shipped and without the
  active-schedule variants; mean predicted makespan, planning time, and how often an active variant was picked.
- placement: `Planner.plan` at `--budget-ms` on the same i.i.d. batches (seed 0) with the partitioner's chunks
  placed round robin and in a V shape (`RankOrder`); per batch, predicted makespan, bound and peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

from e2e_workload import scaled_vlm

from pipeweaver.datagen import dynamic_batch, sample_batch
from pipeweaver.plan.layouts import RankOrder
from pipeweaver.presets import workload
from pipeweaver.search import planner as planner_module
from pipeweaver.search.fallback import build_fallback_plan
from pipeweaver.search.interleave import interleave
from pipeweaver.search.interleave_ref import ACTIVE
from pipeweaver.search.planner import Planner, SearchConfig


def fallback_variants(batches: int) -> dict[str, Any]:
    wl = scaled_vlm(microbatches=16)
    planner = Planner(wl.model, wl.parallel, wl.hardware, config=SearchConfig(workers=1))
    part = planner.partition
    rows = []
    for k in range(batches):
        batch = dynamic_batch(wl, seed=0, iteration=k)
        lean = build_fallback_plan(wl.model, part.placement, part.sub_microbatch_size, batch, interleaver=interleave)
        loose = [
            build_fallback_plan(
                wl.model, part.placement, part.sub_microbatch_size, batch, interleaver=interleave,
                cap_scale=cap, unit_costs=unit,
            )
            for cap, unit in planner_module.LOOSE_FALLBACKS
        ]  # fmt: skip
        loose_sims = [planner.simulate_plan(p, batch) for p in loose]
        served = planner.simulate_plan(planner.fallback_plan(batch), batch)
        optimus = planner.baseline_results(batch, ["optimus-coarse"])["optimus-coarse"]
        rows.append(
            {
                "iteration": k,
                "lean_ms": planner.simulate_plan(lean, batch).makespan_ms,
                "loose_ms": [s.makespan_ms for s in loose_sims],
                "loose_fits": [planner.fits_memory(s) for s in loose_sims],
                "served_ms": served.makespan_ms,
                "optimus_coarse_ms": optimus.makespan_ms,
            }
        )
    planner.close()
    return {"workload": wl.name, "hardware": wl.hardware.name, "rows": rows}


def policy_variants(names: list[str], batches: int) -> dict[str, Any]:
    shipped = planner_module.BASE_POLICIES
    plain = tuple(p for p in shipped if not p & ACTIVE)
    out: dict[str, Any] = {}
    try:
        for name in names:
            w = workload(name)
            for label, policies in (("without_active", plain), ("shipped", shipped)):
                planner_module.BASE_POLICIES = policies
                planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(workers=1, compare_baselines=()))
                ms, wall, active = [], [], 0
                for k in range(batches):
                    batch = sample_batch(w, seed=0, iteration=k)
                    t0 = time.perf_counter()
                    result = planner.plan(batch, budget_ms=700)
                    wall.append((time.perf_counter() - t0) * 1e3)
                    ms.append(result.predicted_ms)
                    active += "+active" in result.start
                planner.close()
                out.setdefault(name, {})[label] = {
                    "mean_ms": statistics.fmean(ms),
                    "plan_ms_p50": statistics.median(wall),
                    "active_picked": active,
                    "batches": batches,
                }
    finally:
        planner_module.BASE_POLICIES = shipped
    return out


def placement_variants(names: list[str], batches: int, budget_ms: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        w = workload(name)
        for order in RankOrder:
            planner = Planner(
                w.model, w.parallel, w.hardware, config=SearchConfig(workers=1, compare_baselines=()), order=order
            )
            rows = []
            for k in range(batches):
                result = planner.plan(sample_batch(w, seed=0, iteration=k), budget_ms=budget_ms)
                rows.append(
                    {
                        "iteration": k,
                        "predicted_ms": round(result.predicted_ms, 1),
                        "lower_bound_ms": round(result.lower_bound_ms, 1),
                        "peak_gib": [round(b / 2**30, 1) for b in result.peak_memory_bytes],
                    }
                )
            planner.close()
            out.setdefault(name, {})[order.value] = {
                "mean_ms": round(statistics.fmean(r["predicted_ms"] for r in rows), 1),
                "mean_bound_ms": round(statistics.fmean(r["lower_bound_ms"] for r in rows), 1),
                "rows": rows,
            }
    return {"budget_ms": budget_ms, "batches": batches, "workloads": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["fallback", "policies", "placement"], default=None)
    ap.add_argument("--fallback-batches", type=int, default=5)
    ap.add_argument("--policy-batches", type=int, default=8)
    ap.add_argument("--workloads", default="tiny-vlm,tiny-t2v,vlm-s,t2v-s")
    ap.add_argument("--placement-batches", type=int, default=4)
    ap.add_argument("--placement-workloads", default="t2v-s")
    ap.add_argument("--budget-ms", type=float, default=700.0, help="placement: the planning budget")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    if args.only in (None, "fallback"):
        report["fallback"] = fallback_variants(args.fallback_batches)
    if args.only in (None, "policies"):
        report["policies"] = policy_variants(args.workloads.split(","), args.policy_batches)
    if args.only in (None, "placement"):
        report["placement"] = placement_variants(
            args.placement_workloads.split(","), args.placement_batches, args.budget_ms
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

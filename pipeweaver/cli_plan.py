"""`pipeweaver simulate` and `pipeweaver plan`: SEMU and the search from the command line.

Kept apart from `cli.py` so that the listing commands stay light: these import numba, ortools and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeweaver.errors import SpecError
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.workload import Workload

GIB = 2**30
SEARCHED = "pipeweaver"


def workload_named(name: str) -> Workload:
    """The preset `name`, or a `SpecError` (one line in the CLI) listing the choices."""
    from pipeweaver.presets import workload

    try:
        return workload(name)
    except KeyError as exc:
        raise SpecError(str(exc).strip("'\"")) from None


def _batch_for(w: Workload, seed: int, iteration: int) -> BatchMetadata:
    from pipeweaver.datagen import sample_batch

    return sample_batch(w, seed=seed, iteration=iteration)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", required=True, help="preset workload (see `pipeweaver workloads`)")
    parser.add_argument("--seed", type=int, default=0, help="batch sampling seed (default 0)")
    parser.add_argument("--iteration", type=int, default=0, help="iteration of the sampled trace (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# ---- simulate ------------------------------------------------------------------------------------------------


def simulate_args(parser: argparse.ArgumentParser) -> None:
    from pipeweaver.search.baselines import BASELINES

    _common(parser)
    choices = [*BASELINES, SEARCHED]
    parser.add_argument("--schedule", choices=choices, help="a baseline, or `pipeweaver` (searched)")
    parser.add_argument("--plan", type=Path, help="simulate a plan JSON file instead (its batch: --seed/--iteration)")
    parser.add_argument("--budget-ms", type=float, default=1000.0, help="search budget for --schedule pipeweaver")


def simulate(args: argparse.Namespace) -> int:
    from pipeweaver.plan.export import plan_from_json
    from pipeweaver.plan.validator import validate
    from pipeweaver.search.baselines import build_baseline_plan
    from pipeweaver.search.planner import Planner, SearchConfig, recompute_map

    if (args.schedule is None) == (args.plan is None):
        raise SpecError("give exactly one of --schedule or --plan")
    w = workload_named(args.workload)
    batch = _batch_for(w, args.seed, args.iteration)
    planner = Planner(
        w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=args.budget_ms, compare_baselines=())
    )
    if args.plan is not None:
        try:
            plan = plan_from_json(args.plan.read_text())
        except (OSError, ValueError) as exc:
            raise SpecError(f"--plan {args.plan}: {exc}") from None
        validate(plan)
        name = plan.header.schedule
        sim = planner.simulate_plan(plan, batch)
    elif args.schedule == SEARCHED:
        result = planner.plan(batch)
        plan, name = result.plan, SEARCHED
        sim = (
            result.simulation
            if result.simulation is not None
            else planner.simulate_plan(plan, batch, recompute_map(plan))
        )
    else:
        plan = build_baseline_plan(args.schedule, model=w.model, parallel=w.parallel, batch=batch, hardware=w.hardware)
        name = args.schedule
        sim = planner.baseline_result(plan, batch)
    out = {
        "workload": w.name,
        "hardware": w.hardware.name,
        "schedule": name,
        "seed": args.seed,
        "iteration": args.iteration,
        "makespan_ms": round(sim.makespan_ms, 3),
        "bubble_fraction": round(sim.bubble_fraction, 4),
        "busy_ms": [round(float(x), 3) for x in sim.busy_ms],
        "peak_memory_gib": [round(float(x) / GIB, 3) for x in sim.peak_memory_bytes],
        "memory_capacity_gib": round(w.hardware.memory_bytes / GIB, 3),
        "fits_memory": planner.fits_memory(sim),
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{w.name} / {name} on {w.hardware.name} (seed {args.seed}, iteration {args.iteration})")
    print(f"  makespan        {sim.makespan_ms / 1e3:10.3f} s")
    if not out["fits_memory"]:
        print(f"  DOES NOT FIT    {w.hardware.memory_bytes / GIB:.1f} GiB devices, even with full recompute")
    print(f"  bubble fraction {sim.bubble_fraction:10.1%}")
    for r in range(sim.pp):
        print(
            f"  rank {r:2d}: busy {sim.busy_ms[r] / 1e3:9.3f} s   peak memory {sim.peak_memory_bytes[r] / GIB:7.1f} GiB"
        )
    return 0


# ---- plan ----------------------------------------------------------------------------------------------------


def plan_args(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--budget-ms", type=float, default=1000.0, help="search budget (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="search worker processes (default 1)")
    parser.add_argument("--png", type=Path, help="write a timeline picture (PipeWeaver over interleaved 1F1B)")
    parser.add_argument("--trace", type=Path, help="write a Chrome/Perfetto trace of the plan")
    parser.add_argument("--out-plan", type=Path, help="write the plan as JSON")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="plan in a cold process (by default a heavy batch is planned first, as the service warms each job's "
        "workers: a cold planner spends the budget loading kernels and costing new shapes)",
    )


def plan(args: argparse.Namespace) -> int:
    from pipeweaver.plan.export import plan_to_json, write_chrome_trace
    from pipeweaver.search.baselines import build_baseline_plan
    from pipeweaver.search.planner import Planner, SearchConfig

    if args.budget_ms <= 0:
        raise SpecError(f"--budget-ms must be positive, got {args.budget_ms}")
    if args.workers < 1:
        raise SpecError(f"--workers must be at least 1, got {args.workers}")
    w = workload_named(args.workload)
    batch = _batch_for(w, args.seed, args.iteration)
    planner = Planner(
        w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=args.budget_ms, workers=args.workers)
    )
    warm_ms = 0.0
    if not args.cold:
        from pipeweaver.datagen import representative_batch

        heavy = representative_batch(w.model, w.parallel, w.hardware, seed=args.seed)
        if heavy is not None:
            t = time.perf_counter()
            planner.plan(heavy, job_id=f"cli-{w.name}-warm-up")
            warm_ms = (time.perf_counter() - t) * 1e3
    result = planner.plan(batch, job_id=f"cli-{w.name}")
    h = result.plan.header
    out = {
        "workload": w.name,
        "hardware": w.hardware.name,
        "seed": args.seed,
        "iteration": args.iteration,
        "predicted_ms": round(result.predicted_ms, 3),
        "lower_bound_ms": round(result.lower_bound_ms, 3),
        "gap_to_lower_bound": round(result.predicted_ms / result.lower_bound_ms - 1, 4)
        if result.lower_bound_ms
        else None,
        "bubble_fraction": round(result.bubble_fraction, 4),
        "search_ms": round(result.search_ms, 1),
        "evaluations": result.evaluations,
        "workers": args.workers,
        "warm_up_ms": round(warm_ms, 1),
        "cache_hit_rate": round(result.cache_hit_rate, 4),
        "sub_microbatch_size": planner.partition.sub_microbatch_size,
        "segments": planner.partition.segments,
        "peak_memory_gib": [round(x / GIB, 2) for x in result.peak_memory_bytes],
        "start": result.start,
        "baselines_ms": {k: round(v, 3) for k, v in result.baseline_ms.items()},
        "baselines_not_fitting_peak_gib": {k: round(v / GIB, 3) for k, v in result.baselines_over_memory.items()},
        "speedup_vs": {k: round(v / result.predicted_ms, 4) for k, v in result.baseline_ms.items()},
        "actions": sum(len(r.actions) for r in result.plan.ranks),
        "sub_microbatches": len(h.sub_microbatches),
    }
    if args.out_plan:
        args.out_plan.write_text(plan_to_json(result.plan))
    if args.trace:
        write_chrome_trace(str(args.trace), result.plan)
    if args.png:
        from pipeweaver.viz import Timeline, write_timeline_png

        base = build_baseline_plan(
            "interleaved-1f1b", model=w.model, parallel=w.parallel, batch=batch, hardware=w.hardware
        )
        base_sim = planner.baseline_result(base, batch)
        write_timeline_png(
            [
                Timeline(f"PipeWeaver ({w.name})", result.plan, [rp.predicted_ms for rp in result.plan.ranks]),
                Timeline("interleaved 1F1B (Megatron VPP)", base, base_sim.to_rank_timings()),
            ],
            args.png,
        )
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"{w.name} on {w.hardware.name}: seed {args.seed}, iteration {args.iteration}, "
        f"{len(batch.microbatches)} microbatches, {len(h.sub_microbatches)} sub-microbatches"
    )
    print(f"  B_i {planner.partition.sub_microbatch_size}  K_i {planner.partition.segments}")
    print(
        f"  PipeWeaver      {result.predicted_ms / 1e3:9.3f} s  (bubble {result.bubble_fraction:.1%}, "
        f"search {result.search_ms:.0f} ms, {result.evaluations} rollouts"
        + (f"; warm-up {warm_ms / 1e3:.1f} s before it)" if warm_ms else ", cold)")
    )
    print(f"  lower bound     {result.lower_bound_ms / 1e3:9.3f} s")
    print(f"  started from    {result.start}")
    for name, ms in sorted(result.baseline_ms.items(), key=lambda kv: kv[1]):
        print(f"  {name:15s} {ms / 1e3:9.3f} s  ({ms / result.predicted_ms:.2f}x)")
    for name, peak in sorted(result.baselines_over_memory.items()):
        print(f"  {name:15s} does not fit (peak {peak / GIB:.1f} GiB > {w.hardware.memory_bytes / GIB:.1f} GiB)")
    for p, what in ((args.png, "timeline"), (args.trace, "trace"), (args.out_plan, "plan")):
        if p:
            print(f"  wrote {what}: {p}", file=sys.stderr)
    return 0

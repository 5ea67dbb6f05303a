"""Search-quality benchmarks that `pipeweaver bench` does not cover (issue: the planner's search).

1. Gap to the CP-SAT optimum on small instances (pp 4, up to 8 microbatches, tiny-vlm and tiny-t2v costs).
2. Per-rank memory program solve times on vlm-s and t2v-s batches (median, p90). The time of one program is the
   wall time of one `optimise_rank` call for a rank whose memory binds (the live activations of its fastest choice
   exceed the cap somewhere), everything included: arrays, greedy start, Lagrangian bound, CP-SAT if it runs; the
   planner reports it in `PlanResult.memory_solve_ms`. Ranks where memory never binds take no program and no time.
3. One worker vs two worker processes at the same budget on t2v-s.

    .venv/bin/python benchmarks/bench_search.py [--quick] [--only memory] > benchmarks/results/search_quality.json

`--policy alternate,active` compares interleaving policies on the same instances (`active` = ALTERNATE | ACTIVE,
also `earliest`, `earliest+active`); `--evaluations N` gives each search N interleaver calls instead of 1 s (fair
when the policies' speeds differ or the machine is busy); `--optima LOG` reuses the CP-SAT results of an earlier
run (its stderr rows) for the same instances.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import time
from dataclasses import replace

import numpy as np

from pipeweaver.datagen import sample_batch
from pipeweaver.plan.ir import PlanSource, Recompute
from pipeweaver.presets import workload
from pipeweaver.search.bounds import exact_makespan_ms, lower_bound_ms
from pipeweaver.search.fallback import heuristic_group_order
from pipeweaver.search.interleave import interleave
from pipeweaver.search.interleave_ref import ACTIVE
from pipeweaver.search.mcts import SegmentOrderSearch
from pipeweaver.search.planner import Planner, SearchConfig, SearchLevel
from pipeweaver.search.problem import Policy, Problem, stage_priorities
from pipeweaver.spec import BatchMetadata

POLICIES = {
    "alternate": int(Policy.ALTERNATE),
    "earliest": int(Policy.EARLIEST),
    "active": int(Policy.ALTERNATE) | ACTIVE,
    "earliest+active": int(Policy.EARLIEST) | ACTIVE,
}


def cp_sat_gaps(
    seeds: range,
    microbatches: int,
    policies: tuple[str, ...] = ("alternate",),
    evaluations: int = 0,
    optima: dict[tuple[str, int, int], tuple[float, bool]] | None = None,
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name in ("tiny-vlm", "tiny-t2v"):
        w = workload(name)
        planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(compare_baselines=()))
        for seed in seeds:
            full = sample_batch(w, seed=seed)
            batch = BatchMetadata(0, full.microbatches[:microbatches])
            header = planner.header_for(batch, job_id="", source=PlanSource.SEARCH, schedule="bench")
            prep = planner._prepare(batch, header, Recompute.NONE)
            known = (optima or {}).get((name, seed, prep.problem.n))
            optimum, proven = known or exact_makespan_ms(prep.problem, time_limit_s=60, workers=2)
            for policy in policies:
                problem = replace(prep.problem, policy=POLICIES[policy])
                heuristic = heuristic_group_order(problem, tuple(p.name for p in header.placement.pipelines))
                search = SegmentOrderSearch(
                    len(problem.groups),
                    heuristic,
                    lambda g, p=problem: interleave(p, stage_priorities(p, g))[3],
                    seed=0,
                )
                t0 = time.perf_counter()
                while search.evaluations < evaluations if evaluations else time.perf_counter() - t0 < 1.0:
                    search.step()
                rows.append(
                    {
                        "workload": name,
                        "seed": seed,
                        "policy": policy,
                        "stages": problem.n,
                        "optimum_ms": round(optimum, 3),
                        "proven_optimal": proven,
                        "heuristic_ms": round(search.reference_ms, 3),
                        "mcts_ms": round(search.best_ms, 3),
                        "gap": round(search.best_ms / optimum - 1, 4),
                        "lower_bound_ms": round(lower_bound_ms(problem), 3),
                        "evaluations": search.evaluations,
                        "us_per_interleave": round(_interleave_us(problem), 1),
                    }
                )
                print(rows[-1], file=sys.stderr)
    return rows


def _interleave_us(problem: Problem, calls: int = 300) -> float:
    """Median wall time of one `interleave` call at random group priorities, in microseconds."""
    rng = np.random.default_rng(0)
    priorities = [stage_priorities(problem, rng.permutation(len(problem.groups)).astype(float)) for _ in range(calls)]
    times = []
    for prio in priorities:
        t0 = time.perf_counter()
        interleave(problem, prio)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def read_optima(path: str) -> dict[tuple[str, int, int], tuple[float, bool]]:
    """CP-SAT results of an earlier run's stderr rows, by (workload, seed, stages)."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("{'workload'"):
                row = ast.literal_eval(line)
                out[(row["workload"], row["seed"], row["stages"])] = (row["optimum_ms"], row["proven_optimal"])
    return out


def memory_solve_times(batches: int, names: tuple[str, ...] = ("vlm-s", "t2v-s")) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        w = workload(name)
        planner = Planner(
            w.model,
            w.parallel,
            w.hardware,
            config=SearchConfig(budget_ms=1500, compare_baselines=(), max_evaluations=200),
        )
        times: list[float] = []
        for i in range(batches):
            times += planner.plan(sample_batch(w, seed=0, iteration=i)).memory_solve_ms
        times.sort()
        out[name] = {
            "batches": batches,
            "programs": len(times),
            "median_ms": round(statistics.median(times), 2),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
            "max_ms": round(times[-1], 2),
        }
        print(name, out[name], file=sys.stderr)
    return out


def workers_comparison(batches: int, budget_ms: float) -> dict[str, float]:
    w = workload("t2v-s")
    out = {}
    for workers in (1, 2):
        planner = Planner(
            w.model,
            w.parallel,
            w.hardware,
            config=SearchConfig(budget_ms=budget_ms, compare_baselines=(), level=SearchLevel.MCTS, workers=workers),
        )
        try:
            values = [planner.plan(sample_batch(w, seed=0, iteration=i)).predicted_ms for i in range(batches)]
        finally:
            planner.close()
        out[f"workers_{workers}_mean_ms"] = round(statistics.fmean(values), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances (smoke run)")
    parser.add_argument("--only", choices=("gap", "memory", "workers"), help="run one section")
    parser.add_argument("--policy", default="alternate", help=f"gap: comma-separated, of {', '.join(POLICIES)}")
    parser.add_argument("--evaluations", type=int, default=0, help="gap: interleaver calls per search (0: 1 s)")
    parser.add_argument("--optima", help="gap: reuse the CP-SAT results of an earlier run's stderr")
    parser.add_argument("--microbatches", type=int, help="gap: per instance (default 8, or 4 with --quick)")
    args = parser.parse_args()
    seeds = range(3) if args.quick else range(8)
    report: dict[str, object] = {}
    if args.only in (None, "gap"):
        policies = tuple(args.policy.split(","))
        if unknown := [p for p in policies if p not in POLICIES]:
            parser.error(f"--policy {','.join(unknown)}: choose among {', '.join(POLICIES)}")
        rows = cp_sat_gaps(
            seeds,
            args.microbatches or (4 if args.quick else 8),
            policies,
            args.evaluations,
            read_optima(args.optima) if args.optima else None,
        )
        report["cp_sat_small_instances"] = rows
        gaps = {p: [float(str(r["gap"])) for r in rows if r["policy"] == p] for p in policies}
        report["cp_sat_mean_gap"] = {p: round(statistics.fmean(g), 4) for p, g in gaps.items()}
    if args.only in (None, "memory"):
        report["memory_program"] = memory_solve_times(2 if args.quick else 5)
    if args.only in (None, "workers"):
        report["workers_t2v_s"] = workers_comparison(2 if args.quick else 5, 1000.0)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

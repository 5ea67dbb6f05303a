"""How far PipeWeaver's predicted makespan is from the per-batch lower bound, before and after the memory-time bound.

Per workload and sampled batch: the old bound (longest chain, busiest rank at the fastest strategy), the new one
(`pipeweaver.search.bounds`: plus the memory-time argument with every recompute strategy and the device budget),
PipeWeaver's predicted makespan (`Planner.plan`, with its planning time before the baseline comparison and the
starting point it refined), the best baseline that fits device memory (those that do not fit are listed, without a
makespan), interleaved 1F1B, and, unless `--no-witness`, a witness: the best of a few plain memory-gated list
schedules on PipeWeaver's own placement (uniform or lifetime-thresholded recompute), simulated by SEMU and kept only
if it fits. The witness is an upper bound on the optimum, so the bound's own slack is at most witness / new bound - 1.

    .venv/bin/python benchmarks/bench_bound_gap.py [--quick] [--workloads vlm-s t2v-s] [--batches 4]

Writes benchmarks/results/bound_gap.json (or --out) and prints a table.

With `--plans-from benchmarks/results/bench` it plans nothing: per workload it recomputes the bound (each argument,
and argument 2 as smallest head + work + smallest tail) on the batches of that directory's `pipeweaver bench`
report (its batch count, seed `--seed`) and sets the report's mean PipeWeaver makespan against the bound the report
recorded and against today's, so a change to `search/bounds.py` is measured on the same plans. Writes
benchmarks/results/bound_gap_same_plans.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeweaver.datagen import sample_batch
from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.ir import Compute, PlanSource, Recompute
from pipeweaver.presets import workload
from pipeweaver.search import bounds
from pipeweaver.search.bounds import BoundParts, lower_bound_ms, lower_bound_parts
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.search.problem import Problem
from pipeweaver.spec import BatchMetadata

WORKLOADS = ("vlm-s", "vlm-m", "vlm-l", "t2v-s", "t2v-l")
RESULTS = Path(__file__).parent / "results" / "bound_gap.json"
SAME_PLANS = Path(__file__).parent / "results" / "bound_gap_same_plans.json"


def gated_list_schedule(problem: Problem, cap: np.ndarray) -> np.ndarray:
    """Start times of a list schedule: the stage that can start earliest goes first (backward before forward, then
    the earlier microbatch); a forward waits while it would push its rank over `cap`, unless its sub-microbatch
    already holds memory there or nothing else can run (so it never deadlocks)."""
    n, pp = problem.n, problem.pp
    remaining = np.diff(problem.pred_ptr).astype(np.int64)
    ready_at = np.zeros(n)
    start = np.full(n, np.nan)
    t_free = np.zeros(pp)
    mem = np.zeros(pp)
    holds: dict[tuple[int, int], float] = {}
    ready: list[list[int]] = [[] for _ in range(pp)]
    mb = np.array([s.microbatch for s in problem.stages])
    for source in np.flatnonzero(remaining == 0).tolist():
        ready[int(problem.rank[source])].append(source)
    Pick = tuple[tuple[float, int, int], int] | None
    cache: list[list[Pick]] = [[None] * pp for _ in range(3)]
    stale = [[True] * pp for _ in range(3)]

    def best_on(r: int, gate: int) -> Pick:
        """Rank r's best stage under gate 0 (strict), 1 (sub-microbatches holding memory go on) or 2 (open)."""
        found: Pick = None
        for i in ready[r]:
            fwd = int(problem.is_forward[i])
            over = fwd and gate < 2 and mem[r] + problem.alloc_bytes[i] > cap[r]
            if over and (gate == 0 or holds.get((r, int(problem.unit[i])), 0.0) <= 0.0):
                continue
            key = (max(t_free[r], ready_at[i]), fwd, int(mb[i]))
            if found is None or key < found[0]:
                found = (key, i)
        return found

    for _ in range(n):
        choice: Pick = None
        chosen_rank = -1
        for gate in range(3):  # the gate opens only when no rank at all can move under the stricter one
            for r in range(pp):
                if stale[gate][r]:
                    cache[gate][r], stale[gate][r] = best_on(r, gate), False
                c = cache[gate][r]
                if c is not None and (choice is None or c[0] < choice[0]):
                    choice, chosen_rank = c, r
            if choice is not None:
                break
        assert choice is not None, "the stage graph has a cycle"
        (t, _, _), i = choice
        r = chosen_rank
        ready[r].remove(i)
        start[i] = t
        t_free[r] = t + problem.duration_ms[i]
        delta = problem.alloc_bytes[i] - problem.free_bytes[i]
        mem[r] += delta
        key = (r, int(problem.unit[i]))
        holds[key] = holds.get(key, 0.0) + delta
        for level in stale:
            level[r] = True
        for q in range(problem.succ_ptr[i], problem.succ_ptr[i + 1]):
            j = int(problem.succ_idx[q])
            remaining[j] -= 1
            ready_at[j] = max(ready_at[j], t_free[r] + _delay(problem, i, j))
            if remaining[j] == 0:
                rj = int(problem.rank[j])
                ready[rj].append(j)
                for level in stale:
                    level[rj] = True
    return start


def _delay(problem: Problem, p: int, j: int) -> float:
    for q in range(problem.pred_ptr[j], problem.pred_ptr[j + 1]):
        if problem.pred_idx[q] == p:
            return float(problem.pred_delay_ms[q])
    return 0.0


def witness_ms(planner: Planner, batch: BatchMetadata) -> tuple[float, str]:
    """Best SEMU makespan that fits device memory among a few gated list schedules on PipeWeaver's placement."""
    header = planner.header_for(batch, job_id="", source=PlanSource.SEARCH, schedule="witness")
    prep = planner._prepare(batch, header, Recompute.NONE)
    per = planner._strategy_costs(prep, batch)
    base = prep.problem
    strategies = list(Recompute)
    problems = [planner._problem_with(prep, per, dict.fromkeys(prep.costs.activation_bytes, rc)) for rc in strategies]
    caps = np.array([planner.hardware.memory_bytes - s for s in planner.partition.static_memory_bytes])
    pairs = bounds._pairs(base)
    dmin = np.min(np.stack([p.duration_ms for p in problems]), axis=0)
    order = bounds._order(base)
    chain = bounds._pair_paths_kernel(
        order, dmin, base.pred_ptr, base.pred_idx, base.pred_delay_ms, pairs.forward, pairs.free
    )
    options: list[tuple[str, np.ndarray]] = [
        (rc.value, np.full(len(pairs.forward), j)) for j, rc in enumerate(strategies)
    ]
    for quantile in (0.5, 0.7, 0.85):  # recompute (full) the pairs that must live longest, keep the rest
        cut = float(np.quantile(chain, quantile))
        options.append((f"full above the {quantile:.0%} lifetime", np.where(chain > cut, 2, 0)))
    best, how = float("inf"), "none fits"
    for name, pick in options:
        per_stage = pick[pairs.of_stage]
        mixed = _mixed(problems, per_stage)
        choice = {
            (s.pipeline, s.chunk, s.microbatch, s.sub): strategies[int(per_stage[i])] for i, s in enumerate(base.stages)
        }
        for factor in (1.0, 0.9):
            start = gated_list_schedule(mixed, caps * factor)
            orders = [
                [Compute(base.stages[i], choice[_pair_key(base, i)]) for i in sorted(idx, key=lambda i: start[i])]
                for idx in (np.flatnonzero(base.rank == r).tolist() for r in range(base.pp))
            ]
            plan = assemble_plan(header, orders, prep.shapes.tensors, graph=prep.graph)
            sim = planner.simulate_plan(plan, batch, choice)
            if planner._fits(sim) and sim.makespan_ms < best:
                best, how = sim.makespan_ms, f"{name}, gate at {factor:.0%} of the budget"
    return best, how


def _pair_key(problem: Problem, i: int) -> tuple[str, int, int, int]:
    s = problem.stages[i]
    return (s.pipeline, s.chunk, s.microbatch, s.sub)


def _mixed(problems: list[Problem], per_stage: np.ndarray) -> Problem:
    from dataclasses import replace

    rows = np.arange(problems[0].n)
    dur = np.stack([p.duration_ms for p in problems])[per_stage, rows]
    alloc = np.stack([p.alloc_bytes for p in problems])[per_stage, rows]
    free = np.stack([p.free_bytes for p in problems])[per_stage, rows]
    return replace(problems[0], duration_ms=dur, alloc_bytes=alloc, free_bytes=free)


def head_work_tail_ms(problem: Problem, strategies: list[Problem]) -> float:
    """Argument 2 as it was before the one-machine view: max over ranks of smallest head + work + smallest tail."""
    dmin = np.min(np.stack([problem.duration_ms, *(v.duration_ms for v in strategies)]), axis=0)
    head, tail = bounds._heads_and_tails(problem, dmin)
    masks = [problem.rank == r for r in range(problem.pp)]
    return max(float(head[m].min() + dmin[m].sum() + tail[m].min()) for m in masks if m.any())


def bound_row(planner: Planner, batch: BatchMetadata) -> tuple[dict[str, Any], Problem, BoundParts]:
    """The bound's arguments on one batch, as the planner wires them (every strategy, the device budget)."""
    header = planner.header_for(batch, job_id="", source=PlanSource.SEARCH, schedule="pipeweaver")
    prep = planner._prepare(batch, header, Recompute.NONE)
    per = planner._strategy_costs(prep, batch)
    t0 = time.perf_counter()
    strategies = [planner._problem_with(prep, per, dict.fromkeys(prep.costs.activation_bytes, rc)) for rc in Recompute]
    caps = [planner.hardware.memory_bytes - s for s in planner.partition.static_memory_bytes]
    parts = lower_bound_parts(prep.problem, strategies, caps)
    bound_ms = (time.perf_counter() - t0) * 1e3
    row = {
        "new_bound_ms": round(parts.best_ms, 1),
        "chain_ms": round(parts.chain_ms, 1),
        "head_work_tail_ms": round(head_work_tail_ms(prep.problem, strategies), 1),
        "busiest_rank_ms": round(parts.rank_ms, 1),
        "memory_time_ms": round(parts.memory_ms, 1),
        "bound_compute_ms": round(bound_ms, 1),
    }
    return row, prep.problem, parts


def measure(name: str, batches: int, budget_ms: float, seed: int, witness: bool) -> list[dict[str, Any]]:
    w = workload(name)
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=budget_ms))
    rows = []
    for it in range(batches):
        batch = sample_batch(w, seed=seed, iteration=it)
        bound, problem, parts = bound_row(planner, batch)
        old = lower_bound_ms(problem)
        result = planner.plan(batch)
        fitting = planner.baseline_makespans(batch)
        best_name = min(fitting, key=lambda k: fitting[k]) if fitting else ""
        row: dict[str, Any] = {
            "workload": name,
            "iteration": it,
            "old_bound_ms": round(old, 1),
            **bound,
            "pipeweaver_ms": round(result.predicted_ms, 1),
            "pipeweaver_fits": bool(max(result.peak_memory_bytes) <= w.hardware.memory_bytes),
            "pipeweaver_start": result.start,
            "plan_ms": round(result.search_ms, 1),
            "planner_reported_bound_ms": round(result.lower_bound_ms, 1),
            "best_baseline": best_name,
            "best_baseline_ms": round(fitting[best_name], 1) if best_name else None,
            "interleaved_1f1b_ms": round(fitting["interleaved-1f1b"], 1) if "interleaved-1f1b" in fitting else None,
            "baselines_not_fitting": sorted(planner.baselines_over_memory(batch)),
            "baselines_below_new_bound": sorted(k for k, v in fitting.items() if v < parts.best_ms - 1e-6),
            "gap_old": round(result.predicted_ms / old - 1, 4),
            "gap_new": round(result.predicted_ms / parts.best_ms - 1, 4),
        }
        if witness:
            t1 = time.perf_counter()
            ms, how = witness_ms(planner, batch)
            row["witness_ms"] = round(ms, 1) if np.isfinite(ms) else None
            row["witness"] = how
            row["witness_s"] = round(time.perf_counter() - t1, 1)
            row["witness_gap_new"] = round(ms / parts.best_ms - 1, 4) if np.isfinite(ms) else None
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    planner.close()
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == name]

        def mean(key: str, rows_: list[dict[str, Any]] = mine) -> float | None:
            values = [r[key] for r in rows_ if r.get(key) is not None]
            return round(statistics.fmean(values), 1) if values else None

        pw, old, new = mean("pipeweaver_ms"), mean("old_bound_ms"), mean("new_bound_ms")
        assert pw is not None and old is not None and new is not None
        best, vpp = mean("best_baseline_ms"), mean("interleaved_1f1b_ms")
        summary: dict[str, Any] = {
            "batches": len(mine),
            "old_bound_ms": old,
            "new_bound_ms": new,
            "pipeweaver_ms": pw,
            "best_baseline_ms": best,
            "best_baselines": sorted({r["best_baseline"] for r in mine if r["best_baseline"]}),
            "speedup_vs_best_baseline": round(best / pw, 4) if best is not None else None,
            "speedup_vs_interleaved_1f1b": round(vpp / pw, 4) if vpp is not None else None,
            "baselines_not_fitting": sorted({b for r in mine for b in r["baselines_not_fitting"]}),
            "plan_ms_p50": round(statistics.median(r["plan_ms"] for r in mine), 1),
            "gap_old": round(pw / old - 1, 4),
            "gap_new": round(pw / new - 1, 4),
            "any_baseline_below_new_bound": any(r["baselines_below_new_bound"] for r in mine),
        }
        witness = mean("witness_ms")
        if witness is not None:
            summary["witness_ms"] = witness
            summary["witness_gap_new"] = round(witness / new - 1, 4)
        out[name] = summary
    return out


def same_plans(reports: Path, names: list[str], seed: int) -> dict[str, Any]:
    """Today's bound on the batches of each workload's `pipeweaver bench` report, against the plans it recorded."""
    summary: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for name in names:
        report = json.loads((reports / name / "bench.json").read_text())
        w = workload(name)
        planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(compare_baselines=()))
        mine = []
        for it in range(int(report["batches"])):
            row, _, _ = bound_row(planner, sample_batch(w, seed=seed, iteration=it))
            mine.append({"workload": name, "iteration": it, **row})
            print(json.dumps(mine[-1]), file=sys.stderr, flush=True)
        planner.close()
        ours = float(report["systems"]["pipeweaver"]["mean_iter_ms"])
        then = float(report["lower_bound_mean_ms"])

        def mean(key: str, rows_: list[dict[str, Any]] = mine) -> float:
            return round(statistics.fmean(r[key] for r in rows_), 1)

        now = mean("new_bound_ms")
        summary[name] = {
            "batches": len(mine),
            "pipeweaver_ms": ours,
            "reported_bound_ms": then,
            "bound_ms": now,
            "chain_ms": mean("chain_ms"),
            "head_work_tail_ms": mean("head_work_tail_ms"),
            "busiest_rank_ms": mean("busiest_rank_ms"),
            "memory_time_ms": mean("memory_time_ms"),
            "bound_compute_ms_max": max(r["bound_compute_ms"] for r in mine),
            "gap_reported": round(ours / then - 1, 4),
            "gap_now": round(ours / now - 1, 4),
        }
        rows += mine
    return {"summary": summary, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--budget-ms", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 batches per workload, 300 ms budget")
    parser.add_argument("--no-witness", action="store_true", help="skip the gated list-schedule witness")
    parser.add_argument("--out", type=Path, help=f"default {RESULTS} ({SAME_PLANS} with --plans-from)")
    parser.add_argument("--plans-from", type=Path, help="plan nothing: today's bound against these bench reports")
    args = parser.parse_args()
    if args.plans_from is not None:
        report = {
            "command": " ".join(sys.argv),
            "seed": args.seed,
            **same_plans(args.plans_from, args.workloads, args.seed),
        }
        out = args.out or SAME_PLANS
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(
            "workload | batches | PipeWeaver s | bound then s | bound now s | head+work+tail s | one machine s"
            " | memory s | gap then | gap now"
        )
        for name, s in report["summary"].items():
            print(
                f"{name} | {s['batches']} | {s['pipeweaver_ms'] / 1e3:.2f} | {s['reported_bound_ms'] / 1e3:.2f}"
                f" | {s['bound_ms'] / 1e3:.2f} | {s['head_work_tail_ms'] / 1e3:.2f} | {s['busiest_rank_ms'] / 1e3:.2f}"
                f" | {s['memory_time_ms'] / 1e3:.2f} | {s['gap_reported']:.2%} | {s['gap_now']:.2%}"
            )
        return 0
    batches, budget = (2, 300.0) if args.quick else (args.batches, args.budget_ms)
    rows: list[dict[str, Any]] = []
    for name in args.workloads:
        rows += measure(name, batches, budget, args.seed, not args.no_witness)
    summary = summarise(rows)
    report = {
        "command": " ".join(sys.argv),
        "batches_per_workload": batches,
        "budget_ms": budget,
        "seed": args.seed,
        "summary": summary,
        "rows": rows,
    }
    out = args.out or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    head = (
        "workload | old bound s | new bound s | PipeWeaver s | best baseline s (fits) | vs best | vs VPP | gap old"
        " | gap new | witness s | plan p50 ms"
    )
    print(head)
    for name, s in summary.items():
        base = f"{s['best_baseline_ms'] / 1e3:.2f}" if s["best_baseline_ms"] is not None else "-"
        wit = f"{s['witness_ms'] / 1e3:.2f}" if s.get("witness_ms") is not None else "-"
        vs_best = f"{s['speedup_vs_best_baseline']:.3f}x" if s["speedup_vs_best_baseline"] else "-"
        vs_vpp = f"{s['speedup_vs_interleaved_1f1b']:.3f}x" if s["speedup_vs_interleaved_1f1b"] else "-"
        print(
            f"{name} | {s['old_bound_ms'] / 1e3:.2f} | {s['new_bound_ms'] / 1e3:.2f} | {s['pipeweaver_ms'] / 1e3:.2f}"
            f" | {base} | {vs_best} | {vs_vpp} | {s['gap_old']:.1%} | {s['gap_new']:.1%} | {wit}"
            f" | {s['plan_ms_p50']:.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

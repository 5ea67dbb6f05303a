"""Lower bounds on a batch's makespan, and the exact optimum of small instances with CP-SAT.

The bound tells how far a plan can still be from the best possible: no schedule beats the busiest rank's work
plus the least time before that rank can start anything and after it must stop, nor the longest dependency chain.
"""

from __future__ import annotations

import numpy as np

from pipeweaver.search.problem import Problem


def _heads_and_tails(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Longest path ending before each stage starts (head) and after it ends (tail), delays included."""
    n = problem.n
    indeg = np.diff(problem.pred_ptr).copy()
    order: list[int] = [i for i in range(n) if indeg[i] == 0]
    k = 0
    while k < len(order):
        i = order[k]
        k += 1
        for q in range(problem.succ_ptr[i], problem.succ_ptr[i + 1]):
            j = int(problem.succ_idx[q])
            indeg[j] -= 1
            if indeg[j] == 0:
                order.append(j)
    head = np.zeros(n)
    for i in order:
        for q in range(problem.pred_ptr[i], problem.pred_ptr[i + 1]):
            p = int(problem.pred_idx[q])
            head[i] = max(head[i], head[p] + problem.duration_ms[p] + problem.pred_delay_ms[q])
    tail = np.zeros(n)
    for i in reversed(order):
        for q in range(problem.pred_ptr[i], problem.pred_ptr[i + 1]):
            p = int(problem.pred_idx[q])
            tail[p] = max(tail[p], tail[i] + problem.duration_ms[i] + problem.pred_delay_ms[q])
    return head, tail


def lower_bound_ms(problem: Problem) -> float:
    """max(longest chain, max over ranks of min head + total work + min tail)."""
    if problem.n == 0:
        return 0.0
    head, tail = _heads_and_tails(problem)
    chain = float(np.max(head + problem.duration_ms + tail))
    best = chain
    for r in range(problem.pp):
        mask = problem.rank == r
        if not mask.any():
            continue
        bound = float(head[mask].min() + problem.duration_ms[mask].sum() + tail[mask].min())
        best = max(best, bound)
    return best


def exact_makespan_ms(
    problem: Problem, *, time_limit_s: float = 30.0, workers: int = 1, scale: float = 1000.0
) -> tuple[float, bool]:
    """Optimal makespan of the interleaving problem (ranks run one stage at a time; memory not constrained).

    Durations are scaled to integers (`scale` units per ms). Returns (makespan_ms, proven_optimal).
    """
    from ortools.sat.python import cp_model  # server-side dependency; imported here so clients never need it

    model = cp_model.CpModel()
    dur = np.rint(problem.duration_ms * scale).astype(np.int64)
    delay = np.rint(problem.pred_delay_ms * scale).astype(np.int64)
    horizon = int(dur.sum() + delay.sum() + 1)
    starts = [model.new_int_var(0, horizon, f"s{i}") for i in range(problem.n)]
    ends = [model.new_int_var(0, horizon, f"e{i}") for i in range(problem.n)]
    intervals = [model.new_interval_var(starts[i], int(dur[i]), ends[i], f"x{i}") for i in range(problem.n)]
    for i in range(problem.n):
        for q in range(problem.pred_ptr[i], problem.pred_ptr[i + 1]):
            p = int(problem.pred_idx[q])
            model.add(starts[i] >= ends[p] + int(delay[q]))
    for r in range(problem.pp):
        model.add_no_overlap([intervals[i] for i in range(problem.n) if problem.rank[i] == r])
    makespan = model.new_int_var(0, horizon, "makespan")
    model.add_max_equality(makespan, ends)
    model.minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"CP-SAT found no schedule ({solver.status_name(status)})")
    return solver.objective_value / scale, status == cp_model.OPTIMAL

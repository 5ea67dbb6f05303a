"""Per-rank memory-strategy optimisation (paper section 5.3, level 3 of the search).

Each stage pair (a chunk's forward and its backward for one sub-microbatch) can keep all activations, drop the
attention internals (selective recompute) or keep only its input (full recompute), layer by layer. Layers of a
chunk are identical, so a candidate is a count of layers per strategy; we keep the fastest, the leanest and the
fastest in each memory bucket between them (a multiple-choice knapsack over up to `max_candidates` options).

Then, with the interleaved timeline fixed, a 0-1 program per rank picks one candidate per pair, minimising total
latency subject to the live activations at every pair's start fitting the rank's budget. CP-SAT solves it,
warm-started from the greedy choice, and stops within 5% of optimal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Candidate:
    """Layer counts per strategy of one stage pair and their cost."""

    none: int
    selective: int
    full: int
    latency_ms: float
    """Forward + backward time of the pair under this candidate."""
    memory_bytes: float
    """Activation bytes held from the forward's start to the backward's end."""


def pair_candidates(
    layers: int,
    latency_ms: tuple[float, float, float],
    memory_bytes: tuple[float, float, float],
    *,
    fixed_ms: float = 0.0,
    fixed_bytes: float = 0.0,
    max_candidates: int = 10,
) -> tuple[Candidate, ...]:
    """Candidates for a pair of `layers` identical layers.

    `latency_ms`/`memory_bytes` give one layer's (none, selective, full) cost; `fixed_*` the chunk's other parts.
    Returned fastest first; the first is the fastest, the last the leanest.
    """
    options: list[Candidate] = []
    for a in range(layers + 1):
        for b in range(layers - a + 1):
            c = layers - a - b
            lat = fixed_ms + a * latency_ms[0] + b * latency_ms[1] + c * latency_ms[2]
            mem = fixed_bytes + a * memory_bytes[0] + b * memory_bytes[1] + c * memory_bytes[2]
            options.append(Candidate(a, b, c, lat, mem))
    # Pareto frontier: no other option both faster and leaner.
    options.sort(key=lambda o: (o.latency_ms, o.memory_bytes))
    frontier: list[Candidate] = []
    for o in options:
        if not frontier or o.memory_bytes < frontier[-1].memory_bytes - 1e-9:
            frontier.append(o)
    if len(frontier) <= max_candidates:
        return tuple(frontier)
    fastest, leanest = frontier[0], frontier[-1]
    lo, hi = leanest.memory_bytes, fastest.memory_bytes
    buckets = max_candidates - 2
    chosen = [fastest]
    for k in range(buckets):
        # Bucket k covers memory in [hi - (k+1)w, hi - k w); take its fastest member.
        top = hi - (hi - lo) * k / buckets
        bottom = hi - (hi - lo) * (k + 1) / buckets
        members = [o for o in frontier[1:-1] if bottom <= o.memory_bytes < top]
        if members:
            chosen.append(min(members, key=lambda o: o.latency_ms))
    chosen.append(leanest)
    unique = {(c.none, c.selective, c.full): c for c in chosen}
    return tuple(sorted(unique.values(), key=lambda o: (o.latency_ms, o.memory_bytes)))


@dataclass(frozen=True, slots=True)
class RankChoice:
    choice: tuple[int, ...]
    """Index of the chosen candidate per pair."""
    latency_ms: float
    solve_ms: float
    optimal_gap: float
    """Relative gap the solver proved (0 = optimal); 0 for the greedy fallback when it is trivially optimal."""
    feasible: bool
    solved: bool = False
    """Whether a 0-1 program was solved (False when memory never binds and the fastest choice is trivially optimal)."""


def _alive(start: Sequence[float], end: Sequence[float]) -> np.ndarray:
    """alive[k, i]: pair i is live at pair k's start (s_i <= s_k < t_i); every pair is live at its own start."""
    s = np.asarray(start, dtype=np.float64)
    t = np.asarray(end, dtype=np.float64)
    alive = (s[None, :] <= s[:, None]) & (s[:, None] < t[None, :])
    np.fill_diagonal(alive, True)
    return alive


def _live_sets(start: Sequence[float], end: Sequence[float]) -> list[list[int]]:
    """For every pair k, the pairs i alive at k's start, k itself included."""
    return [np.flatnonzero(row).tolist() for row in _alive(start, end)]


def greedy_choice(
    candidates: Sequence[Sequence[Candidate]], start: Sequence[float], end: Sequence[float], cap_bytes: float
) -> tuple[int, ...]:
    """Start from the leanest candidate everywhere, then speed up pairs, largest saving per byte first."""
    n = len(candidates)
    choice = [len(c) - 1 for c in candidates]
    if n == 0:
        return ()
    alive = _alive(start, end)
    members = [np.flatnonzero(alive[:, i]) for i in range(n)]  # constraints each pair appears in
    mem = np.array([candidates[i][choice[i]].memory_bytes for i in range(n)])
    load = alive.astype(np.float64) @ mem
    # Passes over the pairs, biggest possible saving first; each pair jumps to its fastest candidate that fits.
    order = sorted(range(n), key=lambda i: candidates[i][0].latency_ms - candidates[i][-1].latency_ms, reverse=True)
    improved = True
    while improved:
        improved = False
        for i in order:
            if choice[i] == 0:
                continue
            cur = candidates[i][choice[i]]
            headroom = cap_bytes - float(load[members[i]].max())
            for j in range(choice[i]):
                extra = candidates[i][j].memory_bytes - cur.memory_bytes
                if extra <= headroom:
                    load[members[i]] += extra
                    choice[i] = j
                    improved = True
                    break
    return tuple(choice)


def optimise_rank(
    candidates: Sequence[Sequence[Candidate]],
    start: Sequence[float],
    end: Sequence[float],
    cap_bytes: float,
    *,
    time_limit_s: float = 0.05,
    relative_gap: float = 0.05,
    workers: int = 1,
    max_pairs: int = 300,
) -> RankChoice:
    """Pick one candidate per pair: min sum latency s.t. live activations at every pair start <= cap."""
    from ortools.sat.python import cp_model  # server-side dependency

    t0 = time.perf_counter()
    n = len(candidates)
    greedy = greedy_choice(candidates, start, end, cap_bytes)
    if n == 0:
        return RankChoice((), 0.0, 0.0, 0.0, True)
    # Constraints that hold even with every pair at its fastest (= largest) candidate can never bind: drop them,
    # and fix pairs that only appear in such constraints at their fastest. Plentiful memory means no solve at all.
    live = _live_sets(start, end)
    tight = [ls for ls in live if sum(candidates[i][0].memory_bytes for i in ls) > cap_bytes]
    free_pairs = sorted({i for ls in tight for i in ls})
    choice_out = [0] * n
    if not free_pairs:
        lat = sum(c[0].latency_ms for c in candidates)
        return RankChoice(tuple(choice_out), lat, (time.perf_counter() - t0) * 1e3, 0.0, True)
    if len(free_pairs) > max_pairs:
        # Too big to build and solve within a planning budget from Python: keep the greedy warm start.
        lat = sum(candidates[i][greedy[i]].latency_ms for i in range(n))
        return RankChoice(greedy, lat, (time.perf_counter() - t0) * 1e3, 1.0, True)
    scale_ms = 1000.0
    mem_unit = max(cap_bytes, 1.0) / 1e6  # memory in millionths of the cap keeps coefficients small
    model = cp_model.CpModel()
    x = {i: [model.new_bool_var(f"o{i}_{j}") for j in range(len(candidates[i]))] for i in free_pairs}
    for i in free_pairs:
        model.add_exactly_one(x[i])
        for j in range(len(candidates[i])):
            model.add_hint(x[i][j], j == greedy[i])
    cap_units = int(cap_bytes / mem_unit)
    # One memory variable per pair keeps each live-set constraint at |live| terms instead of |live| * candidates.
    mem_var = {}
    for i in free_pairs:
        units = [int(c.memory_bytes / mem_unit) for c in candidates[i]]
        mem_var[i] = model.new_int_var(min(units), max(units), f"m{i}")
        model.add(mem_var[i] == sum(u * v for u, v in zip(units, x[i], strict=True)))
    for ls in tight:
        fixed = sum(int(candidates[i][0].memory_bytes / mem_unit) for i in ls if i not in mem_var)
        model.add(sum(mem_var[i] for i in ls if i in mem_var) + fixed <= cap_units)
    model.minimize(
        sum(round(candidates[i][j].latency_ms * scale_ms) * x[i][j] for i in free_pairs for j in range(len(x[i])))
    )
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.relative_gap_limit = relative_gap
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        for i in free_pairs:
            choice_out[i] = next(j for j in range(len(x[i])) if solver.value(x[i][j]))
        choice = tuple(choice_out)
        obj, bound = solver.objective_value, solver.best_objective_bound
        gap = 0.0 if status == cp_model.OPTIMAL else max(0.0, (obj - bound) / max(obj, 1.0))
        feasible = True
    else:  # no proof in time: keep the greedy warm start (always memory-safe when the leanest choice fits)
        choice, gap, feasible = greedy, 1.0, status != cp_model.INFEASIBLE
    lat = sum(candidates[i][choice[i]].latency_ms for i in range(n))
    return RankChoice(choice, lat, (time.perf_counter() - t0) * 1e3, gap, feasible, solved=True)

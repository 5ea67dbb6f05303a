"""Per-rank memory-strategy optimisation (paper section 5.3, level 3 of the search).

Each stage pair (a chunk's forward and its backward for one sub-microbatch) can keep all activations, drop the
attention internals (selective recompute) or keep only its input (full recompute), layer by layer. Layers of a
chunk are identical, so a candidate is a count of layers per strategy; we keep the fastest, the leanest and the
fastest in each memory bucket between them (a multiple-choice knapsack over up to `max_candidates` options).

Then, with the interleaved timeline fixed, a 0-1 program per rank picks one candidate per pair, minimising total
latency subject to the live activations at every pair's start fitting the rank's budget, and stops within 5% of
optimal. How it is solved (`benchmarks/bench_search.py --only memory`: about 1 ms per vlm-s or t2v-s rank; CP-SAT
alone took ~90 ms there, mostly hitting its time limit without improving on the greedy start):

1. Structure. A pair is live on an interval of time, so once the constraint points (the pairs' starts) are
   sorted, the points where a pair is live form a consecutive range [lo, hi); loads and prices are then prefix
   sums (O(n + K) per evaluation instead of O(n K)). Constraints that hold with every pair at its fastest are
   dropped (with the pairs only they touch, fixed at their fastest), and so is every constraint whose live set is
   contained in a neighbour's (interval sets: only local maxima can bind).
2. A Lagrangian lower bound. Pricing memory at each point (lambda >= 0) makes the pairs independent:
   L(lambda) = sum_i min_j (lat_ij + mem_ij * sum_{k in range(i)} lambda_k) - cap * sum_k lambda_k <= optimum.
   Projected subgradient steps (Polyak) reach the LP relaxation's value to within ~0.1% in a few hundred cheap
   iterations; on the workloads measured the LP value is within 0.3% of the integer optimum.
3. Upper bounds. The greedy warm start (leanest everywhere, then the biggest savings first), and a Lagrangian
   heuristic every few iterations: the priced choice, repaired (at the most overloaded point, give up the
   cheapest speed per byte saved) and filled (upgrade wherever headroom allows).
4. Stop as soon as best <= (1 + gap) * bound: the answer is provably within `gap` of the optimum. Only if the
   bound cannot prove it within the iteration cap does CP-SAT run, warm-started (hinted) from the best solution,
   on the reduced model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B8 = npt.NDArray[np.bool_]

_TOL = 1e-9
"""Relative slack on the (normalised) cap when checking a load: incremental load updates drift by ~1e-16."""


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
    """Wall time of the whole call: preparing the arrays, the greedy start, the bound, CP-SAT if it ran."""
    optimal_gap: float
    """Proven relative gap, (latency - lower bound) / lower bound: the choice is within this fraction of the
    optimum (0 = optimal). inf when no bound was computed (the greedy start only)."""
    feasible: bool
    solved: bool = False
    """Whether memory binds, so a 0-1 program had to be decided (False when the fastest choice everywhere fits)."""
    lower_bound_ms: float = 0.0
    """Proven lower bound on the optimal total latency."""
    method: str = "trivial"
    """What settled it: "trivial" (memory never binds), "bound" (the Lagrangian bound proved the gap), "cp-sat",
    "greedy" (no bound asked for), "infeasible" (even the leanest choice overflows)."""


# ---- arrays --------------------------------------------------------------------------------------------------


def candidate_arrays(candidates: Sequence[Sequence[Candidate]]) -> tuple[F64, F64, I64]:
    """(latency_ms[n, S], memory_bytes[n, S], count[n]) of per-pair candidate lists; padding repeats the last."""
    n = len(candidates)
    width = max((len(c) for c in candidates), default=1)
    lat = np.zeros((n, width))
    mem = np.zeros((n, width))
    count = np.zeros(n, dtype=np.int64)
    for i, cands in enumerate(candidates):
        if not cands:
            raise ValueError(f"stage pair {i} has no candidate")
        count[i] = len(cands)
        for j, c in enumerate(cands):
            lat[i, j] = c.latency_ms
            mem[i, j] = c.memory_bytes
        lat[i, len(cands) :] = lat[i, len(cands) - 1]
        mem[i, len(cands) :] = mem[i, len(cands) - 1]
    return lat, mem, count


def _ranges(start: F64, end: F64) -> tuple[I64, I64]:
    """Sort the constraint points (every pair's start); pair i is live at points lo[i] <= k < hi[i].

    Live means s_i <= s_k < t_i. A pair of zero length counts as live at its own start (and at every start tied
    with it: slightly conservative, and no real pair has zero length).
    """
    points = np.sort(start)
    lo = np.searchsorted(points, start, "left").astype(np.int64)
    hi = np.maximum(np.searchsorted(points, end, "left"), np.searchsorted(points, start, "right")).astype(np.int64)
    return lo, hi


def _range_loads(values: F64, lo: I64, hi: I64, k: int) -> F64:
    diff = np.zeros(k + 1)
    np.add.at(diff, lo, values)
    np.add.at(diff, hi, -values)
    out: F64 = np.cumsum(diff[:k])
    return out


def _restrict(lo: I64, hi: I64, keep: B8) -> tuple[I64, I64, int]:
    """Re-index ranges onto the kept points (ranges stay contiguous: keeping a subset of sorted points)."""
    before = np.concatenate(([0], np.cumsum(keep))).astype(np.int64)
    return before[lo], before[hi], int(before[-1])


def _maximal(lo: I64, hi: I64, k: int) -> B8:
    """Points whose live set is not contained in a neighbour's (the only constraints that can bind).

    Moving from point k to k+1 drops the pairs with hi == k+1 and adds those with lo == k+1. S_k is inside S_{k+1}
    when nothing ends there; S_k is strictly inside S_{k-1} when something ended at k and nothing started. Equal
    neighbours keep the last of their run.
    """
    live = hi > lo  # pairs that cover no point (fixed at their fastest) neither start nor end anywhere
    ends = np.zeros(k + 1, dtype=bool)
    ends[hi[live]] = True
    starts = np.zeros(k + 1, dtype=bool)
    starts[lo[live]] = True
    idx = np.arange(k)
    inside_next = (idx + 1 < k) & ~ends[np.minimum(idx + 1, k)]
    inside_prev = (idx > 0) & ~starts[idx] & ends[idx]
    keep: B8 = ~(inside_next | inside_prev)
    return keep


# ---- kernels -------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _loads(mem: F64, choice: I64, lo: I64, hi: I64, k: int) -> F64:
    diff = np.zeros(k + 1)
    for i in range(choice.shape[0]):
        v = mem[i, choice[i]]
        diff[lo[i]] += v
        diff[hi[i]] -= v
    out = np.empty(k)
    acc = 0.0
    for p in range(k):
        acc += diff[p]
        out[p] = acc
    return out


@numba.njit(cache=True)
def _shift(load: F64, a: int, b: int, delta: float) -> None:
    for p in range(a, b):
        load[p] += delta


@numba.njit(cache=True)
def _fill(lat: F64, mem: F64, count: I64, lo: I64, hi: I64, load: F64, choice: I64, order: I64, limit: float) -> None:
    """Passes over the pairs in `order`; each moves to its fastest candidate that fits its live range's headroom."""
    improved = True
    while improved:
        improved = False
        for q in range(order.shape[0]):
            i = order[q]
            c = choice[i]
            top = -math.inf
            for p in range(lo[i], hi[i]):
                if load[p] > top:
                    top = load[p]
            room = limit - top
            best = c
            for j in range(count[i]):
                if lat[i, j] < lat[i, best] and mem[i, j] - mem[i, c] <= room:
                    best = j
            if best != c:
                _shift(load, lo[i], hi[i], mem[i, best] - mem[i, c])
                choice[i] = best
                improved = True


@numba.njit(cache=True)
def _cover(lo: I64, hi: I64, k: int) -> tuple[I64, I64]:
    """CSR of the pairs live at each point (what `_repair` scans instead of every pair)."""
    ptr = np.zeros(k + 1, dtype=np.int64)
    for i in range(lo.shape[0]):
        for p in range(lo[i], hi[i]):
            ptr[p + 1] += 1
    for p in range(k):
        ptr[p + 1] += ptr[p]
    idx = np.empty(ptr[k], dtype=np.int64)
    fill = ptr[:k].copy()
    for i in range(lo.shape[0]):
        for p in range(lo[i], hi[i]):
            idx[fill[p]] = i
            fill[p] += 1
    return ptr, idx


@numba.njit(cache=True)
def _repair(
    lat: F64,
    mem: F64,
    count: I64,
    lo: I64,
    hi: I64,
    cover_ptr: I64,
    cover_idx: I64,
    load: F64,
    choice: I64,
    limit: float,
) -> bool:
    """Until every point fits: at the most overloaded point, give up the least latency per byte freed.

    Moves at that point are ranked once (each live pair's best move to a leaner candidate, by latency added per
    byte freed) and applied in that order until the point fits; then the next most overloaded point. Re-ranking
    after every single move made plans within 0.15% of these (mean over 10 vlm-s and 10 t2v-s batches) but cost
    ~15 ms per repair on a vlm-l rank, where 700 of its 941 pairs are live at a typical point and repairing the
    fastest choice takes ~1,800 moves; this takes ~0.3 ms.
    """
    k = load.shape[0]
    rate = np.empty(cover_idx.shape[0])
    pair = np.empty(cover_idx.shape[0], dtype=np.int64)
    cand = np.empty(cover_idx.shape[0], dtype=np.int64)
    while True:
        worst = -1
        top = limit
        for p in range(k):
            if load[p] > top:
                top = load[p]
                worst = p
        if worst < 0:
            return True
        m = 0
        for q in range(cover_ptr[worst], cover_ptr[worst + 1]):
            i = cover_idx[q]
            c = choice[i]
            best_j = -1
            best_rate = math.inf
            for j in range(count[i]):
                freed = mem[i, c] - mem[i, j]
                if freed > 0.0:
                    r = (lat[i, j] - lat[i, c]) / freed
                    if r < best_rate:
                        best_rate = r
                        best_j = j
            if best_j >= 0:
                rate[m] = best_rate
                pair[m] = i
                cand[m] = best_j
                m += 1
        if m == 0:
            return False  # every pair live here is at its leanest: no choice fits
        ranked = np.argsort(rate[:m], kind="mergesort")
        for q in range(m):
            if load[worst] <= limit:
                break
            i = pair[ranked[q]]
            j = cand[ranked[q]]
            _shift(load, lo[i], hi[i], mem[i, j] - mem[i, choice[i]])
            choice[i] = j


@numba.njit(cache=True)
def _total(lat: F64, choice: I64) -> float:
    s = 0.0
    for i in range(choice.shape[0]):
        s += lat[i, choice[i]]
    return s


@numba.njit(cache=True)
def _greedy(lat: F64, mem: F64, count: I64, lo: I64, hi: I64, k: int, order: I64, limit: float) -> I64:
    """The warm start: the leanest candidate everywhere, then `_fill` (biggest possible saving first)."""
    n = lat.shape[0]
    choice = np.zeros(n, dtype=np.int64)
    for i in range(n):
        best = 0
        for j in range(count[i]):
            if mem[i, j] < mem[i, best] or (mem[i, j] == mem[i, best] and lat[i, j] < lat[i, best]):
                best = j
        choice[i] = best
    load = _loads(mem, choice, lo, hi, k)
    _fill(lat, mem, count, lo, hi, load, choice, order, limit)
    return choice


@numba.njit(cache=True)
def _lagrangian(
    lat: F64,
    mem: F64,
    count: I64,
    lo: I64,
    hi: I64,
    k: int,
    cap: float,
    limit: float,
    order: I64,
    best: I64,
    gap: float,
    max_iterations: int,
    heuristic_every: int,
) -> tuple[float, float, int]:
    """Subgradient ascent on the Lagrangian dual with a Lagrangian heuristic; improves `best` in place.

    Returns (lower bound, latency of `best`, iterations). Stops once best <= (1 + gap) * bound.
    """
    n = lat.shape[0]
    cover_ptr, cover_idx = _cover(lo, hi, k)
    lam = np.zeros(k)
    prefix = np.zeros(k + 1)
    pick = np.zeros(n, dtype=np.int64)
    ub = _total(lat, best)
    bound = -math.inf
    theta = 1.0
    stall = 0
    it = 0
    while it < max_iterations:
        for p in range(k):
            prefix[p + 1] = prefix[p] + lam[p]
        value = -cap * prefix[k]
        for i in range(n):
            price = prefix[hi[i]] - prefix[lo[i]]
            bj = 0
            bv = math.inf
            for j in range(count[i]):
                v = lat[i, j] + price * mem[i, j]
                if v < bv:
                    bv = v
                    bj = j
            pick[i] = bj
            value += bv
        if bound == -math.inf or value > bound + 1e-12 * abs(bound):
            bound = value
            stall = 0
        else:
            stall += 1
            if stall >= 5:
                theta *= 0.5
                stall = 0
        if ub <= (1.0 + gap) * bound:
            break
        # From lambda = 0 too: the fastest choice everywhere, repaired down, complements the greedy start (which
        # comes up from the leanest) and gave the better schedules on vlm-s.
        if it % heuristic_every == 0:
            trial = pick.copy()
            load = _loads(mem, trial, lo, hi, k)
            if _repair(lat, mem, count, lo, hi, cover_ptr, cover_idx, load, trial, limit):
                _fill(lat, mem, count, lo, hi, load, trial, order, limit)
                t = _total(lat, trial)
                if t < ub:
                    ub = t
                    best[:] = trial
                    if ub <= (1.0 + gap) * bound:
                        break
        load = _loads(mem, pick, lo, hi, k)
        norm = 0.0
        for p in range(k):
            g = load[p] - cap
            if lam[p] <= 0.0 and g < 0.0:
                g = 0.0
            load[p] = g
            norm += g * g
        if norm <= 0.0:
            break  # the priced choice fits and leaves no priced point slack: lambda is dual optimal
        step = theta * max(ub - value, 1e-9 * abs(ub)) / norm
        for p in range(k):
            v = lam[p] + step * load[p]
            lam[p] = v if v > 0.0 else 0.0
        it += 1
    return bound, ub, it


# ---- the program ---------------------------------------------------------------------------------------------


def greedy_choice(
    candidates: Sequence[Sequence[Candidate]], start: Sequence[float], end: Sequence[float], cap_bytes: float
) -> tuple[int, ...]:
    """Start from the leanest candidate everywhere, then speed up pairs, biggest possible saving first."""
    if not candidates:
        return ()
    lat, mem, count = candidate_arrays(candidates)
    return tuple(int(j) for j in greedy_choice_arrays(lat, mem, count, start, end, cap_bytes))


def greedy_choice_arrays(
    lat: F64, mem: F64, count: I64, start: Sequence[float] | F64, end: Sequence[float] | F64, cap_bytes: float
) -> I64:
    """`greedy_choice` on `candidate_arrays` (the planner builds the arrays directly)."""
    s = np.asarray(start, dtype=np.float64)
    lo, hi = _ranges(s, np.asarray(end, dtype=np.float64))
    unit = max(cap_bytes, 1.0)
    return _greedy(lat, mem / unit, count, lo, hi, len(s), _saving_order(lat, count), _limit(cap_bytes / unit))


def _saving_order(lat: F64, count: I64) -> I64:
    leanest_lat = lat[np.arange(len(count)), count - 1]
    order: I64 = np.argsort(-(leanest_lat - lat.min(axis=1)), kind="stable").astype(np.int64)
    return order


def _limit(cap: float) -> float:
    return cap * (1.0 + _TOL) + 1e-300


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
    max_iterations: int = 400,
) -> RankChoice:
    """Pick one candidate per pair: min sum latency s.t. live activations at every pair start <= cap.

    Candidates of a pair are in any order (`pair_candidates` gives fastest first). See the module docstring for
    the method; `time_limit_s` bounds CP-SAT, which runs only when the Lagrangian bound cannot prove
    `relative_gap` within `max_iterations` (0 keeps the best heuristic answer and its proven gap instead), and
    only on at most `max_pairs` free pairs.
    """
    if not candidates:
        return RankChoice((), 0.0, 0.0, 0.0, True)
    t0 = time.perf_counter()
    lat, mem, count = candidate_arrays(candidates)
    return optimise_rank_arrays(
        lat,
        mem,
        count,
        start,
        end,
        cap_bytes,
        time_limit_s=time_limit_s,
        relative_gap=relative_gap,
        workers=workers,
        max_pairs=max_pairs,
        max_iterations=max_iterations,
        t0=t0,
    )


def optimise_rank_arrays(
    lat: F64,
    mem: F64,
    count: I64,
    start: Sequence[float] | F64,
    end: Sequence[float] | F64,
    cap_bytes: float,
    *,
    time_limit_s: float = 0.05,
    relative_gap: float = 0.05,
    workers: int = 1,
    max_pairs: int = 300,
    max_iterations: int = 400,
    t0: float | None = None,
) -> RankChoice:
    """`optimise_rank` on `candidate_arrays` (`t0`: when the caller started timing, default now)."""
    t0 = time.perf_counter() if t0 is None else t0
    n = len(count)
    if n == 0:
        return RankChoice((), 0.0, (time.perf_counter() - t0) * 1e3, 0.0, True)
    s = np.asarray(start, dtype=np.float64)
    lo, hi = _ranges(s, np.asarray(end, dtype=np.float64))
    unit = max(cap_bytes, 1.0)  # memory in units of the cap keeps the kernels' numbers near 1
    memn = mem / unit
    cap = cap_bytes / unit
    limit = _limit(cap)
    rows = np.arange(n)
    fastest = np.lexsort((memn, lat), axis=-1)[:, 0]  # ties: the leaner
    # Points where even the fastest choice everywhere fits can never bind: drop them; then keep maximal live sets.
    tight = _range_loads(memn[rows, fastest], lo, hi, n) > limit
    if not tight.any():
        return RankChoice(
            tuple(int(j) for j in fastest),
            float(lat[rows, fastest].sum()),
            (time.perf_counter() - t0) * 1e3,
            0.0,
            True,
            lower_bound_ms=float(lat[rows, fastest].sum()),
        )
    lo, hi, k = _restrict(lo, hi, tight)
    lo, hi, k = _restrict(lo, hi, _maximal(lo, hi, k))
    order = _saving_order(lat, count)
    best = _greedy(lat, memn, count, lo, hi, k, order, limit)
    leanest_load = _loads(memn, np.argmin(memn, axis=1).astype(np.int64), lo, hi, k)
    if leanest_load.max(initial=0.0) > limit:
        return RankChoice(
            tuple(int(j) for j in best),
            _total(lat, best),
            (time.perf_counter() - t0) * 1e3,
            math.inf,
            False,
            solved=True,
            method="infeasible",
        )
    bound, ub, _ = _lagrangian(
        lat, memn, count, lo, hi, k, cap, limit, order, best, relative_gap, max_iterations, heuristic_every=10
    )
    bound = max(bound, float(lat[rows, fastest].sum()))  # lambda = 0, when no iteration ran
    method = "bound"
    if ub > (1.0 + relative_gap) * bound and time_limit_s > 0:
        free = np.flatnonzero(hi > lo)
        if len(free) <= max_pairs:
            found = _cp_sat(lat, memn, count, lo, hi, k, cap, best, free, relative_gap, time_limit_s, workers, limit)
            if found is not None:
                bound = max(bound, found)
                ub = _total(lat, best)
                method = "cp-sat"
    gap = max(0.0, ub / bound - 1.0) if bound > 0 else (0.0 if ub <= bound else math.inf)
    return RankChoice(
        tuple(int(j) for j in best),
        float(ub),
        (time.perf_counter() - t0) * 1e3,
        gap,
        True,
        solved=True,
        lower_bound_ms=float(bound),
        method=method,
    )


def _cp_sat(
    lat: F64,
    mem: F64,
    count: I64,
    lo: I64,
    hi: I64,
    k: int,
    cap: float,
    best: I64,
    free: I64,
    relative_gap: float,
    time_limit_s: float,
    workers: int,
    limit: float,
) -> float | None:
    """CP-SAT on the free pairs and maximal points, hinted with `best`; improves `best` in place when it finds a
    faster choice that fits. Returns its proven bound on the total latency (fixed pairs included), or None.

    Integer coefficients are rounded towards a relaxation (memory down, the cap up, latency to the nearest
    microsecond with the error subtracted), so the bound holds for the real problem; a solution is checked in real
    arithmetic before it replaces `best`."""
    from ortools.sat.python import cp_model  # server-side dependency

    scale = 1000.0  # latency in microseconds
    units = 1e6  # memory in millionths of the cap
    model = cp_model.CpModel()
    mem_var = {}
    chooses: dict[int, list[cp_model.IntVar]] = {}
    objective = []
    for i in free.tolist():
        xs = [model.new_bool_var(f"o{i}_{j}") for j in range(int(count[i]))]
        chooses[i] = xs
        model.add_exactly_one(xs)
        for j, x in enumerate(xs):
            model.add_hint(x, j == int(best[i]))
        used = np.floor(mem[i, : len(xs)] * units).astype(np.int64).tolist()
        mem_var[i] = model.new_int_var(min(used), max(used), f"m{i}")
        model.add(mem_var[i] == cp_model.LinearExpr.weighted_sum(xs, used))
        objective.append(cp_model.LinearExpr.weighted_sum(xs, np.rint(lat[i, : len(xs)] * scale).tolist()))
    cap_units = math.ceil(cap * units)
    for p in range(k):
        live = free[(lo[free] <= p) & (p < hi[free])].tolist()
        if live:
            model.add(cp_model.LinearExpr.sum([mem_var[i] for i in live]) <= cap_units)
    model.minimize(cp_model.LinearExpr.sum(objective))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers  # explicit: the default uses every core
    solver.parameters.relative_gap_limit = relative_gap / (1.0 + relative_gap)  # CP-SAT's gap is relative to obj
    solver.parameters.random_seed = 0
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    fixed_pairs = np.setdiff1d(np.arange(len(count)), free)
    fixed = float(lat[fixed_pairs, best[fixed_pairs]].sum())
    # Rounding the latencies moves each term by at most half a microsecond.
    proven = float(solver.best_objective_bound) / scale - 0.5 / scale * len(free) + fixed
    trial = best.copy()
    for i, xs in chooses.items():
        trial[i] = next(j for j, x in enumerate(xs) if solver.boolean_value(x))
    if _total(lat, trial) < _total(lat, best) and _loads(mem, trial, lo, hi, k).max(initial=0.0) <= limit:
        best[:] = trial
    return proven


def warm_memory_kernels() -> None:
    """Compile (or load from the numba cache) the kernels on a two-pair instance whose memory binds."""
    lat = np.array([[1.0, 2.0], [1.0, 2.0]])
    mem = np.array([[2.0, 1.0], [2.0, 1.0]])
    optimise_rank_arrays(lat, mem, np.array([2, 2]), [0.0, 0.5], [1.0, 1.5], 3.0, time_limit_s=0.0)
    greedy_choice_arrays(lat, mem, np.array([2, 2]), [0.0, 0.5], [1.0, 1.5], 3.0)
    _total(lat, np.zeros(2, dtype=np.int64))  # also called from Python (an infeasible rank, after CP-SAT)

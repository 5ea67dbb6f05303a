"""Lower bounds on a batch's makespan, and the exact optimum of small instances with CP-SAT.

The bound tells how far a plan can still be from the best possible. It is the best of three arguments, each valid
for every schedule of the batch's stage graph under the placement and sub-microbatch split the problem was built
for: any order per rank, any memory strategy per stage pair, any interleaving, every cross-rank transfer at least
as long as its delay (SEMU's link queueing only adds to it). "Fastest" below means each stage's smallest duration
over the strategies.

1. **Chain.** No schedule beats the longest dependency chain at the fastest durations.
2. **Busiest rank.** A rank runs one stage at a time, so the makespan is at least the least time before the rank
   can start anything (its smallest head), plus all its work, plus the least time after it must stop (its smallest
   tail), at the fastest durations.
3. **Memory-time area** (given each strategy's costs and each rank's activation budget A_r). A stage pair k (one
   chunk's forward and backward passes for one sub-microbatch) on rank r runs every stage under one strategy s
   (none / selective / full recompute), which sets the pair's work lat_k(s) and its activation bytes m_k(s). As in
   SEMU's engine, the bytes are held from the forward's start to the end of the pair's freeing pass (B; W when the
   backward is split; the forward itself for forward-only pipelines). That lifetime is at least
   L_k(s) = d_F(s) + D_k + d_free(s), with D_k the longest path from the forward's end to the freeing pass's start
   through the stage graph at the fastest durations, transfer delays included (the downstream forwards, the loss,
   the upstream backwards of the same microbatch; no order can shorten a dependency chain). A schedule that fits
   memory keeps the live bytes at or below A_r at every instant; they are zero before r's first forward can start
   (h^F_r, its smallest head) and after r's last freeing pass must end (t^B_r, its smallest tail). Integrating the
   live bytes over the makespan T gives

       sum_k m_k(s_k) L_k(s_k)  <=  integral of live bytes dt  <=  A_r (T - h^F_r - t^B_r),

   and argument 2 with the strategies actually used gives T >= h_r + t_r + sum_k lat_k(s_k). So for every weight
   lam in [0, 1], with busy(s) = h_r + t_r + sum_k lat_k(s_k) and area(s) = h^F_r + t^B_r + sum_k a_k(s_k) / A_r
   (a_k = m_k L_k), the schedule's own strategies s satisfy

       T >= lam busy(s) + (1 - lam) area(s) >= g_r(lam) := min over all s' of [lam busy(s') + (1 - lam) area(s')],

   and the minimum separates into one choice per pair. Every lam gives a valid bound; the maximum over lam (found
   by bisection on the concave g_r) equals the LP relaxation of "min over s of max(busy, area)", i.e. the
   cheapest fractional recompute that frees enough memory-time. lam = 1 is argument 2. The bound is
   max_r max_lam g_r(lam).

The memory argument covers schedules whose live activations stay within the given budget at every instant. Pass
the budget the result is checked against (SEMU's device capacity minus static memory, what `Planner._fits`
checks), not a stricter planning cap, and do not rely on it for a plan that overflows. It is a statement about
this problem's placement and sub-microbatch split; a schedule on another placement (the baselines') has other
stages, so there the bound is only a reference point (the tests and `benchmarks/bench_bound_gap.py` check it).

Limits: argument 3 is a fluid relaxation. It charges each pair only its dependency chain as lifetime, while in a
busy pipeline the other ranks are working on other microbatches and lifetimes are longer (queueing), and it lets
pairs recompute fractionally. Where one microbatch's chain is short next to a rank's work (sub-microbatches run in
parallel across ranks), the area stays below A_r T and the bound is argument 2; it binds where lifetimes are long
and activations big (t2v-l: a few percent above argument 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from pipeweaver.plan.ir import Pass
from pipeweaver.search.problem import Problem

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_BISECTIONS = 60
"""Bisection steps on lam per rank (each halves the interval; g is concave piecewise linear)."""


# ---- graph kernels ---------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _topological_order(n: int, pred_ptr: I64, succ_ptr: I64, succ_idx: I64) -> I64:  # pragma: no cover - numba
    indeg = np.empty(n, np.int64)
    for i in range(n):
        indeg[i] = pred_ptr[i + 1] - pred_ptr[i]
    order = np.empty(n, np.int64)
    size = 0
    for i in range(n):
        if indeg[i] == 0:
            order[size] = i
            size += 1
    k = 0
    while k < size:
        i = order[k]
        k += 1
        for q in range(succ_ptr[i], succ_ptr[i + 1]):
            j = succ_idx[q]
            indeg[j] -= 1
            if indeg[j] == 0:
                order[size] = j
                size += 1
    return order[:size]


@numba.njit(cache=True)
def _heads_tails_kernel(
    order: I64, dur: F64, pred_ptr: I64, pred_idx: I64, pred_delay: F64
) -> tuple[F64, F64]:  # pragma: no cover - numba
    n = dur.shape[0]
    head = np.zeros(n)
    tail = np.zeros(n)
    for i in order:
        for q in range(pred_ptr[i], pred_ptr[i + 1]):
            p = pred_idx[q]
            head[i] = max(head[i], head[p] + dur[p] + pred_delay[q])
    for k in range(order.shape[0] - 1, -1, -1):
        i = order[k]
        for q in range(pred_ptr[i], pred_ptr[i + 1]):
            p = pred_idx[q]
            tail[p] = max(tail[p], tail[i] + dur[i] + pred_delay[q])
    return head, tail


@numba.njit(cache=True)
def _components(n: int, pred_ptr: I64, pred_idx: I64) -> I64:  # pragma: no cover - numba
    """Each stage's weakly connected component, named by a root stage (union-find with path halving)."""
    parent = np.arange(n)
    for i in range(n):
        for q in range(pred_ptr[i], pred_ptr[i + 1]):
            a = i
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            b = pred_idx[q]
            while parent[b] != b:
                parent[b] = parent[parent[b]]
                b = parent[b]
            if a != b:
                parent[a] = b
    root = np.empty(n, np.int64)
    for i in range(n):
        a = i
        while parent[a] != a:
            a = parent[a]
        root[i] = a
    return root


@numba.njit(cache=True)
def _pair_paths_kernel(
    order: I64, dur: F64, pred_ptr: I64, pred_idx: I64, pred_delay: F64, sources: I64, targets: I64
) -> F64:  # pragma: no cover - numba
    """Per (source, target): the longest path from the source's start to the target's start (-inf: none).

    Stages are regrouped by weakly connected component (one per microbatch in the planner's graphs), keeping the
    topological order inside each, so every source only sweeps its own component from its position on.
    """
    n = dur.shape[0]
    comp = _components(n, pred_ptr, pred_idx)
    grouped = order[np.argsort(comp[order], kind="mergesort")]
    pos = np.empty(n, np.int64)
    for k in range(grouped.shape[0]):
        pos[grouped[k]] = k
    dist = np.full(n, -np.inf)
    out = np.full(sources.shape[0], -np.inf)
    for a in range(sources.shape[0]):
        s, t = sources[a], targets[a]
        if comp[s] != comp[t] or pos[t] < pos[s]:
            continue
        dist[s] = 0.0
        for k in range(pos[s] + 1, pos[t] + 1):
            j = grouped[k]
            best = -np.inf
            for q in range(pred_ptr[j], pred_ptr[j + 1]):
                p = pred_idx[q]
                if dist[p] > -np.inf:
                    best = max(best, dist[p] + dur[p] + pred_delay[q])
            dist[j] = best
        out[a] = dist[t]
        for k in range(pos[s], pos[t] + 1):
            dist[grouped[k]] = -np.inf
    return out


@numba.njit(cache=True)
def _group_by_component(order: I64, pred_ptr: I64, pred_idx: I64) -> I64:  # pragma: no cover - numba
    """`order` regrouped by weakly connected component (first-seen component first), each still in order."""
    n = order.shape[0]
    root = _components(n, pred_ptr, pred_idx)
    first = np.full(n, n, np.int64)
    for k in range(n):
        r = root[order[k]]
        first[r] = min(first[r], k)
    key = np.empty(n, np.int64)
    for k in range(n):
        key[k] = first[root[order[k]]]
    return order[np.argsort(key, kind="mergesort")]


def _component_order(problem: Problem) -> I64:
    grouped: I64 = _group_by_component(_order(problem), problem.pred_ptr, problem.pred_idx)
    return grouped


def _order(problem: Problem) -> I64:
    order: I64 = _topological_order(problem.n, problem.pred_ptr, problem.succ_ptr, problem.succ_idx)
    if order.shape[0] != problem.n:
        raise ValueError("the stage graph has a cycle")
    return order


def _heads_and_tails(problem: Problem, duration_ms: F64 | None = None) -> tuple[F64, F64]:
    """Longest path ending before each stage starts (head) and after it ends (tail), delays included."""
    dur = problem.duration_ms if duration_ms is None else duration_ms
    head, tail = _heads_tails_kernel(_order(problem), dur, problem.pred_ptr, problem.pred_idx, problem.pred_delay_ms)
    return head, tail


# ---- the bound -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BoundParts:
    """The three arguments' values (ms); `memory_ms` is 0 when no strategies or budgets were given."""

    chain_ms: float
    rank_ms: float
    """Busiest rank: max over ranks of smallest head + work + smallest tail, at the fastest durations."""
    memory_ms: float
    memory_rank_ms: tuple[float, ...] = ()
    """Argument 3 per rank."""

    @property
    def best_ms(self) -> float:
        return max(self.chain_ms, self.rank_ms, self.memory_ms)


def lower_bound_ms(
    problem: Problem,
    strategies: Sequence[Problem] = (),
    cap_bytes: Sequence[float] | None = None,
) -> float:
    """The best of the chain, busiest-rank and (given `strategies` and `cap_bytes`) memory-time bounds.

    `strategies`: the same problem under each uniform memory strategy (same stages and edges; that strategy's
    durations and activation bytes), e.g. none, selective and full recompute; `problem`'s own durations count as
    one more option for the fastest durations. `cap_bytes`: per rank, the activation budget every schedule the
    bound covers stays within (device capacity minus static bytes). Without them the bound is
    max(longest chain, busiest rank) with `problem`'s costs.
    """
    return lower_bound_parts(problem, strategies, cap_bytes).best_ms


def lower_bound_parts(
    problem: Problem,
    strategies: Sequence[Problem] = (),
    cap_bytes: Sequence[float] | None = None,
) -> BoundParts:
    """`lower_bound_ms` with each argument's value (see the module docstring)."""
    if problem.n == 0:
        return BoundParts(0.0, 0.0, 0.0)
    for v in strategies:
        if v.n != problem.n or v.pp != problem.pp or not np.array_equal(v.rank, problem.rank):
            raise ValueError("every strategy's problem must have the same stages and ranks as `problem`")
    dmin = np.min(np.stack([problem.duration_ms, *(v.duration_ms for v in strategies)]), axis=0)
    head, tail = _heads_and_tails(problem, dmin)
    chain = float(np.max(head + dmin + tail))
    rank = 0.0
    for r in range(problem.pp):
        mask = problem.rank == r
        if mask.any():
            rank = max(rank, float(head[mask].min() + dmin[mask].sum() + tail[mask].min()))
    if not strategies or cap_bytes is None:
        return BoundParts(chain, rank, 0.0)
    if len(cap_bytes) != problem.pp:
        raise ValueError(f"cap_bytes has {len(cap_bytes)} entries, the problem has pp={problem.pp}")
    per_rank = _memory_rank_bounds(problem, strategies, np.asarray(cap_bytes, dtype=np.float64), dmin, head, tail)
    return BoundParts(chain, rank, float(per_rank.max()), tuple(float(x) for x in per_rank))


@dataclass(frozen=True, slots=True)
class _Pairs:
    forward: I64
    """Per pair, its forward stage."""
    free: I64
    """Per pair, the stage whose end releases its activations (the forward itself when it has no backward)."""
    of_stage: I64
    """Per stage, its pair (every stage belongs to one: pipeline, chunk, microbatch, sub-microbatch)."""


def _pairs(problem: Problem) -> _Pairs:
    index: dict[tuple[str, int, int, int], int] = {}
    of_stage = np.empty(problem.n, dtype=np.int64)
    for i, s in enumerate(problem.stages):
        of_stage[i] = index.setdefault((s.pipeline, s.chunk, s.microbatch, s.sub), len(index))
    forward = np.full(len(index), -1, dtype=np.int64)
    passes: list[dict[Pass, int]] = [{} for _ in index]
    for i, s in enumerate(problem.stages):
        passes[of_stage[i]][s.pass_] = i
    free = np.empty(len(index), dtype=np.int64)
    for k, found in enumerate(passes):
        if Pass.F not in found:
            raise ValueError(f"stage pair {list(index)[k]} has no forward stage")
        forward[k] = found[Pass.F]
        free[k] = found.get(Pass.W, found.get(Pass.B, found.get(Pass.I, found[Pass.F])))
    return _Pairs(forward, free, of_stage)


def _memory_rank_bounds(
    problem: Problem, strategies: Sequence[Problem], cap: F64, dmin: F64, head: F64, tail: F64
) -> F64:
    """Argument 3 per rank (0 for a rank without stages)."""
    pairs = _pairs(problem)
    n_pairs = pairs.forward.shape[0]
    f, fr = pairs.forward, pairs.free
    gap = _pair_paths_kernel(_order(problem), dmin, problem.pred_ptr, problem.pred_idx, problem.pred_delay_ms, f, fr)
    gap = np.where(np.isfinite(gap), gap, dmin[f])  # no path (cannot happen in stage graphs): just the forward
    own = fr == f
    lat = np.empty((n_pairs, len(strategies)))
    area = np.empty((n_pairs, len(strategies)))
    for j, v in enumerate(strategies):
        lat[:, j] = np.bincount(pairs.of_stage, weights=v.duration_ms, minlength=n_pairs)
        life = np.where(own, v.duration_ms[f], gap - dmin[f] + v.duration_ms[f] + v.duration_ms[fr])
        area[:, j] = v.alloc_bytes[f] * life
    pair_rank = problem.rank[f]
    pp = problem.pp
    busy0 = np.zeros(pp)
    area0 = np.zeros(pp)
    for r in range(pp):
        mask = problem.rank == r
        if not mask.any():
            continue
        mine = pair_rank == r
        busy0[r] = head[mask].min() + tail[mask].min()
        area0[r] = head[f[mine]].min() + tail[fr[mine]].min() if mine.any() else 0.0
    has_stages = np.array([(problem.rank == r).any() for r in range(pp)])
    # A budget <= 0 admits no schedule holding bytes at all; such a rank keeps arguments 1-2 only (finite).
    scaled = area / np.where(cap > 0, cap, np.inf)[pair_rank][:, None]

    def g(lam: F64) -> tuple[F64, F64, F64]:
        """g_r(lam) per rank, and busy(s*) and area(s*) of the minimising strategies (for the bisection)."""
        w = lam[pair_rank][:, None]
        pick = np.argmin(w * lat + (1.0 - w) * scaled, axis=1)
        rows = np.arange(n_pairs)
        busy = busy0 + np.bincount(pair_rank, weights=lat[rows, pick], minlength=pp)
        held = area0 + np.bincount(pair_rank, weights=scaled[rows, pick], minlength=pp)
        return lam * busy + (1.0 - lam) * held, busy, held

    lo, hi = np.zeros(pp), np.ones(pp)
    best, _, _ = g(hi)  # lam = 1: argument 2 with each pair at its fastest strategy
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        value, busy, held = g(mid)
        best = np.maximum(best, value)
        # g'(lam) = busy - held at the minimiser: climb towards the maximum of the concave g.
        up = busy > held
        lo = np.where(up, mid, lo)
        hi = np.where(up, hi, mid)
    return np.where(has_stages, best, 0.0)


def memory_rank_bounds_ms(problem: Problem, strategies: Sequence[Problem], cap_bytes: Sequence[float]) -> F64:
    """Argument 3 alone, per rank (see the module docstring)."""
    parts = lower_bound_parts(problem, strategies, cap_bytes)
    return np.array(parts.memory_rank_ms)


def warm_kernels() -> None:
    """Compile (or load from the numba cache) the bound's kernels on a two-stage graph."""
    order = _topological_order(2, np.array([0, 0, 1]), np.array([0, 1, 1]), np.array([1]))
    dur = np.ones(2)
    pred_ptr, pred_idx, delay = np.array([0, 0, 1]), np.array([0]), np.zeros(1)
    _heads_tails_kernel(order, dur, pred_ptr, pred_idx, delay)
    _pair_paths_kernel(order, dur, pred_ptr, pred_idx, delay, np.array([0]), np.array([1]))
    _group_by_component(order, pred_ptr, pred_idx)


# ---- exact optimum of small instances --------------------------------------------------------------------------


def exact_makespan_ms(
    problem: Problem,
    *,
    time_limit_s: float = 30.0,
    workers: int = 1,
    scale: float = 1000.0,
    strategies: Sequence[Problem] = (),
    cap_bytes: Sequence[float] | None = None,
) -> tuple[float, bool]:
    """Optimal makespan of the interleaving problem: ranks run one stage at a time.

    Without `strategies` and `cap_bytes` memory is not constrained and `problem`'s durations are used. With them,
    every stage pair picks one strategy (its stages' durations and its activation bytes), and on every rank the
    bytes held from each forward's start to the end of its freeing pass stay within `cap_bytes` (SEMU's memory
    model; the bytes are rounded down and the caps up, so the model is never stricter than the real one).

    Durations are scaled to integers (`scale` units per ms). Returns (makespan_ms, proven_optimal).
    """
    from ortools.sat.python import cp_model  # server-side dependency; imported here so clients never need it

    model = cp_model.CpModel()
    memory = bool(strategies) and cap_bytes is not None
    options = list(strategies) if memory else [problem]
    durs = [np.rint(v.duration_ms * scale).astype(np.int64) for v in options]
    delay = np.rint(problem.pred_delay_ms * scale).astype(np.int64)
    horizon = int(np.max(np.stack(durs), axis=0).sum() + delay.sum() + 1)
    starts = [model.new_int_var(0, horizon, f"s{i}") for i in range(problem.n)]
    ends = [model.new_int_var(0, horizon, f"e{i}") for i in range(problem.n)]
    if memory:
        assert cap_bytes is not None
        pairs = _pairs(problem)
        n_pairs = pairs.forward.shape[0]
        pick = [[model.new_bool_var(f"x{k}_{j}") for j in range(len(options))] for k in range(n_pairs)]
        for row in pick:
            model.add_exactly_one(row)
        sizes = []
        for i in range(problem.n):
            row = pick[int(pairs.of_stage[i])]
            values = [int(d[i]) for d in durs]
            size = model.new_int_var(min(values), max(values), f"d{i}")
            model.add(size == sum(v * x for v, x in zip(values, row, strict=True)))
            sizes.append(size)
        intervals = [model.new_interval_var(starts[i], sizes[i], ends[i], f"x{i}") for i in range(problem.n)]
        unit = max(max(cap_bytes), 1.0) / 1e6
        for r in range(problem.pp):
            held_intervals = []
            demands = []
            for k in np.flatnonzero(problem.rank[pairs.forward] == r):
                f, fr = int(pairs.forward[k]), int(pairs.free[k])
                units = [int(np.floor(v.alloc_bytes[f] / unit)) for v in options]
                if max(units) == 0:
                    continue
                life = model.new_int_var(0, horizon, f"l{k}")
                held_intervals.append(model.new_interval_var(starts[f], life, ends[fr], f"h{k}"))
                demand = model.new_int_var(min(units), max(units), f"m{k}")
                model.add(demand == sum(u * x for u, x in zip(units, pick[k], strict=True)))
                demands.append(demand)
            if held_intervals:
                model.add_cumulative(held_intervals, demands, int(np.ceil(cap_bytes[r] / unit)))
        # Hint: one microbatch (component) after another, one stage at a time, every pair at its leanest strategy;
        # it fits whenever one microbatch's leanest activations fit, and gives CP-SAT a first schedule to improve.
        lean = [int(np.argmin([v.alloc_bytes[int(f)] for v in options])) for f in pairs.forward]
        for row, chosen in zip(pick, lean, strict=True):
            for j, x in enumerate(row):
                model.add_hint(x, j == chosen)
        clock = 0
        finish = np.zeros(problem.n, dtype=np.int64)
        for i in _component_order(problem):
            d = int(durs[lean[int(pairs.of_stage[i])]][i])
            begin = clock
            for q in range(problem.pred_ptr[i], problem.pred_ptr[i + 1]):
                begin = max(begin, int(finish[problem.pred_idx[q]] + delay[q]))
            finish[i] = begin + d
            clock = int(finish[i])
            model.add_hint(starts[i], begin)
            model.add_hint(ends[i], int(finish[i]))
    else:
        intervals = [model.new_interval_var(starts[i], int(durs[0][i]), ends[i], f"x{i}") for i in range(problem.n)]
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

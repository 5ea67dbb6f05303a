"""Lower bounds on a batch's makespan, and the exact optimum of small instances with CP-SAT.

The bound tells how far a plan can still be from the best possible. It is the best of three arguments, each valid
for every schedule of the batch's stage graph under the placement and sub-microbatch split the problem was built
for: any order per rank, any memory strategy per stage pair, any interleaving, every cross-rank transfer at least
as long as its delay (SEMU's link queueing only adds to it). "Fastest" below means each stage's smallest duration
over the strategies.

1. **Chain.** No schedule beats the longest dependency chain at the fastest durations.
2. **Busiest rank, as one machine with heads and tails.** A stage j on rank r cannot start before its head h_j
   (the longest path ending at its start) and leaves at least its tail t_j after its end (the longest path after
   it), both at the fastest durations with transfer delays included; the rank runs one stage at a time. So the
   makespan is at least the optimum of this one-machine problem (release h_j, work d_j, delivery t_j), and at least
   the optimum of its preemptive relaxation, which Jackson's preemptive schedule (run the released stage with the
   largest tail, preempting at releases) reaches exactly in O(n log n) (`_jackson_kernel`). That optimum equals the
   classic bound max over windows S = {j on r : h_j >= a, t_j >= b} of a + sum_S d_j + b (Carlier 1982): every
   stage of S runs inside [a, T - b]. The whole rank is one window (smallest head + all work + smallest tail, this
   argument before), so it is never weaker. The kernel also returns a window where the maximum is attained (b: the
   tail of the stage that attains it; a: the best release for that b), which argument 3 reuses.
3. **Memory-time area** (given each strategy's costs and each rank's activation budget A_r). A stage pair k (one
   chunk's forward and backward passes for one sub-microbatch) on rank r runs every stage under one strategy s
   (none / selective / full recompute), which sets its stages' durations d_j(s) and its activation bytes m_k(s).
   As in SEMU's engine, the bytes are held from the forward's start to the end of the pair's freeing pass (B; W
   when the backward is split; the forward itself for forward-only pipelines). That lifetime is at least
   L_k(s) = d_F(s) + D_k + d_free(s), with D_k the longest path from the forward's end to the freeing pass's start
   through the stage graph at the fastest durations, transfer delays included (the downstream forwards, the loss,
   the upstream backwards of the same microbatch; no order can shorten a dependency chain). A schedule that fits
   memory keeps the live bytes at or below A_r at every instant. Take two non-empty windows of rank r: stages
   S1 = {j : h_j >= a1, t_j >= b1} and pairs S2 = {k : h(F_k) >= a2, t(free_k) >= b2}. The stages of S1 run one at a
   time inside [a1, T - b1]; the pairs of S2 hold their bytes inside [a2, T - b2], and their bytes are part of the
   live bytes. So, with the schedule's own strategies s,

       busy(s) = a1 + b1 + sum_{j in S1} d_j(s_j)  <=  T,
       area(s) = a2 + b2 + sum_{k in S2} m_k(s_k) L_k(s_k) / A_r  <=  T     (integrate live bytes over [a2, T - b2]),

   and for every weight lam in [0, 1]

       T >= lam busy(s) + (1 - lam) area(s) >= g_r(lam) := min over all s' of [lam busy(s') + (1 - lam) area(s')],

   where the minimum separates into one choice per pair (pair k adds lam times the work of its stages in S1 and
   1 - lam times its area if it is in S2). Every (S1, S2, lam) gives a valid bound; for fixed windows the maximum
   over lam (found by bisection on the concave g_r) is the LP relaxation of "min over s of max(busy, area)", the
   cheapest fractional recompute that frees enough memory-time. Which windows are tried matters for tightness
   only: the whole rank with all its pairs (this argument before), argument 2's window with all pairs (lam = 1 is
   then argument 2), and, for the strategies that solve picks, the pair window where their memory-time bound is
   attained (Jackson's schedule on the pairs: release h(F_k), work m_k L_k / A_r, tail t(free_k)) with argument 2's
   window and with the stage window that is critical at the picked durations. The bound is the largest g_r found,
   over ranks.

The memory argument covers schedules whose live activations stay within the given budget at every instant. Pass
the budget the result is checked against (SEMU's device capacity minus static memory, what `Planner._fits`
checks), not a stricter planning cap, and do not rely on it for a plan that overflows. It is a statement about
this problem's placement and sub-microbatch split; a schedule on another placement (the baselines') has other
stages, so there the bound is only a reference point (the tests and `benchmarks/bench_bound_gap.py` check it).

Limits: on the planner's workloads the chains are short next to a rank's work (sub-microbatches run in parallel
across ranks), so heads and tails are small and argument 2 is within 0.5% of the busiest rank's work alone; the one
machine view adds little there (it does on short pipelines: tests). Without a memory limit the interleaver gets
within 0.5% of argument 2 on vlm-l, so what is left is memory, and argument 3 is a fluid relaxation: it charges
each pair only its dependency chain as lifetime, while in a busy pipeline the other ranks are working on other
microbatches and lifetimes are longer (queueing, 3-13x the chain in unconstrained vlm-l schedules), and it lets
pairs recompute fractionally. Where the area at chain lifetimes stays below A_r T it adds nothing; it binds where
lifetimes are long and activations big (t2v-l: a few percent above argument 2).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

from pipeweaver.plan.ir import Pass
from pipeweaver.search.problem import Problem

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_BISECTIONS = 40
"""Bisection steps on lam per rank (each halves the interval, to 1e-12 here; g is concave piecewise linear)."""

LINK_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
"""Weights mu on the host-link resource tried when some strategy offloads (each gives a valid bound)."""


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


# ---- one rank as one machine: Jackson's preemptive schedule ---------------------------------------------------


@numba.njit(cache=True)
def _jackson_kernel(
    rank: I64, pp: int, release: F64, work: F64, tail: F64
) -> tuple[F64, F64, F64]:  # pragma: no cover - numba
    """Per rank, the optimal preemptive max(C_j + tail_j) of its jobs (0 without jobs), and a window (a, b).

    Jackson's preemptive schedule: whenever a job is released or finishes, run the released job with the largest
    tail, preempting at releases. The window is one where the classic subset bound is attained:
    a + sum of work over {j : release_j >= a, tail_j >= b} + b equals the value (b is the critical job's tail).
    """
    n = rank.shape[0]
    by_release = np.argsort(release, kind="mergesort")
    idx = by_release[np.argsort(rank[by_release], kind="mergesort")]
    rem = work.copy()
    heap = np.empty(n, np.int64)
    value = np.zeros(pp)
    win_a = np.zeros(pp)
    win_b = np.zeros(pp)
    lo = 0
    while lo < n:
        r = rank[idx[lo]]
        hi = lo
        while hi < n and rank[idx[hi]] == r:
            hi += 1
        t = -np.inf
        size = 0
        k = lo
        best = -np.inf
        critical = idx[lo]
        while k < hi or size > 0:
            if size == 0 and t < release[idx[k]]:
                t = release[idx[k]]
            while k < hi and release[idx[k]] <= t:
                # push idx[k] on the max-heap keyed by tail
                c = size
                heap[c] = idx[k]
                size += 1
                while c > 0:
                    up = (c - 1) // 2
                    if tail[heap[up]] >= tail[heap[c]]:
                        break
                    heap[up], heap[c] = heap[c], heap[up]
                    c = up
                k += 1
            j = heap[0]
            nxt = release[idx[k]] if k < hi else np.inf
            if t + rem[j] <= nxt:
                t += rem[j]
                if t + tail[j] > best:
                    best = t + tail[j]
                    critical = j
                # pop the top
                size -= 1
                heap[0] = heap[size]
                c = 0
                while True:
                    left = 2 * c + 1
                    if left >= size:
                        break
                    child = left
                    if left + 1 < size and tail[heap[left + 1]] > tail[heap[left]]:
                        child = left + 1
                    if tail[heap[c]] >= tail[heap[child]]:
                        break
                    heap[c], heap[child] = heap[child], heap[c]
                    c = child
            else:  # preempted by the next release (it runs on if its tail is still the largest)
                rem[j] -= nxt - t
                t = nxt
        b = tail[critical]
        # The best a for this b: releases of the jobs with tail >= b, latest first, summing their work.
        acc = 0.0
        a_best = -np.inf
        v_best = -np.inf
        for q in range(hi - 1, lo - 1, -1):
            i = idx[q]
            if tail[i] >= b:
                acc += work[i]
                if release[i] + acc > v_best:
                    v_best = release[i] + acc
                    a_best = release[i]
        value[r] = best
        win_a[r] = a_best
        win_b[r] = b
        lo = hi
    return value, win_a, win_b


def jackson_reference(
    rank: Sequence[int], pp: int, release: Sequence[float], work: Sequence[float], tail: Sequence[float]
) -> tuple[list[float], list[float], list[float]]:
    """Pure-Python twin of `_jackson_kernel` (heapq; the tests hold them equal)."""
    value, win_a, win_b = [0.0] * pp, [0.0] * pp, [0.0] * pp
    for r in range(pp):
        jobs = sorted((i for i in range(len(rank)) if rank[i] == r), key=lambda i: release[i])
        if not jobs:
            continue
        rem = {i: work[i] for i in jobs}
        heap: list[tuple[float, int]] = []
        t, k, best, critical = -math.inf, 0, -math.inf, jobs[0]
        while k < len(jobs) or heap:
            if not heap:
                t = max(t, release[jobs[k]])
            while k < len(jobs) and release[jobs[k]] <= t:
                heapq.heappush(heap, (-tail[jobs[k]], jobs[k]))
                k += 1
            j = heap[0][1]
            nxt = release[jobs[k]] if k < len(jobs) else math.inf
            if t + rem[j] <= nxt:
                heapq.heappop(heap)
                t += rem[j]
                if t + tail[j] > best:
                    best, critical = t + tail[j], j
            else:
                rem[j] -= nxt - t
                t = nxt
        b = tail[critical]
        window = [i for i in jobs if tail[i] >= b]
        a = max((release[i] for i in window), key=lambda x: x + sum(work[i] for i in window if release[i] >= x))
        value[r], win_a[r], win_b[r] = best, a, b
    return value, win_a, win_b


# ---- the bound -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BoundParts:
    """The three arguments' values (ms); `memory_ms` is 0 when no strategies or budgets were given."""

    chain_ms: float
    rank_ms: float
    """Busiest rank: max over ranks of the one-machine bound with heads and tails (Jackson's preemptive schedule),
    at the fastest durations; never below smallest head + work + smallest tail."""
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
    per_rank, win_a, win_b = _jackson_kernel(problem.rank, problem.pp, head, dmin, tail)
    rank = float(per_rank.max())
    if not strategies or cap_bytes is None:
        return BoundParts(chain, rank, 0.0)
    if len(cap_bytes) != problem.pp:
        raise ValueError(f"cap_bytes has {len(cap_bytes)} entries, the problem has pp={problem.pp}")
    cap = np.asarray(cap_bytes, dtype=np.float64)
    per_rank = _memory_rank_bounds(problem, strategies, cap, dmin, head, tail, (win_a, win_b))
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
    problem: Problem,
    strategies: Sequence[Problem],
    cap: F64,
    dmin: F64,
    head: F64,
    tail: F64,
    busiest: tuple[F64, F64],
) -> F64:
    """Argument 3 per rank (0 for a rank without stages): the best over a few windows (S1, S2) per rank.

    Every (S1, S2, lam) gives a valid bound, so how the windows are picked is a matter of tightness only (the module
    docstring lists them); `busiest` is argument 2's window (a, b) per rank.
    """
    pairs = _pairs(problem)
    n_pairs = pairs.forward.shape[0]
    f, fr = pairs.forward, pairs.free
    gap = _pair_paths_kernel(_order(problem), dmin, problem.pred_ptr, problem.pred_idx, problem.pred_delay_ms, f, fr)
    gap = np.where(np.isfinite(gap), gap, dmin[f])  # no path (cannot happen in stage graphs): just the forward
    own = fr == f
    dur = np.stack([v.duration_ms for v in strategies], axis=1)
    area = np.empty((n_pairs, len(strategies)))
    link = np.zeros((n_pairs, len(strategies)))
    for j, v in enumerate(strategies):
        life = np.where(own, v.duration_ms[f], gap - dmin[f] + v.duration_ms[f] + v.duration_ms[fr])
        if v.offload_ms is not None:
            # An offloaded pair holds its bytes from its forward's start until the copy to the host ends, and again
            # from its prefetch's start (at least a copy before its backward) to its freeing pass's end.
            copy = v.offload_ms[f]
            offloaded = (copy > 0) & ~own
            life = np.where(offloaded, np.minimum(life, v.duration_ms[f] + 2.0 * copy + v.duration_ms[fr]), life)
            link[:, j] = np.where(offloaded, copy, 0.0)
        area[:, j] = v.alloc_bytes[f] * life
    pp, rank = problem.pp, problem.rank
    pair_rank = rank[f]
    # A budget <= 0 admits no schedule holding bytes at all; such a rank keeps arguments 1-2 only (finite).
    scaled = area / np.where(cap > 0, cap, np.inf)[pair_rank][:, None]
    pair_head, pair_tail = head[f], tail[fr]
    has_stages = np.bincount(rank, minlength=pp) > 0
    rows = np.arange(n_pairs)

    # Offloading: each direction of a rank's host link carries one copy at a time, so its copies' time is at most
    # T too (`link`, a third resource). The bound then also takes max over mu of the same LP with weight mu on it.
    mus = LINK_WEIGHTS if link.any() else (0.0,)

    def solve(s1: tuple[F64, F64], s2: tuple[F64, F64]) -> tuple[F64, I64]:
        best, pick = solve_mu(s1, s2, 0.0)
        for mu in mus[1:]:
            value, _ = solve_mu(s1, s2, mu)
            best = np.maximum(best, value)
        return best, pick

    def solve_mu(s1: tuple[F64, F64], s2: tuple[F64, F64], mu: float) -> tuple[F64, I64]:
        """max over lam of g_r(lam) per rank for the windows S1 (stages) and S2 (pairs), with weight mu on the
        host link, and the minimising strategies at the last lam."""
        in1 = (head >= s1[0][rank]) & (tail >= s1[1][rank])
        lat = np.stack(
            [np.bincount(pairs.of_stage, weights=dur[:, j] * in1, minlength=n_pairs) for j in range(dur.shape[1])],
            axis=1,
        )
        in2 = (pair_head >= s2[0][pair_rank]) & (pair_tail >= s2[1][pair_rank])
        held_k = scaled * in2[:, None]
        busy0, area0 = s1[0] + s1[1], s2[0] + s2[1]

        def g(lam: F64) -> tuple[F64, F64, F64, I64]:
            """g_r(lam) per rank, busy(s*) and area(s*) of the minimising strategies s*, and s*."""
            w = lam[pair_rank][:, None]
            pick = np.argmin((1.0 - mu) * (w * lat + (1.0 - w) * held_k) + mu * link, axis=1)
            busy = busy0 + np.bincount(pair_rank, weights=lat[rows, pick], minlength=pp)
            held = area0 + np.bincount(pair_rank, weights=held_k[rows, pick], minlength=pp)
            used = np.bincount(pair_rank, weights=link[rows, pick], minlength=pp)
            return (1.0 - mu) * (lam * busy + (1.0 - lam) * held) + mu * used, busy, held, pick

        lo, hi = np.zeros(pp), np.ones(pp)
        best, _, _, pick = g(hi)  # lam = 1: argument 2 on S1 with each pair at its fastest strategy
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            value, busy, held, pick = g(mid)
            best = np.maximum(best, value)
            # g'(lam) = busy - held at the minimiser: climb towards the maximum of the concave g.
            up = busy > held
            lo = np.where(up, mid, lo)
            hi = np.where(up, hi, mid)
        return best, pick

    def area_window(work: F64) -> tuple[F64, F64]:
        """The window of pairs where the memory-time bound with these areas is attained (Jackson on areas)."""
        _, a, b = _jackson_kernel(pair_rank, pp, pair_head, work, pair_tail)
        return a, b

    def stage_window(pick: I64) -> tuple[F64, F64]:
        """The window of stages where argument 2 at the picked strategies' durations is attained."""
        _, a, b = _jackson_kernel(rank, pp, head, dur[np.arange(problem.n), pick[pairs.of_stage]], tail)
        return a, b

    whole = (_group_min(head, rank, pp), _group_min(tail, rank, pp))
    all_pairs = (_group_min(pair_head, pair_rank, pp), _group_min(pair_tail, pair_rank, pp))
    best = solve(whole, all_pairs)[0]  # the whole rank and all its pairs: never below this
    value, pick = solve(busiest, all_pairs)
    best = np.maximum(best, value)
    critical = area_window(scaled[rows, pick])  # where the picked strategies' memory-time bound is attained
    for s1 in (busiest, stage_window(pick)):
        best = np.maximum(best, solve(s1, critical)[0])
    return np.where(has_stages, best, 0.0)


def _group_min(values: F64, group: I64, size: int) -> F64:
    """Per group, the smallest value (0 where a group has none)."""
    out = np.full(size, np.inf)
    np.minimum.at(out, group, values)
    return np.where(np.isfinite(out), out, 0.0)


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
    _jackson_kernel(np.array([0, 0]), 1, np.zeros(2), dur, np.zeros(2))


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
    """`exact_makespan`'s (best makespan found, proven optimal)."""
    found = exact_makespan(
        problem, time_limit_s=time_limit_s, workers=workers, scale=scale, strategies=strategies, cap_bytes=cap_bytes
    )
    return found.best_ms, found.proven


@dataclass(frozen=True, slots=True)
class ExactResult:
    best_ms: float
    """The makespan of the best schedule CP-SAT found (the optimum when `proven`)."""
    lower_ms: float
    """CP-SAT's proven bound on the optimum when it stopped (equal to `best_ms` when `proven`): no schedule of the
    problem is shorter. A statement about this problem, like `lower_bound_ms`, often tighter on small instances."""
    proven: bool
    start_ms: tuple[float, ...] = ()
    """Per stage, its start in the best schedule."""
    strategy: tuple[int, ...] = ()
    """Per stage pair (`_pairs` order: by pipeline, chunk, microbatch, sub-microbatch as the stages first name
    them), the index into `strategies` it runs under; empty without memory."""


def exact_makespan(
    problem: Problem,
    *,
    time_limit_s: float = 30.0,
    workers: int = 1,
    scale: float = 1000.0,
    strategies: Sequence[Problem] = (),
    cap_bytes: Sequence[float] | None = None,
) -> ExactResult:
    """Optimal makespan of the interleaving problem: ranks run one stage at a time.

    Without `strategies` and `cap_bytes` memory is not constrained and `problem`'s durations are used. With them,
    every stage pair picks one strategy (its stages' durations and its activation bytes), and on every rank the
    bytes held from each forward's start to the end of its freeing pass stay within `cap_bytes` (SEMU's memory
    model; the bytes are rounded down and the caps up, so the model is never stricter than the real one).

    Durations are scaled to integers (`scale` units per ms); the durations round to the nearest unit, so the
    bounds hold to within half a unit per stage of a chain.
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
    proven = status == cp_model.OPTIMAL
    best = solver.objective_value / scale
    picked = tuple(next(j for j, x in enumerate(row) if solver.boolean_value(x)) for row in pick) if memory else ()
    return ExactResult(
        best,
        best if proven else min(best, solver.best_objective_bound / scale),
        proven,
        start_ms=tuple(solver.value(v) / scale for v in starts),
        strategy=picked,
    )

"""Greedy dual-queue stage interleaving (paper section 5.2), pure-Python reference of `interleave.py`'s kernel.

Each rank keeps a forward and a backward queue of ready stages. The rank that can start something earliest goes
next. What it picks depends on the problem's `Policy`:

- ALTERNATE (the paper's rule): if both a forward and a backward stage are ready by the time the rank is free, it
  alternates with the kind it ran last (1F1B emulation, memory-friendly) and takes the highest-priority ready
  stage of that kind; otherwise it takes the ready stage that can start soonest (fills the bubble).
- EARLIEST (list scheduling): the stage that can start first, at equal start a backward before a forward (it
  frees memory), then the higher priority.

Memory: a forward that would push the rank over its cap waits. Under ALTERNATE it still goes if its sub-microbatch
already holds activations on that rank (work in flight must finish to free memory; new work waits, which is what
makes 1F1B emerge); under EARLIEST that exception is the first loosening. The gate loosens one level at a time,
only when no rank at all can progress under the stricter one: units in flight may go, then non-admission forwards,
then everything (it never deadlocks).

Activation offloading (`Problem.offload_bytes`, optional): each rank's host link copies one offloaded forward at a
time, from the forward's end, in the order the forwards end; the bytes leave the rank's memory when the copy ends
(the gate counts copies ended by a forward's start, and a forward that does not fit waits for the copy that makes
room). A reloading backward's bytes count from when it is ready (its prefetch may go from then on), and it starts
once its copy back, after the copy out and the rank's previous copy back, can be done. When nothing can go under the
strictest gate, the rank with ready work whose next copy ends first waits for it before any gate loosens.

`ACTIVE` (a flag or-ed onto either policy) lets a rank wait for a better stage, as in Giffler-Thompson's active
schedules, within a window: the next rank is the one whose eligible ready stages can complete soonest (at C, a
bound below any stage not yet ready there); its candidates are those that can start by `ACTIVE_WINDOW` of the way
from its earliest start to C; among them it takes the highest priority (ties backward first), idling until it is
ready. ALTERNATE | ACTIVE first keeps to the kind opposite the last one run when both kinds are candidates. The
non-delay rules above never wait, so no priorities reach schedules that do (the optimum often does).
"""

from __future__ import annotations

import math

import numpy as np

from pipeweaver.search.problem import F64, I64, Policy, Problem

ACTIVE = 4
"""Flag or-ed onto a `Policy` value (`Problem.policy = Policy.ALTERNATE | ACTIVE`): active schedules (see above)."""

ACTIVE_WINDOW = 0.25
"""Under `ACTIVE`, how far past the rank's earliest start a candidate may start, as a fraction of the way to the
earliest completion (1: Giffler-Thompson's active schedules; 0: non-delay, but ranks still go by earliest completion
and pick by priority). On tiny-vlm / tiny-t2v (seeds 0-7, 8 microbatches, MCTS of 1000 interleavings) the mean gap
to CP-SAT was 6.9% / 2.6% at 0, 6.1% / 2.5% at 0.125, 5.8% / 2.5% at 0.25, 8.5% / 4.8% at 0.75 and 9.3% / 7.2% at
1 (t2v: seeds 0-4 and 0-3), against 9.5% / 4.1% for plain ALTERNATE: wide windows admit so many idle waits that
the group-order search finds the good ones slowly. With the benchmark's 1 s of MCTS: 4.2% / 1.3% against
6.8% / 3.8%."""


def interleave_reference(problem: Problem, priority: F64) -> tuple[I64, F64, F64, float]:
    """Schedule every stage; returns (order position per stage, start_ms, end_ms, makespan_ms).

    `order position` is the index of the stage within its rank's sequence.
    """
    n, pp = problem.n, problem.pp
    remaining_preds = np.diff(problem.pred_ptr).astype(np.int64)
    ready_at = np.zeros(n)
    start = np.full(n, math.nan)
    end = np.full(n, math.nan)
    position = np.full(n, -1, dtype=np.int64)
    t_last = np.zeros(pp)
    last_fwd = np.zeros(pp, dtype=np.int64)  # "last ran a backward": under contention a rank starts with a forward
    mem = np.zeros(pp)
    count = np.zeros(pp, dtype=np.int64)
    ready: list[list[int]] = [[] for _ in range(pp)]
    for i in range(n):
        if remaining_preds[i] == 0:
            ready[int(problem.rank[i])].append(i)

    source = np.diff(problem.pred_ptr) == 0
    n_units = int(problem.unit.max()) + 1 if n else 0
    holds = np.zeros((pp, n_units))  # bytes each (pipeline, microbatch, sub) unit holds per rank

    # Host copies (activation offloading): see `Problem.offload_bytes`. `avail` is when a ready stage may start:
    # ready_at, or for a reloading backward also its prefetch's end.
    offloads = problem.offload_ms is not None
    off_b = problem.offload_bytes if problem.offload_bytes is not None else np.zeros(n)
    off_ms = problem.offload_ms if problem.offload_ms is not None else np.zeros(n)
    reload_of = problem.reload_of if problem.reload_of is not None else np.full(n, -1)
    pending: list[list[tuple[float, float]]] = [[] for _ in range(pp)]  # per rank, (copy end, bytes), in time order
    d2h_free = np.zeros(pp)
    h2d_free = np.zeros(pp)
    d2h_end = np.zeros(n)
    avail = np.zeros(n)

    def available(j: int) -> float:
        """When ready stage j may start: a reloading backward once its prefetch is done; a forward that does not
        fit now, once enough of its rank's offload copies have ended for it to fit."""
        r = int(problem.rank[j])
        t = float(ready_at[j])
        if reload_of[j] >= 0:
            return float(max(t, max(h2d_free[r], d2h_end[reload_of[j]]) + float(off_ms[j])))
        if problem.is_forward[j]:
            m = mem[r] + problem.alloc_bytes[j]
            if m > problem.mem_cap_bytes[r]:
                for at, b in pending[r]:
                    m -= b
                    if m <= problem.mem_cap_bytes[r]:
                        return max(t, at)
        return t

    def load_at(r: int, i: int, t: float) -> float:
        """Rank r's bytes with stage i's, once the offload copies ended by t have freed theirs."""
        m = mem[r] + problem.alloc_bytes[i]
        for at, b in pending[r]:
            if at > t:
                break
            m -= b
        return float(m)

    earliest = (problem.policy & ~ACTIVE) == Policy.EARLIEST
    active = bool(problem.policy & ACTIVE)
    gates = (0, 1, 2, 3) if earliest else (1, 2, 3)

    def eligible(r: int, i: int, gate: int) -> bool:
        """Memory gate of level `gate`: 0 strict, 1 units in flight may go, 2 non-admission forwards too, 3 open."""
        if gate >= 3 or not problem.is_forward[i]:
            return True
        if load_at(r, i, max(t_last[r], float(avail[i]))) <= problem.mem_cap_bytes[r]:
            return True
        if gate == 0:
            return False
        # Over the cap: a unit already holding memory here continues (its backward frees it); new ones wait.
        if holds[r, problem.unit[i]] > 0:
            return True
        return gate == 2 and not source[i]

    def pick(r: int, gate: int) -> tuple[int, float, float]:
        """Best stage on rank r, its start time and the rank's key in the choice among ranks (lowest goes: the
        start, or under ACTIVE the earliest completion), or (-1, inf, inf)."""
        tl = t_last[r]
        tf, tb = math.inf, math.inf
        for i in ready[r]:
            if not eligible(r, i, gate):
                continue
            if problem.is_forward[i]:
                tf = min(tf, avail[i])
            else:
                tb = min(tb, avail[i])
        if tf == math.inf and tb == math.inf:
            return -1, math.inf, math.inf
        best = -1
        if active:
            soonest = math.inf  # the earliest completion of an eligible ready stage
            first = math.inf  # the earliest start
            for i in ready[r]:
                if eligible(r, i, gate):
                    soonest = min(soonest, max(tl, float(avail[i])) + float(problem.duration_ms[i]))
                    first = min(first, max(tl, float(avail[i])))
            limit = first + ACTIVE_WINDOW * (soonest - first)
            candidates = []
            for i in ready[r]:
                if eligible(r, i, gate):
                    at = max(tl, float(avail[i]))
                    if at < limit or at == first:
                        candidates.append(i)
            if not earliest and len({int(problem.is_forward[i]) for i in candidates}) == 2:
                candidates = [i for i in candidates if problem.is_forward[i] != last_fwd[r]]
            for i in candidates:
                if (
                    best < 0
                    or priority[i] > priority[best]
                    or (priority[i] == priority[best] and problem.is_forward[i] < problem.is_forward[best])
                ):
                    best = i
            return best, max(tl, float(avail[best])), soonest
        if not earliest and tf <= tl and tb <= tl:  # both ready: alternate (1F1B), highest priority of that kind
            want_fwd = 1 - last_fwd[r]
            for i in ready[r]:
                if (
                    problem.is_forward[i] == want_fwd
                    and avail[i] <= tl
                    and eligible(r, i, gate)
                    and (best < 0 or priority[i] > priority[best])
                ):
                    best = i
            return best, tl, tl
        if earliest:  # the soonest start; ties backward first, then by priority
            key = None
            for i in ready[r]:
                if not eligible(r, i, gate):
                    continue
                k = (max(tl, float(avail[i])), int(problem.is_forward[i]), -float(priority[i]))
                if key is None or k < key:
                    best, key = i, k
            return best, max(tl, float(avail[best])), max(tl, float(avail[best]))
        for i in ready[r]:  # otherwise the soonest ready; ties by priority, then backward first
            if not eligible(r, i, gate):
                continue
            if (
                best < 0
                or avail[i] < avail[best]
                or (
                    avail[i] == avail[best]
                    and (
                        priority[i] > priority[best]
                        or (priority[i] == priority[best] and problem.is_forward[i] < problem.is_forward[best])
                    )
                )
            ):
                best = i
        return best, max(tl, float(avail[best])), max(tl, float(avail[best]))

    # A rank's pick depends only on its own state; cache it until that state changes (a rank's stage runs, or a
    # stage becomes ready on it). Same results as recomputing every pick, several times faster at large pp.
    picks: list[list[tuple[int, float, float] | None]] = [[None] * pp for _ in range(4)]
    done = 0
    while done < n:
        chosen, chosen_t, chosen_key, chosen_r = -1, math.inf, math.inf, -1
        waited = False
        for gate in gates:
            for r in range(pp):
                cached = picks[gate][r]
                if cached is None:
                    cached = picks[gate][r] = pick(r, gate)
                i, t, key = cached
                if i >= 0 and key < chosen_key:
                    chosen, chosen_t, chosen_key, chosen_r = i, t, key, r
            if chosen >= 0:
                break
            if offloads and gate == gates[0]:
                # Nothing fits now: before loosening the gate, the rank with gated work whose next offload copy
                # ends first waits for it, and every rank tries again.
                waiting = [q for q in range(pp) if ready[q] and pending[q]]
                if waiting:
                    w = min(waiting, key=lambda q: (pending[q][0][0], q))
                    t_last[w] = max(t_last[w], pending[w][0][0])
                    while pending[w] and pending[w][0][0] <= t_last[w]:
                        mem[w] -= pending[w].pop(0)[1]
                    for j in ready[w]:
                        avail[j] = available(j)
                    for level in picks:
                        level[w] = None
                    waited = True
                    break
        if waited:
            continue
        if chosen < 0:
            raise RuntimeError("interleaver stuck: the stage graph has a cycle")
        r, i = chosen_r, chosen
        for level in picks:
            level[r] = None
        ready[r].remove(i)
        start[i] = chosen_t
        end[i] = chosen_t + problem.duration_ms[i]
        t_last[r] = end[i]
        last_fwd[r] = problem.is_forward[i]
        mem[r] += problem.alloc_bytes[i] - problem.free_bytes[i]
        holds[r, problem.unit[i]] += problem.alloc_bytes[i] - problem.free_bytes[i]
        if offloads:
            if reload_of[i] >= 0:
                h2d_free[r] = start[i]
            elif problem.is_forward[i] and off_b[i] > 0.0:
                d2h_end[i] = max(end[i], d2h_free[r]) + off_ms[i]
                d2h_free[r] = d2h_end[i]
                pending[r].append((float(d2h_end[i]), float(off_b[i])))
            while pending[r] and pending[r][0][0] <= t_last[r]:
                mem[r] -= pending[r].pop(0)[1]
            for j in ready[r]:
                avail[j] = available(j)
        position[i] = count[r]
        count[r] += 1
        done += 1
        for k in range(problem.succ_ptr[i], problem.succ_ptr[i + 1]):
            j = int(problem.succ_idx[k])
            remaining_preds[j] -= 1
            if remaining_preds[j] == 0:
                t = 0.0
                for q in range(problem.pred_ptr[j], problem.pred_ptr[j + 1]):
                    p = int(problem.pred_idx[q])
                    t = max(t, end[p] + problem.pred_delay_ms[q])
                ready_at[j] = t
                if offloads and reload_of[j] >= 0:
                    mem[int(problem.rank[j])] += off_b[j]  # its prefetch may go from now on: the gate counts it
                avail[j] = available(j) if offloads else t
                ready[int(problem.rank[j])].append(j)
                for level in picks:
                    level[int(problem.rank[j])] = None
    return position, start, end, float(np.max(end)) if n else 0.0

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

    earliest = (problem.policy & ~ACTIVE) == Policy.EARLIEST
    active = bool(problem.policy & ACTIVE)
    gates = (0, 1, 2, 3) if earliest else (1, 2, 3)

    def eligible(r: int, i: int, gate: int) -> bool:
        """Memory gate of level `gate`: 0 strict, 1 units in flight may go, 2 non-admission forwards too, 3 open."""
        if gate >= 3 or not problem.is_forward[i]:
            return True
        if mem[r] + problem.alloc_bytes[i] <= problem.mem_cap_bytes[r]:
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
                tf = min(tf, ready_at[i])
            else:
                tb = min(tb, ready_at[i])
        if tf == math.inf and tb == math.inf:
            return -1, math.inf, math.inf
        best = -1
        if active:
            soonest = math.inf  # the earliest completion of an eligible ready stage
            first = math.inf  # the earliest start
            for i in ready[r]:
                if eligible(r, i, gate):
                    soonest = min(soonest, max(tl, float(ready_at[i])) + float(problem.duration_ms[i]))
                    first = min(first, max(tl, float(ready_at[i])))
            limit = first + ACTIVE_WINDOW * (soonest - first)
            candidates = []
            for i in ready[r]:
                if eligible(r, i, gate):
                    at = max(tl, float(ready_at[i]))
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
            return best, max(tl, float(ready_at[best])), soonest
        if not earliest and tf <= tl and tb <= tl:  # both ready: alternate (1F1B), highest priority of that kind
            want_fwd = 1 - last_fwd[r]
            for i in ready[r]:
                if (
                    problem.is_forward[i] == want_fwd
                    and ready_at[i] <= tl
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
                k = (max(tl, float(ready_at[i])), int(problem.is_forward[i]), -float(priority[i]))
                if key is None or k < key:
                    best, key = i, k
            return best, max(tl, float(ready_at[best])), max(tl, float(ready_at[best]))
        for i in ready[r]:  # otherwise the soonest ready; ties by priority, then backward first
            if not eligible(r, i, gate):
                continue
            if (
                best < 0
                or ready_at[i] < ready_at[best]
                or (
                    ready_at[i] == ready_at[best]
                    and (
                        priority[i] > priority[best]
                        or (priority[i] == priority[best] and problem.is_forward[i] < problem.is_forward[best])
                    )
                )
            ):
                best = i
        return best, max(tl, float(ready_at[best])), max(tl, float(ready_at[best]))

    # A rank's pick depends only on its own state; cache it until that state changes (a rank's stage runs, or a
    # stage becomes ready on it). Same results as recomputing every pick, several times faster at large pp.
    picks: list[list[tuple[int, float, float] | None]] = [[None] * pp for _ in range(4)]
    done = 0
    while done < n:
        chosen, chosen_t, chosen_key, chosen_r = -1, math.inf, math.inf, -1
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
                ready[int(problem.rank[j])].append(j)
                for level in picks:
                    level[int(problem.rank[j])] = None
    return position, start, end, float(np.max(end)) if n else 0.0

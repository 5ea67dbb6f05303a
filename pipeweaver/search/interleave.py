"""Greedy dual-queue interleaving, compiled with numba (the search's hot loop).

Same algorithm and tie-breaking as `interleave_ref.interleave_reference` (the tests compare them on random
problems); read that module for the rules. Ready queues are fixed-size arrays kept in insertion order.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from pipeweaver.search.interleave_ref import ACTIVE, ACTIVE_WINDOW
from pipeweaver.search.problem import F64, I64, Policy, Problem

_EARLIEST = int(Policy.EARLIEST)
_ACTIVE = ACTIVE
_WINDOW = ACTIVE_WINDOW
_NONE_F = np.zeros(0)
_NONE_I = np.zeros(0, dtype=np.int64)


@numba.njit(cache=True)
def _gated(gate: int, forward: int, source: int, over: bool, holding: bool) -> bool:
    """Memory gate (see the reference): 0 strict, 1 units in flight may go, 2 non-admission forwards too, 3 open."""
    if gate >= 3 or forward == 0 or not over:
        return False
    if gate == 0:
        return True
    if holding:
        return False
    return gate == 1 or source == 1


@numba.njit(cache=True)
def _over(
    r: int, i: int, t: float, mem: F64, alloc: F64, cap: F64, pend_t: F64, pend_b: F64, pend_head: I64, pend_tail: I64
) -> bool:
    """Whether stage i starting at t pushes rank r over its cap, counting the offload copies done by then."""
    m = mem[r] + alloc[i]
    for q in range(pend_head[r], pend_tail[r]):
        if pend_t[r, q] > t:
            break
        m -= pend_b[r, q]
    return bool(m > cap[r])


@numba.njit(cache=True)
def _avail(
    j: int,
    r: int,
    ready_at: F64,
    is_forward: I64,
    alloc: F64,
    mem: F64,
    cap: F64,
    pend_t: F64,
    pend_b: F64,
    pend_head: I64,
    pend_tail: I64,
    reload_of: I64,
    offload_ms: F64,
    h2d_free: F64,
    d2h_end: F64,
) -> float:
    """When ready stage j may start on rank r with offloading: a reloading backward once its prefetch is done; a
    forward that does not fit now, once enough of the rank's offload copies have ended for it to fit."""
    t = float(ready_at[j])
    if reload_of[j] >= 0:
        return float(max(t, max(h2d_free[r], d2h_end[reload_of[j]]) + offload_ms[j]))
    if is_forward[j] == 1:
        m = mem[r] + alloc[j]
        if m > cap[r]:
            for q in range(pend_head[r], pend_tail[r]):
                m -= pend_b[r, q]
                if m <= cap[r]:
                    return float(max(t, pend_t[r, q]))
    return t


@numba.njit(cache=True)
def _settle_copies(
    r: int,
    t_last: F64,
    ready: I64,
    nready: I64,
    avail: F64,
    ready_at: F64,
    is_forward: I64,
    alloc: F64,
    mem: F64,
    cap: F64,
    pend_t: F64,
    pend_b: F64,
    pend_head: I64,
    pend_tail: I64,
    reload_of: I64,
    offload_ms: F64,
    h2d_free: F64,
    d2h_end: F64,
) -> None:
    """Rank r's clock moved: free the bytes of its offload copies that have ended by then, and recompute when each
    of its ready stages may start (`_avail`)."""
    while pend_head[r] < pend_tail[r] and pend_t[r, pend_head[r]] <= t_last[r]:
        mem[r] -= pend_b[r, pend_head[r]]
        pend_head[r] += 1
    for k in range(nready[r]):
        j = ready[r, k]
        avail[j] = _avail(
            j,
            r,
            ready_at,
            is_forward,
            alloc,
            mem,
            cap,
            pend_t,
            pend_b,
            pend_head,
            pend_tail,
            reload_of,
            offload_ms,
            h2d_free,
            d2h_end,
        )


@numba.njit(cache=True)
def _pick(
    r: int,
    gate: int,
    earliest: bool,
    active: bool,
    duration: F64,
    ready: I64,
    nready: I64,
    t_last: F64,
    last_fwd: I64,
    is_forward: I64,
    source: I64,
    mem: F64,
    alloc: F64,
    cap: F64,
    holds: F64,
    unit: I64,
    ready_at: F64,
    priority: F64,
    pend_t: F64,
    pend_b: F64,
    pend_head: I64,
    pend_tail: I64,
) -> tuple[int, float, float]:
    """Rank r's best stage under memory gate `gate`, its start time and the rank's key among ranks, or
    (-1, inf, inf): the reference's `pick`.

    Without ACTIVE one pass over the ready stages does it all (this is the interleaver's inner loop: on vlm-l's
    17,000 stages it scanned each rank's ready list two or three times per stage scheduled): it tracks, among the
    stages the gate lets through, the earliest ready time of each kind, the highest-priority stage of each kind
    ready by the rank's clock (what ALTERNATE takes when both kinds are ready) and the best by the remaining rule.
    Each is the first of its kind in the ready list's order at equal keys, as the reference's separate loops are."""
    tl = t_last[r]
    tf = math.inf
    tb = math.inf
    soonest = math.inf  # under ACTIVE: the earliest completion and the earliest start of an eligible stage
    first = math.inf
    ready_f = -1  # without ACTIVE: the highest-priority eligible forward / backward ready by tl
    ready_b = -1
    best = -1  # without ACTIVE: the best by the soonest-start rule (EARLIEST) or soonest-ready rule (ALTERNATE)
    for k in range(nready[r]):
        i = ready[r, k]
        over = _over(r, i, max(tl, ready_at[i]), mem, alloc, cap, pend_t, pend_b, pend_head, pend_tail)
        if _gated(gate, is_forward[i], source[i], over, holds[r, unit[i]] > 0):
            continue
        if is_forward[i] == 1:
            if ready_at[i] < tf:
                tf = ready_at[i]
        elif ready_at[i] < tb:
            tb = ready_at[i]
        if active:
            at = max(tl, ready_at[i])
            if at + duration[i] < soonest:
                soonest = at + duration[i]
            if at < first:
                first = at
            continue
        if not earliest and ready_at[i] <= tl:
            # Written out, as in the ACTIVE pass below: a helper function here cost ~10% of the call on vlm-l.
            if is_forward[i] == 1:
                if ready_f < 0 or priority[i] > priority[ready_f]:
                    ready_f = i
            elif ready_b < 0 or priority[i] > priority[ready_b]:
                ready_b = i
        if best < 0:
            best = i
            continue
        a = ready_at[i]
        b = ready_at[best]
        if earliest:
            a = max(a, tl)
            b = max(b, tl)
            if a < b or (
                a == b
                and (
                    is_forward[i] < is_forward[best]
                    or (is_forward[i] == is_forward[best] and priority[i] > priority[best])
                )
            ):
                best = i
        elif a < b or (
            a == b
            and (priority[i] > priority[best] or (priority[i] == priority[best] and is_forward[i] < is_forward[best]))
        ):
            best = i
    if tf == math.inf and tb == math.inf:
        return -1, math.inf, math.inf
    if active:
        limit = first + _WINDOW * (soonest - first)
        # Candidates start before `limit` (or first): the highest priority of each kind (first one at equal
        # priority), then as the reference: the other kind than the last run under ALTERNATE when both are there,
        # else the higher priority, backward at equal priority.
        best_f = -1
        best_b = -1
        for k in range(nready[r]):
            i = ready[r, k]
            if _gated(
                gate,
                is_forward[i],
                source[i],
                _over(r, i, max(tl, ready_at[i]), mem, alloc, cap, pend_t, pend_b, pend_head, pend_tail),
                holds[r, unit[i]] > 0,
            ):
                continue
            at = max(tl, ready_at[i])
            if not (at < limit or at == first):
                continue
            if is_forward[i] == 1:
                if best_f < 0 or priority[i] > priority[best_f]:
                    best_f = i
            elif best_b < 0 or priority[i] > priority[best_b]:
                best_b = i
        if best_f < 0:
            best = best_b
        elif best_b < 0:
            best = best_f
        elif not earliest:
            best = best_b if last_fwd[r] == 1 else best_f
        else:
            best = best_f if priority[best_f] > priority[best_b] else best_b
        return best, max(tl, ready_at[best]), soonest
    if not earliest and tf <= tl and tb <= tl:  # both kinds ready: the other kind than the last run (1F1B)
        return (ready_f if last_fwd[r] == 0 else ready_b), tl, tl
    start = max(tl, ready_at[best])
    return best, start, start


@numba.njit(cache=True)
def _kernel(
    pp: int,
    rank: I64,
    duration: F64,
    is_forward: I64,
    alloc: F64,
    free: F64,
    pred_ptr: I64,
    pred_idx: I64,
    pred_delay: F64,
    succ_ptr: I64,
    succ_idx: I64,
    cap: F64,
    priority: F64,
    unit: I64,
    policy: int,
    offload_bytes: F64,
    offload_ms: F64,
    reload_of: I64,
) -> tuple[I64, F64, F64]:
    n = rank.shape[0]
    remaining = np.empty(n, dtype=np.int64)
    for i in range(n):
        remaining[i] = pred_ptr[i + 1] - pred_ptr[i]
    ready_at = np.zeros(n)
    start = np.full(n, np.nan)
    end = np.full(n, np.nan)
    position = np.full(n, -1, dtype=np.int64)
    t_last = np.zeros(pp)
    last_fwd = np.zeros(pp, dtype=np.int64)
    mem = np.zeros(pp)
    count = np.zeros(pp, dtype=np.int64)
    ready = np.empty((pp, n), dtype=np.int64)
    nready = np.zeros(pp, dtype=np.int64)
    for i in range(n):
        if remaining[i] == 0:
            r = rank[i]
            ready[r, nready[r]] = i
            nready[r] += 1

    n_units = 0
    for i in range(n):
        if unit[i] + 1 > n_units:
            n_units = unit[i] + 1
    holds = np.zeros((pp, n_units))
    source = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if pred_ptr[i + 1] == pred_ptr[i]:
            source[i] = 1
    earliest = (policy & ~_ACTIVE) == _EARLIEST
    active = (policy & _ACTIVE) != 0
    first_gate = 0 if earliest else 1
    # Host copies: offloaded forwards free their bytes when their copy ends (a FIFO per rank, in time order, since
    # the copies of a rank serialize); a reloading backward starts once its prefetch, after the offload and the
    # rank's earlier prefetches, is done (`avail`: the time a stage may start, ready_at plus that wait).
    offloads = offload_ms.shape[0] > 0
    m = n if offloads else 0
    pend_t = np.zeros((pp, m))
    pend_b = np.zeros((pp, m))
    pend_head = np.zeros(pp, dtype=np.int64)
    pend_tail = np.zeros(pp, dtype=np.int64)
    d2h_free = np.zeros(pp)
    h2d_free = np.zeros(pp)
    d2h_end = np.zeros(m)
    avail = ready_at if not offloads else np.zeros(n)
    # A rank's pick depends only on its own state: cache it per gate until that state changes (a stage of the rank
    # runs, or one becomes ready on it), as the reference does.
    pick_i = np.full((4, pp), -1, dtype=np.int64)
    pick_t = np.full((4, pp), math.inf)
    pick_key = np.full((4, pp), math.inf)
    stale = np.ones((4, pp), dtype=np.bool_)
    done = 0
    while done < n:
        chosen = -1
        chosen_t = math.inf
        chosen_key = math.inf
        chosen_r = -1
        waited = False
        for gate in range(first_gate, 4):
            for r in range(pp):
                if stale[gate, r]:
                    best, t, key = _pick(
                        r,
                        gate,
                        earliest,
                        active,
                        duration,
                        ready,
                        nready,
                        t_last,
                        last_fwd,
                        is_forward,
                        source,
                        mem,
                        alloc,
                        cap,
                        holds,
                        unit,
                        avail,
                        priority,
                        pend_t,
                        pend_b,
                        pend_head,
                        pend_tail,
                    )
                    pick_i[gate, r] = best
                    pick_t[gate, r] = t
                    pick_key[gate, r] = key
                    stale[gate, r] = False
                best = pick_i[gate, r]
                if best >= 0 and pick_key[gate, r] < chosen_key:
                    chosen = best
                    chosen_t = pick_t[gate, r]
                    chosen_key = pick_key[gate, r]
                    chosen_r = r
            if chosen >= 0:
                break
            if offloads and gate == first_gate:
                # Nothing fits now: before loosening the gate, the rank with gated work whose next offload copy
                # ends first waits for it (its bytes are freed then), and every rank tries again.
                w = -1
                for q in range(pp):
                    pending = nready[q] > 0 and pend_head[q] < pend_tail[q]
                    if pending and (w < 0 or pend_t[q, pend_head[q]] < pend_t[w, pend_head[w]]):
                        w = q
                if w >= 0:
                    waited = True
                    tw = pend_t[w, pend_head[w]]
                    if tw > t_last[w]:
                        t_last[w] = tw
                    _settle_copies(
                        w,
                        t_last,
                        ready,
                        nready,
                        avail,
                        ready_at,
                        is_forward,
                        alloc,
                        mem,
                        cap,
                        pend_t,
                        pend_b,
                        pend_head,
                        pend_tail,
                        reload_of,
                        offload_ms,
                        h2d_free,
                        d2h_end,
                    )
                    stale[:, w] = True
                    break
        if waited:
            continue
        if chosen < 0:
            return position, start, end  # cycle: caller sees unscheduled stages
        r = chosen_r
        i = chosen
        # order-preserving removal (keeps tie-breaking identical to the reference's list.remove)
        k = 0
        while ready[r, k] != i:
            k += 1
        for q in range(k, nready[r] - 1):
            ready[r, q] = ready[r, q + 1]
        nready[r] -= 1
        start[i] = chosen_t
        end[i] = chosen_t + duration[i]
        t_last[r] = end[i]
        last_fwd[r] = is_forward[i]
        mem[r] += alloc[i] - free[i]
        holds[r, unit[i]] += alloc[i] - free[i]
        if offloads:
            if reload_of[i] >= 0:
                h2d_free[r] = start[i]
            elif is_forward[i] == 1 and offload_bytes[i] > 0.0:
                d2h_end[i] = max(end[i], d2h_free[r]) + offload_ms[i]
                d2h_free[r] = d2h_end[i]
                pend_t[r, pend_tail[r]] = d2h_end[i]
                pend_b[r, pend_tail[r]] = offload_bytes[i]
                pend_tail[r] += 1
            _settle_copies(
                r,
                t_last,
                ready,
                nready,
                avail,
                ready_at,
                is_forward,
                alloc,
                mem,
                cap,
                pend_t,
                pend_b,
                pend_head,
                pend_tail,
                reload_of,
                offload_ms,
                h2d_free,
                d2h_end,
            )
        position[i] = count[r]
        count[r] += 1
        done += 1
        stale[:, r] = True
        for k in range(succ_ptr[i], succ_ptr[i + 1]):
            j = succ_idx[k]
            remaining[j] -= 1
            if remaining[j] == 0:
                t = 0.0
                for q in range(pred_ptr[j], pred_ptr[j + 1]):
                    p = pred_idx[q]
                    v = end[p] + pred_delay[q]
                    if v > t:
                        t = v
                ready_at[j] = t
                rj = rank[j]
                if offloads:
                    if reload_of[j] >= 0:
                        # Its prefetch may be issued from now on (SEMU issues it one or more computes before the
                        # backward): the memory gate counts its bytes from here.
                        mem[rj] += offload_bytes[j]
                    avail[j] = _avail(
                        j,
                        rj,
                        ready_at,
                        is_forward,
                        alloc,
                        mem,
                        cap,
                        pend_t,
                        pend_b,
                        pend_head,
                        pend_tail,
                        reload_of,
                        offload_ms,
                        h2d_free,
                        d2h_end,
                    )
                ready[rj, nready[rj]] = j
                nready[rj] += 1
                stale[:, rj] = True
    return position, start, end


def interleave(problem: Problem, priority: F64) -> tuple[I64, F64, F64, float]:
    """Numba twin of `interleave_reference`: (position per stage, start_ms, end_ms, makespan_ms)."""
    position, start, end = _kernel(
        problem.pp,
        problem.rank,
        problem.duration_ms,
        problem.is_forward,
        problem.alloc_bytes,
        problem.free_bytes,
        problem.pred_ptr,
        problem.pred_idx,
        problem.pred_delay_ms,
        problem.succ_ptr,
        problem.succ_idx,
        problem.mem_cap_bytes,
        np.ascontiguousarray(priority, dtype=np.float64),
        problem.unit,
        int(problem.policy),
        problem.offload_bytes if problem.offload_bytes is not None else _NONE_F,
        problem.offload_ms if problem.offload_ms is not None else _NONE_F,
        problem.reload_of if problem.reload_of is not None else _NONE_I,
    )
    if problem.n and np.any(position < 0):
        raise RuntimeError("interleaver stuck: the stage graph has a cycle")
    return position, start, end, float(np.max(end)) if problem.n else 0.0

"""SEMU with activation offloading: copies on a per-rank host link, memory held until a copy ends and again from a
prefetch, backwards waiting for their copy; numba kernel == pure-Python twin."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeweaver.plan import Compute, Pass, Plan, Prefetch, assemble_plan
from pipeweaver.plan.offload import place_prefetches
from pipeweaver.simulator.engine import LinkModel, StageCosts, flatten, simulate
from pipeweaver.simulator.sim_kernel import merge_host_events, run_numba, run_reference
from tests.simulator.test_engine import Case, _c, chain_header, no_tensors, random_case

GB_PER_MS = 1e12
"""Bytes per second that move 1 GB per millisecond (the tests' costs are in ms and GB)."""


def host_link(pp: int, bandwidth: float, latency_ms: float = 0.0) -> LinkModel:
    return replace(LinkModel.zero(pp), host_bandwidth_bytes_per_s=bandwidth, host_latency_ms=latency_ms)


def offload(plan: Plan, units: set[tuple[int, int]]) -> Plan:
    """`plan` with exactly the forwards of (chunk, microbatch) `units` offloading (and no prefetch if none)."""
    ranks = []
    for rp in plan.ranks:
        actions = tuple(
            replace(a, offload=a.stage.pass_ is Pass.F and (a.stage.chunk, a.stage.microbatch) in units)
            if isinstance(a, Compute)
            else a
            for a in rp.actions
            if units or not isinstance(a, Prefetch)
        )
        ranks.append(replace(rp, actions=actions))
    return replace(plan, ranks=tuple(ranks))


def both(plan: Plan, costs: StageCosts, link: LinkModel):  # type: ignore[no-untyped-def]
    fast = simulate(plan, costs, link=link, use_numba=True)
    slow = simulate(plan, costs, link=link, use_numba=False)
    assert fast.makespan_ms == slow.makespan_ms
    for r in range(fast.pp):
        assert fast.memory_timeline(r) == slow.memory_timeline(r)
        assert np.array_equal(fast.start_ms[r], slow.start_ms[r])
    assert np.array_equal(fast.peak_memory_bytes, slow.peak_memory_bytes)
    return fast


def one_rank_plan(actions: list[Compute | Prefetch]) -> tuple[Plan, StageCosts]:
    header = chain_header(1, 2)
    plan = assemble_plan(header, [[a for a in actions if isinstance(a, Compute)]], no_tensors)
    rp = replace(plan.ranks[0], actions=tuple(actions))
    costs = StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0, act_bytes=4e9)
    return replace(plan, ranks=(rp,)), costs


F0, F1, B0, B1 = (_c(0, 0, Pass.F), _c(0, 1, Pass.F), _c(0, 0, Pass.B), _c(0, 1, Pass.B))


def test_offload_frees_at_copy_end_and_prefetch_holds_again() -> None:
    """F0 offloads 4 GB at 2 GB/ms (2 ms each way): its bytes are freed when the copy out ends (1..3); B1's start
    (2) issues B0's prefetch, whose copy back waits for the copy out (3..5); B0 then waits for it (5, not 4)."""
    plan, costs = one_rank_plan([replace(F0, offload=True), F1, Prefetch(B0.stage), B1, B0])
    res = both(plan, costs, host_link(1, 2 * GB_PER_MS))
    assert res.makespan_ms == 7.0  # F0 0-1, F1 1-2, B1 2-4, B0 5-7
    # F0 +4 at 0, F1 +4 at 1, prefetch +4 at 2, copy out done -4 at 3, B1 frees at 4, B0 at 7.
    gb = [(t, b / 1e9) for t, b in res.memory_timeline(0)]
    assert gb == [(0.0, 0.0), (0.0, 4.0), (1.0, 8.0), (2.0, 12.0), (3.0, 8.0), (4.0, 4.0), (7.0, 0.0)]
    assert res.host_peak_bytes is not None and res.host_peak_bytes[0] == 4e9
    assert res.host_copy_ms is not None and res.host_copy_ms[0] == 2.0


def test_backward_waits_for_its_copy_back() -> None:
    """The prefetch right before B0 (F0 ends at 2, copy out 2..4, copy back 4..6): B0 starts at 6, 4 ms exposed."""
    plan, costs = one_rank_plan([F1, replace(F0, offload=True), Prefetch(B0.stage), B0, B1])
    res = both(plan, costs, host_link(1, 2 * GB_PER_MS))
    b0 = plan.ranks[0].actions.index(B0)
    assert res.start_ms[0][b0] == 6.0  # F1 0-1, F0 1-2, out 2-4, back 4-6
    assert res.makespan_ms == 10.0
    # A backward without a prefetch issues its own copy when reached: the same here.
    plan2, _ = one_rank_plan([F1, replace(F0, offload=True), B0, B1])
    assert simulate(plan2, costs, link=host_link(1, 2 * GB_PER_MS)).makespan_ms == 10.0


def test_copies_of_a_rank_queue_on_its_host_link() -> None:
    """Two offloads back to back: the second copy starts when the first ends (one direction, FIFO)."""
    plan, costs = one_rank_plan(
        [replace(F0, offload=True), replace(F1, offload=True), Prefetch(B1.stage), Prefetch(B0.stage), B1, B0]
    )
    res = both(plan, costs, host_link(1, 1 * GB_PER_MS))  # 4 ms per copy
    # Outs: F0 1..5, F1 5..9; backs: B1's from 9 (after its out) to 13, B0's 13..17. B1 runs 13-15, B0 17-19.
    assert res.makespan_ms == 19.0
    gb = [(t, b / 1e9) for t, b in res.memory_timeline(0)]
    # Both prefetches were issued at 2 (before B1): their bytes count from then, before the copies even start.
    assert gb == [(0, 0), (0, 4), (1, 8), (2, 12), (2, 16), (5, 12), (9, 8), (15, 4), (19, 0)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_case(), st.floats(0.0, 1.0), st.sampled_from([1e6, 1e8, 1e12, math.inf]), st.booleans())
def test_random_offloads_numba_matches_reference(case: Case, share: float, bandwidth: float, place: bool) -> None:
    plan, _, _, costs, link = case
    rng = random.Random(int(share * 1e6))
    units = {(s.chunk, s.microbatch) for s in costs.act_bytes if rng.random() < share}
    # Offload applies to forwards of pairs with a backward only (the validator's rule; SEMU does not care).
    plan = offload(plan, units)
    link = replace(link, host_bandwidth_bytes_per_s=bandwidth, host_latency_ms=0.01)
    copy = {s: link.host_copy_ms(costs.act_bytes.get(s, 0.0)) for s in costs.act_bytes}
    if place:
        plan = place_prefetches(plan, costs.compute_ms, copy)
    flat = flatten(plan, costs, link)
    fast, slow = merge_host_events(flat, run_numba(flat)), merge_host_events(flat, run_reference(flat))
    assert fast.status == slow.status == 0
    for name in ("start_ms", "end_ms", "busy_ms", "peak_bytes", "event_count", "event_time_ms", "event_bytes"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    res = simulate(plan, costs, link=link)
    plain = simulate(plan, costs, link=replace(link, host_bandwidth_bytes_per_s=math.inf, host_latency_ms=0.0))
    base = simulate(offload(plan, set()), costs, link=link)
    # Copies only delay: never faster than without offloading; free copies change no time and hold less memory.
    assert res.makespan_ms >= base.makespan_ms - 1e-9
    assert plain.makespan_ms == pytest.approx(base.makespan_ms)
    assert np.all(plain.peak_memory_bytes <= base.peak_memory_bytes + 1e-6)
    for r in range(res.pp):
        times = [t for t, _ in res.memory_timeline(r)]
        assert times == sorted(times)
        assert res.memory_bytes[r][-1] == pytest.approx(costs.static_bytes[r], abs=1e-3)  # everything freed

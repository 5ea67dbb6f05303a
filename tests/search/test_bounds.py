"""Lower bounds: never above any schedule's makespan (CP-SAT optima with and without memory, the planner's plans,
every baseline that fits), never below the simpler arguments they replace, the one-machine kernel equal to its
Python twin and to the subset bound it computes, and the memory-time argument binds where memory is short."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver.datagen import sample_batch
from pipeweaver.plan import PlanHeader, stage_graph
from pipeweaver.plan.ir import Pass, PlanSource, Recompute
from pipeweaver.plan.layouts import modular_placement, split_sub_microbatches
from pipeweaver.presets import workload
from pipeweaver.search.bounds import (
    _heads_and_tails,
    _jackson_kernel,
    _pairs,
    exact_makespan,
    exact_makespan_ms,
    jackson_reference,
    lower_bound_ms,
    lower_bound_parts,
)
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.search.problem import Problem, build_problem, with_offload
from pipeweaver.spec import BatchMetadata
from pipeweaver.spec.workload import Workload
from tests.search.pipelines import small_batch, uniform_pipeline_header

MB = 1e6


def _head_work_tail_ms(problem: Problem, strategies: list[Problem] | None = None) -> float:
    """Argument 2 before the one-machine view: max over ranks of smallest head + all work + smallest tail."""
    dmin = np.min(np.stack([problem.duration_ms, *(v.duration_ms for v in strategies or [])]), axis=0)
    head, tail = _heads_and_tails(problem, dmin)
    masks = [problem.rank == r for r in range(problem.pp)]
    return max(float(head[m].min() + dmin[m].sum() + tail[m].min()) for m in masks if m.any())


# ---- one rank as one machine -------------------------------------------------------------------------------------


def _window_bound(rank: list[int], pp: int, release: list[float], work: list[float], tail: list[float]) -> list[float]:
    """Per rank, max over windows {j : release_j >= a, tail_j >= b} of a + their work + b, by brute force."""
    out = [0.0] * pp
    for r in range(pp):
        jobs = [j for j in range(len(rank)) if rank[j] == r]
        for a in (release[j] for j in jobs):
            for b in (tail[j] for j in jobs):
                window = [j for j in jobs if release[j] >= a and tail[j] >= b]
                if window:
                    out[r] = max(out[r], a + sum(work[j] for j in window) + b)
    return out


@settings(max_examples=300, deadline=None)
@given(
    jobs=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40), st.integers(0, 12), st.integers(0, 40)), max_size=12)
)
def test_one_machine_kernel_equals_reference_and_the_window_bound(jobs: list[tuple[int, int, int, int]]) -> None:
    # Quarter-ms values: sums stay exact in floating point, and ties in release and tail are common.
    rank = [j[0] for j in jobs]
    release, work, tail = ([j[k] / 4 for j in jobs] for k in (1, 2, 3))
    arrays = (np.array(rank, np.int64), 3, np.array(release), np.array(work), np.array(tail))
    value, a, b = _jackson_kernel(*arrays)
    ref_value, ref_a, ref_b = jackson_reference(rank, 3, release, work, tail)
    assert value.tolist() == pytest.approx(ref_value)
    assert value.tolist() == pytest.approx(_window_bound(rank, 3, release, work, tail))
    for win_a, win_b in ((a.tolist(), b.tolist()), (ref_a, ref_b)):  # the window returned attains the bound
        for r in set(rank):
            inside = [j for j in range(len(rank)) if rank[j] == r and release[j] >= win_a[r] and tail[j] >= win_b[r]]
            assert inside
            assert win_a[r] + sum(work[j] for j in inside) + win_b[r] == pytest.approx(value[r])


def test_one_machine_bound_sees_that_backwards_wait_for_the_chain() -> None:
    # Two ranks, two microbatches; rank 0: F = 1, B = 4; rank 1: F = B = 1. Rank 0's backwards cannot start before
    # 3 ms (F F B through rank 1) and take 8 ms: 11 ms, which 1F1B reaches. Smallest head + work + smallest tail
    # on rank 0 is 10 ms, on rank 1 9 ms, and the chain 7 ms.
    header = uniform_pipeline_header(2, 2)
    g = stage_graph(header)
    cost = {(0, Pass.F): 1.0, (0, Pass.B): 4.0, (1, Pass.F): 1.0, (1, Pass.B): 1.0}
    dur = {s: cost[(g.rank[s], s.pass_)] for s in g.stages}
    problem = build_problem(g, 2, dur, {}, {}, [1e9] * 2)
    parts = lower_bound_parts(problem)
    assert (parts.chain_ms, _head_work_tail_ms(problem)) == (pytest.approx(7.0), pytest.approx(10.0))
    assert parts.rank_ms == pytest.approx(11.0)
    optimum, proven = exact_makespan_ms(problem, time_limit_s=10)
    assert proven and optimum == pytest.approx(11.0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), pp=st.sampled_from([2, 3, 4]), m=st.integers(1, 4), split=st.booleans())
def test_busiest_rank_bound_is_between_head_work_tail_and_the_optimum(seed: int, pp: int, m: int, split: bool) -> None:
    problem = _strategy_problems(seed, pp, m, split)[0]
    parts = lower_bound_parts(problem)
    assert parts.rank_ms >= _head_work_tail_ms(problem) - 1e-9
    best, _ = exact_makespan_ms(problem, time_limit_s=10)  # proven or not: a makespan some schedule reaches
    assert parts.best_ms <= best + 1e-3 * problem.n


def test_cp_sat_reports_its_own_bound_below_its_best_and_equal_when_proven() -> None:
    for seed in range(2):
        problem = _strategy_problems(seed, 3, 3, False)[0]
        proven = exact_makespan(problem, time_limit_s=10)
        assert proven.proven and proven.lower_ms == proven.best_ms
        # Stopped early (proven or not): the optimum lies between CP-SAT's bound and its best schedule.
        early = exact_makespan(problem, time_limit_s=1.0)
        assert early.lower_ms <= proven.best_ms + 1e-9 <= early.best_ms + 1e-9


def _strategy_problems(seed: int, pp: int, m: int, split: bool) -> list[Problem]:
    """One random stage graph under three strategies: fast and big, slower backward and smaller, slowest and tiny
    (the shape of none / selective / full recompute), with random per-pair costs."""
    rng = np.random.default_rng(seed)
    model = workload("tiny-vlm").model
    batch = small_batch([int(x) for x in rng.integers(0, 4, m)], [int(x) for x in rng.integers(5, 80, m)])
    placement = modular_placement(model, pp, {"vit": 1, "llm": 1})
    header = PlanHeader(
        job_id="t",
        iteration=0,
        placement=placement,
        sub_microbatches=split_sub_microbatches(model, placement, batch, {"vit": 2}),
        num_microbatches=m,
        schedule="test",
        split_backward=split,
    )
    g = stage_graph(header)
    base = {s: float(rng.uniform(0.5, 3.0)) for s in g.stages}
    act = {(s.pipeline, s.chunk, s.microbatch, s.sub): float(rng.uniform(0.5, 2.0)) for s in g.stages}
    delay = {(p, s): float(rng.uniform(0, 0.3)) for s in g.stages for p in g.remote_inputs(s)}
    out = []
    for slow, lean in ((1.0, 1.0), (1.2, 0.6), (1.6, 0.1)):
        dur = {s: d * (slow if s.pass_ is not Pass.F else 1.0) for s, d in base.items()}
        out.append(build_problem(g, pp, dur, {k: v * lean for k, v in act.items()}, delay, [1e9] * pp))
    return out


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    pp=st.sampled_from([2, 3]),
    m=st.integers(1, 3),
    split=st.booleans(),
    tightness=st.sampled_from([0.15, 0.3, 0.5, 1.0]),
)
def test_bound_never_exceeds_the_memory_constrained_optimum(
    seed: int, pp: int, m: int, split: bool, tightness: float
) -> None:
    strategies = _strategy_problems(seed, pp, m, split)
    none = strategies[0]
    # Budget: a fraction of what every pair at its fastest would hold, never below the leanest single pair's need.
    total = np.array([none.alloc_bytes[none.rank == r].sum() for r in range(pp)])
    cap = np.maximum(total * tightness, 2.0)
    parts = lower_bound_parts(none, strategies, cap)
    assert parts.best_ms >= lower_bound_ms(none) - 1e-9  # never weaker than arguments 1-2
    assert parts.rank_ms >= _head_work_tail_ms(none, strategies) - 1e-9
    assert parts.memory_ms >= parts.rank_ms - 1e-9  # lam = 1 on argument 2's window
    try:
        optimum, _ = exact_makespan_ms(none, time_limit_s=10, strategies=strategies, cap_bytes=cap)
    except RuntimeError:
        return  # no schedule fits this budget: nothing to bound
    # Feasible or proven optimal, CP-SAT's value is a makespan some schedule reaches; the bound may not exceed it.
    assert parts.best_ms <= optimum + 1e-3 * none.n


def _uniform_pipeline(pp: int, m: int) -> list[Problem]:
    """A plain pipeline (one chunk per rank, whole microbatches): F = 1, B = 2; recompute: B = 4, bytes / 10."""
    header = uniform_pipeline_header(pp, m)
    g = stage_graph(header)
    act = {(s.pipeline, s.chunk, s.microbatch, s.sub): 1.0 for s in g.stages}
    out = []
    for b, lean in ((2.0, 1.0), (4.0, 0.1)):
        dur = {s: 1.0 if s.pass_ is Pass.F else b for s in g.stages}
        out.append(build_problem(g, pp, dur, {k: v * lean for k, v in act.items()}, {}, [1e9] * pp))
    return out


def test_memory_argument_binds_when_one_microbatch_fits_and_stays_below_the_optimum() -> None:
    pp, m = 3, 6
    strategies = _uniform_pipeline(pp, m)
    # Rank 0 keeps each microbatch at least from its forward to its backward's end (F F F B B B = 9 ms) unless it
    # recomputes (2 ms more work, a tenth of the bytes: 1.1 byte-ms). With room for about one microbatch, keeping
    # all 6 takes 6 * 9 / 1.05 ms of memory-time. Its backwards cannot start before 7 ms (F F B B through ranks 1
    # and 2) and are 12 ms of work; recomputing a fraction x of each pair balances 7 + 12 + 12x with
    # 6 (9 (1 - x) + 1.1 x) / 1.05 at 25.81 ms. Counting all of rank 0's work from 0 instead gives 25.02 ms (this
    # argument before), rank 1 gives 25.69 ms; the busiest-rank bound is 24 ms (rank 2: 2 ms head, 18 ms work,
    # 4 ms tail).
    cap = [1.05] * pp
    parts = lower_bound_parts(strategies[0], strategies, cap)
    assert parts.rank_ms == pytest.approx(24.0)
    assert parts.memory_rank_ms[:2] == (pytest.approx(25.81, abs=1e-2), pytest.approx(25.685, abs=1e-2))
    # CP-SAT's best schedule within the limit (proven optimal or not) is a makespan some schedule reaches.
    best, _ = exact_makespan_ms(strategies[0], time_limit_s=10, strategies=strategies, cap_bytes=cap)
    assert parts.best_ms <= best + 1e-6
    # With room for every microbatch the memory argument adds nothing.
    roomy = lower_bound_parts(strategies[0], strategies, [float(m)] * pp)
    assert roomy.memory_ms == pytest.approx(roomy.rank_ms)


def test_old_signature_is_the_chain_and_busiest_rank_bound() -> None:
    strategies = _uniform_pipeline(4, 8)
    # 1F1B on a uniform pipeline: (m + p - 1) * (F + B); the busiest-rank bound is that exactly.
    assert lower_bound_ms(strategies[0]) == pytest.approx((8 + 4 - 1) * 3.0)
    optimum, _ = exact_makespan_ms(strategies[0], time_limit_s=20)
    assert lower_bound_ms(strategies[0]) <= optimum + 1e-6


# ---- on the planner's problems -----------------------------------------------------------------------------------


def _planner_bound(planner: Planner, batch: BatchMetadata) -> tuple[float, Problem, list[Problem], list[float]]:
    """What the planner reports as its lower bound (the wiring planner.plan uses)."""
    header = planner.header_for(batch, job_id="", source=PlanSource.SEARCH, schedule="pipeweaver")
    prep = planner._prepare(batch, header, Recompute.NONE)
    per = planner._strategy_costs(prep, batch)
    strategies = [planner._problem_with(prep, per, dict.fromkeys(prep.costs.activation_bytes, rc)) for rc in Recompute]
    caps = [planner.hardware.memory_bytes - s for s in planner.partition.static_memory_bytes]
    return lower_bound_ms(prep.problem, strategies, caps), prep.problem, strategies, caps


def _tight(w: Workload, extra_mb: float) -> Workload:
    """`w` on a device with only `extra_mb` of room above the largest rank's static memory."""
    probe = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(compare_baselines=()))
    memory = max(probe.partition.static_memory_bytes) + extra_mb * MB
    return replace(w, hardware=replace(w.hardware, memory_bytes=memory))


@pytest.mark.parametrize(
    ("name", "extra_mb", "seeds", "binds"),
    [
        # tiny-vlm's blocks are large next to its weights: where its memory argument binds (4 MB of room), no plan
        # fits once a backward's working memory counts (three blocks' activations under full recompute).
        ("tiny-t2v", 8.0, (1, 2, 3), True),
        ("tiny-t2v", 6.0, (1, 2), True),
        ("tiny-vlm", 12.0, (1, 2), False),
    ],
)
def test_bound_is_below_the_plan_and_every_baseline_that_fits(
    name: str, extra_mb: float, seeds: tuple[int, ...], binds: bool
) -> None:
    w = _tight(workload(name), extra_mb)
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=150, max_evaluations=30))
    checked = 0
    for seed in seeds:
        batch = sample_batch(w, seed=seed)
        bound, problem, strategies, caps = _planner_bound(planner, batch)
        parts = lower_bound_parts(problem, strategies, caps)
        assert (parts.memory_ms > max(parts.rank_ms, parts.chain_ms) + 1.0) is binds
        assert parts.rank_ms >= _head_work_tail_ms(problem, strategies) - 1e-9
        result = planner.plan(batch)
        assert max(result.peak_memory_bytes) <= w.hardware.memory_bytes  # the argument needs a plan that fits
        assert bound <= result.predicted_ms + 1e-6
        for baseline, sim in planner.baseline_results(batch).items():
            if planner._fits(sim):  # other placements: an empirical check, not a theorem (see bounds.py)
                assert bound <= sim.makespan_ms + 1e-6, baseline
                checked += 1
    assert checked > 0


def test_bound_stays_below_cp_sat_on_a_small_tight_instance() -> None:
    w = _tight(workload("tiny-t2v"), 2.0)
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(compare_baselines=()))
    batch = sample_batch(w, seed=11)
    small = type(batch)(batch.iteration, batch.microbatches[:3])
    bound, problem, strategies, caps = _planner_bound(planner, small)
    parts = lower_bound_parts(problem, strategies, caps)
    assert parts.memory_ms > parts.rank_ms + 1.0
    best, _ = exact_makespan_ms(problem, time_limit_s=10, strategies=strategies, cap_bytes=caps)
    assert bound <= best + 1e-3 * problem.n


def test_memory_argument_binds_on_t2v_l_and_stays_below_every_schedule_that_fits() -> None:
    # 80 GB cannot hold the DiT 30B's activations for their lifetimes: the bound must charge some recompute.
    w = workload("t2v-l")
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=150, max_evaluations=5))
    batch = sample_batch(w, seed=0)
    bound, problem, strategies, caps = _planner_bound(planner, batch)
    parts = lower_bound_parts(problem, strategies, caps)
    # 1.7% above the busiest rank since a GPU's transfers carry its tp shard (shorter chains, shorter lifetimes).
    assert parts.memory_ms > 1.01 * parts.rank_ms
    result = planner.plan(batch)
    assert max(result.peak_memory_bytes) <= w.hardware.memory_bytes
    assert bound <= result.predicted_ms
    fitting = {k: v.makespan_ms for k, v in planner.baseline_results(batch).items() if planner._fits(v)}
    assert fitting
    assert bound <= min(fitting.values())


def test_cp_sat_returns_the_schedule_it_reports() -> None:
    strategies = _uniform_pipeline(3, 6)
    found = exact_makespan(strategies[0], time_limit_s=10, strategies=strategies, cap_bytes=[1.05] * 3)
    p = strategies[0]
    of_stage = _pairs(p).of_stage
    dur = np.array([strategies[found.strategy[of_stage[i]]].duration_ms[i] for i in range(p.n)])
    start = np.array(found.start_ms)
    end = start + dur
    assert float(end.max()) == pytest.approx(found.best_ms)
    for i in range(p.n):  # dependencies, transfer delays included
        for q in range(p.pred_ptr[i], p.pred_ptr[i + 1]):
            assert start[i] >= end[p.pred_idx[q]] + p.pred_delay_ms[q] - 1e-9
    for r in range(p.pp):  # one stage at a time per rank
        mine = sorted(np.flatnonzero(p.rank == r), key=lambda i: start[i])
        assert all(start[b] >= end[a] - 1e-9 for a, b in pairwise(mine))
    assert 1 in found.strategy  # room for about one microbatch: some pairs must recompute


# ---- activation offloading ---------------------------------------------------------------------------------------


def _offloading(problem: Problem, copy_ms: float) -> Problem:
    """`problem` with every pair offloading its bytes, each copy taking `copy_ms`."""
    forwards = problem.is_forward == 1
    return with_offload(problem, np.where(forwards, problem.alloc_bytes, 0.0), np.full(problem.n, copy_ms))


def test_offloading_lowers_the_memory_argument_and_the_host_link_bounds_it() -> None:
    """The pipeline of `test_memory_argument_binds_when_one_microbatch_fits...` (memory argument 25.81 ms on rank
    0) with an offload strategy: copies of 0.1 ms leave each pair 2 x 0.1 ms of holding beyond its own F and B, so
    memory no longer binds and the bound falls to the busiest rank's 24 ms. With 3 ms copies, offloading all six of
    rank 0's pairs would keep its host link busy 18 ms per direction and hold each pair 9 ms: the bound stays above
    24 ms, and never above the bound without offloading (a strategy more can only lower the minimum)."""
    pp, m = 3, 6
    strategies = _uniform_pipeline(pp, m)
    cap = [1.05] * pp
    without = lower_bound_parts(strategies[0], strategies, cap)
    quick = lower_bound_parts(strategies[0], [*strategies, _offloading(strategies[0], 0.1)], cap)
    assert quick.best_ms == pytest.approx(24.0)
    slow = lower_bound_parts(strategies[0], [*strategies, _offloading(strategies[0], 3.0)], cap)
    assert 24.0 + 0.1 < slow.best_ms <= without.best_ms + 1e-9
    # The host link alone: offloading keeps rank 0's pairs for F + 2 copies + B = 9 ms, no less than without;
    # recompute is then the only way to save memory-time, and the bound is the one without offloading.
    same = lower_bound_parts(strategies[0], [*strategies, _offloading(strategies[0], 100.0)], cap)
    assert same.best_ms == pytest.approx(without.best_ms)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), split=st.booleans(), copy=st.sampled_from([0.05, 0.5, 3.0]))
def test_offload_strategies_never_raise_the_bound(seed: int, split: bool, copy: float) -> None:
    strategies = _strategy_problems(seed, 2, 3, split)
    none = strategies[0]
    total = np.array([none.alloc_bytes[none.rank == r].sum() for r in range(2)])
    cap = np.maximum(total * 0.3, 2.0)
    without = lower_bound_parts(none, strategies, cap)
    offloads = [_offloading(strategies[0], copy), _offloading(strategies[1], copy)]
    with_them = lower_bound_parts(none, [*strategies, *offloads], cap)
    assert with_them.best_ms <= without.best_ms + 1e-9
    assert with_them.best_ms >= max(with_them.rank_ms, with_them.chain_ms) - 1e-9

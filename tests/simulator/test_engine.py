"""SEMU's event simulation: numba kernel == pure-Python twin, and exact pipeline-bubble and memory results."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeweaver import presets
from pipeweaver.errors import InvalidPlan
from pipeweaver.plan import (
    Action,
    Chunk,
    CommBatch,
    Compute,
    Direction,
    LayerRange,
    Pass,
    PipelineInfo,
    Placement,
    Plan,
    PlanHeader,
    RankPlan,
    StageGraph,
    StageKey,
    SubMicrobatch,
    TensorSpec,
    Transfer,
    TransferShapes,
    Wait,
    assemble_plan,
    stage_graph,
)
from pipeweaver.plan.layouts import (
    RankOrder,
    _min_max_partition,
    mixed_placement,
    modular_placement,
    split_sub_microbatches,
    whole_sub_microbatches,
)
from pipeweaver.simulator.engine import LinkModel, SimResult, StageCosts, flatten, simulate, transfer_bytes
from pipeweaver.simulator.sim_kernel import run_numba, run_reference
from pipeweaver.spec import BatchMetadata, Document, MediaItem, Microbatch, Modality, ParallelSpec
from pipeweaver.spec.hardware import H800

# ---- helpers: single-pipeline schedules --------------------------------------------------------------------

PIPE = "model"


def chain_header(p: int, m: int, v: int = 1) -> PlanHeader:
    """One pipeline of p*v one-layer chunks (chunk c on rank c % p); m microbatches of one sub each."""
    chunks = tuple(Chunk(PIPE, c, c % p, (LayerRange("llm", c, c + 1),)) for c in range(p * v))
    placement = Placement(pp=p, pipelines=(PipelineInfo(PIPE, ("llm",)),), chunks=chunks)
    subs = tuple(SubMicrobatch(PIPE, j, 0, (("llm", (0,)),)) for j in range(m))
    return PlanHeader(
        job_id="test",
        iteration=0,
        placement=placement,
        sub_microbatches=subs,
        num_microbatches=m,
        schedule="test",
    )


def _c(chunk: int, mb: int, pass_: Pass) -> Compute:
    return Compute(StageKey(PIPE, chunk, mb, 0, pass_))


def one_f_one_b(p: int, m: int) -> list[list[Compute]]:
    """1F1B: p-r-1 warm-up forwards, then one forward / one backward, then the remaining backwards."""
    orders = []
    for r in range(p):
        warm = min(p - r - 1, m)
        order = [_c(r, j, Pass.F) for j in range(warm)]
        for i in range(m - warm):
            order += [_c(r, warm + i, Pass.F), _c(r, i, Pass.B)]
        order += [_c(r, j, Pass.B) for j in range(m - warm, m)]
        orders.append(order)
    return orders


def gpipe(p: int, m: int) -> list[list[Compute]]:
    return [[_c(r, j, Pass.F) for j in range(m)] + [_c(r, j, Pass.B) for j in range(m)] for r in range(p)]


def interleaved_1f1b(p: int, m: int, v: int) -> list[list[Compute]]:
    """Megatron-LM's interleaved 1F1B (forward_backward_pipelining_with_interleaving); m a multiple of p."""
    total = m * v

    def unit(k: int, forward: bool, r: int) -> Compute:
        group, in_group = divmod(k, p * v)
        local = in_group // p
        if not forward:
            local = v - 1 - local
        mb = group * p + in_group % p
        return _c(local * p + r, mb, Pass.F if forward else Pass.B)

    orders = []
    for r in range(p):
        warm = total if m == p else min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [unit(k, True, r) for k in range(warm)]
        for k in range(total - warm):
            order += [unit(k + warm, True, r), unit(k, False, r)]
        order += [unit(k, False, r) for k in range(total - warm, total)]
        orders.append(order)
    return orders


def no_tensors(src: StageKey, dst: StageKey) -> tuple[TensorSpec, ...]:
    return ()


def both(plan: Plan, costs: StageCosts, link: LinkModel) -> SimResult:
    """Simulate with numba and with the reference; insist they agree exactly; return one."""
    fast = simulate(plan, costs, link=link, use_numba=True)
    slow = simulate(plan, costs, link=link, use_numba=False)
    assert_same(fast, slow)
    return fast


def assert_same(a: SimResult, b: SimResult) -> None:
    assert a.makespan_ms == b.makespan_ms
    assert a.bubble_fraction == b.bubble_fraction
    for x, y in [(a.busy_ms, b.busy_ms), (a.peak_memory_bytes, b.peak_memory_bytes)]:
        assert np.array_equal(x, y)
    for xs, ys in [
        (a.start_ms, b.start_ms),
        (a.end_ms, b.end_ms),
        (a.memory_time_ms, b.memory_time_ms),
        (a.memory_bytes, b.memory_bytes),
    ]:
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys, strict=True):
            assert np.array_equal(x, y)


# ---- (b) exact bubble fractions ----------------------------------------------------------------------------

GRID = [(p, m) for p in (2, 4, 8) for m in (4, 8, 16)]


@pytest.mark.parametrize("schedule", [one_f_one_b, gpipe])
@pytest.mark.parametrize(("p", "m"), GRID)
def test_1f1b_and_gpipe_bubble(schedule: Callable[[int, int], list[list[Compute]]], p: int, m: int) -> None:
    f = 1.0
    header = chain_header(p, m)
    plan = assemble_plan(header, schedule(p, m), no_tensors)
    res = both(plan, StageCosts.uniform(header, forward_ms=f, backward_ms=2 * f), LinkModel.zero(p))
    assert res.makespan_ms == (m + p - 1) * 3 * f
    assert res.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert np.array_equal(res.busy_ms, np.full(p, 3 * f * m))


@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize(("p", "m"), [(p, m) for p, m in GRID if m % p == 0])
def test_interleaved_1f1b_bubble(p: int, m: int, v: int) -> None:
    header = chain_header(p, m, v)
    plan = assemble_plan(header, interleaved_1f1b(p, m, v), no_tensors)
    res = both(plan, StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0), LinkModel.zero(p))
    assert res.makespan_ms == (v * m + p - 1) * 3.0
    assert res.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_search_baselines_give_the_textbook_bubbles(p: int, m: int) -> None:
    """The baselines package's orders, simulated: 1F1B/GPipe/interleaved as above; ZB-H1 (F = I = W) idles
    (p-1) * (F + I - W) = (p-1) * f per rank (Qi et al., zero-bubble pipeline parallelism)."""
    baselines = pytest.importorskip("pipeweaver.search.baselines")
    expected = {"1f1b": (1, m + p - 1), "gpipe": (1, m + p - 1), "interleaved-1f1b": (2, 2 * m + p - 1)}
    for name, (v, slots) in expected.items():
        header = chain_header(p, m, v)
        plan = assemble_plan(header, baselines.baseline_orders(name, header), no_tensors)
        res = both(plan, StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0), LinkModel.zero(p))
        assert res.makespan_ms == 3.0 * slots, name
    header = replace(chain_header(p, m), split_backward=True)
    plan = assemble_plan(header, baselines.baseline_orders("zb-h1", header), no_tensors)
    res = both(plan, StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0), LinkModel.zero(p))
    assert res.makespan_ms == 3.0 * m + (p - 1)
    assert res.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=1e-12)


def test_mixed_placement_chain_matches_hand_built() -> None:
    """The issue's construction (layouts.mixed_placement on a model of pp*k layers) gives the same bubble."""
    p, m = 4, 8
    model = presets.tiny_vlm().model  # 16 layers end to end
    placement = mixed_placement(model, p, 1)
    subs = tuple(SubMicrobatch(PIPE, j, 0, tuple((n, (0,)) for n in model.module_names)) for j in range(m))
    header = PlanHeader(
        job_id="t",
        iteration=0,
        placement=placement,
        sub_microbatches=subs,
        num_microbatches=m,
        schedule="1f1b",
    )
    plan = assemble_plan(header, one_f_one_b(p, m), no_tensors)
    res = both(plan, StageCosts.uniform(header, forward_ms=2.0, backward_ms=4.0), LinkModel.zero(p))
    assert res.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


# ---- (c) the paper's motivating example --------------------------------------------------------------------


def test_motivating_example_37b() -> None:
    """16 stages over 64 ViT layers (6.75 ms) + 64 LM layers (10.5 ms), 1F1B, 64 microbatches: ~23% idle."""
    p, m = 16, 64
    model = presets.motivation_37b().model
    layer_ms = [6.75] * 64 + [10.5] * 64
    sizes = _min_max_partition(layer_ms, p)
    chunks, stage_ms, pos = [], [], 0
    for c, size in enumerate(sizes):
        n_vit = max(0, min(pos + size, 64) - pos)
        n_llm = size - n_vit
        ranges = []
        if n_vit:
            ranges.append(LayerRange("vit", pos, pos + n_vit))
        if n_llm:
            start = max(pos, 64) - 64
            ranges.append(LayerRange("llm", start, start + n_llm))
        chunks.append(Chunk(PIPE, c, c, tuple(ranges)))
        stage_ms.append(6.75 * n_vit + 10.5 * n_llm)
        pos += size
    assert min(stage_ms) == 63.0 and max(stage_ms) == 73.5

    placement = Placement(pp=p, pipelines=(PipelineInfo(PIPE, model.module_names),), chunks=tuple(chunks))
    subs = tuple(SubMicrobatch(PIPE, j, 0, (("vit", (0,)), ("llm", (0,)))) for j in range(m))
    header = PlanHeader(
        job_id="t",
        iteration=0,
        placement=placement,
        sub_microbatches=subs,
        num_microbatches=m,
        schedule="1f1b",
    )
    costs = StageCosts(
        compute_ms={s: stage_ms[s.chunk] / 3 * (1 if s.pass_ is Pass.F else 2) for s in stage_graph(header).stages}
    )
    res = both(assemble_plan(header, one_f_one_b(p, m), no_tensors), costs, LinkModel.zero(p))
    assert 0.22 <= res.bubble_fraction <= 0.24
    assert res.makespan_ms == pytest.approx(5734.5)  # paper.md Appendix A: (m-1)*max + sum of stages
    assert res.bubble_fraction == pytest.approx(1 - m * sum(stage_ms) / (p * 5734.5))


# ---- (d) memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (8, 16)])
def test_peak_memory_1f1b_and_gpipe(p: int, m: int) -> None:
    header = chain_header(p, m)
    static, act = 1e9, 3e6
    costs = StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0, act_bytes=act, static_bytes=static)
    r1 = both(assemble_plan(header, one_f_one_b(p, m), no_tensors), costs, LinkModel.zero(p))
    rg = both(assemble_plan(header, gpipe(p, m), no_tensors), costs, LinkModel.zero(p))
    assert r1.peak_memory_bytes[0] == static + p * act
    assert rg.peak_memory_bytes[0] == static + m * act
    assert list(r1.peak_memory_bytes) == [static + (p - r) * act for r in range(p)]
    for res in (r1, rg):
        timeline = res.memory_timeline(0)
        assert timeline[0] == (0.0, static) and timeline[-1] == (res.makespan_ms, static)
        assert [t for t, _ in timeline] == sorted(t for t, _ in timeline)


def test_split_backward_frees_at_w() -> None:
    """With I/W split, I keeps the activations and W releases them."""
    header = replace(chain_header(1, 1), split_backward=True)
    plan = assemble_plan(header, [[_c(0, 0, Pass.F), _c(0, 0, Pass.I), _c(0, 0, Pass.W)]], no_tensors)
    costs = StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0, act_bytes=5.0)
    res = both(plan, costs, LinkModel.zero(1))
    assert res.memory_timeline(0) == [(0.0, 0.0), (0.0, 5.0), (3.0, 0.0)]


def test_a_backward_holds_its_working_memory_while_it_runs() -> None:
    """`StageCosts.workspace_bytes`: B allocates it at its start and frees it at its end, on top of the
    activations (F at 0-1 ms, B at 1-3 ms); under a split backward, I holds it and W does not."""
    header = chain_header(1, 1)
    plan = assemble_plan(header, [[_c(0, 0, Pass.F), _c(0, 0, Pass.B)]], no_tensors)
    costs = replace(
        StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0, act_bytes=5.0),
        workspace_bytes={(PIPE, 0, 0, 0): 3.0},
    )
    res = both(plan, costs, LinkModel.zero(1))
    assert res.memory_timeline(0) == [(0.0, 0.0), (0.0, 5.0), (1.0, 8.0), (3.0, 0.0)]
    assert res.peak_memory_bytes[0] == 8.0
    split = replace(header, split_backward=True)
    plan = assemble_plan(split, [[_c(0, 0, Pass.F), _c(0, 0, Pass.I), _c(0, 0, Pass.W)]], no_tensors)
    costs = replace(
        StageCosts.uniform(split, forward_ms=1.0, backward_ms=2.0, act_bytes=5.0),
        workspace_bytes={(PIPE, 0, 0, 0): 3.0},
    )
    res = both(plan, costs, LinkModel.zero(1))
    assert res.memory_timeline(0) == [(0.0, 0.0), (0.0, 5.0), (1.0, 8.0), (2.0, 5.0), (3.0, 0.0)]


@pytest.mark.parametrize(
    ("info", "passes", "timeline"),
    [
        # Forward only (frozen, nothing trainable upstream): activations live for the forward alone.
        (PipelineInfo(PIPE, ("llm",), backward=False), [Pass.F], [(0.0, 0.0), (0.0, 5.0), (1.0, 0.0)]),
        # Frozen but passing gradients upstream, split backward: I is the last pass and frees.
        (
            PipelineInfo(PIPE, ("llm",), weight_grad=False),
            [Pass.F, Pass.I],
            [(0.0, 0.0), (0.0, 5.0), (2.0, 0.0)],
        ),
    ],
)
def test_activations_freed_by_the_last_pass(
    info: PipelineInfo, passes: list[Pass], timeline: list[tuple[float, float]]
) -> None:
    base = chain_header(1, 1)
    placement = replace(base.placement, pipelines=(info,))
    header = replace(base, placement=placement, split_backward=True)
    plan = assemble_plan(header, [[_c(0, 0, x) for x in passes]], no_tensors)
    res = both(plan, StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0, act_bytes=5.0), LinkModel.zero(1))
    assert res.memory_timeline(0) == timeline


BUFFER = (TensorSpec((1000,)),)
"""One bf16 tensor: every receive of the buffer tests allocates 2,000 bytes."""
B = 2000.0
ACT = 1e6


def buffer_tensors(src: StageKey, dst: StageKey) -> tuple[TensorSpec, ...]:
    return BUFFER


def test_receive_buffers_count_from_their_post() -> None:
    """1F1B, 2 ranks, 2 microbatches, free links, receives posted one compute ahead (`receive_lookahead=1`).

    Rank 1's chunk starts inside the module: a forward input counts from its post and becomes the consumer's
    activations when it starts (counted once). Rank 0's gradients count from their post until their B ends.
    """
    header = chain_header(2, 2)
    costs = StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0, act_bytes=ACT)
    res = both(assemble_plan(header, one_f_one_b(2, 2), buffer_tensors, receive_lookahead=1), costs, LinkModel.zero(2))
    # Rank 0: F0 0-1, F1 1-2 (B0's gradient posted before it), B0 4-6 (B1's posted before its wait), B1 7-9.
    assert res.memory_timeline(0) == [
        (0.0, 0.0),
        (0.0, ACT),
        (1.0, ACT + B),
        (1.0, 2 * ACT + B),
        (2.0, 2 * ACT + 2 * B),
        (6.0, ACT + B),
        (9.0, 0.0),
    ]
    # Rank 1: F0's input posted at 0, F0 1-2, F1's input posted before B0 (2-4), F1 4-5, B1 5-7.
    assert res.memory_timeline(1) == [
        (0.0, 0.0),
        (0.0, B),
        (1.0, ACT),
        (2.0, ACT + B),
        (4.0, B),
        (4.0, ACT),
        (7.0, 0.0),
    ]
    without = both(assemble_plan(header, one_f_one_b(2, 2), no_tensors, receive_lookahead=1), costs, LinkModel.zero(2))
    assert res.makespan_ms == without.makespan_ms
    assert list(res.peak_memory_bytes - without.peak_memory_bytes) == [2 * B, B]


def _module_start_header() -> PlanHeader:
    """Two ranks, one microbatch; chunk 1 starts a module (its pre part takes the input)."""
    base = chain_header(2, 1)
    chunks = (Chunk(PIPE, 0, 0, (LayerRange("vit", 0, 1),)), Chunk(PIPE, 1, 1, (LayerRange("llm", 0, 1),)))
    return replace(base, placement=replace(base.placement, chunks=chunks))


@pytest.mark.parametrize(
    ("header", "passes", "rank", "timeline"),
    [
        # Split backward: rank 0's gradient, posted before its F, is kept for W (the executor's pending grads).
        (
            replace(chain_header(2, 1), split_backward=True),
            [Pass.F, Pass.I, Pass.W],
            0,
            [(0.0, 0.0), (0.0, B), (0.0, ACT + B), (5.0, 0.0)],
        ),
        # Split backward, rank 1's forward input: taken over by the activations at F's start as with B.
        (
            replace(chain_header(2, 1), split_backward=True),
            [Pass.F, Pass.I, Pass.W],
            1,
            [(0.0, 0.0), (0.0, B), (1.0, ACT), (4.0, 0.0)],
        ),
        # Forward only: no activations outlive F, so the input counts until F ends.
        (
            replace(
                chain_header(2, 1),
                placement=replace(
                    chain_header(2, 1).placement, pipelines=(PipelineInfo(PIPE, ("llm",), backward=False),)
                ),
            ),
            [Pass.F],
            1,
            [(0.0, 0.0), (0.0, B), (1.0, ACT + B), (2.0, 0.0)],
        ),
        # A chunk that starts a module: its activations do not hold the input; it counts until B ends.
        (_module_start_header(), [Pass.F, Pass.B], 1, [(0.0, 0.0), (0.0, B), (1.0, ACT + B), (4.0, 0.0)]),
    ],
)
def test_receive_buffer_lifetimes(
    header: PlanHeader, passes: list[Pass], rank: int, timeline: list[tuple[float, float]]
) -> None:
    orders = [[_c(r, 0, x) for x in passes] for r in range(2)]
    plan = assemble_plan(header, orders, buffer_tensors, receive_lookahead=1)  # posted before the previous compute
    costs = StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0, act_bytes=ACT)
    assert both(plan, costs, LinkModel.zero(2)).memory_timeline(rank) == timeline


def test_receive_counts_on_when_the_forward_keeps_less() -> None:
    """Activations take over at most their own bytes of the input (none inside a frozen module): the rest of the
    buffer counts until the chunk's activations are freed."""
    header = chain_header(2, 1)
    plan = assemble_plan(header, one_f_one_b(2, 1), buffer_tensors)
    for act, timeline in [
        (0.0, [(0.0, 0.0), (0.0, B), (4.0, 0.0)]),
        (500.0, [(0.0, 0.0), (0.0, B), (4.0, 0.0)]),  # 500 of the input become activations, 1,500 stay a buffer
        (5000.0, [(0.0, 0.0), (0.0, B), (1.0, 5000.0), (4.0, 0.0)]),
    ]:
        costs = StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0, act_bytes=act)
        assert both(plan, costs, LinkModel.zero(2)).memory_timeline(1) == timeline


# ---- transfers and the link model --------------------------------------------------------------------------


def test_transfer_cost_and_fifo_link() -> None:
    """Two sends to the same peer posted together occupy the link one after the other."""
    a, b = StageKey(PIPE, 0, 0, 0, Pass.F), StageKey(PIPE, 0, 1, 0, Pass.F)
    a1, b1 = StageKey(PIPE, 1, 0, 0, Pass.F), StageKey(PIPE, 1, 1, 0, Pass.F)
    tensors = (TensorSpec((1000, 500)), TensorSpec((10,), "float32"))
    assert transfer_bytes(tensors) == 1_000_040
    send = CommBatch(0, tuple(Transfer(Direction.SEND, 1, x, y, tensors) for x, y in [(a, a1), (b, b1)]))
    recv = CommBatch(0, tuple(Transfer(Direction.RECV, 0, x, y, tensors) for x, y in [(a, a1), (b, b1)]))
    header = chain_header(2, 2)
    plan = Plan(
        header,
        (
            RankPlan(0, (Compute(a), Compute(b), send, Wait(0))),
            RankPlan(1, (recv, Wait(0), Compute(a1), Compute(b1))),
        ),
    )
    link = LinkModel.uniform(2, latency_ms=0.5, bandwidth_bytes_per_s=1e9)
    costs = StageCosts(compute_ms={a: 1.0, b: 2.0, a1: 4.0, b1: 8.0})
    res = both(plan, costs, link)
    one = 0.5 + 1_000_040 / 1e9 * 1e3
    assert res.start_ms[1][2] == 3.0 + 2 * one  # the second transfer waits for the first on the link
    assert res.end_ms[0][3] == 3.0 + 2 * one  # the send wait too
    assert res.makespan_ms == 3.0 + 2 * one + 12.0
    assert res.bubble_fraction == pytest.approx(1 - 15.0 / (2 * res.makespan_ms))
    timings = res.to_rank_timings()
    assert timings[1][2] == (3.0 + 2 * one, 3.0 + 2 * one + 4.0)
    annotated = res.annotate(plan)
    assert annotated.ranks[0].predicted_ms == timings[0]
    assert annotated.header.predicted_makespan_ms == res.makespan_ms


def test_link_model_from_specs() -> None:
    """pp 4 x tp 4 on 8-GPU nodes: ranks 0-1 on node 0, ranks 2-3 on node 1."""
    link = LinkModel.from_specs(H800, ParallelSpec(pp=4, tp=4, microbatches=8))
    bw = link.bandwidth_bytes_per_s
    assert bw[0][1] == bw[1][0] == bw[2][3] == H800.nvlink_bandwidth
    assert bw[1][2] == bw[0][3] == H800.internode_bandwidth
    assert link.latency_ms == pytest.approx(H800.p2p_latency_s * 1e3)
    other = LinkModel.from_specs(H800, ParallelSpec(pp=4, tp=2, dp=2, microbatches=8), dp_replica=1)
    assert other.bandwidth_bytes_per_s[0][3] == H800.nvlink_bandwidth  # GPUs 8 and 14, one node
    assert LinkModel.zero(3).transfer_ms(0, 2, 1e12) == 0.0


# ---- (e) invalid plans -------------------------------------------------------------------------------------


def test_deadlock_raises_invalid_plan() -> None:
    """Rank 0 runs its backward before its forward: it waits for a gradient rank 1 can never produce."""
    header = chain_header(2, 1)
    orders = [[_c(0, 0, Pass.B), _c(0, 0, Pass.F)], [_c(1, 0, Pass.F), _c(1, 0, Pass.B)]]
    plan = assemble_plan(header, orders, no_tensors)
    costs = StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0)
    for use_numba in (True, False):
        with pytest.raises(InvalidPlan, match="deadlock") as err:
            simulate(plan, costs, link=LinkModel.zero(2), use_numba=use_numba)
        assert "rank 1 step 1" in str(err.value) and "needs rank 0" in str(err.value)


def test_unmatched_send_raises_invalid_plan() -> None:
    header = chain_header(2, 1)
    plan = assemble_plan(header, one_f_one_b(2, 1), no_tensors)
    rank1 = RankPlan(1, tuple(a for a in plan.ranks[1].actions if not isinstance(a, CommBatch | Wait)))
    broken = Plan(header, (plan.ranks[0], rank1))
    with pytest.raises(InvalidPlan, match="no matching receive"):
        simulate(broken, StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0), link=LinkModel.zero(2))


def test_wait_before_post_and_missing_cost() -> None:
    header = chain_header(1, 1)
    bad = Plan(header, (RankPlan(0, (Wait(7),)),))
    with pytest.raises(InvalidPlan, match="before posting"):
        simulate(bad, StageCosts(compute_ms={}), link=LinkModel.zero(1))
    plan = assemble_plan(header, [[_c(0, 0, Pass.F), _c(0, 0, Pass.B)]], no_tensors)
    with pytest.raises(ValueError, match="no compute time"):
        simulate(plan, StageCosts(compute_ms={}), link=LinkModel.zero(1))


# ---- (a) random plans: numba == reference, and == the longest path when links are free ---------------------


def random_batch(draw: st.DrawFn, video: bool) -> BatchMetadata:
    mbs = []
    for _ in range(draw(st.integers(1, 5))):
        docs = []
        for _ in range(draw(st.integers(1, 3))):
            n_media = draw(st.integers(0, 2))
            if video:
                sizes = [draw(st.sampled_from([32, 64, 96])) for _ in range(n_media)]
                media = tuple(MediaItem(Modality.VIDEO, t) for t in sizes)
            else:
                media = tuple(MediaItem(Modality.IMAGE, 16, 4) for _ in range(n_media))
            docs.append(Document(draw(st.integers(1, 40)), media))
        mbs.append(Microbatch(tuple(docs)))
    return BatchMetadata(iteration=0, microbatches=tuple(mbs))


def random_orders(graph: StageGraph, pp: int, rng: random.Random) -> tuple[list[list[Compute]], list[StageKey]]:
    """Per-rank orders from one random topological order of the stage DAG (greedy on random priorities)."""
    priority = {s: rng.random() for s in graph.stages}
    missing = {s: len(graph.preds[s]) for s in graph.stages}
    ready = [s for s in graph.stages if missing[s] == 0]
    orders: list[list[Compute]] = [[] for _ in range(pp)]
    topo: list[StageKey] = []
    while ready:
        s = min(ready, key=lambda x: priority[x])
        ready.remove(s)
        topo.append(s)
        orders[graph.rank[s]].append(Compute(s))
        for n in graph.succs[s]:
            missing[n] -= 1
            if missing[n] == 0:
                ready.append(n)
    assert len(topo) == len(graph.stages)
    return orders, topo


def longest_path_starts(
    graph: StageGraph, topo: Sequence[StageKey], costs: StageCosts, pp: int
) -> dict[StageKey, float]:
    """With free links a stage starts when its rank is free and all its predecessors have finished."""
    clock = [0.0] * pp
    finish: dict[StageKey, float] = {}
    start: dict[StageKey, float] = {}
    for s in topo:
        r = graph.rank[s]
        start[s] = max([clock[r]] + [finish[p] for p in graph.preds[s]])
        finish[s] = clock[r] = start[s] + costs.compute_ms[s]
    return start


Case = tuple[Plan, StageGraph, list[StageKey], StageCosts, LinkModel]


@st.composite
def random_case(draw: st.DrawFn) -> Case:
    name = draw(st.sampled_from(["tiny-vlm", "tiny-t2v"]))
    pp = draw(st.integers(2, 4))
    workload = presets.workload(name)
    model = workload.model
    batch = random_batch(draw, video=name == "tiny-t2v")
    order = draw(st.sampled_from(list(RankOrder)))
    if draw(st.booleans()):
        k = draw(st.integers(1, 8 // pp))
        placement = modular_placement(model, pp, {m: k for m in model.module_names}, order=order)
        media = model.module_names[0] if name == "tiny-vlm" else model.module_names[1]
        subs = (
            split_sub_microbatches(model, placement, batch, {media: draw(st.integers(1, 2))})
            if draw(st.booleans())
            else whole_sub_microbatches(model, placement, batch)
        )
    else:
        placement = mixed_placement(model, pp, draw(st.integers(1, 16 // pp)), order=order)
        subs = whole_sub_microbatches(model, placement, batch)
    header = PlanHeader(
        job_id="h",
        iteration=0,
        placement=placement,
        sub_microbatches=subs,
        num_microbatches=len(batch.microbatches),
        schedule="random",
        split_backward=draw(st.booleans()),
    )
    graph = stage_graph(header)
    rng = random.Random(draw(st.integers(0, 2**32)))
    orders, topo = random_orders(graph, pp, rng)
    shapes = TransferShapes(model, batch, header, dtype="bfloat16")
    plan = assemble_plan(header, orders, shapes.tensors, graph=graph)
    costs = StageCosts(
        compute_ms={s: round(rng.uniform(0.1, 5.0), 3) for s in graph.stages},
        act_bytes={s: float(rng.randrange(0, 10**6)) for s in graph.stages if s.pass_ is Pass.F},
        static_bytes=[float(rng.randrange(10**9)) for _ in range(pp)],
    )
    link = LinkModel(
        latency_ms=rng.uniform(0, 0.05),
        bandwidth_bytes_per_s=tuple(tuple(rng.uniform(1e6, 1e9) for _ in range(pp)) for _ in range(pp)),
    )
    return plan, graph, topo, costs, link


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_case())
def test_random_plans_numba_matches_reference(case: Case) -> None:
    plan, graph, topo, costs, link = case
    pp = plan.header.placement.pp
    flat = flatten(plan, costs, link)
    fast, slow = run_numba(flat), run_reference(flat)
    assert fast.status == slow.status == 0
    for name in ("start_ms", "end_ms", "busy_ms", "peak_bytes", "event_count", "pc"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    for r in range(pp):
        lo, n = int(fast.event_offsets[r]), int(fast.event_count[r])
        assert np.array_equal(fast.event_time_ms[lo : lo + n], slow.event_time_ms[lo : lo + n])
        assert np.array_equal(fast.event_bytes[lo : lo + n], slow.event_bytes[lo : lo + n])

    res = simulate(plan, costs, link=link)
    assert 0.0 <= res.bubble_fraction < 1.0
    assert res.makespan_ms >= float(res.busy_ms.max())
    for r in range(pp):
        assert np.all(res.end_ms[r] >= res.start_ms[r])
        assert np.all(np.diff(res.start_ms[r]) >= 0)
        assert res.memory_bytes[r][-1] == pytest.approx(costs.static_bytes[r], abs=1e-3)  # everything freed

    # Free links: every compute starts exactly when the stage DAG plus rank order allows.
    free = simulate(plan, costs, link=LinkModel.zero(pp), use_numba=True)
    expected = longest_path_starts(graph, topo, costs, pp)
    for r, rp in enumerate(plan.ranks):
        for i, a in enumerate(rp.actions):
            if isinstance(a, Compute):
                assert free.start_ms[r][i] == expected[a.stage]
    assert free.makespan_ms == max(expected[s] + costs.compute_ms[s] for s in graph.stages)
    assert math.isfinite(res.makespan_ms) and res.makespan_ms >= free.makespan_ms


def _without_tensors(plan: Plan) -> Plan:
    def strip(a: Action) -> Action:
        return CommBatch(a.handle, tuple(replace(op, tensors=()) for op in a.ops)) if isinstance(a, CommBatch) else a

    return replace(plan, ranks=tuple(replace(rp, actions=tuple(strip(a) for a in rp.actions)) for rp in plan.ranks))


def _memory_at(res: SimResult, rank: int, t: float) -> float:
    """Memory in use once every event at time `t` has happened."""
    times = res.memory_time_ms[rank]
    return float(res.memory_bytes[rank][int(np.searchsorted(times, t, side="right")) - 1])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_case())
def test_random_plans_count_live_receive_buffers(case: Case) -> None:
    """Free links (so shapes change no timing): memory minus memory of the same plan without tensors is, at every
    time, the bytes of the receives posted and not yet released. A receive is released when its consumer starts
    if that is the forward of a chunk that starts inside a module and keeps activations (up to the forward's
    activation bytes), else when the last pass of its consumer's (chunk, sub-microbatch) on that rank ends."""
    plan, _, _, costs, _ = case
    header = plan.header
    link = LinkModel.zero(header.placement.pp)
    res = both(plan, costs, link)
    bare = both(_without_tensors(plan), costs, link)
    inside = {(c.pipeline, c.index): c.layers[0].start > 0 for c in header.placement.chunks}
    for r, rp in enumerate(plan.ranks):
        start: dict[StageKey, float] = {}
        unit_end: dict[tuple[str, int, int, int], float] = {}
        for i, a in enumerate(rp.actions):
            if isinstance(a, Compute):
                s = a.stage
                start[s] = float(res.start_ms[r][i])
                key = (s.pipeline, s.chunk, s.microbatch, s.sub)
                unit_end[key] = max(unit_end.get(key, 0.0), float(res.end_ms[r][i]))
        live: list[tuple[float, float, float]] = []
        taken: dict[StageKey, float] = {}
        for i, a in enumerate(rp.actions):
            if not isinstance(a, CommBatch):
                continue
            for op in a.ops:
                if op.direction is Direction.RECV:
                    d = op.dst
                    unit = (d.pipeline, d.chunk, d.microbatch, d.sub)
                    keeps = header.placement.pipeline(d.pipeline).backward
                    n = transfer_bytes(op.tensors)
                    if d.pass_ is Pass.F and keeps and inside[(d.pipeline, d.chunk)]:
                        live.append((float(res.start_ms[r][i]), start[d], n))
                        taken[d] = taken.get(d, 0) + n
                    else:
                        live.append((float(res.start_ms[r][i]), unit_end[unit], n))
        for d, n in taken.items():  # what the forward's activations cannot hold keeps counting
            excess = n - min(n, costs.act_bytes.get(d, 0.0))
            live.append((start[d], unit_end[(d.pipeline, d.chunk, d.microbatch, d.sub)], excess))
        for t in np.union1d(res.memory_time_ms[r], bare.memory_time_ms[r]).tolist():
            expected = sum(n for lo, hi, n in live if lo <= t < hi)
            assert _memory_at(res, r, t) - _memory_at(bare, r, t) == pytest.approx(expected, abs=1e-2)


def test_swapped_transfer_order_raises_invalid_plan() -> None:
    """Receives posted out of the senders' order would pair the wrong tensors (NCCL matches by order)."""
    header = chain_header(2, 2)
    plan = assemble_plan(header, gpipe(2, 2), no_tensors)
    rank1 = list(plan.ranks[1].actions)
    recvs = [(i, a) for i, a in enumerate(rank1) if isinstance(a, CommBatch) and a.ops[0].src.pass_ is Pass.F]
    (i, first), (j, second) = recvs
    rank1[i], rank1[j] = CommBatch(first.handle, second.ops), CommBatch(second.handle, first.ops)
    broken = Plan(header, (plan.ranks[0], RankPlan(1, tuple(rank1))))
    with pytest.raises(InvalidPlan, match=re.escape("sent as model.0F0.0->model.1F0.0 but received as")):
        simulate(broken, StageCosts.uniform(header, forward_ms=1.0, backward_ms=2.0), link=LinkModel.zero(2))


def test_one_kernel_signature() -> None:
    """Every call above reused one compiled specialisation (int64/float64 arrays only)."""
    from pipeweaver.simulator import sim_kernel

    plan = assemble_plan(chain_header(2, 4), one_f_one_b(2, 4), no_tensors)
    simulate(plan, StageCosts.uniform(plan.header, forward_ms=1.0, backward_ms=2.0), link=LinkModel.zero(2))
    assert len(sim_kernel._numba_kernel.signatures) == 1

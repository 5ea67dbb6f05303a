"""`assemble_plan` posts each receive ahead of its consumer: plans stay valid and FIFO-matched, and SEMU never finds
them slower than plans that post each receive right before its consumer."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver.datagen import sample_batch
from pipeweaver.plan.assemble import RECEIVE_LOOKAHEAD, assemble_plan
from pipeweaver.plan.graph import StageGraph, stage_graph
from pipeweaver.plan.ir import CommBatch, Compute, Direction, Plan, StageKey, TensorSpec, Wait
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.plan.validator import validate
from pipeweaver.presets import workload
from pipeweaver.search.baselines import BASELINES, build_baseline_plan
from pipeweaver.search.planner import Planner, SearchConfig
from tests.plan.test_validator import (
    LAYOUTS,
    Docs,
    Layout,
    Orders,
    chunk_recompute,
    docs_strategy,
    gpipe_orders,
    layouts,
    make_batch,
    make_header,
    one_f_one_b_orders,
    random_orders,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))

from nccl_order_check import nccl_dry_run

Edge = tuple[StageKey, StageKey]


def assemble(
    layout: Layout, orders: Callable[[StageGraph, int], Orders], lookahead: int, docs: Docs | None = None
) -> tuple[Plan, StageGraph]:
    batch = make_batch(layout.workload, docs or ([[(8, 2), (4, 1)], [(12, 0)], [(3, 3)]]))
    header, model = make_header(layout, batch)
    g = stage_graph(header)
    computes = [[Compute(s, chunk_recompute(s)) for s in o] for o in orders(g, layout.pp)]
    shapes = TransferShapes(model, batch, header, dtype="bfloat16")
    return assemble_plan(header, computes, shapes.tensors, graph=g, receive_lookahead=lookahead), g


def receives(plan: Plan) -> dict[Edge, tuple[int, int, int]]:
    """Every receive as (rank, computes before its post, computes before its wait)."""
    out: dict[Edge, tuple[int, int, int]] = {}
    for rp in plan.ranks:
        computes = 0
        posted: dict[int, tuple[Edge, ...]] = {}
        for a in rp.actions:
            if isinstance(a, Compute):
                computes += 1
            elif isinstance(a, CommBatch):
                recvs = tuple((o.src, o.dst) for o in a.ops if o.direction is Direction.RECV)
                assert len(recvs) in (0, len(a.ops))  # receives never share a batch with sends
                posted[a.handle] = recvs
                for e in recvs:
                    out[e] = (rp.rank, computes, -1)
            elif isinstance(a, Wait):
                for e in posted[a.handle]:
                    out[e] = (out[e][0], out[e][1], computes)
    return out


def assert_moved_earlier(plan: Plan, before: Plan, lookahead: int) -> None:
    """Each receive is posted `lookahead` computes earlier than right before its consumer (not before the rank's
    first compute) and waited where it was."""
    now, then = receives(plan), receives(before)
    assert now.keys() == then.keys()
    for edge, (_, post, wait) in now.items():
        _, post0, wait0 = then[edge]
        assert post0 == wait0  # lookahead 0: posted where it is waited, right before its consumer
        assert wait == wait0, edge
        assert post == max(0, post0 - lookahead), edge


def fifo_ok(plan: Plan) -> bool:
    """NCCL's matching on the executor's one communicator per directed rank pair, with no eager buffering."""
    return bool(nccl_dry_run(plan, 0.0, directed=True)["ok"])


@pytest.mark.parametrize("lookahead", [1, 2, 5])
@pytest.mark.parametrize("orders", [gpipe_orders, one_f_one_b_orders], ids=["gpipe", "1f1b"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
def test_receives_are_posted_ahead_and_waited_in_place(
    layout: Layout, orders: Callable[[StageGraph, int], Orders], lookahead: int
) -> None:
    plan, g = assemble(layout, orders, lookahead)
    validate(plan, graph=g)
    assert fifo_ok(plan)
    assert_moved_earlier(plan, assemble(layout, orders, 0)[0], lookahead)


def test_the_default_posts_receives_at_their_consumer() -> None:
    """Measured on GPUs (RECEIVE_LOOKAHEAD's docstring): a receive posted early holds an NCCL kernel on the device."""
    assert RECEIVE_LOOKAHEAD == 0
    plan, _ = assemble(Layout(pp=4, sub_size=1), one_f_one_b_orders, 1)
    computes = [[a for a in rp.actions if isinstance(a, Compute)] for rp in plan.ranks]
    default = assemble_plan(plan.header, computes, tensors_of(plan))
    assert default.ranks == assemble(Layout(pp=4, sub_size=1), one_f_one_b_orders, 0)[0].ranks
    assert default.ranks != plan.ranks


@settings(max_examples=60, deadline=None)
@given(
    layout=layouts(),
    docs=docs_strategy,
    rng=st.randoms(use_true_random=False),
    lookahead=st.integers(0, 4),
)
def test_random_orders_stay_valid_and_fifo_matched(
    layout: Layout, docs: Docs, rng: random.Random, lookahead: int
) -> None:
    seed = rng.random()
    plan, g = assemble(layout, lambda g, pp: random_orders(g, pp, random.Random(seed)), lookahead, docs)
    validate(plan, graph=g)
    assert fifo_ok(plan)
    before, _ = assemble(layout, lambda g, pp: random_orders(g, pp, random.Random(seed)), 0, docs)
    assert_moved_earlier(plan, before, lookahead)


def test_negative_lookahead_is_refused() -> None:
    plan, _ = assemble(Layout(), gpipe_orders, 0)
    with pytest.raises(ValueError, match="receive_lookahead must be 0 or more"):
        assemble_plan(plan.header, [[]] * plan.header.placement.pp, tensors_of(plan), receive_lookahead=-1)


# ---- planner and baseline plans on SEMU -----------------------------------------------------------------------


def tensors_of(plan: Plan) -> Callable[[StageKey, StageKey], tuple[TensorSpec, ...]]:
    shapes = {
        (o.src, o.dst): o.tensors for rp in plan.ranks for a in rp.actions if isinstance(a, CommBatch) for o in a.ops
    }
    return lambda src, dst: shapes[(src, dst)]


def posted_at_consumer(plan: Plan) -> Plan:
    """`plan`'s computes compiled as before receives were posted early: each right before its consumer."""
    orders = [[a for a in rp.actions if isinstance(a, Compute)] for rp in plan.ranks]
    return assemble_plan(plan.header, orders, tensors_of(plan), receive_lookahead=0)


def posted_ahead(plan: Plan, lookahead: int) -> Plan:
    orders = [[a for a in rp.actions if isinstance(a, Compute)] for rp in plan.ranks]
    return assemble_plan(plan.header, orders, tensors_of(plan), receive_lookahead=lookahead)


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_searched_and_baseline_plans_are_never_slower_on_semu(name: str) -> None:
    w = workload(name)
    planner = Planner(
        w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=150, compare_baselines=(), max_evaluations=30)
    )
    gained = 0.0
    for seed in range(3):
        batch = sample_batch(w, seed=seed)
        result = planner.plan(batch)
        cases = [(result.plan, result.plan.recompute_map())]
        for baseline in sorted(BASELINES):
            try:
                plan = build_baseline_plan(
                    baseline, model=w.model, parallel=w.parallel, batch=batch, hardware=w.hardware
                )
            except ValueError:
                continue  # the baseline cannot cut this model
            cases.append((plan, {}))
        for served, recompute in cases:
            validate(served)
            assert fifo_ok(served)
            before = posted_at_consumer(served)
            # the default posts at the consumer (RECEIVE_LOOKAHEAD)
            assert [rp.actions for rp in before.ranks] == [rp.actions for rp in served.ranks]
            plan = posted_ahead(served, 1)
            validate(plan)
            assert fifo_ok(plan)
            assert_moved_earlier(plan, before, 1)
            sim = planner.simulate_plan(plan, batch, recompute)
            sim0 = planner.simulate_plan(before, batch, recompute)
            assert sim.makespan_ms <= sim0.makespan_ms * (1 + 1e-12), plan.header.schedule
            # Same computes in the same order; a receive posted earlier holds its buffer longer (SEMU counts it from
            # its post), so a rank never needs less memory.
            assert all(sim.peak_memory_bytes >= sim0.peak_memory_bytes)
            gained += sim0.makespan_ms - sim.makespan_ms
    assert gained > 0.0

"""Send batches fused into the next receive batch, and the validator's proof on one communicator per pipeline."""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver import presets
from pipeweaver.datagen import sample_batch
from pipeweaver.errors import InvalidPlan
from pipeweaver.plan.fuse import fuse_sends_with_next_receives, has_fused_batches, is_fused
from pipeweaver.plan.graph import StageGraph
from pipeweaver.plan.ir import CommBatch, Compute, Direction, Plan, Wait
from pipeweaver.plan.validator import runs_on_one_communicator, validate
from pipeweaver.search.baselines import build_baseline_plan
from tests.plan.test_validator import Docs, Layout, build_plan, docs_strategy, layouts, local_orders, random_orders


def baseline(name: str, pp: int) -> Plan:
    w = presets.tiny_vlm(pp=pp)
    batch = sample_batch(w, seed=3, iteration=0)
    return build_baseline_plan(name, model=w.model, parallel=w.parallel, batch=batch, tensors_dtype="float32")


@pytest.mark.parametrize("pp", [2, 4])
def test_1f1b_needs_fusion_to_run_on_one_communicator(pp: int) -> None:
    # Torch's Schedule1F1B fuses its sends with the next receives for this reason: unfused, each rank's send waits
    # for a receive that its peer posts only after a send of its own, on the same in-order communicator.
    plain = baseline("1f1b", pp)
    validate(plain)
    with pytest.raises(InvalidPlan, match=r"^deadlock on one communicator per pipeline"):
        validate(plain, communicators="pipeline")
    fused = fuse_sends_with_next_receives(plain)
    assert has_fused_batches(fused) and not has_fused_batches(plain)
    validate(fused)
    validate(fused, communicators="pipeline")
    assert runs_on_one_communicator(fused) and not runs_on_one_communicator(plain)


def test_the_one_communicator_answer_still_refuses_an_invalid_plan() -> None:
    plan = fuse_sends_with_next_receives(baseline("1f1b", 2))
    rp = plan.ranks[1]
    broken = replace(rp, actions=tuple(a for a in rp.actions if not isinstance(a, Wait))[:-1])
    with pytest.raises(InvalidPlan):
        runs_on_one_communicator(replace(plan, ranks=(plan.ranks[0], broken)))


def test_fusion_can_break_a_plan_and_the_validator_says_so() -> None:
    # Interleaved 1F1B's ranks post in no common rhythm: tying a send's completion to the next receive deadlocks
    # it even with one communicator per directed pair.
    fused = fuse_sends_with_next_receives(baseline("interleaved-1f1b", 2))
    with pytest.raises(InvalidPlan, match=r"^deadlock"):
        validate(fused)


def test_fusion_keeps_every_compute_and_transfer_and_drops_only_the_absorbed_waits() -> None:
    plain = baseline("1f1b", 4)
    fused = fuse_sends_with_next_receives(plain)
    for before, after in zip(plain.ranks, fused.ranks, strict=True):
        assert [a for a in before.actions if isinstance(a, Compute)] == [
            a for a in after.actions if isinstance(a, Compute)
        ]

        def ops(actions: tuple[object, ...]) -> Counter[str]:
            return Counter(str(o) for a in actions if isinstance(a, CommBatch) for o in a.ops)

        assert ops(before.actions) == ops(after.actions)
        handles = [a.handle for a in after.actions if isinstance(a, CommBatch)]
        waits = [a.handle for a in after.actions if isinstance(a, Wait)]
        assert sorted(handles) == sorted(waits) and len(set(handles)) == len(handles)
        merged = sum(is_fused(a) for a in after.actions)
        assert len(before.actions) - len(after.actions) == 2 * merged  # one batch and one wait fewer per fusion
        assert len(after.predicted_ms) in (0, len(after.actions))


def in_order_reference(plan: Plan) -> str:
    """One communicator per pipeline, simulated op by op with different bookkeeping: every rank's posted batches
    in a FIFO; the head batch's ops pair off with the peer's op on the same edge when the peer's head batch holds
    it; a wait passes once no op of its batch is left anywhere."""
    queues: list[deque[CommBatch]] = [deque() for _ in plan.ranks]
    open_ops: dict[tuple[int, int], set[tuple[Direction, str, str]]] = {}
    pos = [0] * len(plan.ranks)
    moved = True
    while moved:
        moved = False
        for rp in plan.ranks:
            r = rp.rank
            while pos[r] < len(rp.actions):
                a = rp.actions[pos[r]]
                if isinstance(a, CommBatch):
                    queues[r].append(a)
                    open_ops[(r, a.handle)] = {(o.direction, str(o.src), str(o.dst)) for o in a.ops}
                elif isinstance(a, Wait) and open_ops[(r, a.handle)]:
                    break
                pos[r] += 1
                moved = True
        for rp in plan.ranks:
            r = rp.rank
            if not queues[r]:
                continue
            head = queues[r][0]
            for o in head.ops:
                mine = (o.direction, str(o.src), str(o.dst))
                if mine not in open_ops[(r, head.handle)] or not queues[o.peer]:
                    continue
                peer_head = queues[o.peer][0]
                theirs = (Direction.RECV if o.direction is Direction.SEND else Direction.SEND, mine[1], mine[2])
                if theirs in open_ops[(o.peer, peer_head.handle)]:
                    open_ops[(r, head.handle)].discard(mine)
                    open_ops[(o.peer, peer_head.handle)].discard(theirs)
                    moved = True
        for r, q in enumerate(queues):
            while q and not open_ops[(r, q[0].handle)]:
                q.popleft()
                moved = True
    return "ok" if all(pos[rp.rank] == len(rp.actions) for rp in plan.ranks) else "deadlock"


def verdict(plan: Plan, g: StageGraph) -> str:
    try:
        validate(plan, graph=g, communicators="pipeline")
    except InvalidPlan as e:
        return "deadlock" if str(e).startswith("deadlock") else f"error: {e}"
    return "ok"


@settings(max_examples=150, deadline=None)
@given(layout=layouts(), docs=docs_strategy, rng=st.randoms(use_true_random=False), fuse=st.booleans())
def test_one_communicator_dry_run_agrees_with_an_in_order_reference(
    layout: Layout, docs: Docs, rng: random.Random, fuse: bool
) -> None:
    orders = random_orders if rng.random() < 0.5 else local_orders
    plan, g = build_plan(layout, docs, lambda g, pp: orders(g, pp, rng))
    if fuse:
        plan = fuse_sends_with_next_receives(plan)
    try:
        validate(plan, graph=g)  # the pair-communicator proof comes first; the in-order one only adds to it
    except InvalidPlan:
        return
    assert verdict(plan, g) == in_order_reference(plan)


def test_a_single_rank_plan_has_nothing_to_deadlock() -> None:
    plan, g = build_plan(Layout(pp=1))
    assert verdict(fuse_sends_with_next_receives(plan), g) == "ok"

"""Activation offloading in the plan IR: text form, where prefetches go, what the validator refuses, JSON and wire
round trips (old plans without the fields decode as before)."""

from __future__ import annotations

import dataclasses

import pytest

from pipeweaver import wire
from pipeweaver.errors import InvalidPlan
from pipeweaver.plan.export import plan_from_json, plan_to_json
from pipeweaver.plan.ir import Compute, Pass, Plan, Prefetch, Recompute, StageKey
from pipeweaver.plan.offload import place_prefetches
from pipeweaver.plan.validator import validate
from pipeweaver.v1 import planner_pb2 as pb
from tests.plan.test_validator import base_plan, compute_of, locate, with_actions

F = StageKey.parse("vit.0F0.0")
B = F.with_pass(Pass.B)


def offloading(plan: Plan, stage: StageKey = F, recompute: Recompute = Recompute.NONE) -> Plan:
    """`plan` with `stage`'s pair offloading (its forward and backward under `recompute`), no prefetch placed."""
    ranks = []
    for rp in plan.ranks:
        actions = tuple(
            dataclasses.replace(a, recompute=recompute, offload=a.stage == stage)
            if isinstance(a, Compute) and a.stage.with_pass(Pass.F) == stage
            else a
            for a in rp.actions
        )
        ranks.append(dataclasses.replace(rp, actions=actions))
    return dataclasses.replace(plan, ranks=tuple(ranks))


def unit_costs(plan: Plan) -> dict[StageKey, float]:
    return {a.stage: 1.0 for rp in plan.ranks for a in rp.actions if isinstance(a, Compute)}


def invalid(plan: Plan, defect: str) -> str:
    with pytest.raises(InvalidPlan) as info:
        validate(plan)
    message = str(info.value)
    assert message.startswith(defect), message
    return message


def test_text_forms() -> None:
    assert str(Compute(F, Recompute.SELECTIVE, offload=True)) == "vit.0F0.0!s!o"
    assert str(Compute(F, offload=True)) == "vit.0F0.0!o"
    assert str(Prefetch(B)) == "prefetch:vit.0B0.0"


def test_prefetch_goes_a_copy_of_compute_before_the_backward_and_never_before_the_forward_ends() -> None:
    plan = offloading(base_plan())
    r, b, _ = locate(plan, compute_of("vit.0B0.0"))
    _, f, _ = locate(plan, compute_of("vit.0F0.0"))
    computes = [i for i, a in enumerate(plan.ranks[r].actions) if isinstance(a, Compute) and f < i < b]
    assert len(computes) >= 3
    for copy, lead in ((0.0, 0), (1.0, 2), (2.0, 3), (1e9, None)):
        placed = place_prefetches(plan, unit_costs(plan), {F: copy}, lead=1.25)
        validate(placed)
        actions = placed.ranks[r].actions
        at = next(i for i, a in enumerate(actions) if isinstance(a, Prefetch))
        if lead is None:
            assert at == f + 1  # as early as allowed: right after the forward
        else:
            # `lead` computes between the prefetch and the backward (1.25 copies of unit computes, rounded up).
            between = [a for a in actions[at : actions.index(Compute(B))] if isinstance(a, Compute)]
            assert len(between) == lead
    # Placing again replaces the prefetches instead of adding more.
    twice = place_prefetches(place_prefetches(plan, unit_costs(plan), {F: 1.0}), unit_costs(plan), {F: 1.0})
    assert sum(isinstance(a, Prefetch) for rp in twice.ranks for a in rp.actions) == 1


def test_validator_refuses_offloads_without_their_prefetch_or_out_of_place() -> None:
    plan = offloading(base_plan())
    invalid(plan, "missing prefetch")
    placed = place_prefetches(plan, unit_costs(plan), {F: 1.0})
    validate(placed)
    r, b, _ = locate(placed, compute_of("vit.0B0.0"))
    actions = [a for a in placed.ranks[r].actions if not isinstance(a, Prefetch)]
    b = actions.index(Compute(B))
    invalid(with_actions(placed, r, [*actions[: b + 1], Prefetch(B), *actions[b + 1 :]]), "prefetch out of place")
    f = actions.index(Compute(F, offload=True))
    invalid(with_actions(placed, r, [*actions[:f], Prefetch(B), *actions[f:]]), "prefetch out of place")
    twice = [*actions[:b], Prefetch(B), Prefetch(B), *actions[b:]]
    invalid(with_actions(placed, r, twice), "prefetch without offload")  # the second one matches nothing
    other = StageKey.parse("vit.0B1.0")
    invalid(with_actions(placed, r, [*actions[:b], Prefetch(other), *actions[b:]]), "prefetch without offload")


def test_validator_refuses_offload_on_a_backward_or_under_full_recompute() -> None:
    plan = base_plan()
    r, i, _ = locate(plan, compute_of("vit.0B0.0"))
    actions = list(plan.ranks[r].actions)
    actions[i] = Compute(B, offload=True)
    invalid(with_actions(plan, r, actions), "offload on a backward")
    full = place_prefetches(offloading(plan, F, Recompute.FULL), unit_costs(plan), {F: 1.0})
    invalid(full, "offload with full recompute")


def test_offloading_plans_round_trip_through_json_and_the_wire() -> None:
    plan = place_prefetches(offloading(base_plan(), F, Recompute.SELECTIVE), unit_costs(base_plan()), {F: 1.0})
    assert plan_from_json(plan_to_json(plan)) == plan
    assert wire.plan_from_proto(wire.plan_to_proto(plan)) == plan
    # A Compute encoded before the field existed (no offload) decodes as not offloading.
    old = pb.Action(compute=pb.Compute(stage=wire.stage_key_to_proto(F), recompute=pb.RECOMPUTE_SELECTIVE))
    assert wire.action_from_proto(old) == Compute(F, Recompute.SELECTIVE)
    assert wire.action_from_proto(pb.Action(prefetch=pb.Prefetch(stage=wire.stage_key_to_proto(B)))) == Prefetch(B)

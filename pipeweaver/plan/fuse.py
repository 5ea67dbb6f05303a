"""Fuse each send batch with the receive batch posted right after it, as torch's 1F1B does.

`assemble_plan` posts a stage's sends right after the stage and the next stage's receives right before that
stage: two batches back to back. Posted as one batch, the pair becomes one NCCL group, and on one communicator
per pipeline (`PipelineExecutor(pair_groups=False)`) one kernel moves both (torch's `Schedule1F1B` fuses its
forward sends with the next backward receives in the same way). The fused batch is waited where the receive
was, so the send must also have completed before the next stage runs; the send's own end-of-iteration wait goes.

Whether the result runs is the validator's question (`validate(plan, communicators=...)`): fusing ties a send's
completion to a receive's, which can deadlock a plan whose ranks post in no common rhythm.
"""

from __future__ import annotations

from typing import TypeGuard

from pipeweaver.plan.ir import Action, CommBatch, Direction, Plan, RankPlan, Wait


def _only(action: Action, direction: Direction) -> TypeGuard[CommBatch]:
    return isinstance(action, CommBatch) and all(op.direction is direction for op in action.ops)


def is_fused(action: Action) -> bool:
    """A batch that both sends and receives (what `fuse_sends_with_next_receives` makes)."""
    return isinstance(action, CommBatch) and len({op.direction for op in action.ops}) == 2


def has_fused_batches(plan: Plan) -> bool:
    return any(is_fused(a) for rp in plan.ranks for a in rp.actions)


def fuse_sends_with_next_receives(plan: Plan) -> Plan:
    """The same plan with every send-only batch merged into a receive-only batch that directly follows it."""
    ranks: list[RankPlan] = []
    for rp in plan.ranks:
        actions, timing = rp.actions, rp.predicted_ms
        out: list[Action] = []
        out_timing: list[tuple[float, float]] = []
        absorbed: set[int] = set()
        i = 0
        while i < len(actions):
            a = actions[i]
            b = actions[i + 1] if i + 1 < len(actions) else None
            if _only(a, Direction.SEND) and b is not None and _only(b, Direction.RECV):
                out.append(CommBatch(b.handle, a.ops + b.ops))  # the receive's handle: its wait stays put
                absorbed.add(a.handle)
                if timing:
                    out_timing.append(timing[i])
                i += 2
                continue
            if not (isinstance(a, Wait) and a.handle in absorbed):
                out.append(a)
                if timing:
                    out_timing.append(timing[i])
            i += 1
        ranks.append(RankPlan(rank=rp.rank, actions=tuple(out), predicted_ms=tuple(out_timing)))
    return Plan(header=plan.header, ranks=tuple(ranks))

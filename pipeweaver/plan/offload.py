"""Where a plan prefetches offloaded activations: one `Prefetch` action per offloaded stage pair.

A forward that offloads (`Compute.offload`) copies its saved activations to host memory; its pair's first backward
pass (B, or I when the backward is split) needs them back on the device. The prefetch goes early enough that the
copy is done by then, and no earlier, since the bytes are device memory again from the prefetch on: walking back
from the backward over its rank's actions, at the latest action such that the computes from there to the backward
last at least `lead` times the copy, never before the action right after the forward. Waits and idle time are not
counted, so a copy usually has more room than planned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from pipeweaver.plan.ir import Action, Compute, Pass, Plan, Prefetch, StageKey

PREFETCH_LEAD = 1.25
"""Compute time, in copy times, a prefetch is placed before the backward that needs it."""

Unit = tuple[str, int, int, int]


def _unit(s: StageKey) -> Unit:
    return (s.pipeline, s.chunk, s.microbatch, s.sub)


def place_prefetches(
    plan: Plan,
    compute_ms: Mapping[StageKey, float],
    copy_ms: Mapping[StageKey, float],
    *,
    lead: float = PREFETCH_LEAD,
) -> Plan:
    """`plan` with a `Prefetch` before each offloaded pair's first backward pass (existing prefetches dropped).

    `compute_ms` gives every compute's duration, `copy_ms` each offloading forward's copy time (one direction);
    a forward missing there counts as an instant copy (the prefetch then goes right before the backward)."""
    ranks = []
    for rp in plan.ranks:
        actions = [a for a in rp.actions if not isinstance(a, Prefetch)]
        offloaded: dict[Unit, int] = {}
        before: dict[int, list[StageKey]] = {}
        for b, a in enumerate(actions):
            if not isinstance(a, Compute):
                continue
            unit = _unit(a.stage)
            if a.stage.pass_ is Pass.F:
                if a.offload:
                    offloaded[unit] = b
                continue
            f = offloaded.pop(unit, None)
            if f is None:
                continue
            need = lead * copy_ms.get(StageKey(*unit, Pass.F), 0.0)
            j = b
            covered = 0.0
            while j - 1 > f and covered < need:
                j -= 1
                found = actions[j]
                if isinstance(found, Compute):
                    covered += compute_ms.get(found.stage, 0.0)
            before.setdefault(j, []).append(a.stage)
        if not before:
            ranks.append(replace(rp, actions=tuple(actions), predicted_ms=()))
            continue
        out: list[Action] = []
        for j, a in enumerate(actions):
            out.extend(Prefetch(s) for s in before.get(j, ()))
            out.append(a)
        ranks.append(replace(rp, actions=tuple(out), predicted_ms=()))
    return replace(plan, ranks=tuple(ranks))


def first_backward(actions: tuple[Action, ...]) -> dict[Unit, int]:
    """Per stage pair of one rank's actions, the index of its first backward pass (B or I)."""
    out: dict[Unit, int] = {}
    for i, a in enumerate(actions):
        if isinstance(a, Compute) and a.stage.pass_ is not Pass.F:
            out.setdefault(_unit(a.stage), i)
    return out

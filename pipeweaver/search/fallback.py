"""The static plan a trainer can build alone for PipeWeaver's placement when no searched plan arrives in time.

Pure Python (numpy only): it orders the batch's stages with the reference interleaver on unit costs (forward 1,
backward 2) and a 1F1B memory cap (rank r keeps at most pp - r sub-microbatches of a pipeline in flight), so every
rank derives the same order from the batch metadata without talking to the planner.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.graph import StageGraph, stage_graph
from pipeweaver.plan.ir import Compute, Pass, Placement, Plan, PlanHeader, PlanSource
from pipeweaver.plan.layouts import split_sub_microbatches
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.search.interleave_ref import interleave_reference
from pipeweaver.search.problem import F64, I64, Problem, build_problem, stage_priorities
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.model import ModelSpec


def heuristic_group_order(problem: Problem, pipelines: tuple[str, ...]) -> tuple[int, ...]:
    """Microbatch-major order; forwards in DAG order (encoder first), backwards in reverse DAG order."""
    index = {p: i for i, p in enumerate(pipelines)}

    def key(g: int) -> tuple[int, int, int]:
        grp = problem.groups[g]
        pos = index[grp.pipeline]
        return (grp.microbatch, 1 if grp.backward else 0, -pos if grp.backward else pos)

    return tuple(sorted(range(len(problem.groups)), key=key))


Interleaver = Callable[[Problem, F64], tuple[I64, F64, F64, float]]


def fallback_orders(
    header: PlanHeader, interleaver: Interleaver = interleave_reference, graph: StageGraph | None = None
) -> list[list[Compute]]:
    """Per-rank compute orders of the static fallback schedule for `header`.

    The planner passes the numba interleaver (same result, much faster) and the stage graph it already built
    (`stage_graph(header)`); trainers use the pure-Python default.
    """
    graph = graph or stage_graph(header)
    pp = header.placement.pp
    dur = {s: 1.0 if s.pass_ is Pass.F else (2.0 if s.pass_ is Pass.B else 1.0) for s in graph.stages}
    act = {(s.pipeline, s.chunk, s.microbatch, s.sub): 1.0 for s in graph.stages if s.pass_ is Pass.F}
    cap = [float(max(pp - r, 1)) for r in range(pp)]
    problem = build_problem(graph, pp, dur, act, {}, cap)
    order = heuristic_group_order(problem, tuple(p.name for p in header.placement.pipelines))
    prio = np.zeros(len(problem.groups))
    for i, g in enumerate(order):
        prio[g] = len(order) - i
    position, _, _, _ = interleaver(problem, stage_priorities(problem, prio))
    orders: list[list[Compute]] = [[] for _ in range(pp)]
    for i in sorted(range(problem.n), key=lambda i: (int(problem.rank[i]), int(position[i]))):
        orders[int(problem.rank[i])].append(Compute(problem.stages[i]))
    return orders


def build_fallback_plan(
    model: ModelSpec,
    placement: Placement,
    sub_microbatch_size: dict[str, int],
    batch: BatchMetadata,
    *,
    job_id: str = "",
    dtype: str = "bfloat16",
    interleaver: Interleaver = interleave_reference,
) -> Plan:
    """The fallback plan for `batch` on `placement` (header.source = FALLBACK)."""
    header = PlanHeader(
        job_id=job_id,
        iteration=batch.iteration,
        placement=placement,
        sub_microbatches=split_sub_microbatches(model, placement, batch, sub_microbatch_size),
        num_microbatches=len(batch.microbatches),
        schedule="pipeweaver-fallback",
        source=PlanSource.FALLBACK,
        dp_replica=batch.dp_replica,
    )
    shapes = TransferShapes(model, batch, header, dtype=dtype)
    return assemble_plan(header, fallback_orders(header, interleaver), shapes.tensors)

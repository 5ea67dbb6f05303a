"""The static plan a trainer can build alone for PipeWeaver's placement when no searched plan arrives in time.

Pure Python (numpy only): it orders the batch's stages with the reference interleaver, microbatch-major priorities
and a memory cap, so every rank derives the same order from the batch metadata without talking to the planner.

Costs: each stage's work in FLOPs from the model spec and the batch's token counts (its chunk's blocks' matrix
products plus per-instance attention, backward twice the forward), not SEMU: trainers build this plan alone.
Unit costs (every stage 1, backward 2) make a ViT chunk on 25 images as long as a decoder chunk on 4,096 tokens.
On the scaled VLM of the 4-GPU runs the served fallback (unit costs, lean cap) measured 1.57-1.71 s per iteration
against 0.73 s for Optimus's coarse schedule (4 H100s, docs/gpu.md section 5); SEMU puts a lean fallback at about
twice Optimus's time with either cost (`benchmarks/bench_planner_variants.py --only fallback`).

Memory cap, in microbatch-chunks (a chunk's activations for one whole microbatch; a sub-microbatch counts its
share): rank r keeps at most interleaved 1F1B's in-flight count, 2 (pp - r - 1) + (v - 1) pp + 1, where v is the
number of chunks a microbatch's chain passes on a rank (a ViT and a decoder chunk: 2), times a scale; or the lean
cap, at most pp - r stage units (a chunk on a sub-microbatch) in flight. A trainer's own fallback uses the lean
cap (it has no memory model to check a looser one against); the planner's (`Planner.fallback_plan`) tries looser
caps and keeps one that fits device memory in SEMU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.graph import StageGraph, stage_graph
from pipeweaver.plan.ir import Compute, Pass, Placement, Plan, PlanHeader, PlanSource, StageKey
from pipeweaver.plan.layouts import split_sub_microbatches
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.search.interleave_ref import interleave_reference
from pipeweaver.search.problem import F64, I64, Problem, build_problem, stage_priorities
from pipeweaver.spec.batch import BatchMetadata, Instance, module_instances
from pipeweaver.spec.model import ModelSpec


def heuristic_group_order(
    problem: Problem, pipelines: tuple[str, ...], microbatches: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Microbatch-major order (the batch's, or `microbatches` first to last); forwards in DAG order (encoder
    first), backwards in reverse DAG order."""
    index = {p: i for i, p in enumerate(pipelines)}
    position = {m: i for i, m in enumerate(microbatches)} if microbatches is not None else None

    def key(g: int) -> tuple[int, int, int]:
        grp = problem.groups[g]
        pos = index[grp.pipeline]
        mb = grp.microbatch if position is None else position[grp.microbatch]
        return (mb, 1 if grp.backward else 0, -pos if grp.backward else pos)

    return tuple(sorted(range(len(problem.groups)), key=key))


def microbatch_work_ms(problem: Problem) -> dict[int, float]:
    """Each microbatch's total stage time in `problem` (every pipeline and pass, all ranks)."""
    per_group = np.bincount(problem.group, weights=problem.duration_ms, minlength=len(problem.groups))
    work: dict[int, float] = {}
    for g, grp in enumerate(problem.groups):
        work[grp.microbatch] = work.get(grp.microbatch, 0.0) + float(per_group[g])
    return work


def sized_group_orders(problem: Problem, pipelines: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """`heuristic_group_order` with the microbatches in other orders by their work (`microbatch_work_ms`):

    - "organ pipe": short microbatches at both ends (a quick fill and a quick drain), the longest in the middle;
    - "largest first": the long microbatches early, the short ones last (a quick drain).
    """
    work = microbatch_work_ms(problem)
    by_size = sorted(work, key=lambda m: (work[m], m))
    orders = {"organ pipe": by_size[0::2] + by_size[1::2][::-1], "largest first": by_size[::-1]}
    return {name: heuristic_group_order(problem, pipelines, mbs) for name, mbs in orders.items()}


Interleaver = Callable[[Problem, F64], tuple[I64, F64, F64, float]]


def stage_work(model: ModelSpec, batch: BatchMetadata, header: PlanHeader, graph: StageGraph) -> dict[StageKey, float]:
    """Each stage's work in GFLOPs, from the spec alone: per block 2 x parameters x tokens plus 4 x hidden x each
    attention span squared (and the module's post part, a projector or an LM head, on the chunk that holds it;
    the pre part is mostly a table lookup); a backward pass (B) twice its forward, I and W one forward each."""
    chunks = {(c.pipeline, c.index): c for c in header.placement.chunks}
    subs = {(s.pipeline, s.microbatch, s.index): s for s in header.sub_microbatches}
    instances: dict[tuple[str, int], tuple[Instance, ...]] = {}
    forward: dict[tuple[str, int, int, int], float] = {}
    out: dict[StageKey, float] = {}
    for st in graph.stages:
        key = (st.pipeline, st.chunk, st.microbatch, st.sub)
        f = forward.get(key)
        if f is None:
            f = 0.0
            sub = subs[(st.pipeline, st.microbatch, st.sub)]
            for lr in chunks[(st.pipeline, st.chunk)].layers:
                spec = model.module(lr.module)
                found = instances.get((lr.module, st.microbatch))
                if found is None:
                    found = instances[(lr.module, st.microbatch)] = module_instances(
                        model, lr.module, batch.microbatches[st.microbatch]
                    )
                mine = [found[i] for i in sub.instances_of(lr.module)]
                tokens = sum(i.tokens for i in mine)
                square = sum(float(span) ** 2 for i in mine for span in i.attention_spans)
                per_block = 2.0 * spec.block_params() * tokens + 4.0 * spec.hidden * square
                head = spec.post_params() if lr.stop == spec.layers else 0
                f += (lr.stop - lr.start) * per_block + 2.0 * head * tokens
            forward[key] = f = f / 1e9
        out[st] = 2.0 * f if st.pass_ is Pass.B else f
    return out


def fallback_orders(
    header: PlanHeader,
    interleaver: Interleaver = interleave_reference,
    graph: StageGraph | None = None,
    *,
    work: dict[StageKey, float] | None = None,
    lean: bool = False,
    cap_scale: float = 1.0,
) -> list[list[Compute]]:
    """Per-rank compute orders of the static fallback schedule for `header`.

    `work` gives each stage's relative duration (`stage_work`; default unit costs: forward 1, backward 2). The
    planner passes the numba interleaver (same result, much faster) and the stage graph it already built
    (`stage_graph(header)`); trainers use the pure-Python default. `lean` caps memory at pp - r stage units per
    rank (see the module's docstring); `cap_scale` multiplies the usual cap (``math.inf``: no cap), for a caller
    that can check the result against device memory (`Planner.fallback_plan`).
    """
    graph = graph or stage_graph(header)
    pp = header.placement.pp
    if work is None:
        dur = {s: 2.0 if s.pass_ is Pass.B else 1.0 for s in graph.stages}
    else:
        scale = max(work.values(), default=1.0) or 1.0
        dur = {s: max(work[s] / scale, 1e-6) for s in graph.stages}  # ~1: the interleaver's tolerances
    if lean:
        act = {(s.pipeline, s.chunk, s.microbatch, s.sub): 1.0 for s in graph.stages if s.pass_ is Pass.F}
        cap = [float(max(pp - r, 1)) for r in range(pp)]
    else:
        subs: dict[tuple[str, int], int] = {}
        for sm in header.sub_microbatches:
            subs[(sm.pipeline, sm.microbatch)] = subs.get((sm.pipeline, sm.microbatch), 0) + 1
        act = {
            (s.pipeline, s.chunk, s.microbatch, s.sub): 1.0 / subs[(s.pipeline, s.microbatch)]
            for s in graph.stages
            if s.pass_ is Pass.F
        }
        per_rank = [0] * pp
        for c in header.placement.chunks:
            per_rank[c.rank] += 1
        v = max(1, min(per_rank))
        cap = [float(2 * (pp - r - 1) + (v - 1) * pp + 1) * cap_scale for r in range(pp)]
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
    cap_scale: float | None = None,
    unit_costs: bool = False,
) -> Plan:
    """The fallback plan for `batch` on `placement` (header.source = FALLBACK). By default (what a trainer builds
    alone, with no memory model at hand) the lean memory cap; `cap_scale` (a multiple of the interleaved cap,
    ``math.inf`` for none) and `unit_costs` are for a planner that checks the result against device memory."""
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
    graph = stage_graph(header)
    work = None if unit_costs else stage_work(model, batch, header, graph)
    if cap_scale is None:
        orders = fallback_orders(header, interleaver, graph, work=work, lean=True)
    else:
        orders = fallback_orders(header, interleaver, graph, work=work, cap_scale=cap_scale)
    return assemble_plan(header, orders, shapes.tensors, graph=graph)  # one stage graph per build, not two

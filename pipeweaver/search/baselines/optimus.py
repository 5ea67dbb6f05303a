"""Optimus's coarse-grained schedule (Feng et al., ATC'24), as the PipeWeaver paper re-implements it.

Every module is its own pipeline with one chunk per rank. Each rank first runs the encoder forwards of all
microbatches, then the backbone's 1F1B, then the encoder backwards: encoders fill the backbone's warm-up
bubble but hold their activations through it (the 25% higher peak memory the paper reports). The fine-grained
part of Optimus (filling tensor-parallel bubbles) is orthogonal and omitted, as in the paper.
"""

from __future__ import annotations

from pipeweaver.plan.ir import Compute, Pass, PlanHeader
from pipeweaver.search.baselines._line import Op, lower, pipeline_line
from pipeweaver.search.baselines.one_f_one_b import one_f_one_b_rank


def optimus_orders(header: PlanHeader) -> list[list[Compute]]:
    """Encoders are the pipelines that feed another; the backbones are the rest (the sinks of the module DAG).

    The order on every rank follows one global order (all encoder forwards, each backbone's 1F1B, all encoder
    backwards), so it is valid for any batch, including microbatches without images.
    """
    placement = header.placement
    feeders = {e.src for e in placement.edges}
    encoders = [p.name for p in placement.pipelines if p.name in feeders]
    backbones = [p.name for p in placement.pipelines if p.name not in feeders]
    lines = {p.name: pipeline_line(header, p.name) for p in placement.pipelines}
    orders: list[list[Compute]] = []
    for r in range(placement.pp):
        order: list[Compute] = []
        for name in encoders:
            line = lines[name]
            chunks = line.chunks_of_rank[r]
            order += lower(line, [Op(c, Pass.F, u) for u in range(line.m) for c in chunks])
        for name in backbones:
            line = lines[name]
            order += lower(line, one_f_one_b_rank(line.only_chunk(r, "optimus-coarse"), line.num_chunks, line.m))
        for name in reversed(encoders):
            line = lines[name]
            chunks = line.chunks_of_rank[r]
            order += lower(line, [Op(c, Pass.B, u) for u in range(line.m) for c in reversed(chunks)])
        orders.append(order)
    return orders

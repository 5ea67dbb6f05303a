"""GPipe: every forward of the batch, then every backward (fill-drain; torch's `ScheduleGPipe` order)."""

from __future__ import annotations

from pipeweaver.plan.ir import Pass
from pipeweaver.search.baselines._line import Line, Op


def gpipe_ops(line: Line) -> list[list[Op]]:
    """Per rank: forwards by (unit, chunk ascending), then backwards by (unit, chunk descending).

    Both halves follow one global topological order of the stage graph, so any number of chunks per rank
    works.
    """
    orders: list[list[Op]] = []
    for chunks in line.chunks_of_rank:
        fwd = [Op(c, Pass.F, u) for u in range(line.m) for c in chunks]
        bwd = [Op(c, Pass.B, u) for u in range(line.m) for c in reversed(chunks)]
        orders.append(fwd + bwd)
    return orders

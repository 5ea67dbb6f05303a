"""One pipeline of a header seen as a classic linear pipeline, and the lowering of textbook orders onto it.

The textbook schedules (GPipe, 1F1B, interleaved 1F1B, ZB-H1, ZBV) are written over abstract ops
(chunk, F/B/I/W, unit): a *unit* is one (microbatch, sub-microbatch) the pipeline runs, in order. Lowering
turns them into `Compute` actions with the header's backward passes: a B becomes I then W when the backward is
split, an I becomes B when it is not, and passes a pipeline does not run (frozen modules) are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pipeweaver.plan.graph import backward_passes
from pipeweaver.plan.ir import Compute, Pass, PlanHeader, StageKey


class Op(NamedTuple):
    """One textbook action: run `kind` of `chunk` on unit `unit` (an index into `Line.units`)."""

    chunk: int
    kind: Pass
    unit: int


@dataclass(frozen=True, slots=True)
class Line:
    """One pipeline of a header: its chunks per rank and the units that flow through it."""

    pipeline: str
    pp: int
    num_chunks: int
    units: tuple[tuple[int, int], ...]
    """(microbatch, sub-microbatch) pairs in microbatch order; microbatches without work for it are absent."""
    chunks_of_rank: tuple[tuple[int, ...], ...]
    """Chunk indices each rank holds, ascending."""
    passes: tuple[Pass, ...]
    """Backward passes of every chunk: (), (B,), (I,) or (I, W)."""

    @property
    def m(self) -> int:
        return len(self.units)

    def only_chunk(self, rank: int, schedule: str) -> int:
        chunks = self.chunks_of_rank[rank]
        if len(chunks) != 1:
            raise ValueError(
                f"{schedule} needs one chunk of pipeline '{self.pipeline}' per rank; rank {rank} holds {list(chunks)}"
            )
        return chunks[0]


def pipeline_line(header: PlanHeader, pipeline: str) -> Line:
    placement = header.placement
    chunks = placement.chunks_of(pipeline)
    per_rank: list[list[int]] = [[] for _ in range(placement.pp)]
    for c in chunks:
        per_rank[c.rank].append(c.index)
    units = tuple(sorted((s.microbatch, s.index) for s in header.sub_microbatches if s.pipeline == pipeline))
    return Line(
        pipeline=pipeline,
        pp=placement.pp,
        num_chunks=len(chunks),
        units=units,
        chunks_of_rank=tuple(tuple(sorted(r)) for r in per_rank),
        passes=backward_passes(header, pipeline),
    )


def single_line(header: PlanHeader, schedule: str) -> Line:
    """The header's only pipeline (single-pipeline schedules run on Megatron-style mixed placements)."""
    pipelines = header.placement.pipelines
    if len(pipelines) != 1:
        raise ValueError(
            f"{schedule} runs one pipeline; the placement has {len(pipelines)} "
            f"({[p.name for p in pipelines]}); use a mixed placement"
        )
    return pipeline_line(header, pipelines[0].name)


def _lower_pass(kind: Pass, passes: tuple[Pass, ...]) -> tuple[Pass, ...]:
    if kind is Pass.F:
        return (Pass.F,)
    if not passes:
        return ()
    split = Pass.I in passes
    if kind is Pass.B:
        return passes if split else (Pass.B,)
    if kind is Pass.I:
        return (Pass.I,) if split else (Pass.B,)
    return (Pass.W,) if Pass.W in passes else ()


def lower(line: Line, ops: Sequence[Op]) -> list[Compute]:
    """`ops` of one rank as compute actions; ops on units past the last one (padding) are dropped."""
    out: list[Compute] = []
    for op in ops:
        if op.unit >= line.m:
            continue
        mb, sub = line.units[op.unit]
        for p in _lower_pass(op.kind, line.passes):
            out.append(Compute(StageKey(line.pipeline, op.chunk, mb, sub, p)))
    return out


def lower_all(line: Line, ops_per_rank: Sequence[Sequence[Op]]) -> list[list[Compute]]:
    return [lower(line, ops) for ops in ops_per_rank]

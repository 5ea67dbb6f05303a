"""1F1B (PipeDream-flush, Megatron's non-interleaved schedule): warm up, alternate one forward and one
backward, drain. The stage at position c of n warms up with min(n - 1 - c, m) forwards (Megatron, torch)."""

from __future__ import annotations

from pipeweaver.plan.ir import Pass
from pipeweaver.search.baselines._line import Line, Op


def one_f_one_b_rank(chunk: int, num_chunks: int, m: int) -> list[Op]:
    """The 1F1B order of the stage at position `chunk` of a `num_chunks`-stage pipeline over `m` units."""
    warmup = min(num_chunks - 1 - chunk, m)
    ops = [Op(chunk, Pass.F, u) for u in range(warmup)]
    for k in range(m - warmup):
        ops.append(Op(chunk, Pass.F, warmup + k))
        ops.append(Op(chunk, Pass.B, k))
    ops.extend(Op(chunk, Pass.B, u) for u in range(m - warmup, m))
    return ops


def one_f_one_b_ops(line: Line) -> list[list[Op]]:
    return [one_f_one_b_rank(line.only_chunk(r, "1f1b"), line.num_chunks, line.m) for r in range(line.pp)]

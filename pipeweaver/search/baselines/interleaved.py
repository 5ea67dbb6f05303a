"""Interleaved 1F1B (Megatron's virtual pipeline, Narayanan et al. SC'21; torch's `ScheduleInterleaved1F1B`).

Each rank holds v chunks placed round robin (chunk l*p + r on rank r). Forwards walk Megatron's schedule
table: microbatches in groups of N (`microbatch_group_size_per_vp_stage`), each group through chunk 0, then
chunk 1, ...; the k-th backward takes the k-th table entry with its chunk mirrored. Rank r warms up with
(v-1)*N + 2*(p-1-r) forwards, then alternates one forward and one backward, then drains.

N is the smallest group size Megatron accepts: N = p when p divides m (Megatron's default, and torch's order);
otherwise the smallest N in [p, m] whose last, shorter group still holds at least p microbatches (Megatron
raises on a shorter remainder, and the order it gives deadlocks: the first rank's forwards of the short group
wait on the last rank, which already waits on the first rank's backward). With fewer microbatches than ranks,
which Megatron refuses, one group holds them all (N = m), as torch does.
"""

from __future__ import annotations

from pipeweaver.plan.ir import Pass
from pipeweaver.search.baselines._line import Line, Op


def schedule_table(m: int, v: int, group: int) -> list[tuple[int, int]]:
    """Megatron's `get_schedule_table`: (unit, local chunk) in forward order."""
    table: list[tuple[int, int]] = []
    for start in range(0, m, group):
        members = range(start, min(start + group, m))
        table.extend((u, local) for local in range(v) for u in members)
    return table


def group_size(m: int, pp: int) -> int:
    """Megatron's `microbatch_group_size_per_vp_stage` for m microbatches on pp ranks (module docstring)."""
    if m <= pp:
        return m
    return next(n for n in range(pp, m + 1) if m % n == 0 or m % n >= pp)


def interleaved_rank(rank: int, chunks: tuple[int, ...], pp: int, m: int) -> list[Op]:
    v = len(chunks)
    group = group_size(m, pp)
    table = schedule_table(m, v, group)
    total = m * v
    warmup = min((v - 1) * group + 2 * (pp - 1 - rank), total)

    def fwd(k: int) -> Op:
        u, local = table[k]
        return Op(chunks[local], Pass.F, u)

    def bwd(k: int) -> Op:
        u, local = table[k]
        return Op(chunks[v - 1 - local], Pass.B, u)

    ops = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        ops.append(fwd(warmup + k))
        ops.append(bwd(k))
    ops.extend(bwd(k) for k in range(total - warmup, total))
    return ops


def interleaved_ops(line: Line) -> list[list[Op]]:
    pp = line.pp
    v = line.num_chunks // pp
    for r, chunks in enumerate(line.chunks_of_rank):
        expected = tuple(local * pp + r for local in range(v))
        if line.num_chunks != v * pp or chunks != expected:
            raise ValueError(
                f"interleaved-1f1b needs pp*v chunks of pipeline '{line.pipeline}' placed round robin; "
                f"rank {r} holds {list(chunks)}, expected {list(expected)}"
            )
    if line.m == 0:
        return [[] for _ in range(pp)]
    return [interleaved_rank(r, chunks, pp, line.m) for r, chunks in enumerate(line.chunks_of_rank)]

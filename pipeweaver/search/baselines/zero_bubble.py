"""Zero-bubble schedules (Qi et al., ICLR'24): the backward split into input-gradient (I) and weight-gradient
(W) passes, and W work moved into what would be bubbles.

- ZB-H1: 1F1B's order and in-flight limit, with rank r (stage position c) deferring its W passes by c steps:
  after the k-th I it runs W of unit k - c. The deferred W's fill the drain, leaving a bubble of
  (p-1)(T_F + T_I - T_W) per rank (one third of 1F1B's when T_F = T_I = T_W).
- ZBV: two chunks per rank in a V (chunk r and chunk 2p-1-r), torch's `ScheduleZBVZeroBubble` order; zero
  bubble in steady state when T_F = T_I = T_W.

Both build the order for at least the microbatch count the textbook needs and drop the padding units: removing
whole units from every rank keeps a valid order valid.
"""

from __future__ import annotations

from pipeweaver.plan.ir import Pass
from pipeweaver.search.baselines._line import Line, Op


def zb_h1_rank(chunk: int, num_chunks: int, m: int) -> list[Op]:
    """ZB-H1 order of the stage at position `chunk` over `m` units (m >= num_chunks; callers pad)."""
    warmup = num_chunks - chunk
    ops = [Op(chunk, Pass.F, u) for u in range(warmup)]
    for k in range(m):
        ops.append(Op(chunk, Pass.I, k))
        if k - chunk >= 0:
            ops.append(Op(chunk, Pass.W, k - chunk))
        if warmup + k < m:
            ops.append(Op(chunk, Pass.F, warmup + k))
    ops.extend(Op(chunk, Pass.W, u) for u in range(max(0, m - chunk), m))
    return ops


def zb_h1_ops(line: Line) -> list[list[Op]]:
    m = max(line.m, line.num_chunks)
    return [zb_h1_rank(line.only_chunk(r, "zb-h1"), line.num_chunks, m) for r in range(line.pp)]


def zbv_rank(rank: int, pp: int, m: int) -> list[Op]:
    """torch's ZBV order for `rank` over `m` units, before dropping padding (m >= 2p - 1)."""
    c0, c1 = rank, 2 * pp - 1 - rank
    ops: list[Op] = []
    f0 = f1 = b0 = b1 = 0
    for _ in range(2 * (pp - rank) - 1):
        ops.append(Op(c0, Pass.F, f0))
        f0 += 1
    for _ in range(rank):
        ops += [Op(c1, Pass.F, f1), Op(c0, Pass.F, f0)]
        f1 += 1
        f0 += 1
    for _ in range(pp - rank):
        ops += [Op(c1, Pass.F, f1), Op(c1, Pass.I, b1), Op(c1, Pass.W, b1)]
        f1 += 1
        b1 += 1
    while f1 < f0 or f0 < m:
        if f0 < m:
            ops.append(Op(c0, Pass.F, f0))
            f0 += 1
        ops += [Op(c0, Pass.I, b0), Op(c0, Pass.W, b0)]
        b0 += 1
        ops += [Op(c1, Pass.F, f1), Op(c1, Pass.I, b1), Op(c1, Pass.W, b1)]
        f1 += 1
        b1 += 1
    w0, w1 = b0, b1
    for _ in range(rank):
        ops += [Op(c0, Pass.I, b0), Op(c1, Pass.I, b1)]
        b0 += 1
        b1 += 1
    for _ in range(pp - rank):
        ops += [Op(c0, Pass.I, b0), Op(c0, Pass.W, w0)]
        b0 += 1
        w0 += 1
    ops.extend(Op(c1, Pass.W, u) for u in range(w1, b1))
    ops.extend(Op(c0, Pass.W, u) for u in range(w0, b0))
    return ops


def zbv_ops(line: Line) -> list[list[Op]]:
    pp = line.pp
    for r, chunks in enumerate(line.chunks_of_rank):
        expected = (r, 2 * pp - 1 - r)
        if line.num_chunks != 2 * pp or chunks != expected:
            raise ValueError(
                f"zbv needs 2*pp chunks of pipeline '{line.pipeline}' in a V; rank {r} holds {list(chunks)}, "
                f"expected {list(expected)}"
            )
    if line.m == 0:
        return [[] for _ in range(pp)]
    m = max(line.m, 2 * pp - 1)
    return [zbv_rank(r, pp, m) for r in range(pp)]

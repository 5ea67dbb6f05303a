"""The scheduling problem the search solves, flattened into arrays (shared by the Python and numba interleavers).

A problem is the stage DAG of one batch under a fixed placement and sub-microbatch split, with each stage's
duration and activation memory, the communication delay of each cross-rank edge, each rank's memory cap, and the
segment group each stage belongs to (MCTS orders groups; stages of one group share its priority).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from pipeweaver.plan.graph import StageGraph
from pipeweaver.plan.ir import Pass, StageKey
from pipeweaver.plan.offload import PREFETCH_LEAD

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class GroupKey:
    """A schedulable group of segments: one pipeline's forward (or backward) passes of one microbatch.

    Same-modality segments of one microbatch have the same structure and similar cost, so the search ties them:
    they share one priority and keep a fixed order inside the group (paper section 5.1, symmetry breaking).
    """

    pipeline: str
    microbatch: int
    backward: bool

    def __str__(self) -> str:
        return f"{self.pipeline}.{'B' if self.backward else 'F'}{self.microbatch}"


class Policy(IntEnum):
    """How the interleaver picks a rank's next stage (`interleave_ref` has the rules)."""

    ALTERNATE = 0
    """Paper section 5.2: with both kinds ready by the time the rank is free, alternate with the kind it ran last
    (1F1B emulation), highest priority first; else the stage ready soonest. A forward over the memory cap still
    goes if its sub-microbatch already holds memory on the rank."""
    EARLIEST = 1
    """List scheduling: the stage that can start first; at equal start backward before forward, then priority.
    The memory gate is strict: a forward that would push the rank over its cap waits, even one whose
    sub-microbatch is in flight, until no rank at all can move. Backward work drains as soon as it is ready, so
    memory frees early and more forwards fit under the real budget (vlm-s with selective recompute: 16.6 s in
    SEMU against 19.2 s, which also overflows, with ALTERNATE)."""


@dataclass(frozen=True, slots=True)
class Problem:
    stages: tuple[StageKey, ...]
    pp: int
    rank: I64
    duration_ms: F64
    is_forward: I64
    """1 for F stages (they allocate activations), 0 for B/I/W."""
    alloc_bytes: F64
    """Activation bytes a stage allocates when it starts (F) ..."""
    free_bytes: F64
    """... and frees when it ends (the last backward pass of the same chunk and sub-microbatch)."""
    pred_ptr: I64
    pred_idx: I64
    pred_delay_ms: F64
    """Delay after the predecessor ends before this stage may start (transfer time across ranks, else 0)."""
    succ_ptr: I64
    succ_idx: I64
    group: I64
    """Index into `groups` of each stage."""
    intra: I64
    """Fixed order of a stage inside its group (by sub-microbatch, then chunk)."""
    groups: tuple[GroupKey, ...]
    unit: I64
    """Index of each stage's (pipeline, microbatch, sub-microbatch): the unit the memory gate admits per rank."""
    mem_cap_bytes: F64
    """Per-rank cap of the interleaver's memory gate, in activation bytes (the planner sets it at or below the real
    budget: device capacity minus static memory)."""
    policy: int = Policy.ALTERNATE
    """The interleaver's `Policy` for this problem."""
    offload_bytes: F64 | None = None
    """Activation offloading (None: no stage pair offloads). Per stage: for a forward, the bytes its copy to host
    memory frees when it ends (the copy starts at the forward's end, after the rank's earlier copies); for the
    first backward pass of an offloaded pair, the bytes its prefetch brings back."""
    offload_ms: F64 | None = None
    """Per stage, the copy time of those bytes (each direction of a rank's host link carries one copy at a time)."""
    reload_of: I64 | None = None
    """Per stage, for the first backward pass of an offloaded pair, its forward's index (-1 otherwise)."""

    @property
    def n(self) -> int:
        return len(self.stages)


def build_problem(
    graph: StageGraph,
    pp: int,
    duration_ms: Mapping[StageKey, float],
    activation_bytes: Mapping[tuple[str, int, int, int], float],
    delay_ms: Mapping[tuple[StageKey, StageKey], float],
    mem_cap_bytes: Sequence[float],
) -> Problem:
    """Flatten `graph` with costs.

    `activation_bytes` is keyed by (pipeline, chunk, microbatch, sub): held from that chunk's F start to the end of
    its last backward pass. `delay_ms` gives the transfer time of each cross-rank data edge (missing = 0).
    """
    # One pass over the stages into plain lists, then numpy: this runs once per batch on ~10^4 stages and was
    # a visible part of the planner's fixed cost when it built a GroupKey and did several dict walks per stage.
    stages = graph.stages
    index = {s: i for i, s in enumerate(stages)}
    n = len(stages)
    rank = np.fromiter((graph.rank[s] for s in stages), dtype=np.int64, count=n)
    dur = np.fromiter((duration_ms[s] for s in stages), dtype=np.float64, count=n)
    fwd = np.zeros(n, dtype=np.int64)
    alloc = np.zeros(n)
    free = np.zeros(n)
    group = np.zeros(n, dtype=np.int64)
    intra = np.zeros(n, dtype=np.int64)
    group_of: dict[tuple[str, int, bool], int] = {}
    # The backward pass that ends a chunk's activation lifetime: W when split (it still needs the inputs), else B.
    last_bwd: dict[tuple[str, int, int, int], int] = {}
    for i, s in enumerate(stages):
        key = (s.pipeline, s.chunk, s.microbatch, s.sub)
        pass_ = s.pass_
        backward = pass_ is not Pass.F
        if not backward:
            fwd[i] = 1
            alloc[i] = activation_bytes.get(key, 0.0)
        elif pass_ is Pass.W or key not in last_bwd:  # B, I or W
            last_bwd[key] = i
        g = (s.pipeline, s.microbatch, backward)
        found = group_of.get(g)
        if found is None:
            found = group_of[g] = len(group_of)
        group[i] = found
        # Forward: earlier subs first, then chunk order; backward: same subs order, chunks descending.
        intra[i] = s.sub * 100_000 + (-s.chunk if backward else s.chunk)
    for key, i in last_bwd.items():
        free[i] = activation_bytes.get(key, 0.0)

    pred_lists = [graph.preds[s] for s in stages]
    pred_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(ps) for ps in pred_lists], out=pred_ptr[1:])
    pred_idx = [index[p] for ps in pred_lists for p in ps]
    if delay_ms:
        pred_delay = [delay_ms.get((p, s), 0.0) for s, ps in zip(stages, pred_lists, strict=True) for p in ps]
    else:
        pred_delay = [0.0] * len(pred_idx)
    succ_lists = [graph.succs[s] for s in stages]
    succ_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(ss) for ss in succ_lists], out=succ_ptr[1:])
    succ_idx = [index[x] for ss in succ_lists for x in ss]
    groups = tuple(GroupKey(*g) for g in sorted(group_of, key=lambda g: group_of[g]))
    return Problem(
        stages=stages,
        pp=pp,
        rank=rank,
        duration_ms=dur,
        is_forward=fwd,
        alloc_bytes=alloc,
        free_bytes=free,
        pred_ptr=pred_ptr,
        pred_idx=np.array(pred_idx, dtype=np.int64),
        pred_delay_ms=np.array(pred_delay),
        succ_ptr=succ_ptr,
        succ_idx=np.array(succ_idx, dtype=np.int64),
        group=group,
        intra=intra,
        groups=groups,
        unit=_units(stages),
        mem_cap_bytes=np.array(mem_cap_bytes, dtype=np.float64),
    )


def stage_priorities(problem: Problem, group_priority: npt.NDArray[np.float64]) -> F64:
    """Per-stage priority: its group's priority, ties broken by the fixed intra-group order (earlier first)."""
    if problem.n == 0:
        return np.zeros(0)
    low = problem.intra.min()
    spread = float(problem.intra.max() - low + 1)
    prio: F64 = group_priority[problem.group] - (problem.intra - low) / spread
    return prio


def _units(stages: tuple[StageKey, ...]) -> I64:
    ids: dict[tuple[str, int, int], int] = {}
    return np.array([ids.setdefault((s.pipeline, s.microbatch, s.sub), len(ids)) for s in stages], dtype=np.int64)


def peak_memory(problem: Problem, start: F64, end: F64) -> F64:
    """Per-rank peak of live activation bytes of a timed schedule (allocated at F start, freed at backward end;
    offloaded bytes freed when their copy ends and back a copy before the backward, as the interleaver has them)."""
    peaks = np.zeros(problem.pp)
    host = host_events(problem, start, end)
    for r in range(problem.pp):
        idx = np.flatnonzero(problem.rank == r)
        times = np.concatenate((start[idx], end[idx], host[0][r]))
        deltas = np.concatenate((problem.alloc_bytes[idx], -problem.free_bytes[idx], host[1][r]))
        # At equal times frees come first (a backward ending as a forward starts).
        order = np.lexsort((deltas, times))
        live = np.cumsum(deltas[order])
        peaks[r] = float(live.max()) if len(live) else 0.0
    return peaks


def overflow(problem: Problem, start: F64, end: F64) -> float:
    """Largest relative excess of a rank's peak over its cap (0 when the schedule fits)."""
    peaks = peak_memory(problem, start, end)
    caps = np.maximum(problem.mem_cap_bytes, 1.0)
    return float(max(0.0, np.max((peaks - problem.mem_cap_bytes) / caps))) if problem.pp else 0.0


def reload_stages(problem: Problem) -> I64:
    """Per stage, for the first backward pass of each stage pair (B, or I when the backward is split), the index
    of the pair's forward; -1 for every other stage. What `with_offload` needs."""
    forward: dict[tuple[str, int, int, int], int] = {}
    for i, s in enumerate(problem.stages):
        if s.pass_ is Pass.F:
            forward[(s.pipeline, s.chunk, s.microbatch, s.sub)] = i
    out = np.full(problem.n, -1, dtype=np.int64)
    for i, s in enumerate(problem.stages):
        if s.pass_ is Pass.B or s.pass_ is Pass.I:
            out[i] = forward.get((s.pipeline, s.chunk, s.microbatch, s.sub), -1)
    return out


def with_offload(problem: Problem, forward_bytes: F64, copy_ms: F64, reload_of: I64 | None = None) -> Problem:
    """`problem` with activation offloading: `forward_bytes[i]` and `copy_ms[i]` per stage, nonzero on the
    forwards that offload (other entries are ignored). `reload_of` from `reload_stages` (computed if missing).
    A problem without any offloading forward gets no offload arrays (the interleaver's plain path)."""
    fwd = problem.is_forward.astype(bool) & (forward_bytes > 0)
    if not fwd.any():
        return replace(problem, offload_bytes=None, offload_ms=None, reload_of=None)
    back = reload_stages(problem) if reload_of is None else reload_of
    source = np.where(back >= 0, back, 0)
    reloads = (back >= 0) & fwd[source]
    off_b = np.where(fwd, forward_bytes, 0.0)
    off_ms = np.where(fwd, copy_ms, 0.0)
    off_b = np.where(reloads, off_b[source], off_b)
    off_ms = np.where(reloads, off_ms[source], off_ms)
    return replace(
        problem,
        offload_bytes=off_b.astype(np.float64),
        offload_ms=off_ms.astype(np.float64),
        reload_of=np.where(reloads, back, -1).astype(np.int64),
    )


def host_events(problem: Problem, start: F64, end: F64) -> tuple[list[F64], list[F64]]:
    """Per rank, (times, byte changes) of a timed schedule's offload copies: each offloading forward's bytes leave
    when its copy ends (copies of a rank in the order the forwards end, one at a time, each from its forward's end),
    and come back when the prefetch of its first backward pass starts, a copy before that pass."""
    empty = np.zeros(0)
    if problem.offload_ms is None or problem.offload_bytes is None or problem.reload_of is None:
        return [empty] * problem.pp, [empty] * problem.pp
    times: list[F64] = []
    deltas: list[F64] = []
    offloading = (problem.is_forward == 1) & (problem.offload_bytes > 0)
    for r in range(problem.pp):
        fwd = np.flatnonzero(offloading & (problem.rank == r))
        fwd = fwd[np.argsort(end[fwd], kind="stable")]
        done = np.zeros(len(fwd))
        free = 0.0
        for k, i in enumerate(fwd):
            free = max(float(end[i]), free) + float(problem.offload_ms[i])
            done[k] = free
        back = np.flatnonzero((problem.reload_of >= 0) & (problem.rank == r))
        # As the plans place prefetches (`plan.offload.place_prefetches`): at the start of the stage running
        # PREFETCH_LEAD copies before the backward (when the rank is busy then).
        mine = np.flatnonzero(problem.rank == r)
        mine = mine[np.argsort(start[mine], kind="stable")]
        issue = start[back] - PREFETCH_LEAD * problem.offload_ms[back]
        at = np.searchsorted(start[mine], issue, "right") - 1
        covering = (at >= 0) & (end[mine[np.maximum(at, 0)]] > issue)
        issue = np.where(covering, start[mine[np.maximum(at, 0)]], issue)
        times.append(np.concatenate((done, issue)))
        deltas.append(np.concatenate((-problem.offload_bytes[fwd], problem.offload_bytes[back])))
    return times, deltas

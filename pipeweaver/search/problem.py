"""The scheduling problem the search solves, flattened into arrays (shared by the Python and numba interleavers).

A problem is the stage DAG of one batch under a fixed placement and sub-microbatch split, with each stage's
duration and activation memory, the communication delay of each cross-rank edge, each rank's memory cap, and the
segment group each stage belongs to (MCTS orders groups; stages of one group share its priority).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from pipeweaver.plan.graph import StageGraph
from pipeweaver.plan.ir import Pass, StageKey

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
    """Per-rank peak of live activation bytes of a timed schedule (allocated at F start, freed at backward end)."""
    peaks = np.zeros(problem.pp)
    for r in range(problem.pp):
        idx = np.flatnonzero(problem.rank == r)
        times = np.concatenate((start[idx], end[idx]))
        deltas = np.concatenate((problem.alloc_bytes[idx], -problem.free_bytes[idx]))
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

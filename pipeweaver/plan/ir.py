"""The plan IR: per-rank ordered actions plus a shared header.

A plan is data (like torch.distributed.pipelining's `_Action`): small immutable actions with a compact text form
(`vit.2F0.1` = pipeline `vit`, chunk 2, Forward, microbatch 0, sub-microbatch 1), one ordered list per rank.

A *pipeline* is a chain of chunks that one pass of data walks through. PipeWeaver gives every modality module its
own pipeline (chunks never mix modules); Megatron-style baselines lay all modules end to end as one pipeline whose
chunks may span a module boundary. Pipelines form a DAG (a ViT pipeline feeds the LLM pipeline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, TypeAlias


class Pass(StrEnum):
    """What a compute action does to its chunk."""

    F = "F"
    """Forward."""
    B = "B"
    """Full backward (input and weight gradients)."""
    I = "I"  # noqa: E741 - the zero-bubble papers' name for the input-gradient pass
    """Input-gradient half of a split backward (zero-bubble)."""
    W = "W"
    """Weight-gradient half of a split backward (zero-bubble)."""

    @property
    def is_backward(self) -> bool:
        return self is not Pass.F


class Recompute(StrEnum):
    """Memory strategy of a stage: what the forward keeps for the backward."""

    NONE = "none"
    SELECTIVE = "selective"
    """Drop attention internals and recompute them in backward (Korthikanti et al.)."""
    FULL = "full"
    """Keep only the chunk input; recompute the whole forward in backward."""


class PlanSource(StrEnum):
    SEARCH = "search"
    CACHE = "cache"
    FALLBACK = "fallback"
    BASELINE = "baseline"


_STAGE_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.(\d+)([FBIW])(\d+)\.(\d+)")
_RECOMPUTE_SUFFIX = {Recompute.NONE: "", Recompute.SELECTIVE: "!s", Recompute.FULL: "!f"}
_OFFLOAD_SUFFIX = "!o"


class StageKey(NamedTuple):
    """One execution of one chunk: (pipeline, chunk, microbatch, sub-microbatch, pass).

    A named tuple, not a dataclass: stage keys are the dictionary keys of the validator, the stage graph, SEMU's
    flattening and the search, and a tuple hashes and compares in C (`benchmarks/bench_plan_check.py`: checking
    a scaled-T2V plan's graph and validation 52 -> 19 ms with the change, docs/gpu.md section 7). Immutable and
    ordered field by field as before; it is also equal to a plain tuple of the same fields, so never mix the two
    as keys of one mapping.
    """

    pipeline: str
    chunk: int
    microbatch: int
    sub: int
    pass_: Pass

    def __str__(self) -> str:
        return f"{self.pipeline}.{self.chunk}{self.pass_.value}{self.microbatch}.{self.sub}"

    @staticmethod
    def parse(text: str) -> StageKey:
        """Inverse of `str()`: ``vit.2F0.1`` -> StageKey('vit', 2, 0, 1, F)."""
        match = _STAGE_RE.fullmatch(text)
        if match is None:
            raise ValueError(f"not a stage key: {text!r} (expected like 'vit.2F0.1')")
        pipeline, chunk, pass_, mb, sub = match.groups()
        return StageKey(pipeline, int(chunk), int(mb), int(sub), Pass(pass_))

    def with_pass(self, pass_: Pass) -> StageKey:
        return StageKey(self.pipeline, self.chunk, self.microbatch, self.sub, pass_)


@dataclass(frozen=True, slots=True)
class Compute:
    """Run `stage` on this rank with memory strategy `recompute`."""

    stage: StageKey
    recompute: Recompute = Recompute.NONE
    offload: bool = False
    """A forward only: copy what it keeps for its backward (under `recompute`: NONE or SELECTIVE) to host memory
    as it is saved, on a side stream, freeing the device copy once the copy ends; a `Prefetch` action brings it
    back before the pair's first backward pass. Text suffix ``!o``."""

    def __str__(self) -> str:
        return f"{self.stage}{_RECOMPUTE_SUFFIX[self.recompute]}{_OFFLOAD_SUFFIX if self.offload else ''}"


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Start copying the offloaded activations of `stage`'s pair back to the device (on a side stream; returns
    at once). `stage` is the pair's first backward pass (B, or I when the backward is split), which waits for the
    copy; the plan puts this action early enough that the copy is usually done by then."""

    stage: StageKey

    def __str__(self) -> str:
        return f"prefetch:{self.stage}"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Shape and dtype of one transferred tensor; receivers allocate buffers from it (no shape handshake)."""

    shape: tuple[int, ...]
    dtype: str = "bfloat16"


class Direction(StrEnum):
    SEND = "send"
    RECV = "recv"


@dataclass(frozen=True, slots=True)
class Transfer:
    """One point-to-point op of a batch: the output of `src` that `dst` consumes, to or from `peer`."""

    direction: Direction
    peer: int
    src: StageKey
    """Stage whose output (activation for F, gradient for B/I) travels."""
    dst: StageKey
    """Stage that consumes it on the receiving rank."""
    tensors: tuple[TensorSpec, ...]

    def __str__(self) -> str:
        arrow = ">" if self.direction is Direction.SEND else "<"
        return f"{self.direction.value}{arrow}{self.peer}:{self.src}->{self.dst}"


@dataclass(frozen=True, slots=True)
class CommBatch:
    """Post these transfers together (`batch_isend_irecv`); `handle` names the batch for its `Wait`."""

    handle: int
    ops: tuple[Transfer, ...]

    def __str__(self) -> str:
        return f"comm#{self.handle}{{{', '.join(str(o) for o in self.ops)}}}"


@dataclass(frozen=True, slots=True)
class Wait:
    """Block until every transfer of batch `handle` has completed."""

    handle: int

    def __str__(self) -> str:
        return f"wait#{self.handle}"


Action: TypeAlias = Compute | CommBatch | Wait | Prefetch


# ---- header --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerRange:
    """Layers [start, stop) of module `module`."""

    module: str
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """A contiguous slice of one pipeline's layers, statically placed on `rank`."""

    pipeline: str
    index: int
    rank: int
    layers: tuple[LayerRange, ...]


@dataclass(frozen=True, slots=True)
class PipelineInfo:
    """One pipeline of the plan: which modules it runs and which passes it needs."""

    name: str
    modules: tuple[str, ...]
    backward: bool = True
    """False for frozen modules with nothing trainable upstream: forward only."""
    weight_grad: bool = True
    """False for frozen modules that still pass input gradients upstream (no W work)."""


@dataclass(frozen=True, slots=True)
class PipelineEdge:
    """Pipeline `dst`'s first chunk consumes pipeline `src`'s last chunk output of the same microbatch."""

    src: str
    dst: str


@dataclass(frozen=True, slots=True)
class Placement:
    """Static chunk-to-rank placement of a job (fixed for the whole training run)."""

    pp: int
    pipelines: tuple[PipelineInfo, ...]
    chunks: tuple[Chunk, ...]
    edges: tuple[PipelineEdge, ...] = ()

    def pipeline(self, name: str) -> PipelineInfo:
        for p in self.pipelines:
            if p.name == name:
                return p
        raise KeyError(f"placement has no pipeline '{name}' (pipelines: {[p.name for p in self.pipelines]})")

    def chunks_of(self, pipeline: str) -> tuple[Chunk, ...]:
        return tuple(sorted((c for c in self.chunks if c.pipeline == pipeline), key=lambda c: c.index))

    def num_chunks(self, pipeline: str) -> int:
        return sum(1 for c in self.chunks if c.pipeline == pipeline)

    def rank_of(self, pipeline: str, chunk: int) -> int:
        for c in self.chunks:
            if c.pipeline == pipeline and c.index == chunk:
                return c.rank
        raise KeyError(f"placement has no chunk {chunk} of pipeline '{pipeline}'")

    def upstream(self, pipeline: str) -> tuple[str, ...]:
        return tuple(e.src for e in self.edges if e.dst == pipeline)

    def downstream(self, pipeline: str) -> tuple[str, ...]:
        return tuple(e.dst for e in self.edges if e.src == pipeline)


@dataclass(frozen=True, slots=True)
class SubMicrobatch:
    """Which instances of microbatch `microbatch` sub-microbatch `index` of `pipeline` carries, per module."""

    pipeline: str
    microbatch: int
    index: int
    instances: tuple[tuple[str, tuple[int, ...]], ...]
    """(module, instance indices) pairs; indices refer to `spec.module_instances` order."""

    def instances_of(self, module: str) -> tuple[int, ...]:
        for name, idx in self.instances:
            if name == module:
                return idx
        return ()


@dataclass(frozen=True, slots=True)
class PlanHeader:
    """What every rank shares: identity, placement, the sub-microbatch split, predictions, provenance."""

    job_id: str
    iteration: int
    placement: Placement
    sub_microbatches: tuple[SubMicrobatch, ...]
    num_microbatches: int
    schedule: str
    """Name of what produced the plan: a baseline (``1f1b``) or ``pipeweaver``."""
    source: PlanSource = PlanSource.BASELINE
    dp_replica: int = 0
    split_backward: bool = False
    """Backward is split into I and W passes (zero-bubble schedules)."""
    predicted_makespan_ms: float = 0.0
    lower_bound_ms: float = 0.0
    peak_memory_bytes: tuple[float, ...] = ()
    """Predicted peak memory per rank."""
    baseline_makespans_ms: tuple[tuple[str, float], ...] = ()
    """Predicted makespans of the baselines on the same batch, for comparison."""

    def subs_of(self, pipeline: str, microbatch: int) -> tuple[SubMicrobatch, ...]:
        return tuple(s for s in self.sub_microbatches if s.pipeline == pipeline and s.microbatch == microbatch)


@dataclass(frozen=True, slots=True)
class RankPlan:
    """One rank's ordered action list, with the predicted [start, end) of each action in ms when known."""

    rank: int
    actions: tuple[Action, ...]
    predicted_ms: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    header: PlanHeader
    ranks: tuple[RankPlan, ...] = field(default=())
    wire_digest: int | None = field(default=None, compare=False, repr=False)
    """Digest of the serialized header and rank plans this plan was decoded from (set by the client when it
    assembles the service's replies): what the ranks' vote compares, instead of hashing the whole object graph
    (`benchmarks/bench_plan_check.py`, scaled-T2V plan: 0.6 ms against 21-37 ms for its `repr`, on ranks whose
    host sets the iteration's pace). None for a plan built in this process."""

    def rank(self, r: int) -> RankPlan:
        return self.ranks[r]

    def compute_order(self, r: int) -> tuple[StageKey, ...]:
        return tuple(a.stage for a in self.ranks[r].actions if isinstance(a, Compute))

    def recompute_map(self) -> dict[tuple[str, int, int, int], Recompute]:
        """The memory strategy of every forward stage that runs with one, by (pipeline, chunk, microbatch, sub):
        what SEMU needs to replay the plan."""
        out: dict[tuple[str, int, int, int], Recompute] = {}
        for rp in self.ranks:
            for a in rp.actions:
                if isinstance(a, Compute) and a.stage.pass_ is Pass.F and a.recompute is not Recompute.NONE:
                    s = a.stage
                    out[(s.pipeline, s.chunk, s.microbatch, s.sub)] = a.recompute
        return out

    def offloaded(self) -> set[tuple[str, int, int, int]]:
        """The stage pairs (pipeline, chunk, microbatch, sub) whose forward offloads its activations."""
        return {
            (a.stage.pipeline, a.stage.chunk, a.stage.microbatch, a.stage.sub)
            for rp in self.ranks
            for a in rp.actions
            if isinstance(a, Compute) and a.offload
        }

    def text(self) -> str:
        """Readable dump: one line per rank with every action's text form."""
        return "\n".join(f"rank {rp.rank}: " + " ".join(str(a) for a in rp.actions) for rp in self.ranks)

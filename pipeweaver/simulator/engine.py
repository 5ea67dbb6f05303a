"""SEMU's event simulation: replay a plan's per-rank action lists on stage costs and a link model.

Each rank has one compute stream that runs its computes in order. A `CommBatch` posts its sends and receives
at the rank's clock; a transfer starts once both ends have posted and its directed link is free (FIFO), and
lasts latency + bytes / bandwidth; a `Wait` moves the rank's clock to the end of its batch's last transfer.
Memory: a forward allocates its activations when it starts; the pass that ends the chunk's backward (B, or W
when backward is split; I when there is no W) frees them when it ends. The backward pass (B or I) also holds its
working memory (`StageCosts.workspace_bytes`) while it runs. A `CommBatch` allocates its receive buffers
when posted, as the executor does (`_inputs_in_activations` says until when they count). The loop itself lives in
`sim_kernel`.

Activation offloading (`Compute.offload`): each rank has a host link with one FIFO per direction. An offloading
forward's copy to the host starts when the forward ends and the device-to-host direction is free, and its bytes
are freed when the copy ends; the pair's `Prefetch` issues the copy back (after the copy out and the rank's earlier
copies back) and allocates the bytes again then; the first backward pass waits for that copy (exposed time). The
copies run beside the compute stream: they take no compute time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from pipeweaver.errors import InvalidPlan
from pipeweaver.plan.graph import backward_passes, stage_graph
from pipeweaver.plan.ir import (
    Action,
    CommBatch,
    Compute,
    Direction,
    Pass,
    Plan,
    PlanHeader,
    Prefetch,
    StageKey,
    TensorSpec,
)
from pipeweaver.simulator.sim_kernel import (
    COMPUTE,
    DEADLOCK,
    POST,
    PREFETCH,
    WAIT,
    FlatPlan,
    FlatResult,
    FloatArray,
    merge_host_events,
    run_numba,
    run_reference,
)
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.parallel import ParallelSpec

DTYPE_BYTES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


@lru_cache(maxsize=4096)
def transfer_bytes(tensors: tuple[TensorSpec, ...]) -> int:
    """Bytes a transfer moves: the sum over its tensors of prod(shape) * dtype size."""
    total = 0
    for t in tensors:
        try:
            size = DTYPE_BYTES[t.dtype]
        except KeyError:
            known = sorted(DTYPE_BYTES)
            raise ValueError(f"unknown dtype '{t.dtype}' in a transfer; known: {known}") from None
        total += math.prod(t.shape) * size
    return total


@dataclass(frozen=True, slots=True)
class StageCosts:
    """What the cost model tells the simulator: plain numbers per stage and per rank."""

    compute_ms: Mapping[StageKey, float]
    """Compute time of every stage the plan runs (all passes)."""
    act_bytes: Mapping[StageKey, float] = field(default_factory=dict)
    """Activation memory a forward keeps for its backward, keyed by the forward (F) stage; missing means 0."""
    static_bytes: Sequence[float] = ()
    """Per-rank memory held for the whole step (weights, gradients, optimizer states); empty means 0."""
    workspace_bytes: Mapping[tuple[str, int, int, int], float] = field(default_factory=dict)
    """Per stage pair (pipeline, chunk, microbatch, sub): what its backward pass (B, or I) allocates on top of the
    activations from its start to its end (`CostModel.stage_workspace_bytes`); missing means 0."""

    @staticmethod
    def uniform(
        header: PlanHeader,
        *,
        forward_ms: float,
        backward_ms: float,
        act_bytes: float = 0.0,
        static_bytes: float = 0.0,
    ) -> StageCosts:
        """Every stage of `header` costs the same whatever its layers; I and W split `backward_ms` evenly."""
        per_pass = {Pass.F: forward_ms, Pass.B: backward_ms, Pass.I: backward_ms / 2, Pass.W: backward_ms / 2}
        stages = stage_graph(header).stages
        return StageCosts(
            compute_ms={s: per_pass[s.pass_] for s in stages},
            act_bytes={s: act_bytes for s in stages if s.pass_ is Pass.F},
            static_bytes=(static_bytes,) * header.placement.pp,
        )


@dataclass(frozen=True, slots=True)
class LinkModel:
    """Point-to-point cost between pipeline ranks: latency_ms + bytes / bandwidth of the directed pair."""

    latency_ms: float
    bandwidth_bytes_per_s: tuple[tuple[float, ...], ...]
    """[src][dst] bandwidth in bytes/s; math.inf makes the bytes free."""
    shards: int = 1
    """GPU pairs a transfer is split over: a pipeline rank of tp GPUs with sequence parallelism sends each GPU's
    1/tp of the sequence to its peer GPU (Megatron-LM's pipeline schedules divide the sequence length of the
    tensors they send by tp when sequence parallelism is on), so each GPU receives, holds and carries
    `device_bytes` of a transfer's bytes, over its own link."""
    host_bandwidth_bytes_per_s: float = math.inf
    """Each GPU's link to host memory (PCIe), bytes/s per direction: what activation offloading copies over
    (`HardwareSpec.host_link_bandwidth`)."""
    host_latency_ms: float = 0.0
    """Fixed cost of one host copy."""

    def __post_init__(self) -> None:
        if not (self.host_bandwidth_bytes_per_s > 0 and self.host_latency_ms >= 0):
            raise ValueError("host_bandwidth_bytes_per_s must be positive and host_latency_ms not negative")
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        pp = len(self.bandwidth_bytes_per_s)
        if any(len(row) != pp for row in self.bandwidth_bytes_per_s):
            raise ValueError(f"bandwidth_bytes_per_s must be a square pp x pp table (pp = {pp})")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must not be negative, got {self.latency_ms}")
        if any(bw <= 0 for row in self.bandwidth_bytes_per_s for bw in row):
            raise ValueError("bandwidth_bytes_per_s must be positive everywhere (math.inf for free links)")

    @property
    def pp(self) -> int:
        return len(self.bandwidth_bytes_per_s)

    def device_bytes(self, num_bytes: int) -> int:
        """One GPU's share of a transfer of `num_bytes` (rounded up)."""
        return -(-num_bytes // self.shards)

    def transfer_ms(self, src: int, dst: int, num_bytes: float) -> float:
        """Time to move one GPU's share, `num_bytes` (`device_bytes`), from pipeline rank src to dst."""
        return self.latency_ms + num_bytes / self.bandwidth_bytes_per_s[src][dst] * 1e3

    def host_copy_ms(self, num_bytes: float) -> float:
        """Time to copy `num_bytes` of one GPU's activations to host memory, or back (0 for nothing)."""
        if num_bytes <= 0:
            return 0.0
        return self.host_latency_ms + num_bytes / self.host_bandwidth_bytes_per_s * 1e3

    @staticmethod
    def zero(pp: int) -> LinkModel:
        """Free communication: every transfer takes no time (for tests and compute-only what-ifs)."""
        return LinkModel(latency_ms=0.0, bandwidth_bytes_per_s=((math.inf,) * pp,) * pp)

    @staticmethod
    def uniform(pp: int, *, latency_ms: float, bandwidth_bytes_per_s: float) -> LinkModel:
        return LinkModel(latency_ms=latency_ms, bandwidth_bytes_per_s=((bandwidth_bytes_per_s,) * pp,) * pp)

    @staticmethod
    def from_specs(hardware: HardwareSpec, parallel: ParallelSpec, *, dp_replica: int = 0) -> LinkModel:
        """NVLink between ranks on one node, the network across nodes.

        A replica occupies pp * tp consecutive GPUs and pipeline rank r its GPU r * tp (TP groups innermost,
        so a TP group never straddles a node); node = GPU // gpus_per_node.
        """
        pp, tp = parallel.pp, parallel.tp
        base = dp_replica * pp * tp
        gpu = [base + r * tp for r in range(pp)]
        table = tuple(tuple(hardware.link_bandwidth(gpu[a], gpu[b]) for b in range(pp)) for a in range(pp))
        return LinkModel(
            latency_ms=hardware.p2p_latency_s * 1e3,
            bandwidth_bytes_per_s=table,
            shards=tp,
            host_bandwidth_bytes_per_s=hardware.host_link_bandwidth,
            host_latency_ms=HOST_COPY_LATENCY_MS,
        )


HOST_COPY_LATENCY_MS = 0.01
"""Fixed cost of one offload or prefetch copy (a cudaMemcpyAsync to pinned memory and its event: ~10 us)."""


@dataclass(frozen=True, slots=True, eq=False)
class SimResult:
    """Simulated timeline of one plan. Per-rank arrays are aligned with `plan.ranks[r].actions`."""

    start_ms: tuple[FloatArray, ...]
    end_ms: tuple[FloatArray, ...]
    makespan_ms: float
    """Latest end of any action on any rank (send waits included)."""
    busy_ms: FloatArray
    """Per rank, total compute time."""
    bubble_fraction: float
    """1 - sum(busy_ms) / (pp * makespan_ms): the idle share of the pipeline's time."""
    peak_memory_bytes: FloatArray
    """Per rank, static memory plus the largest live activation total."""
    memory_time_ms: tuple[FloatArray, ...]
    """Per rank, times at which its memory changes (the first is 0, at static memory)."""
    memory_bytes: tuple[FloatArray, ...]
    """Per rank, memory in use from the matching `memory_time_ms` on."""
    host_peak_bytes: FloatArray | None = None
    """Per rank (one GPU), the most offloaded activation bytes held in host memory at once, each from its forward's
    end to its backward's start; None when nothing offloads."""
    host_copy_ms: FloatArray | None = None
    """Per rank, the time its device-to-host direction spends copying (the other direction carries as much)."""

    @property
    def pp(self) -> int:
        return len(self.start_ms)

    def memory_timeline(self, rank: int) -> list[tuple[float, float]]:
        """(time_ms, bytes) steps of one rank's memory, in time order."""
        return list(zip(self.memory_time_ms[rank].tolist(), self.memory_bytes[rank].tolist(), strict=True))

    def to_rank_timings(self) -> tuple[tuple[tuple[float, float], ...], ...]:
        """Per rank, (start, end) of each action: what `RankPlan.predicted_ms` holds."""
        pairs = zip(self.start_ms, self.end_ms, strict=True)
        return tuple(tuple(zip(s.tolist(), e.tolist(), strict=True)) for s, e in pairs)

    def annotate(self, plan: Plan) -> Plan:
        """`plan` with every action's predicted window, the predicted makespan and per-rank peak memory."""
        timings = self.to_rank_timings()
        ranks = tuple(replace(rp, predicted_ms=timings[rp.rank]) for rp in plan.ranks)
        header = replace(
            plan.header,
            predicted_makespan_ms=self.makespan_ms,
            peak_memory_bytes=tuple(self.peak_memory_bytes.tolist()),
        )
        return replace(plan, header=header, ranks=ranks)


# ---- flattening --------------------------------------------------------------------------------------------


def _freeing_pass(header: PlanHeader, pipeline: str) -> Pass:
    """The pass whose end releases a chunk's activations; a forward-only pipeline frees them at F's end."""
    passes = backward_passes(header, pipeline)
    return passes[-1] if passes else Pass.F


def _inputs_in_activations(header: PlanHeader, frees: Mapping[str, Pass]) -> set[tuple[str, int]]:
    """The (pipeline, chunk)s whose activation bytes, from their forward's start, hold their received inputs.

    The executor allocates a receive buffer when it posts the receive and keeps the received tensor (the consumer's
    input, or the gradient of its output) until the consumer's activations are freed; SEMU counts it from the post.
    A forward input of a chunk that starts inside a module is the first block's input, which every block's
    activation bytes include: from the forward's start it counts as activations, not twice. The activations take
    over at most their own bytes, though: a chunk inside a frozen module keeps none, and a lean (full-recompute)
    chunk may keep fewer bytes than it received; the rest of the buffer counts until the chunk's activations are
    freed. At tp > 1 a GPU receives its sequence-parallel shard (`LinkModel.device_bytes`), as its activations are.
    Nothing counts the other receives, so they count until the pass that frees the consumer's activations ends:
    gradients (B or I, or W after a split backward: the executor keeps them for W), forward inputs of forward-only
    chunks (their F, the last pass that reads them), and inputs of a chunk that starts a module, which its pre part
    takes; the pre part's activation bytes hold none of an LM's image features but all of a DiT's caption, so the
    caption counts twice (~1 MB per t2v-s sub-microbatch) rather than the image features not at all (~5 MB per
    vlm-s ViT sub-microbatch).
    """
    return {
        (c.pipeline, c.index)
        for c in header.placement.chunks
        if c.layers and c.layers[0].start > 0 and frees.get(c.pipeline, Pass.F) is not Pass.F
    }


def flatten(plan: Plan, costs: StageCosts, link: LinkModel) -> FlatPlan:
    """Resolve a plan into `FlatPlan` arrays: costs per action, matched sends and receives, FIFO link chains.

    Sends and receives between two ranks match in posting order (as NCCL and gloo do); a matched pair that
    names different stages or tensors, an unmatched op, or a wait before its batch is an `InvalidPlan`.
    """
    header = plan.header
    pp = header.placement.pp
    if len(plan.ranks) != pp:
        raise InvalidPlan(f"plan has {len(plan.ranks)} rank lists, placement has pp={pp}\n{plan.text()}")
    if link.pp != pp:
        raise ValueError(f"link model covers {link.pp} ranks, plan has pp={pp}")
    if costs.static_bytes and len(costs.static_bytes) != pp:
        raise ValueError(f"static_bytes has {len(costs.static_bytes)} entries, plan has pp={pp}")
    frees = {p.name: _freeing_pass(header, p.name) for p in header.placement.pipelines}
    inputs_in_activations = _inputs_in_activations(header, frees)
    compute_ms, act_bytes, workspace = costs.compute_ms, costs.act_bytes, costs.workspace_bytes
    backward_with_workspace = (Pass.B, Pass.I)
    # Host copies (only when some forward offloads): per action, copy time, reloaded forward, prefetched
    # backward, bytes. An offloading forward copies all its activation bytes.
    offloads = any(isinstance(a, Compute) and a.offload for rp in plan.ranks for a in rp.actions)
    offload_ms: list[float] = []
    reload_ms: list[float] = []
    reload_of: list[int] = []
    prefetch_of: list[int] = []
    host_bytes: list[float] = []
    forward, send = Pass.F, Direction.SEND  # an enum member is a slow attribute lookup (~0.1 us) in this loop

    rank_offsets = [0]
    kind: list[int] = []
    duration: list[float] = []
    alloc: list[float] = []
    free: list[float] = []
    op_lo: list[int] = []
    op_hi: list[int] = []
    op_action: list[int] = []
    op_what: list[tuple[StageKey, StageKey, tuple[TensorSpec, ...]]] = []
    op_bytes: list[int] = []  # a receive's bytes (0 for a send: the matching receive has them)
    sends: dict[tuple[int, int], list[int]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[int]] = defaultdict(list)

    for r, rp in enumerate(plan.ranks):
        if rp.rank != r:
            raise InvalidPlan(f"rank list {r} is labelled rank {rp.rank}\n{plan.text()}")
        batches: dict[int, tuple[int, int]] = {}
        # Per (pipeline, chunk, microbatch, sub) of this rank: [receive bytes its forward's activations take over at
        # its start, bytes its freeing pass releases at its end] (keyed by plain tuples: cheaper to hash than stages).
        held: dict[tuple[str, int, int, int], list[float]] = {}
        offloaded: dict[tuple[str, int, int, int], int] = {}  # pair -> its offloading forward's action index
        prefetches: dict[StageKey, int] = {}  # backward stage -> its PREFETCH action's index
        for action in rp.actions:
            index = len(kind)
            lo = hi = 0
            ms = alloc_b = free_b = 0.0
            if isinstance(action, Compute):
                stage = action.stage
                cost = compute_ms.get(stage)
                if cost is None:
                    raise ValueError(f"costs have no compute time for stage {stage} (rank {r})")
                if not cost >= 0.0:
                    raise ValueError(f"compute time of stage {stage} must be non-negative, got {cost}")
                ms = cost
                is_forward = stage.pass_ is forward
                frees_here = stage.pass_ is frees.get(stage.pipeline)
                if is_forward or frees_here:
                    unit = (stage.pipeline, stage.chunk, stage.microbatch, stage.sub)
                    if is_forward:
                        alloc_b = act = act_bytes.get(stage, 0.0)
                        entry = held.get(unit)
                        if entry is None:
                            held[unit] = [0.0, act]
                        else:
                            # The activations hold at most their own bytes of the inputs (none: a frozen module).
                            taken = entry[0] if entry[0] <= act else act
                            alloc_b = act - taken
                            entry[1] += act + (entry[0] - taken)
                            entry[0] = 0.0
                    if frees_here:
                        entry = held.pop(unit, None)
                        if entry is not None:
                            free_b = entry[1]
                if workspace and stage.pass_ in backward_with_workspace:
                    extra = workspace.get((stage.pipeline, stage.chunk, stage.microbatch, stage.sub), 0.0)
                    alloc_b += extra  # from the pass's start to its end
                    free_b += extra
                if offloads:
                    copy_ms, reload = -1.0, 0.0
                    of = -1
                    moved = 0.0
                    unit = (stage.pipeline, stage.chunk, stage.microbatch, stage.sub)
                    if is_forward:
                        if action.offload:
                            moved = act_bytes.get(stage, 0.0)
                            copy_ms = link.host_copy_ms(moved)
                            offloaded[unit] = index
                    else:
                        of = offloaded.pop(unit, -1)  # the first backward pass of the pair reloads
                        if of >= 0:
                            moved = host_bytes[of]
                            reload = offload_ms[of]
                            pre = prefetches.pop(stage, -1)
                            if pre >= 0:
                                prefetch_of[pre] = index
                    offload_ms.append(copy_ms)
                    reload_ms.append(reload)
                    reload_of.append(of)
                    prefetch_of.append(-1)
                    host_bytes.append(moved)
                kind.append(COMPUTE)
            elif isinstance(action, CommBatch):
                if action.handle in batches:
                    message = f"rank {r} posts batch #{action.handle} twice"
                    raise InvalidPlan(_render(plan, r, action, message))
                lo = len(op_action)
                for op in action.ops:
                    if not 0 <= op.peer < pp or op.peer == r:
                        message = f"rank {r} has a transfer with peer {op.peer}"
                        raise InvalidPlan(_render(plan, r, action, message))
                    num_bytes = 0
                    if op.direction is send:
                        sends[(r, op.peer)].append(len(op_action))
                    else:
                        recvs[(op.peer, r)].append(len(op_action))
                        num_bytes = link.device_bytes(transfer_bytes(op.tensors))
                        if num_bytes:  # the executor allocates the buffer when it posts the receive
                            alloc_b += num_bytes
                            dst = op.dst
                            unit = (dst.pipeline, dst.chunk, dst.microbatch, dst.sub)
                            entry = held.get(unit)
                            if entry is None:
                                entry = held[unit] = [0.0, 0.0]
                            taken_over = dst.pass_ is forward and (dst.pipeline, dst.chunk) in inputs_in_activations
                            entry[0 if taken_over else 1] += num_bytes
                    op_action.append(index)
                    op_what.append((op.src, op.dst, op.tensors))
                    op_bytes.append(num_bytes)
                hi = len(op_action)
                batches[action.handle] = (lo, hi)
                kind.append(POST)
            elif isinstance(action, Prefetch):
                prefetches[action.stage] = index  # resolved when the backward comes; an unmatched one does nothing
                kind.append(PREFETCH)
            else:
                if action.handle not in batches:
                    message = f"rank {r} waits for batch #{action.handle} before posting it"
                    raise InvalidPlan(_render(plan, r, action, message))
                lo, hi = batches[action.handle]
                kind.append(WAIT)
            if offloads and not isinstance(action, Compute):
                offload_ms.append(-1.0)
                reload_ms.append(0.0)
                reload_of.append(-1)
                prefetch_of.append(-1)
                host_bytes.append(0.0)
            duration.append(ms)
            alloc.append(alloc_b)
            free.append(free_b)
            op_lo.append(lo)
            op_hi.append(hi)
        rank_offsets.append(len(kind))

    # Ops between two ranks pair up in posting order; transfer k of a directed link follows transfer k-1.
    op_match = [-1] * len(op_action)
    op_transfer = [-1] * len(op_action)
    transfer_ms: list[float] = []
    transfer_prev: list[int] = []
    for pair in sorted(set(sends) | set(recvs)):
        sender, receiver = pair
        s_ops, r_ops = sends.get(pair, []), recvs.get(pair, [])
        if len(s_ops) != len(r_ops):
            k = min(len(s_ops), len(r_ops))
            if len(s_ops) > k:
                extra, owner, side, other = s_ops[k], sender, "send", "receive"
            else:
                extra, owner, side, other = r_ops[k], receiver, "receive", "send"
            src, dst, _ = op_what[extra]
            message = (
                f"{side} {src}->{dst} from rank {sender} to rank {receiver} has no matching {other} "
                f"(transfer {k} of the pair)"
            )
            raise InvalidPlan(_render_op(plan, rank_offsets, owner, op_action[extra], message))
        prev = -1
        for k, (so, ro) in enumerate(zip(s_ops, r_ops, strict=True)):
            if op_what[so] != op_what[ro]:
                s_src, s_dst, _ = op_what[so]
                r_src, r_dst, _ = op_what[ro]
                message = (
                    f"transfer {k} from rank {sender} to rank {receiver} is sent as {s_src}->{s_dst} but "
                    f"received as {r_src}->{r_dst} (or with other shapes): point-to-point ops match in "
                    "posting order"
                )
                raise InvalidPlan(_render_op(plan, rank_offsets, receiver, op_action[ro], message))
            tr = len(transfer_ms)
            op_match[so], op_match[ro] = ro, so
            op_transfer[so] = op_transfer[ro] = tr
            transfer_ms.append(link.transfer_ms(sender, receiver, op_bytes[ro]))
            transfer_prev.append(prev)
            prev = tr
    static = list(costs.static_bytes) if costs.static_bytes else [0.0] * pp
    i64, f64 = np.int64, np.float64
    host: dict[str, np.ndarray] = {}
    if offloads:
        host = {
            "offload_ms": np.array(offload_ms, f64),
            "reload_ms": np.array(reload_ms, f64),
            "reload_of": np.array(reload_of, i64),
            "prefetch_of": np.array(prefetch_of, i64),
            "host_bytes": np.array(host_bytes, f64),
        }
    return FlatPlan(
        rank_offsets=np.array(rank_offsets, i64),
        kind=np.array(kind, i64),
        duration_ms=np.array(duration, f64),
        alloc_bytes=np.array(alloc, f64),
        free_bytes=np.array(free, f64),
        op_lo=np.array(op_lo, i64),
        op_hi=np.array(op_hi, i64),
        op_match=np.array(op_match, i64),
        op_transfer=np.array(op_transfer, i64),
        transfer_ms=np.array(transfer_ms, f64),
        transfer_prev=np.array(transfer_prev, i64),
        static_bytes=np.array(static, f64),
        op_action=np.array(op_action, i64),
        **host,
    )


# ---- simulation --------------------------------------------------------------------------------------------


def run_flat(flat: FlatPlan, *, use_numba: bool = True) -> FlatResult:
    return run_numba(flat) if use_numba else run_reference(flat)


def simulate(plan: Plan, costs: StageCosts, *, link: LinkModel, use_numba: bool = True) -> SimResult:
    """Simulate `plan`; raises `InvalidPlan` when it deadlocks or its transfers do not pair up."""
    flat = flatten(plan, costs, link)
    out = merge_host_events(flat, run_flat(flat, use_numba=use_numba))
    if out.status == DEADLOCK:
        raise InvalidPlan(_render_deadlock(plan, flat, out))
    return to_result(flat, out)


def to_result(flat: FlatPlan, out: FlatResult) -> SimResult:
    """Split a finished flat run into per-rank arrays and summary numbers."""
    pp = flat.pp
    cuts = flat.rank_offsets[1:-1]
    makespan = float(out.end_ms.max()) if out.end_ms.size else 0.0
    total_busy = float(out.busy_ms.sum())
    bubble = 1.0 - total_busy / (pp * makespan) if makespan > 0 else 0.0
    spans = list(zip(out.event_offsets[:-1].tolist(), out.event_count.tolist(), strict=True))
    return SimResult(
        start_ms=tuple(np.split(out.start_ms, cuts)),
        end_ms=tuple(np.split(out.end_ms, cuts)),
        makespan_ms=makespan,
        busy_ms=out.busy_ms,
        bubble_fraction=bubble,
        peak_memory_bytes=out.peak_bytes,
        memory_time_ms=tuple(out.event_time_ms[lo : lo + n] for lo, n in spans),
        memory_bytes=tuple(out.event_bytes[lo : lo + n] for lo, n in spans),
        **_host_usage(flat, out),
    )


def _host_usage(flat: FlatPlan, out: FlatResult) -> dict[str, FloatArray]:
    if flat.offload_ms is None or flat.reload_of is None or flat.host_bytes is None:
        return {}
    rank_of = np.repeat(np.arange(flat.pp), np.diff(flat.rank_offsets))
    back = np.flatnonzero(flat.reload_of >= 0)
    fwd = flat.reload_of[back]
    peak = np.zeros(flat.pp)
    busy = np.bincount(rank_of, weights=np.maximum(flat.offload_ms, 0.0), minlength=flat.pp).astype(np.float64)
    for r in range(flat.pp):
        mine = rank_of[back] == r
        t = np.concatenate((out.end_ms[fwd[mine]], out.start_ms[back[mine]]))
        d = np.concatenate((flat.host_bytes[fwd[mine]], -flat.host_bytes[back[mine]]))
        order = np.lexsort((d, t))
        peak[r] = float(np.cumsum(d[order]).max(initial=0.0))
    return {"host_peak_bytes": peak, "host_copy_ms": busy}


# ---- error rendering ---------------------------------------------------------------------------------------

_WINDOW = 3


def _row(actions: Sequence[Action], mark: int) -> str:
    lo, hi = max(0, mark - _WINDOW), min(len(actions), mark + _WINDOW + 1)
    cells = [f">>{a}<<" if i == mark else str(a) for i, a in enumerate(actions[lo:hi], start=lo)]
    return ("... " if lo > 0 else "") + " ".join(cells) + (" ..." if hi < len(actions) else "")


def _render(plan: Plan, rank: int, action: Action, message: str) -> str:
    actions = plan.ranks[rank].actions
    mark = next(i for i, a in enumerate(actions) if a is action)
    return f"{message}\n  rank {rank} step {mark}: {_row(actions, mark)}"


def _render_op(plan: Plan, rank_offsets: Sequence[int], rank: int, action_index: int, message: str) -> str:
    step = action_index - rank_offsets[rank]
    return f"{message}\n  rank {rank} step {step}: {_row(plan.ranks[rank].actions, step)}"


def _render_deadlock(plan: Plan, flat: FlatPlan, out: FlatResult) -> str:
    """Every stuck rank's waiting cell, and which peer op it waits for."""
    offsets = flat.rank_offsets.tolist()
    pc = out.pc.tolist()
    rank_of_action = np.repeat(np.arange(flat.pp), np.diff(flat.rank_offsets))
    lines = ["plan deadlocks: every unfinished rank waits for a transfer its peer has not posted"]
    for r in range(flat.pp):
        if pc[r] >= offsets[r + 1]:
            lines.append(f"  rank {r}: done")
            continue
        step = pc[r] - offsets[r]
        lines.append(f"  rank {r} step {step}: {_row(plan.ranks[r].actions, step)}")
        for o in range(int(flat.op_lo[pc[r]]), int(flat.op_hi[pc[r]])):
            peer_action = int(flat.op_action[flat.op_match[o]])
            peer = int(rank_of_action[peer_action])
            if peer_action >= pc[peer]:
                lines.append(
                    f"    needs rank {peer} step {peer_action - offsets[peer]} "
                    f"({plan.ranks[peer].actions[peer_action - offsets[peer]]}), not reached"
                )
    return "\n".join(lines)

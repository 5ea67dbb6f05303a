"""Runs one rank's share of a plan with torch: chunk forwards and backwards, batched point-to-point transfers.

The executor holds only the chunks placed on its rank. `run_iteration` first proves the plan (validator, placement,
sub-microbatch coverage, transfer shapes against the batch) and refuses it with `InvalidPlan` before touching a
tensor; then it walks the rank's actions: a `CommBatch` posts `batch_isend_irecv` with receive buffers allocated
from the plan's shapes (no handshake), a `Wait` completes a batch, a `Compute` runs F, B, I or W of a chunk on a
sub-microbatch. Every chunk boundary is an autograd boundary, even between two chunks on one rank: a chunk's
inputs are fresh leaves and gradients travel as explicit tensors, exactly as they would between ranks.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeweaver.client.cuda_env import warn_if_unprepared_for_dynamic_pipelines
from pipeweaver.client.data import SyntheticData, stable_seed
from pipeweaver.client.geometry import Geometry, LossScale, geometry
from pipeweaver.client.host_gc import FULL_PASS_EVERY, CollectorClock, is_settled, settle_host_objects
from pipeweaver.client.kernel_warmup import warm_up_gemms, warm_up_rows
from pipeweaver.client.models import (
    BlockPart,
    ModalityModule,
    Piece,
    PostPart,
    PrePart,
    Stream,
    build_part,
    part_key,
    reference_modules,
)
from pipeweaver.client.offload import HostStore
from pipeweaver.errors import InvalidPlan
from pipeweaver.plan.fuse import has_fused_batches
from pipeweaver.plan.graph import StageGraph, stage_graph
from pipeweaver.plan.ir import (
    Chunk,
    CommBatch,
    Compute,
    Direction,
    LayerRange,
    Pass,
    Placement,
    Plan,
    PlanSource,
    Prefetch,
    Recompute,
    StageKey,
    SubMicrobatch,
    Transfer,
    Wait,
)
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.plan.validator import runs_on_one_communicator, validate
from pipeweaver.spec.batch import BatchMetadata, module_instances
from pipeweaver.spec.model import ModelSpec

__all__ = ["IterationStats", "PipelineExecutor", "wire_dtype"]

_WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger("pipeweaver.client")

CHECKED_PLANS = 4
"""Accepted plans an executor remembers: the one running, the next ones checked ahead (prefetch lookahead <= 3)."""

Edge = tuple[StageKey, StageKey]
ChunkId = tuple[str, int]
Unit = tuple[str, int, int, int]
"""(pipeline, chunk, microbatch, sub-microbatch): one chunk's work on one sub-microbatch, across its passes."""


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype of a plan's `TensorSpec.dtype`."""
    try:
        return _WIRE_DTYPES[name]
    except KeyError:
        raise InvalidPlan(f"unsupported transfer dtype '{name}'; use one of {sorted(_WIRE_DTYPES)}") from None


@dataclass(slots=True)
class _CheckedPlan:
    """A plan this executor accepted for a batch: its stage graph and, once asked for, the digest the ranks vote
    on (`run_with_fallback` only: a plain `run_iteration` never hashes its plan)."""

    plan: Plan
    batch: BatchMetadata
    graph: StageGraph
    digest: int | None = None
    warmed: bool = False
    """Its computes' new GEMM row counts were loaded ahead (`prepare`)."""
    fits_one_communicator: bool = False
    """The executor has pair groups and the plan, fused, is proven on the pipeline's one communicator too (see
    `one_communicator_plans`, read when the plan runs)."""

    def vote_digest(self) -> int:
        if self.digest is None:
            # Every rank of the pipeline must hold the same actions, not just the same header: the digest of the
            # bytes the plan was decoded from when it came from the service, else of the whole object graph.
            wire = self.plan.wire_digest
            self.digest = wire if wire is not None else stable_seed("plan", repr(self.plan)) & ((1 << 62) - 1)
        return self.digest


@dataclass(frozen=True, slots=True)
class IterationStats:
    """What one rank did in one iteration."""

    iteration: int
    schedule: str
    source: PlanSource
    loss: float
    """Sum of the losses this rank's chunks computed (the iteration loss is the sum over ranks)."""
    computes: int
    sent_bytes: int
    received_bytes: int
    wall_ms: float
    fallback_reason: str = ""
    """Why a fallback plan ran instead of the planner's (empty when it did not)."""
    warmed_gemms: int = 0
    """(layer, row count) pairs whose kernels were loaded at the start of the iteration (new shapes)."""
    warm_ms: float = 0.0
    """Part of `wall_ms` spent loading them (device work included): a cost of shapes new to the process, which a
    long run pays once per shape."""
    sends_released_early: int = 0
    """Send batches whose tensors were dropped on completion, before the plan's Wait for them."""
    dispatch_ms: float = 0.0
    """Host time from the iteration's start until every action was issued: when it is close to `wall_ms`, the
    host, not the device, set the iteration's pace."""
    idle_hook_ms: float = 0.0
    """Host time in `idle_hook` (checking the next plans, loading their kernels), and in the executor's periodic
    full garbage collection when this iteration ran it (`settle_gc`)."""
    drain_ms: float = 0.0
    """Host time waiting for the device at the end: near zero means the hook or the dispatch was the bottleneck
    (the device had finished before the host got there)."""
    hook_check_ms: float = 0.0
    """Part of `idle_hook_ms` in which `prepare` checked plans (graph, validator, shapes, vote digest)."""
    hook_warm_ms: float = 0.0
    """Part of `idle_hook_ms` in which `prepare` loaded new GEMM shapes' kernels (GPUs)."""
    gc_ms: float = 0.0
    """Host time in the cyclic garbage collector during the iteration, hook included (`host_gc`)."""
    gc_passes: tuple[int, int, int] = (0, 0, 0)
    """The collector's passes per generation during the iteration (2: full passes)."""
    one_communicator: bool = False
    """The plan's transfers bypassed this executor's pair groups for the pipeline's one communicator
    (`one_communicator_plans`)."""
    offloaded_bytes: int = 0
    """Saved activation bytes this rank's offloading forwards copied to host memory (`Compute.offload`)."""


@dataclass(slots=True)
class _Part:
    """The layers of one module that a chunk holds, with the module's pre/post parts when it holds its ends."""

    layers: LayerRange
    pre: PrePart | None
    blocks: list[BlockPart]
    post: PostPart | None


@dataclass(slots=True)
class _Unit:
    """Autograd state of one chunk on one sub-microbatch, from its forward to its last backward pass."""

    recompute: Recompute
    inputs: dict[StageKey, tuple[Tensor, ...]]
    """Producer forward stage -> the leaves received from it (gradients go back to its backward)."""
    outputs: dict[StageKey, tuple[Tensor, ...]]
    """Consumer forward stage -> the tensors handed to it (its backward returns their gradients)."""
    loss: Tensor | None
    pending: tuple[list[Tensor], list[Tensor]] | None = None
    """(outputs, their gradients) kept by I for W."""
    host: HostStore | None = None
    """Its saved tensors in host memory, when its forward offloaded them."""


@dataclass(slots=True)
class _Iteration:
    """Per-iteration state: nothing here survives into the next iteration (shapes change every batch)."""

    plan: Plan
    batch: BatchMetadata
    graph: StageGraph
    data: SyntheticData
    scale: LossScale
    subs: dict[tuple[str, int, int], SubMicrobatch]
    mailbox: dict[Edge, tuple[Tensor, ...]] = field(default_factory=dict)
    outbox: dict[Edge, tuple[Tensor, ...]] = field(default_factory=dict)
    units: dict[Unit, _Unit] = field(default_factory=dict)
    geometries: dict[tuple[str, int, tuple[int, ...]], Geometry] = field(default_factory=dict)
    in_flight: dict[int, tuple[list[dist.Work], list[tuple[Edge, list[Tensor]]], list[Tensor]]] = field(
        default_factory=dict
    )
    losses: list[Tensor] = field(default_factory=list)
    """Detached losses, summed once at the end: reading each on the host would stall the GPU pipeline."""
    computes: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    warmed_gemms: int = 0
    sends_released: int = 0
    sends_in_flight: deque[int] = field(default_factory=deque)
    """Handles of posted send-only batches, oldest first, whose tensors are still held (see `_release_sent`)."""
    one_communicator: bool = False
    """Every transfer goes through the pipeline's communicator, not the pair groups."""
    offloaded_bytes: int = 0


def _checkpointed(block: BlockPart, stream: Stream, geom: Geometry) -> Stream:
    """FULL recompute, one block at a time (SEMU's model of it): the forward keeps each block's input (and the DiT's
    caption once, shared by every block), and the backward recomputes one block's forward at a time, so its
    activations are alive for that block's backward only. Checkpointing the whole chunk instead keeps less (its
    input alone) but recomputes every block before the first backward, holding the whole chunk's activations at
    once: a peak SEMU would not see."""
    if stream.context is None:

        def hidden_only(h: Tensor) -> Tensor:
            return block.run(Stream(h), geom, False).hidden

        out: Tensor = checkpoint(hidden_only, stream.hidden, use_reentrant=False)
        return Stream(out)

    def with_context(h: Tensor, c: Tensor) -> Tensor:
        return block.run(Stream(h, c), geom, False).hidden

    out = checkpoint(with_context, stream.hidden, stream.context, use_reentrant=False)
    return Stream(out, stream.context)


def _unit(s: StageKey) -> Unit:
    return (s.pipeline, s.chunk, s.microbatch, s.sub)


class PipelineExecutor:
    """One pipeline rank of a job: builds the chunks `placement` puts on `rank` and executes plans for them.

    `pp_ranks[r]` is the global rank of pipeline rank r (default: r); `pp_group` is the process group of this
    pipeline (default: the world). `dp_group`, when given, all-reduces (averages) gradients across data-parallel
    replicas after each plan.

    `pair_groups` gives every *directed* pair of pipeline ranks its own process group (communicator). NCCL runs a
    communicator's point-to-point groups in posting order on one stream, so with a single communicator a send that
    its receiver posts much later (searched plans run encoder forwards long before the backbone consumes them)
    blocks the sender's later receives, and the ranks can deadlock; with one communicator per direction of every
    pair, each communicator sees exactly the per-pair FIFO order that the plan validator proves deadlock-free.
    Default: on for NCCL, off otherwise (gloo buffers sends). Creating groups is collective: every process of the
    world must construct its executor, and `pipelines` lists every pipeline's global ranks (default: this one
    only, i.e. dp = 1), so all processes create the same groups in the same order.
    """

    def __init__(
        self,
        model: ModelSpec,
        placement: Placement,
        rank: int,
        *,
        pp_ranks: Sequence[int] | None = None,
        pp_group: dist.ProcessGroup | None = None,
        dp_group: dist.ProcessGroup | None = None,
        modules: Mapping[str, ModalityModule] | None = None,
        init_seed: int = 0,
        data_seed: int = 0,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        pair_groups: bool | None = None,
        pipelines: Sequence[Sequence[int]] | None = None,
        settle_gc: bool | None = None,
    ) -> None:
        if not 0 <= rank < placement.pp:
            raise ValueError(f"rank must be in [0, {placement.pp}) for a placement of pp={placement.pp}, got {rank}")
        self.model = model
        self.placement = placement
        self.rank = rank
        self.pp_ranks = tuple(pp_ranks) if pp_ranks is not None else tuple(range(placement.pp))
        if len(self.pp_ranks) != placement.pp:
            raise ValueError(f"pp_ranks has {len(self.pp_ranks)} entries, placement has pp={placement.pp}")
        self.pp_group = pp_group
        self.dp_group = dp_group
        self.data_seed = data_seed
        self.device = device or torch.device("cpu")
        # Synthetic inputs are drawn where they are used (see pipeweaver.client.data).
        self._data_device = str(self.device) if self.device.type == "cuda" else "cpu"
        self.warm_new_shapes = self.device.type == "cuda"
        """Load new GEMM shapes' kernels at the start of each iteration, or ahead in `prepare`
        (`pipeweaver.client.kernel_warmup`)."""
        self.prewarmed_gemms = 0
        """(layer, rows) pairs `prepare` loaded ahead of their iteration, since this executor was built."""
        self.prepare_ms = {"check": 0.0, "warm": 0.0}
        """Host time `prepare` spent checking plans and loading their kernels, since this executor was built."""
        self.settle_gc = self.device.type == "cuda" if settle_gc is None else settle_gc
        """Manage the process's garbage collector (`pipeweaver.client.host_gc`): after the first iteration, freeze
        the surviving objects out of its passes and switch its automatic passes off (unless the process is settled
        already), then run a full pass every `full_pass_every` iterations. On host-bound GPU ranks the automatic
        passes would land inside iterations. Process-wide; default on for CUDA devices."""
        self.full_pass_every = FULL_PASS_EVERY
        self.iterations_run = 0
        self._gc_clock = CollectorClock()
        self.dtype = dtype
        self._offload_streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None
        """(device-to-host, host-to-device) side streams of activation offloading, made on first use."""
        self.modules = dict(modules) if modules is not None else reference_modules(model)
        self.parts: dict[str, nn.Module] = {}
        self.chunks: dict[ChunkId, list[_Part]] = {}
        self._chunk_of: dict[ChunkId, Chunk] = {(c.pipeline, c.index): c for c in placement.chunks}
        for chunk in placement.chunks:
            if chunk.rank == rank:
                self.chunks[(chunk.pipeline, chunk.index)] = self._build_chunk(chunk, init_seed)
        self._pair_group: dict[tuple[int, int], dist.ProcessGroup] = {}
        self._checked: OrderedDict[int, _CheckedPlan] = OrderedDict()
        """Recently accepted plans by identity (see `check`), newest last, at most `CHECKED_PLANS`."""
        self.idle_hook: Callable[[], object] | None = None
        """Called once per iteration once the iteration's work is all queued on the device, before the host waits
        for it to finish: the host is idle there, so it is the place to check the plans of the next iterations
        (`PlanPrefetcher.prepare_arrived` with `prepare`). An exception in it is logged, never raised."""
        self.one_communicator_plans = True
        """Run a plan on the pipeline's one communicator, even when pair groups exist, if it has batches that both
        send and receive (`pipeweaver.plan.fuse`) and the validator proves it on one communicator: each such batch
        is then one NCCL group, one kernel for both directions (torch's `Schedule1F1B` runs this way)."""
        if pair_groups is None:
            pair_groups = dist.is_initialized() and dist.get_backend() == "nccl"
        if pair_groups and placement.pp > 1 and dist.is_initialized():
            self._create_pair_groups(pipelines or [self.pp_ranks])
        if self.device.type == "cuda" and placement.pp > 1:
            warn_if_unprepared_for_dynamic_pipelines()

    def _create_pair_groups(self, pipelines: Sequence[Sequence[int]]) -> None:
        """One group per directed pair (a -> b) of pipeline ranks, for every pipeline, in the same order on every
        process (new_group is collective over the world)."""
        mine = tuple(self.pp_ranks)
        for ranks in pipelines:
            for a in range(len(ranks)):
                for b in range(len(ranks)):
                    if a == b:
                        continue
                    group = dist.new_group([ranks[a], ranks[b]])
                    if tuple(ranks) == mine:
                        self._pair_group[(a, b)] = group

    def _group_for(self, it: _Iteration, direction: Direction, peer: int) -> dist.ProcessGroup | None:
        """The communicator of this op: its directed pair's own group, else the pipeline's."""
        if not self._pair_group or it.one_communicator:
            return self.pp_group
        key = (self.rank, peer) if direction is Direction.SEND else (peer, self.rank)
        return self._pair_group[key]

    # ---- model --------------------------------------------------------------------------------------------

    def _build(self, module: str, part: str | int, seed: int) -> nn.Module | None:
        built = build_part(self.modules[module], part, seed=seed, device=self.device, dtype=self.dtype)
        if built is not None:
            self.parts[part_key(module, part)] = built
        return built

    def _build_chunk(self, chunk: Chunk, seed: int) -> list[_Part]:
        out: list[_Part] = []
        for rng in chunk.layers:
            spec = self.model.module(rng.module)
            pre = self._build(rng.module, "pre", seed) if rng.start == 0 else None
            blocks = [self._build(rng.module, i, seed) for i in range(rng.start, rng.stop)]
            post = self._build(rng.module, "post", seed) if rng.stop == spec.layers else None
            assert pre is None or isinstance(pre, PrePart)
            assert post is None or isinstance(post, PostPart)
            assert all(isinstance(b, BlockPart) for b in blocks)
            out.append(_Part(rng, pre, [b for b in blocks if isinstance(b, BlockPart)], post))
        return out

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their global names (``llm.blocks.3.q.weight``)."""
        for key, part in self.parts.items():
            for name, p in part.named_parameters():
                yield f"{key}.{name}", p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def gradients(self) -> dict[str, Tensor]:
        """Gradient of every trainable parameter of this rank (zeros where the iteration did not reach it)."""
        return {
            name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in self.named_parameters()
            if p.requires_grad
        }

    def _chunk_params(self, chunk: list[_Part]) -> list[nn.Parameter]:
        parts: list[nn.Module] = [m for part in chunk for m in (part.pre, *part.blocks, part.post) if m is not None]
        return [p for m in parts for p in m.parameters() if p.requires_grad]

    # ---- checks -------------------------------------------------------------------------------------------

    def check(self, plan: Plan, batch: BatchMetadata) -> StageGraph:
        """Raise `InvalidPlan` unless `plan` is valid, fits this executor's placement and was built for `batch`.

        Touches no tensor and no process group, so every rank refuses the same plan the same way. Plans and batches
        are immutable, so the last few accepted pairs are remembered: a plan checked ahead (`prepare`) or run again
        (fixed shapes) is not checked twice on the iteration's critical path.
        """
        return self._accepted(plan, batch).graph

    def prepare(self, plan: Plan, batch: BatchMetadata) -> None:
        """Check `plan` for `batch` now (raises `InvalidPlan`) and remember it with its digest, so that running it
        later costs neither: about 40 ms of host time for a 1,300-action plan of the scaled VLM on a slow core,
        time in which the device would otherwise sit idle at the start of the iteration.

        On GPUs (`warm_new_shapes`) it also loads the GEMM kernels of the plan's new row counts
        (`pipeweaver.client.kernel_warmup`), which the iteration would otherwise do at its start with the device
        idle (40-120 ms per iteration of the 4-GPU T2V runs: per-batch sub-microbatches bring new token counts
        every iteration). Call it with none of this rank's work waiting for a peer's host, as the idle hook is
        (every action of the running iteration is queued, so every transfer completes and the device drains
        for the load), or between iterations."""
        t0 = time.perf_counter()
        try:
            entry = self._accepted(plan, batch)
            entry.vote_digest()
        finally:
            t1 = time.perf_counter()
            self.prepare_ms["check"] += (t1 - t0) * 1e3
        if self.warm_new_shapes and not entry.warmed:
            entry.warmed = True
            self.prewarmed_gemms += self._warm_rows(self._gemm_rows(self._iteration(plan, batch, entry.graph)))
            self.prepare_ms["warm"] += (time.perf_counter() - t1) * 1e3

    def _accepted(self, plan: Plan, batch: BatchMetadata) -> _CheckedPlan:
        key = id(plan)
        hit = self._checked.get(key)
        if hit is not None and hit.plan is plan and (hit.batch is batch or hit.batch == batch):
            self._checked.move_to_end(key)
            return hit
        graph, fits_one = self._check(plan, batch)
        entry = _CheckedPlan(plan=plan, batch=batch, graph=graph, fits_one_communicator=fits_one)
        self._checked[key] = entry
        while len(self._checked) > CHECKED_PLANS:
            self._checked.popitem(last=False)
        return entry

    def _check(self, plan: Plan, batch: BatchMetadata) -> tuple[StageGraph, bool]:
        """The plan's stage graph, and whether it may run on the pipeline's one communicator (this executor has
        pair groups and the plan, fused, is proven there too; see `one_communicator_plans`). The same answers on
        every rank: they depend on the plan alone."""
        graph = stage_graph(plan.header)
        fits_one = False
        if self._pair_group and has_fused_batches(plan):
            fits_one = runs_on_one_communicator(plan, graph=graph)
        else:
            validate(plan, graph=graph)
        h = plan.header
        if h.placement != self.placement:
            raise InvalidPlan(
                f"plan '{h.job_id}' iteration {h.iteration} ({h.schedule}) uses another placement than this "
                "executor's; placements are static for a job (rebuild the executor to change it)"
            )
        if h.num_microbatches != len(batch.microbatches):
            raise InvalidPlan(
                f"plan '{h.job_id}' iteration {h.iteration} has {h.num_microbatches} microbatches, the batch has "
                f"{len(batch.microbatches)}; the plan was built for another batch"
            )
        self._check_coverage(plan, batch)
        shapes = TransferShapes(self.model, batch, h, dtype="float32")
        for rp in plan.ranks:
            for i, action in enumerate(rp.actions):
                if not isinstance(action, CommBatch):
                    continue
                for op in action.ops:
                    want = tuple(t.shape for t in shapes.tensors(op.src, op.dst))
                    got = tuple(t.shape for t in op.tensors)
                    if want != got:
                        raise InvalidPlan(
                            f"rank {rp.rank} step {i}: {op} carries shapes {list(got)} but this batch needs "
                            f"{list(want)}; the plan was built for another batch"
                        )
                    for t in op.tensors:
                        wire_dtype(t.dtype)
        return graph, fits_one

    def _check_coverage(self, plan: Plan, batch: BatchMetadata) -> None:
        """Every instance of every module of every microbatch is in exactly one sub-microbatch of its pipeline."""
        h = plan.header
        for info in h.placement.pipelines:
            for j, mb in enumerate(batch.microbatches):
                subs = h.subs_of(info.name, j)
                indices = sorted(s.index for s in subs)
                if indices != list(range(len(subs))):
                    raise InvalidPlan(
                        f"pipeline '{info.name}' microbatch {j}: sub-microbatch indices {indices} are not "
                        f"0..{len(subs) - 1}"
                    )
                for module in info.modules:
                    n = len(module_instances(self.model, module, mb))
                    got = sorted(i for s in subs for i in s.instances_of(module))
                    if got != list(range(n)) and not (n == 0 and not got):
                        raise InvalidPlan(
                            f"pipeline '{info.name}' microbatch {j}: the sub-microbatches carry instances {got} of "
                            f"module '{module}', which has {n} in this batch; each must be carried exactly once "
                            "(was the plan built for another batch?)"
                        )
                    if n and not subs:
                        raise InvalidPlan(
                            f"pipeline '{info.name}' microbatch {j}: module '{module}' has {n} instances but the "
                            "plan has no sub-microbatch for them (was the plan built for another batch?)"
                        )

    # ---- running ------------------------------------------------------------------------------------------

    def run_iteration(
        self, plan: Plan, batch: BatchMetadata, *, optimizer: torch.optim.Optimizer | None = None
    ) -> IterationStats:
        """Run this rank's actions of `plan` on `batch`, all-reduce gradients across replicas, step `optimizer`.

        Raises `InvalidPlan` (before any tensor or communication) for a plan that fails `check`.
        """
        self._gc_clock.start()
        try:
            stats = self._run_iteration(plan, batch, optimizer)
        finally:
            self._gc_clock.stop()
        self.iterations_run += 1
        if self.settle_gc and self.iterations_run == 1 and not is_settled():
            # The trainer's long-lived objects exist now (chunks, optimizer state, CUDA/NCCL wrappers, kernels).
            settle_host_objects()
        return stats

    def _run_iteration(
        self, plan: Plan, batch: BatchMetadata, optimizer: torch.optim.Optimizer | None
    ) -> IterationStats:
        start = time.perf_counter()
        self._gc_clock.take()
        entry = self._accepted(plan, batch)
        it = self._iteration(plan, batch, entry.graph)
        it.one_communicator = self.one_communicator_plans and entry.fits_one_communicator
        for p in self.parameters():
            p.grad = None
        warm_ms = 0.0
        if self.warm_new_shapes:
            t_warm = time.perf_counter()
            self._warm_new_rows(it)
            if it.warmed_gemms and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # its device time too; nothing of the iteration is in flight
            warm_ms = (time.perf_counter() - t_warm) * 1e3
        for action in plan.ranks[self.rank].actions:
            if isinstance(action, Compute):
                self._compute(it, action)
            elif isinstance(action, CommBatch):
                self._post(it, action)
            elif isinstance(action, Wait):
                self._wait(it, action.handle)
            elif isinstance(action, Prefetch):
                self._prefetch(it, action.stage)
        it.units.clear()
        loss_sum = torch.stack(it.losses).double().sum() if it.losses else None
        self._all_reduce_gradients()
        if optimizer is not None:
            optimizer.step()
        t_hook = time.perf_counter()
        before = dict(self.prepare_ms)
        self._run_idle_hook()  # everything is queued: the host has time while the device finishes
        if self.settle_gc and is_settled() and (self.iterations_run + 1) % self.full_pass_every == 0:
            gc.collect()  # the automatic passes are off (host_gc): every rank collects in the same iteration
        t_drain = time.perf_counter()
        loss = float(loss_sum) if loss_sum is not None else 0.0
        if self.device.type == "cuda":  # kernels run asynchronously: time the work, not its launch
            torch.cuda.synchronize(self.device)
        t_end = time.perf_counter()
        collector = self._gc_clock.take()
        h = plan.header
        return IterationStats(
            iteration=h.iteration,
            schedule=h.schedule,
            source=h.source,
            loss=loss,
            computes=it.computes,
            sent_bytes=it.sent_bytes,
            received_bytes=it.received_bytes,
            wall_ms=(time.perf_counter() - start) * 1e3,
            warmed_gemms=it.warmed_gemms,
            warm_ms=warm_ms,
            sends_released_early=it.sends_released,
            dispatch_ms=(t_hook - start) * 1e3,
            idle_hook_ms=(t_drain - t_hook) * 1e3,
            hook_check_ms=self.prepare_ms["check"] - before["check"],
            hook_warm_ms=self.prepare_ms["warm"] - before["warm"],
            drain_ms=(t_end - t_drain) * 1e3,
            gc_ms=collector.ms,
            gc_passes=collector.collections,
            one_communicator=it.one_communicator,
            offloaded_bytes=it.offloaded_bytes,
        )

    def _run_idle_hook(self) -> None:
        hook = self.idle_hook
        if hook is None:
            return
        try:
            hook()
        except Exception:  # the hook prepares future iterations: this one must not fail because of it
            log.warning("rank %d: the executor's idle hook failed", self.rank, exc_info=True)

    def run_with_fallback(
        self,
        plan: Plan | None,
        batch: BatchMetadata,
        fallback: Callable[[BatchMetadata], Plan],
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> IterationStats:
        """Run `plan` if every rank of the pipeline holds the same valid plan, else `fallback(batch)` everywhere.

        One small all-reduce over the pipeline group makes the decision unanimous: a rank whose plan is missing,
        late or invalid, or differs from its peers', sends everyone to the fallback instead of deadlocking them.
        """
        reason = ""
        digest = 0
        if plan is None:
            reason = "no plan arrived"
        else:
            try:
                digest = self._accepted(plan, batch).vote_digest()
            except InvalidPlan as e:
                reason = f"invalid plan: {str(e).splitlines()[0]}"
        ok = 0 if reason else 1
        votes = torch.tensor([ok, digest >> 31, digest & ((1 << 31) - 1)], dtype=torch.int64)
        votes = torch.cat([votes, -votes[1:]]).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(votes, op=dist.ReduceOp.MIN, group=self.pp_group)
        agreed = int(votes[0]) == 1 and int(votes[1]) == -int(votes[3]) and int(votes[2]) == -int(votes[4])
        if agreed and plan is not None:
            return self.run_iteration(plan, batch, optimizer=optimizer)
        if not reason:
            reason = "another rank had no valid plan, or a different one"
        stats = self.run_iteration(fallback(batch), batch, optimizer=optimizer)
        return replace(stats, source=PlanSource.FALLBACK, fallback_reason=reason)

    def warm_up(self) -> None:
        """One ring exchange in which every pipeline rank takes part (NCCL's first batched p2p call must involve
        all ranks of the group in some torch versions). Call once after the process group starts."""
        pp = self.placement.pp
        if pp == 1 or not dist.is_initialized():
            return
        send = torch.zeros(1, device=self.device)
        recv = torch.empty(1, device=self.device)
        ops = [
            dist.P2POp(dist.isend, send, self.pp_ranks[(self.rank + 1) % pp], group=self.pp_group),
            dist.P2POp(dist.irecv, recv, self.pp_ranks[(self.rank - 1) % pp], group=self.pp_group),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def _iteration(self, plan: Plan, batch: BatchMetadata, graph: StageGraph) -> _Iteration:
        return _Iteration(
            plan=plan,
            batch=batch,
            graph=graph,
            data=SyntheticData(
                seed=self.data_seed, iteration=batch.iteration, dp_replica=batch.dp_replica, device=self._data_device
            ),
            scale=LossScale.of(self.model, batch),
            subs={(s.pipeline, s.microbatch, s.index): s for s in plan.header.sub_microbatches},
        )

    def _warm_new_rows(self, it: _Iteration) -> None:
        """Load the GEMM kernels of the row counts this iteration's computes use that this process has not run
        (see `pipeweaver.client.kernel_warmup`): now, before any transfer of the iteration is posted. Nothing
        when `prepare` loaded them ahead."""
        it.warmed_gemms += self._warm_rows(self._gemm_rows(it))

    def _gemm_rows(self, it: _Iteration) -> dict[tuple[ChunkId, int], set[int]]:
        """Row counts per (chunk, part) of this rank's forward computes (backward runs the same GEMM shapes)."""
        rows: dict[tuple[ChunkId, int], set[int]] = {}
        for action in it.plan.ranks[self.rank].actions:
            if not isinstance(action, Compute) or action.stage.pass_ is not Pass.F:
                continue
            s = action.stage
            sub = it.subs[(s.pipeline, s.microbatch, s.sub)]
            for k, part in enumerate(self.chunks[(s.pipeline, s.chunk)]):
                rng = part.layers
                geom = self._geometry(it, rng.module, s.microbatch, sub.instances_of(rng.module))
                rows.setdefault(((s.pipeline, s.chunk), k), set()).update(geom.gemm_rows())
        return rows

    def _warm_rows(self, rows: dict[tuple[ChunkId, int], set[int]]) -> int:
        runs = 0
        for ((pipeline, chunk), k), counts in rows.items():
            part = self.chunks[(pipeline, chunk)][k]
            modules = [m for m in (part.pre, *part.blocks, part.post) if m is not None]
            runs += warm_up_rows(modules, counts)
        return runs

    def warm_up_kernels(self, max_rows: int) -> int:
        """Load the GEMM kernels of this rank's chunks for every row count up to `max_rows` (the most tokens or
        patches one sub-microbatch of the run can have): see `pipeweaver.client.kernel_warmup`. Call before the
        first iteration on GPUs; returns the number of (layer, rows) pairs run."""
        parts = [p for chunk in self.chunks.values() for p in chunk]
        modules = [m for p in parts for m in (p.pre, *p.blocks, p.post) if m is not None]
        runs = warm_up_gemms(modules, max_rows)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return runs

    def _all_reduce_gradients(self) -> None:
        if self.dp_group is None:
            return
        world = dist.get_world_size(self.dp_group)
        for p in self.parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.dp_group)
            p.grad.div_(world)

    # ---- communication ------------------------------------------------------------------------------------

    def _post(self, it: _Iteration, batch: CommBatch) -> None:
        ops: list[dist.P2POp] = []
        groups: list[dist.ProcessGroup | None] = []
        recvs: list[tuple[Edge, list[Tensor]]] = []
        keep: list[Tensor] = []
        for op in batch.ops:
            peer = self.pp_ranks[op.peer]
            if op.direction is Direction.SEND:
                for t in self._outgoing(it, op):
                    keep.append(t)
                    if t.numel():  # both ends know the shape: empty tensors are not sent at all
                        group = self._group_for(it, Direction.SEND, op.peer)
                        ops.append(dist.P2POp(dist.isend, t, peer, group=group))
                        groups.append(group)
                        it.sent_bytes += t.numel() * t.element_size()
            else:
                bufs = [
                    torch.empty(spec.shape, dtype=wire_dtype(spec.dtype), device=self.device) for spec in op.tensors
                ]
                for t in bufs:
                    if t.numel():
                        group = self._group_for(it, Direction.RECV, op.peer)
                        ops.append(dist.P2POp(dist.irecv, t, peer, group=group))
                        groups.append(group)
                        it.received_bytes += t.numel() * t.element_size()
                recvs.append(((op.src, op.dst), bufs))
        works: list[dist.Work] = []
        # batch_isend_irecv coalesces ops of one group: post one call per communicator, each in plan order.
        for group in dict.fromkeys(groups):
            mine = [o for o, g in zip(ops, groups, strict=True) if g is group]
            works.extend(w for w in dist.batch_isend_irecv(mine) if w is not None)
        it.in_flight[batch.handle] = (works, recvs, keep)
        if works and not recvs:
            it.sends_in_flight.append(batch.handle)

    def _release_sent(self, it: _Iteration) -> None:
        """Drop the tensors of send batches that have completed, oldest first, without waiting: a plan may wait for
        its sends only at the end of the iteration, and holding every sent activation and gradient until then
        costs memory SEMU does not count (about 9 GB on a vlm-s rank). A batch's `Wait` still comes and then
        finds nothing left to do. NCCL works report completion from their CUDA event; gloo's send works report it
        only once waited, so on gloo this releases nothing (and costs one call per compute)."""
        q = it.sends_in_flight
        while q:
            handle = q[0]
            entry = it.in_flight.get(handle)
            if entry is not None and not all(w.is_completed() for w in entry[0]):
                return
            q.popleft()
            if entry is not None:  # not waited yet: keep the handle for its Wait, drop the works and tensors
                it.in_flight[handle] = ([], [], [])
                it.sends_released += 1

    def _outgoing(self, it: _Iteration, op: Transfer) -> list[Tensor]:
        tensors = it.outbox.pop((op.src, op.dst))
        if len(tensors) != len(op.tensors) or any(
            tuple(t.shape) != spec.shape for t, spec in zip(tensors, op.tensors, strict=False)
        ):
            raise RuntimeError(
                f"rank {self.rank}: {op} should carry {[s.shape for s in op.tensors]} but the chunk produced "
                f"{[tuple(t.shape) for t in tensors]}; the model and the plan's shapes disagree"
            )
        return [t.detach().to(wire_dtype(s.dtype)).contiguous() for t, s in zip(tensors, op.tensors, strict=True)]

    def _wait(self, it: _Iteration, handle: int) -> None:
        works, recvs, _ = it.in_flight.pop(handle)
        for work in works:
            work.wait()
        for edge, bufs in recvs:
            it.mailbox[edge] = tuple(b.to(self.dtype) for b in bufs)

    def _deliver(self, it: _Iteration, src: StageKey, dst: StageKey, tensors: tuple[Tensor, ...]) -> None:
        if it.graph.rank[dst] == self.rank:
            it.mailbox[(src, dst)] = tensors
        else:
            it.outbox[(src, dst)] = tensors

    # ---- compute ------------------------------------------------------------------------------------------

    def _compute(self, it: _Iteration, action: Compute) -> None:
        it.computes += 1
        if it.sends_in_flight:
            self._release_sent(it)
        s = action.stage
        if s.pass_ is Pass.F:
            self._forward(it, s, action.recompute, action.offload)
        elif s.pass_ is Pass.W:
            self._weight_backward(it, s)
        else:
            self._backward(it, s)

    def _geometry(self, it: _Iteration, module: str, microbatch: int, instances: tuple[int, ...]) -> Geometry:
        key = (module, microbatch, instances)
        if key not in it.geometries:
            it.geometries[key] = geometry(
                self.model,
                it.batch,
                module,
                microbatch,
                instances,
                it.data,
                it.scale,
                device=self.device,
                dtype=self.dtype,
            )
        return it.geometries[key]

    def _host_store(self, chunk: list[_Part]) -> HostStore:
        if self.device.type == "cuda" and self._offload_streams is None:
            streams = [torch.cuda.Stream(self.device) for _ in range(2)]  # type: ignore[no-untyped-call]
            self._offload_streams = (streams[0], streams[1])
        out, back = self._offload_streams if self._offload_streams is not None else (None, None)
        return HostStore(self.device, self._chunk_params(chunk), offload_stream=out, prefetch_stream=back)

    def _prefetch(self, it: _Iteration, stage: StageKey) -> None:
        unit = it.units.get(_unit(stage))
        if unit is not None and unit.host is not None:
            unit.host.prefetch()

    def _forward(self, it: _Iteration, s: StageKey, recompute: Recompute, offload: bool = False) -> None:
        g = it.graph
        chunk = self.chunks[(s.pipeline, s.chunk)]
        sub = it.subs[(s.pipeline, s.microbatch, s.sub)]
        producers = list(g.data_preds[s])
        inputs: dict[StageKey, tuple[Tensor, ...]] = {}
        for p in producers:
            received = it.mailbox.pop((p, s))
            inputs[p] = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in received)
        consumers = [c for c in g.succs[s] if s in g.data_preds[c]]
        flat_in = [t for p in producers for t in inputs[p]]
        counts = [len(inputs[p]) for p in producers]
        layout: list[list[int]] = [[]]
        """Tensors per consumer, then 1 when a loss follows (set by each run, recompute included)."""

        def run(*flat: Tensor) -> tuple[Tensor, ...]:
            by_producer: dict[StageKey, tuple[Tensor, ...]] = {}
            pos = 0
            for p, n in zip(producers, counts, strict=True):
                by_producer[p] = tuple(flat[pos : pos + n])
                pos += n
            per_consumer, loss = self._chunk_forward(it, s, chunk, sub, by_producer, consumers, recompute)
            layout[0] = [len(ts) for ts in per_consumer] + ([1] if loss is not None else [])
            out = tuple(t for ts in per_consumer for t in ts)
            return (*out, loss) if loss is not None else out

        host = self._host_store(chunk) if offload else None
        result: tuple[Tensor, ...]
        if host is not None:
            with host.saving():
                result = run(*flat_in)
            it.offloaded_bytes += host.bytes
        else:
            result = run(*flat_in)  # FULL recompute checkpoints each block inside (`_chunk_forward`)
        sizes = layout[0]
        loss = result[-1] if len(sizes) > len(consumers) else None
        outputs: dict[StageKey, tuple[Tensor, ...]] = {}
        pos = 0
        for c, n in zip(consumers, sizes, strict=False):
            outputs[c] = tuple(result[pos : pos + n])
            pos += n
            self._deliver(it, s, c, tuple(t.detach() for t in outputs[c]))
        if loss is not None:
            it.losses.append(loss.detach())
        it.units[_unit(s)] = _Unit(recompute=recompute, inputs=inputs, outputs=outputs, loss=loss, host=host)

    def _pipeline_upstream(self, pipeline: str, module: str) -> list[str]:
        """Upstream modules of `module` inside `pipeline`, in the order their outputs travel (plan.shapes)."""
        members = self.placement.pipeline(pipeline).modules
        return [e.src for e in self.model.upstream(module) if e.src in members]

    def _chunk_forward(
        self,
        it: _Iteration,
        s: StageKey,
        chunk: list[_Part],
        sub: SubMicrobatch,
        inputs: dict[StageKey, tuple[Tensor, ...]],
        consumers: list[StageKey],
        recompute: Recompute,
    ) -> tuple[list[tuple[Tensor, ...]], Tensor | None]:
        """Run the chunk's parts in order; return the tensors for each consumer and the loss."""
        selective = recompute is Recompute.SELECTIVE
        stream: Stream | None = None
        module_outputs: dict[str, Tensor] = {}
        loss: Tensor | None = None
        for k, part in enumerate(chunk):
            rng = part.layers
            geom = self._geometry(it, rng.module, s.microbatch, sub.instances_of(rng.module))
            if part.pre is not None:  # the chunk's inputs feed its first part; later parts take local outputs
                pieces = self._pieces(it, s, sub, rng.module, inputs if k == 0 else {}, module_outputs)
                stream = part.pre.run(pieces, geom)
            elif stream is None:  # the chunk starts inside a module: (hidden[, context]) from the previous chunk
                (received,) = inputs.values()
                stream = Stream(received[0], received[1] if len(received) > 1 else None)
            for block in part.blocks:
                if recompute is Recompute.FULL:
                    stream = _checkpointed(block, stream, geom)
                else:
                    stream = block.run(stream, geom, selective)
            if part.post is not None:
                out = part.post.run(stream, geom)
                if out.output is not None:
                    module_outputs[rng.module] = out.output
                if out.loss is not None:
                    loss = out.loss if loss is None else loss + out.loss
                stream = None
        per_consumer: list[tuple[Tensor, ...]] = []
        last = chunk[-1].layers.module
        for c in consumers:
            if c.pipeline != s.pipeline:  # another pipeline's first chunk: this pipeline's output
                per_consumer.append((module_outputs[last],))
                continue
            first = self._chunk_of[(s.pipeline, c.chunk)].layers[0]
            if first.start > 0:  # the next chunk continues the module: (hidden[, context])
                assert stream is not None
                ctx = stream.context
                per_consumer.append((stream.hidden,) if ctx is None else (stream.hidden, ctx.view_as(ctx)))
                continue
            outs: list[Tensor] = []
            for src in self._pipeline_upstream(s.pipeline, first.module):
                if src not in module_outputs:
                    raise NotImplementedError(
                        f"chunk {s.chunk} of pipeline '{s.pipeline}' must forward the output of module '{src}', "
                        "which ended in an earlier chunk; forwarding outputs across chunks is not supported"
                    )
                outs.append(module_outputs[src])
            per_consumer.append(tuple(outs))
        return per_consumer, loss

    def _pieces(
        self,
        it: _Iteration,
        s: StageKey,
        sub: SubMicrobatch,
        module: str,
        inputs: dict[StageKey, tuple[Tensor, ...]],
        local: dict[str, Tensor],
    ) -> dict[str, list[Piece]]:
        """Upstream outputs `module`'s pre part consumes: from this chunk, the previous chunk or other pipelines."""
        pieces: dict[str, list[Piece]] = {}
        for e in self.model.upstream(module):
            if e.src in local:
                pieces[e.src] = [Piece(sub.instances_of(e.src), local[e.src])]
        for p, tensors in inputs.items():
            if p.pipeline == s.pipeline:  # previous chunk of a mixed pipeline: one tensor per upstream module
                for src, t in zip(self._pipeline_upstream(s.pipeline, module), tensors, strict=True):
                    pieces.setdefault(src, []).append(Piece(sub.instances_of(src), t))
            else:  # another pipeline's last chunk: its last module's output for one of its sub-microbatches
                src = self._chunk_of[(p.pipeline, p.chunk)].layers[-1].module
                producer_sub = it.subs[(p.pipeline, p.microbatch, p.sub)]
                pieces.setdefault(src, []).append(Piece(producer_sub.instances_of(src), tensors[0]))
        return pieces

    # ---- backward -----------------------------------------------------------------------------------------

    def _grad_pairs(self, it: _Iteration, s: StageKey, unit: _Unit) -> tuple[list[Tensor], list[Tensor]]:
        """(outputs, gradients) to backpropagate: received gradients of the outputs, and 1 for the loss."""
        by_id: dict[int, tuple[Tensor, Tensor]] = {}
        for q in it.graph.data_preds[s]:
            grads = it.mailbox.pop((q, s))
            for out, grad in zip(unit.outputs[q.with_pass(Pass.F)], grads, strict=True):
                if not out.requires_grad:
                    continue
                if id(out) in by_id:
                    prev = by_id[id(out)]
                    by_id[id(out)] = (out, prev[1] + grad)
                else:
                    by_id[id(out)] = (out, grad)
        pairs = list(by_id.values())
        if unit.loss is not None and unit.loss.requires_grad:
            pairs.append((unit.loss, torch.ones_like(unit.loss)))
        return [o for o, _ in pairs], [g for _, g in pairs]

    def _backward(self, it: _Iteration, s: StageKey) -> None:
        """B (input and weight gradients) or I (input gradients only; W follows)."""
        key = _unit(s)
        unit = it.units[key]
        outs, grads = self._grad_pairs(it, s, unit)
        leaves = [t for ts in unit.inputs.values() for t in ts if t.requires_grad]
        input_grads: dict[int, Tensor] = {}
        if s.pass_ is Pass.B:
            if outs:
                torch.autograd.backward(outs, grads)
            input_grads = {id(t): t.grad for t in leaves if t.grad is not None}
            del it.units[key]
        else:
            has_w = s.with_pass(Pass.W) in it.graph.rank
            if outs and leaves:
                got = torch.autograd.grad(outs, leaves, grads, retain_graph=has_w, allow_unused=True)
                input_grads = {id(t): gr for t, gr in zip(leaves, got, strict=True) if gr is not None}
            if has_w:
                unit.pending = (outs, grads)
            else:
                del it.units[key]
        for c in it.graph.succs[s]:
            if s not in it.graph.data_preds[c]:
                continue
            sent = tuple(input_grads.get(id(t), torch.zeros_like(t)).detach() for t in unit.inputs[c.with_pass(Pass.F)])
            self._deliver(it, s, c, sent)

    def _weight_backward(self, it: _Iteration, s: StageKey) -> None:
        key = _unit(s)
        unit = it.units.pop(key)
        assert unit.pending is not None, f"{s} runs before its I pass"
        outs, grads = unit.pending
        params = self._chunk_params(self.chunks[(s.pipeline, s.chunk)])
        if outs and params:
            torch.autograd.backward(outs, grads, inputs=params)

"""Conversions between the spec/plan dataclasses and their v1 protobuf messages (proto/pipeweaver/v1).

`*_from_proto` rebuilds the dataclass, so its validation runs on wire input: bad input raises `SpecError`
whose message starts with the field path (``model.modules[1]: ...``). No grpc import: worker processes use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar, assert_never

from google.protobuf.message import Message

from pipeweaver.errors import SpecError
from pipeweaver.plan.ir import (
    Action,
    Chunk,
    CommBatch,
    Compute,
    Direction,
    LayerRange,
    Pass,
    PipelineEdge,
    PipelineInfo,
    Placement,
    Plan,
    PlanHeader,
    PlanSource,
    Prefetch,
    RankPlan,
    Recompute,
    StageKey,
    SubMicrobatch,
    TensorSpec,
    Transfer,
    Wait,
)
from pipeweaver.spec.batch import BatchMetadata, Document, MediaItem, Microbatch
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import (
    ImageGeometry,
    LayerKind,
    MergeKind,
    Modality,
    ModelSpec,
    ModuleEdge,
    ModuleSpec,
    VideoGeometry,
)
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.v1 import planner_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

__all__ = [
    "action_count",
    "action_from_proto",
    "action_to_proto",
    "batch_from_proto",
    "batch_to_proto",
    "hardware_from_proto",
    "hardware_to_proto",
    "header_from_proto",
    "header_to_proto",
    "model_from_proto",
    "model_to_proto",
    "packed_actions_from_proto",
    "packed_actions_to_proto",
    "parallel_from_proto",
    "parallel_to_proto",
    "placement_from_proto",
    "placement_to_proto",
    "plan_from_proto",
    "plan_to_proto",
    "rank_plan_from_proto",
    "rank_plan_to_proto",
    "stage_key_from_proto",
    "stage_key_to_proto",
]

# ---- helpers -----------------------------------------------------------------------------------------------

_E = TypeVar("_E", bound=StrEnum)
_W = TypeVar("_W", bound=int)


class _EnumMap(Generic[_E, _W]):
    """A StrEnum <-> proto enum mapping; the wire's *_UNSPECIFIED decodes to the dataclass default, if any."""

    def __init__(self, py: type[_E], wire: _EnumTypeWrapper[_W], members: Mapping[_E, _W]) -> None:
        self._wire = wire
        self._to_wire = dict(members)
        self._from_wire = {int(number): member for member, number in members.items()}
        # Fail at import, not on some rare request, when either enum gains a member the other lacks.
        wire_numbers = {v.number for v in wire.DESCRIPTOR.values if v.number != 0}
        if set(members) != set(py) or set(self._from_wire) != wire_numbers:
            raise RuntimeError(f"pipeweaver.wire: {py.__name__} and {wire.DESCRIPTOR.full_name} are out of sync")

    def encode(self, value: _E) -> _W:
        return self._to_wire[value]

    def decode(self, number: int, path: str, default: _E | None = None) -> _E:
        if number in self._from_wire:
            return self._from_wire[number]
        if number == 0 and default is not None:
            return default
        names = ", ".join(self._wire.Name(w) for w in self._to_wire.values())
        known = self._wire.DESCRIPTOR.values_by_number
        got = known[number].name if number in known else f"unknown value {number}"
        raise SpecError(f"{path}: must be one of {names}, got {got}")


_LAYER_KIND = _EnumMap(
    LayerKind,
    pb.LayerKind,
    {
        LayerKind.VIT_BLOCK: pb.LAYER_KIND_VIT_BLOCK,
        LayerKind.DECODER_BLOCK: pb.LAYER_KIND_DECODER_BLOCK,
        LayerKind.DIT_BLOCK: pb.LAYER_KIND_DIT_BLOCK,
    },
)
_MODALITY = _EnumMap(
    Modality,
    pb.Modality,
    {Modality.IMAGE: pb.MODALITY_IMAGE, Modality.VIDEO: pb.MODALITY_VIDEO, Modality.TEXT: pb.MODALITY_TEXT},
)
_MERGE_KIND = _EnumMap(
    MergeKind,
    pb.MergeKind,
    {
        MergeKind.TOKEN_SCATTER: pb.MERGE_KIND_TOKEN_SCATTER,
        MergeKind.CROSS_ATTENTION_CONTEXT: pb.MERGE_KIND_CROSS_ATTENTION_CONTEXT,
    },
)
_PASS = _EnumMap(
    Pass,
    pb.Pass,
    {
        Pass.F: pb.PASS_FORWARD,
        Pass.B: pb.PASS_BACKWARD,
        Pass.I: pb.PASS_BACKWARD_INPUT,
        Pass.W: pb.PASS_BACKWARD_WEIGHT,
    },
)
_RECOMPUTE = _EnumMap(
    Recompute,
    pb.Recompute,
    {
        Recompute.NONE: pb.RECOMPUTE_NONE,
        Recompute.SELECTIVE: pb.RECOMPUTE_SELECTIVE,
        Recompute.FULL: pb.RECOMPUTE_FULL,
    },
)
_DIRECTION = _EnumMap(Direction, pb.Direction, {Direction.SEND: pb.DIRECTION_SEND, Direction.RECV: pb.DIRECTION_RECV})
_PLAN_SOURCE = _EnumMap(
    PlanSource,
    pb.PlanSource,
    {
        PlanSource.SEARCH: pb.PLAN_SOURCE_SEARCH,
        PlanSource.CACHE: pb.PLAN_SOURCE_CACHE,
        PlanSource.FALLBACK: pb.PLAN_SOURCE_FALLBACK,
        PlanSource.BASELINE: pb.PLAN_SOURCE_BASELINE,
    },
)


@contextmanager
def _at(path: str) -> Iterator[None]:
    """Prefix a `SpecError` from a dataclass's validation with the wire path of the message it came from.

    Wrap only the dataclass construction, after the children are converted: their errors already carry
    their own, longer path.
    """
    try:
        yield
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


def _present(msg: Message, *names: str) -> dict[str, Any]:
    """The proto3 `optional` fields among `names` that were set; unset ones take the dataclass default."""
    return {name: getattr(msg, name) for name in names if msg.HasField(name)}


def _need(msg: Message, field: str, path: str) -> None:
    """Raise `SpecError` when a required message field is absent (proto3 would silently read it as empty)."""
    if not msg.HasField(field):
        raise SpecError(f"{path}.{field}: missing")


# ---- spec: model -------------------------------------------------------------------------------------------


def _image_to_proto(g: ImageGeometry) -> pb.ImageGeometry:
    return pb.ImageGeometry(image_px=g.image_px, patch_px=g.patch_px, merge=g.merge)


def _image_from_proto(msg: pb.ImageGeometry, path: str) -> ImageGeometry:
    with _at(path):
        return ImageGeometry(**_present(msg, "image_px", "patch_px", "merge"))


def _video_to_proto(g: VideoGeometry) -> pb.VideoGeometry:
    return pb.VideoGeometry(
        fps=g.fps,
        temporal_compression=g.temporal_compression,
        spatial_compression=g.spatial_compression,
        patch=g.patch,
        width_px=g.width_px,
        height_px=g.height_px,
    )


def _video_from_proto(msg: pb.VideoGeometry, path: str) -> VideoGeometry:
    fields = ("fps", "temporal_compression", "spatial_compression", "patch", "width_px", "height_px")
    with _at(path):
        return VideoGeometry(**_present(msg, *fields))


def _module_to_proto(m: ModuleSpec) -> pb.ModuleSpec:
    return pb.ModuleSpec(
        name=m.name,
        kind=_LAYER_KIND.encode(m.kind),
        layers=m.layers,
        hidden=m.hidden,
        ffn_hidden=m.ffn_hidden,
        heads=m.heads,
        kv_heads=m.kv_heads,
        input=_MODALITY.encode(m.input),
        frozen=m.frozen,
        vocab_size=m.vocab_size,
        lm_head=m.lm_head,
        image=_image_to_proto(m.image) if m.image is not None else None,
        projector_hidden=m.projector_hidden,
        projector_out=m.projector_out,
        video=_video_to_proto(m.video) if m.video is not None else None,
        context_hidden=m.context_hidden,
        display_name=m.display_name,
    )


def _module_from_proto(msg: pb.ModuleSpec, path: str) -> ModuleSpec:
    image = _image_from_proto(msg.image, f"{path}.image") if msg.HasField("image") else None
    video = _video_from_proto(msg.video, f"{path}.video") if msg.HasField("video") else None
    kind = _LAYER_KIND.decode(msg.kind, f"{path}.kind")
    modality = _MODALITY.decode(msg.input, f"{path}.input")
    with _at(path):
        return ModuleSpec(
            name=msg.name,
            kind=kind,
            layers=msg.layers,
            hidden=msg.hidden,
            ffn_hidden=msg.ffn_hidden,
            heads=msg.heads,
            kv_heads=msg.kv_heads,
            input=modality,
            frozen=msg.frozen,
            vocab_size=msg.vocab_size,
            lm_head=msg.lm_head,
            image=image,
            projector_hidden=msg.projector_hidden,
            projector_out=msg.projector_out,
            video=video,
            context_hidden=msg.context_hidden,
            display_name=msg.display_name,
        )


def model_to_proto(model: ModelSpec) -> pb.ModelSpec:
    return pb.ModelSpec(
        name=model.name,
        modules=[_module_to_proto(m) for m in model.modules],
        edges=[pb.ModuleEdge(src=e.src, dst=e.dst, merge=_MERGE_KIND.encode(e.merge)) for e in model.edges],
    )


def model_from_proto(msg: pb.ModelSpec, *, path: str = "model") -> ModelSpec:
    modules = tuple(_module_from_proto(m, f"{path}.modules[{i}]") for i, m in enumerate(msg.modules))
    edges = tuple(
        ModuleEdge(src=e.src, dst=e.dst, merge=_MERGE_KIND.decode(e.merge, f"{path}.edges[{i}].merge"))
        for i, e in enumerate(msg.edges)
    )
    with _at(path):
        return ModelSpec(name=msg.name, modules=modules, edges=edges)


# ---- spec: parallelism and hardware ------------------------------------------------------------------------


def parallel_to_proto(p: ParallelSpec) -> pb.ParallelSpec:
    return pb.ParallelSpec(
        pp=p.pp,
        microbatches=p.microbatches,
        tp=p.tp,
        dp=p.dp,
        seq_len=p.seq_len,
        distributed_optimizer=p.distributed_optimizer,
    )


def parallel_from_proto(msg: pb.ParallelSpec, *, path: str = "parallel") -> ParallelSpec:
    with _at(path):
        return ParallelSpec(
            pp=msg.pp,
            microbatches=msg.microbatches,
            **_present(msg, "tp", "dp", "seq_len", "distributed_optimizer"),
        )


def hardware_to_proto(h: HardwareSpec) -> pb.HardwareSpec:
    return pb.HardwareSpec(
        name=h.name,
        peak_flops=h.peak_flops,
        hbm_bandwidth=h.hbm_bandwidth,
        memory_bytes=h.memory_bytes,
        nvlink_bandwidth=h.nvlink_bandwidth,
        internode_bandwidth=h.internode_bandwidth,
        gpus_per_node=h.gpus_per_node,
        p2p_latency_s=h.p2p_latency_s,
        dtype_bytes=h.dtype_bytes,
        host_link_bandwidth=h.host_link_bandwidth,
        host_memory_bytes=h.host_memory_bytes,
    )


def hardware_from_proto(msg: pb.HardwareSpec, *, path: str = "hardware") -> HardwareSpec:
    with _at(path):
        return HardwareSpec(
            name=msg.name,
            peak_flops=msg.peak_flops,
            hbm_bandwidth=msg.hbm_bandwidth,
            memory_bytes=msg.memory_bytes,
            nvlink_bandwidth=msg.nvlink_bandwidth,
            internode_bandwidth=msg.internode_bandwidth,
            **_present(
                msg, "gpus_per_node", "p2p_latency_s", "dtype_bytes", "host_link_bandwidth", "host_memory_bytes"
            ),
        )


# ---- spec: batch metadata ----------------------------------------------------------------------------------


def _media_to_proto(m: MediaItem) -> pb.MediaItem:
    return pb.MediaItem(modality=_MODALITY.encode(m.modality), tokens=m.tokens, merged_tokens=m.merged_tokens)


def _media_from_proto(msg: pb.MediaItem, path: str) -> MediaItem:
    modality = _MODALITY.decode(msg.modality, f"{path}.modality")
    with _at(path):
        return MediaItem(modality=modality, tokens=msg.tokens, merged_tokens=msg.merged_tokens)


def _document_from_proto(msg: pb.Document, path: str) -> Document:
    media = tuple(_media_from_proto(m, f"{path}.media[{i}]") for i, m in enumerate(msg.media))
    with _at(path):
        return Document(text_tokens=msg.text_tokens, media=media)


def batch_to_proto(batch: BatchMetadata) -> pb.BatchMetadata:
    return pb.BatchMetadata(
        iteration=batch.iteration,
        microbatches=[
            pb.Microbatch(
                documents=[
                    pb.Document(text_tokens=d.text_tokens, media=[_media_to_proto(m) for m in d.media])
                    for d in mb.documents
                ]
            )
            for mb in batch.microbatches
        ],
        dp_replica=batch.dp_replica,
    )


def batch_from_proto(msg: pb.BatchMetadata, *, path: str = "batch") -> BatchMetadata:
    microbatches = tuple(
        Microbatch(
            documents=tuple(
                _document_from_proto(d, f"{path}.microbatches[{i}].documents[{j}]") for j, d in enumerate(mb.documents)
            )
        )
        for i, mb in enumerate(msg.microbatches)
    )
    with _at(path):
        return BatchMetadata(iteration=msg.iteration, microbatches=microbatches, dp_replica=msg.dp_replica)


# ---- plan IR: actions --------------------------------------------------------------------------------------


def stage_key_to_proto(s: StageKey) -> pb.StageKey:
    return pb.StageKey(
        pipeline=s.pipeline,
        chunk=s.chunk,
        microbatch=s.microbatch,
        sub=s.sub,
        pass_kind=_PASS.encode(s.pass_),
    )


def stage_key_from_proto(msg: pb.StageKey, *, path: str = "stage") -> StageKey:
    return StageKey(msg.pipeline, msg.chunk, msg.microbatch, msg.sub, _PASS.decode(msg.pass_kind, f"{path}.pass_kind"))


_DEFAULT_DTYPE = TensorSpec((0,)).dtype
"""What an unset `TensorSpec.dtype` means on the wire ("bfloat16")."""


def _tensor_to_proto(ts: TensorSpec) -> pb.TensorSpec:
    # The default dtype goes unset (the proto's default): 10 of a transfer's ~55 bytes on the wire, in every one.
    return pb.TensorSpec(shape=ts.shape, dtype=None if ts.dtype == _DEFAULT_DTYPE else ts.dtype)


def _transfer_to_proto(t: Transfer) -> pb.Transfer:
    return pb.Transfer(
        direction=_DIRECTION.encode(t.direction),
        peer=t.peer,
        src=stage_key_to_proto(t.src),
        dst=stage_key_to_proto(t.dst),
        tensors=[_tensor_to_proto(ts) for ts in t.tensors],
    )


def _transfer_from_proto(msg: pb.Transfer, path: str) -> Transfer:
    _need(msg, "src", path)
    _need(msg, "dst", path)
    return Transfer(
        direction=_DIRECTION.decode(msg.direction, f"{path}.direction"),
        peer=msg.peer,
        src=stage_key_from_proto(msg.src, path=f"{path}.src"),
        dst=stage_key_from_proto(msg.dst, path=f"{path}.dst"),
        tensors=tuple(TensorSpec(tuple(ts.shape), **_present(ts, "dtype")) for ts in msg.tensors),
    )


def action_to_proto(action: Action) -> pb.Action:
    match action:
        case Compute():
            return pb.Action(
                compute=pb.Compute(
                    stage=stage_key_to_proto(action.stage),
                    recompute=_RECOMPUTE.encode(action.recompute),
                    offload=action.offload,
                )
            )
        case CommBatch():
            return pb.Action(
                comm_batch=pb.CommBatch(handle=action.handle, ops=[_transfer_to_proto(t) for t in action.ops])
            )
        case Wait():
            return pb.Action(wait=pb.Wait(handle=action.handle))
        case Prefetch():
            return pb.Action(prefetch=pb.Prefetch(stage=stage_key_to_proto(action.stage)))
        case _:
            assert_never(action)


def action_from_proto(msg: pb.Action, *, path: str = "action") -> Action:
    match msg.WhichOneof("action"):
        case "compute":
            where = f"{path}.compute"
            _need(msg.compute, "stage", where)
            return Compute(
                stage_key_from_proto(msg.compute.stage, path=f"{where}.stage"),
                _RECOMPUTE.decode(msg.compute.recompute, f"{where}.recompute", Recompute.NONE),
                msg.compute.offload,
            )
        case "comm_batch":
            ops = msg.comm_batch.ops
            return CommBatch(
                msg.comm_batch.handle,
                tuple(_transfer_from_proto(t, f"{path}.comm_batch.ops[{i}]") for i, t in enumerate(ops)),
            )
        case "wait":
            return Wait(msg.wait.handle)
        case "prefetch":
            _need(msg.prefetch, "stage", f"{path}.prefetch")
            return Prefetch(stage_key_from_proto(msg.prefetch.stage, path=f"{path}.prefetch.stage"))
        case None:
            raise SpecError(f"{path}: empty; set one of compute, comm_batch, wait, prefetch")


# ---- plan IR: header ---------------------------------------------------------------------------------------


def placement_to_proto(p: Placement) -> pb.Placement:
    return pb.Placement(
        pp=p.pp,
        pipelines=[
            pb.PipelineInfo(name=i.name, modules=i.modules, backward=i.backward, weight_grad=i.weight_grad)
            for i in p.pipelines
        ],
        chunks=[
            pb.Chunk(
                pipeline=c.pipeline,
                index=c.index,
                rank=c.rank,
                layers=[pb.LayerRange(module=r.module, start=r.start, stop=r.stop) for r in c.layers],
            )
            for c in p.chunks
        ],
        edges=[pb.PipelineEdge(src=e.src, dst=e.dst) for e in p.edges],
    )


def placement_from_proto(msg: pb.Placement, *, path: str = "placement") -> Placement:
    return Placement(
        pp=msg.pp,
        pipelines=tuple(
            PipelineInfo(i.name, tuple(i.modules), **_present(i, "backward", "weight_grad")) for i in msg.pipelines
        ),
        chunks=tuple(
            Chunk(c.pipeline, c.index, c.rank, tuple(LayerRange(r.module, r.start, r.stop) for r in c.layers))
            for c in msg.chunks
        ),
        edges=tuple(PipelineEdge(e.src, e.dst) for e in msg.edges),
    )


def _sub_microbatch_to_proto(s: SubMicrobatch) -> pb.SubMicrobatch:
    return pb.SubMicrobatch(
        pipeline=s.pipeline,
        microbatch=s.microbatch,
        index=s.index,
        instances=[pb.ModuleInstances(module=module, indices=idx) for module, idx in s.instances],
    )


def _sub_microbatch_from_proto(msg: pb.SubMicrobatch) -> SubMicrobatch:
    instances = tuple((i.module, tuple(i.indices)) for i in msg.instances)
    return SubMicrobatch(msg.pipeline, msg.microbatch, msg.index, instances)


def header_to_proto(h: PlanHeader) -> pb.PlanHeader:
    return pb.PlanHeader(
        job_id=h.job_id,
        iteration=h.iteration,
        placement=placement_to_proto(h.placement),
        sub_microbatches=[_sub_microbatch_to_proto(s) for s in h.sub_microbatches],
        num_microbatches=h.num_microbatches,
        schedule=h.schedule,
        source=_PLAN_SOURCE.encode(h.source),
        dp_replica=h.dp_replica,
        split_backward=h.split_backward,
        predicted_makespan_ms=h.predicted_makespan_ms,
        lower_bound_ms=h.lower_bound_ms,
        peak_memory_bytes=h.peak_memory_bytes,
        baseline_makespans=[pb.BaselineMakespan(schedule=name, makespan_ms=ms) for name, ms in h.baseline_makespans_ms],
    )


def header_from_proto(msg: pb.PlanHeader, *, path: str = "header") -> PlanHeader:
    _need(msg, "placement", path)
    return PlanHeader(
        job_id=msg.job_id,
        iteration=msg.iteration,
        placement=placement_from_proto(msg.placement, path=f"{path}.placement"),
        sub_microbatches=tuple(_sub_microbatch_from_proto(s) for s in msg.sub_microbatches),
        num_microbatches=msg.num_microbatches,
        schedule=msg.schedule,
        source=_PLAN_SOURCE.decode(msg.source, f"{path}.source", PlanSource.BASELINE),
        dp_replica=msg.dp_replica,
        split_backward=msg.split_backward,
        predicted_makespan_ms=msg.predicted_makespan_ms,
        lower_bound_ms=msg.lower_bound_ms,
        peak_memory_bytes=tuple(msg.peak_memory_bytes),
        baseline_makespans_ms=tuple((b.schedule, b.makespan_ms) for b in msg.baseline_makespans),
    )


# ---- plan IR: actions in columns ---------------------------------------------------------------------------

_KIND_NAMES = {
    pb.ACTION_KIND_COMPUTE: "COMPUTE",
    pb.ACTION_KIND_COMM_BATCH: "COMM_BATCH",
    pb.ACTION_KIND_WAIT: "WAIT",
    pb.ACTION_KIND_PREFETCH: "PREFETCH",
}


def packed_actions_to_proto(actions: Sequence[Action]) -> pb.PackedActions:
    """`actions` as `PackedActions`: each distinct stage key and tensor list once, in order of first use."""
    pipelines: dict[str, int] = {}
    rows: dict[StageKey, int] = {}
    columns: tuple[list[int], list[int], list[int], list[int], list[int]] = ([], [], [], [], [])
    lists: dict[tuple[TensorSpec, ...], int] = {}
    kinds: list[int] = []
    args: list[int] = []

    def row(stage: StageKey) -> int:
        found = rows.get(stage)
        if found is None:
            found = rows[stage] = len(rows)
            values = (
                pipelines.setdefault(stage.pipeline, len(pipelines)),
                stage.chunk,
                stage.microbatch,
                stage.sub,
                int(_PASS.encode(stage.pass_)),
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        return found

    for action in actions:
        match action:
            case Compute():
                kinds.append(pb.ACTION_KIND_COMPUTE)
                args += (row(action.stage), int(_RECOMPUTE.encode(action.recompute)), int(action.offload))
            case CommBatch():
                kinds.append(pb.ACTION_KIND_COMM_BATCH)
                args += (action.handle, len(action.ops))
                for t in action.ops:
                    tensors = lists.setdefault(t.tensors, len(lists))
                    args += (int(_DIRECTION.encode(t.direction)), t.peer, row(t.src), row(t.dst), tensors)
            case Wait():
                kinds.append(pb.ACTION_KIND_WAIT)
                args.append(action.handle)
            case Prefetch():
                kinds.append(pb.ACTION_KIND_PREFETCH)
                args.append(row(action.stage))
            case _:
                assert_never(action)
    return pb.PackedActions(
        pipelines=list(pipelines),
        stage_pipeline=columns[0],
        stage_chunk=columns[1],
        stage_microbatch=columns[2],
        stage_sub=columns[3],
        stage_pass=columns[4],  # type: ignore[arg-type]  # Pass numbers
        tensor_lists=[pb.TensorList(tensors=[_tensor_to_proto(ts) for ts in tl]) for tl in lists],
        kinds=kinds,  # type: ignore[arg-type]  # ActionKind numbers
        args=args,
    )


def packed_actions_from_proto(msg: pb.PackedActions, *, path: str = "packed") -> tuple[Action, ...]:
    """The actions of `msg`; a bad table or argument raises `SpecError` naming the field and its index."""
    n = len(msg.stage_pipeline)
    for name in ("stage_chunk", "stage_microbatch", "stage_sub", "stage_pass"):
        got = len(getattr(msg, name))
        if got != n:
            raise SpecError(
                f"{path}.{name}: the stage table needs one entry per row, {n} as in stage_pipeline, got {got}"
            )
    pipelines = list(msg.pipelines)
    stages: list[StageKey] = []
    for i, (p, chunk, microbatch, sub, pass_) in enumerate(
        zip(msg.stage_pipeline, msg.stage_chunk, msg.stage_microbatch, msg.stage_sub, msg.stage_pass, strict=True)
    ):
        if not 0 <= p < len(pipelines):
            raise SpecError(f"{path}.stage_pipeline[{i}]: must index pipelines (0..{len(pipelines) - 1}), got {p}")
        stages.append(StageKey(pipelines[p], chunk, microbatch, sub, _PASS.decode(pass_, f"{path}.stage_pass[{i}]")))
    tensor_lists = [
        tuple(TensorSpec(tuple(ts.shape), **_present(ts, "dtype")) for ts in tl.tensors) for tl in msg.tensor_lists
    ]
    args = msg.args
    at = 0

    def take(count: int, i: int, kind: str) -> Sequence[int]:
        nonlocal at
        if at + count > len(args):
            raise SpecError(
                f"{path}.args: action {i} ({kind}) needs {count} value(s) from args[{at}], but args has {len(args)}"
            )
        values = args[at : at + count]
        at += count
        return values

    def stage(value: int, offset: int, what: str) -> StageKey:
        if not 0 <= value < n:
            raise SpecError(f"{path}.args[{offset}]: {what} must be a stage row (0..{n - 1}), got {value}")
        return stages[value]

    out: list[Action] = []
    for i, kind in enumerate(msg.kinds):
        if kind not in _KIND_NAMES:
            raise SpecError(f"{path}.kinds[{i}]: must be one of {', '.join(_KIND_NAMES.values())}, got {kind}")
        name = _KIND_NAMES[kind]
        start = at
        if kind == pb.ACTION_KIND_COMPUTE:
            row, recompute, offload = take(3, i, name)
            if offload not in (0, 1):
                raise SpecError(f"{path}.args[{start + 2}]: offload of action {i} must be 0 or 1, got {offload}")
            out.append(
                Compute(
                    stage(row, start, f"the stage of action {i}"),
                    _RECOMPUTE.decode(recompute, f"{path}.args[{start + 1}]", Recompute.NONE),
                    bool(offload),
                )
            )
        elif kind == pb.ACTION_KIND_COMM_BATCH:
            handle, count = take(2, i, name)
            if count < 0:
                raise SpecError(
                    f"{path}.args[{start + 1}]: the op count of action {i} must not be negative, got {count}"
                )
            ops = []
            for j in range(count):
                first = at
                direction, peer, src, dst, tensors = take(5, i, name)
                if not 0 <= tensors < len(tensor_lists):
                    raise SpecError(
                        f"{path}.args[{first + 4}]: op {j} of action {i} must name a row of tensor_lists "
                        f"(0..{len(tensor_lists) - 1}), got {tensors}"
                    )
                ops.append(
                    Transfer(
                        _DIRECTION.decode(direction, f"{path}.args[{first}]"),
                        peer,
                        stage(src, first + 2, f"src of op {j} of action {i}"),
                        stage(dst, first + 3, f"dst of op {j} of action {i}"),
                        tensor_lists[tensors],
                    )
                )
            out.append(CommBatch(handle, tuple(ops)))
        elif kind == pb.ACTION_KIND_WAIT:
            (handle,) = take(1, i, name)
            out.append(Wait(handle))
        else:
            (row,) = take(1, i, name)
            out.append(Prefetch(stage(row, start, f"the stage of action {i}")))
    if at != len(args):
        raise SpecError(f"{path}.args: {len(args) - at} value(s) left after the {len(msg.kinds)} actions")
    return tuple(out)


def action_count(msg: pb.RankPlan) -> int:
    """How many actions `msg` holds, in either form, without decoding them."""
    return len(msg.packed.kinds) if msg.HasField("packed") else len(msg.actions)


# ---- plan IR: rank plans and whole plans -------------------------------------------------------------------


def rank_plan_to_proto(rp: RankPlan, *, packed: bool = False) -> pb.RankPlan:
    """`rp` on the wire; with `packed`, its actions in columns (`PackedActions`: what the service sends)."""
    msg = pb.RankPlan(
        rank=rp.rank,
        predicted_start_ms=[start for start, _ in rp.predicted_ms],
        predicted_end_ms=[end for _, end in rp.predicted_ms],
    )
    if packed:
        msg.packed.CopyFrom(packed_actions_to_proto(rp.actions))
    else:
        msg.actions.extend(action_to_proto(a) for a in rp.actions)
    return msg


def rank_plan_from_proto(msg: pb.RankPlan, *, path: str = "rank_plan") -> RankPlan:
    """Either form of the actions (`actions` or `packed`)."""
    if msg.HasField("packed"):
        if msg.actions:
            raise SpecError(f"{path}: set actions or packed, not both (got {len(msg.actions)} actions and packed)")
        actions = packed_actions_from_proto(msg.packed, path=f"{path}.packed")
    else:
        actions = tuple(action_from_proto(a, path=f"{path}.actions[{i}]") for i, a in enumerate(msg.actions))
    starts, ends = tuple(msg.predicted_start_ms), tuple(msg.predicted_end_ms)
    if len(starts) != len(ends) or len(starts) not in (0, len(actions)):
        raise SpecError(
            f"{path}.predicted_start_ms/predicted_end_ms: need both empty or one entry per action "
            f"({len(actions)}), got {len(starts)} starts and {len(ends)} ends"
        )
    return RankPlan(rank=msg.rank, actions=actions, predicted_ms=tuple(zip(starts, ends, strict=True)))


def plan_to_proto(plan: Plan, *, packed: bool = False) -> pb.Plan:
    return pb.Plan(
        header=header_to_proto(plan.header), ranks=[rank_plan_to_proto(rp, packed=packed) for rp in plan.ranks]
    )


def plan_from_proto(msg: pb.Plan, *, path: str = "plan") -> Plan:
    _need(msg, "header", path)
    return Plan(
        header=header_from_proto(msg.header, path=f"{path}.header"),
        ranks=tuple(rank_plan_from_proto(r, path=f"{path}.ranks[{i}]") for i, r in enumerate(msg.ranks)),
    )

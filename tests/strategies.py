"""Hypothesis strategies for spec and plan values, shared across the test suite.

Spec strategies draw values their dataclasses accept (`__post_init__` passes). Plans are well-formed, not
executable: actions name the placement's pipelines and chunks, waits follow their comm batches.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import strategies as st

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

INPUT_OF: dict[LayerKind, Modality] = {
    LayerKind.VIT_BLOCK: Modality.IMAGE,
    LayerKind.DIT_BLOCK: Modality.VIDEO,
    LayerKind.DECODER_BLOCK: Modality.TEXT,
}

identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
"""Lowercase identifiers: module and pipeline names."""
durations_ms = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
positive_floats = st.floats(min_value=1e-6, max_value=1e18, allow_nan=False, allow_infinity=False)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- spec --------------------------------------------------------------------------------------------------


@st.composite
def image_geometries(draw: st.DrawFn) -> ImageGeometry:
    patch_px = draw(st.integers(1, 32))
    merge = draw(st.integers(1, 4))
    side = merge * draw(st.integers(1, 16))
    return ImageGeometry(image_px=patch_px * side, patch_px=patch_px, merge=merge)


@st.composite
def video_geometries(draw: st.DrawFn) -> VideoGeometry:
    temporal = draw(st.integers(1, 8))
    spatial, patch = draw(st.integers(1, 16)), draw(st.integers(1, 4))
    step = spatial * patch
    return VideoGeometry(
        fps=temporal * draw(st.integers(1, 8)),
        temporal_compression=temporal,
        spatial_compression=spatial,
        patch=patch,
        width_px=step * draw(st.integers(1, 32)),
        height_px=step * draw(st.integers(1, 32)),
    )


@st.composite
def module_specs(
    draw: st.DrawFn, *, name: str | None = None, kind: LayerKind | None = None, hidden: int | None = None
) -> ModuleSpec:
    """A valid module; pass `hidden` to pin its width (heads are then drawn among its divisors)."""
    kind = kind or draw(st.sampled_from(LayerKind))
    if hidden is None:
        heads = draw(st.integers(1, 32))
        hidden = heads * draw(st.integers(1, 128))
    else:
        heads = draw(st.sampled_from([d for d in _divisors(hidden) if d <= 64]))
    vocab_size = draw(st.integers(0, 200_000)) if kind is LayerKind.DECODER_BLOCK else 0
    projector_hidden = draw(st.sampled_from([0, 4 * hidden])) if kind is LayerKind.VIT_BLOCK else 0
    return ModuleSpec(
        name=name or draw(identifiers),
        kind=kind,
        layers=draw(st.integers(1, 128)),
        hidden=hidden,
        ffn_hidden=draw(st.integers(1, 100_000)),
        heads=heads,
        kv_heads=draw(st.sampled_from(_divisors(heads))),
        input=INPUT_OF[kind],
        frozen=draw(st.booleans()),
        vocab_size=vocab_size,
        lm_head=vocab_size > 0 and draw(st.booleans()),
        image=draw(image_geometries()) if kind is LayerKind.VIT_BLOCK else None,
        projector_hidden=projector_hidden,
        video=draw(video_geometries()) if kind is LayerKind.DIT_BLOCK else None,
        context_hidden=draw(st.integers(0, 8192)) if kind is LayerKind.DIT_BLOCK else 0,
        display_name=draw(st.text(max_size=12)),
    )


# Module kinds in DAG order of the two model families the paper studies; drawn half the time so that edges
# of both merge kinds are common, not a lucky accident of independent draws.
_FAMILIES: dict[str, tuple[LayerKind, ...]] = {
    "vlm": (LayerKind.VIT_BLOCK, LayerKind.DECODER_BLOCK),
    "t2v": (LayerKind.DECODER_BLOCK, LayerKind.DIT_BLOCK),
}


@st.composite
def model_specs(draw: st.DrawFn, *, max_modules: int = 4) -> ModelSpec:
    """A valid model DAG: a VLM, a T2V model, or 1 to `max_modules` random modules with random valid edges."""
    family = draw(st.sampled_from([None, "vlm", "t2v"]))
    if family is None:
        kinds = tuple(draw(st.lists(st.sampled_from(LayerKind), min_size=1, max_size=max_modules)))
    else:
        kinds = _FAMILIES[family]
    names = draw(st.lists(identifiers, min_size=len(kinds), max_size=len(kinds), unique=True))
    # Many modules share one width and ViTs often project to it, so token-scatter edges are often possible.
    shared_hidden = 64 * draw(st.integers(1, 64))
    modules: list[ModuleSpec] = []
    for name, kind in zip(names, kinds, strict=True):
        hidden = shared_hidden if family or draw(st.booleans()) else None
        module = draw(module_specs(name=name, kind=kind, hidden=hidden))
        if kind is LayerKind.VIT_BLOCK and (family or draw(st.booleans())):
            module = replace(module, projector_out=shared_hidden)
        modules.append(module)
    candidates = [
        ModuleEdge(src=src.name, dst=dst.name, merge=merge)
        for i, src in enumerate(modules)
        for dst in modules[i + 1 :]
        for merge in MergeKind
        if _edge_ok(src, dst, merge)
    ]
    min_edges = 1 if family else 0
    edges = draw(st.lists(st.sampled_from(candidates), min_size=min_edges, unique=True)) if candidates else []
    return ModelSpec(name=draw(st.text(max_size=16)), modules=tuple(modules), edges=tuple(edges))


def _edge_ok(src: ModuleSpec, dst: ModuleSpec, merge: MergeKind) -> bool:
    """The edge rules of `ModelSpec.__post_init__`."""
    if merge is MergeKind.TOKEN_SCATTER:
        return dst.input is Modality.TEXT and src.output_hidden() == dst.hidden
    return dst.kind is LayerKind.DIT_BLOCK and src.input is Modality.TEXT


@st.composite
def parallel_specs(draw: st.DrawFn, *, model: ModelSpec | None = None) -> ParallelSpec:
    """A valid parallelism; with `model`, one that also passes `check_model(model)`."""
    if model is None:
        pp, tp = draw(st.integers(1, 64)), draw(st.integers(1, 16))
    else:
        pp = draw(st.integers(1, min(m.layers for m in model.modules)))
        tps = [
            tp
            for tp in range(1, 17)
            if all(
                m.heads % tp == 0 and m.ffn_hidden % tp == 0 and (m.kv_heads % tp == 0 or tp % m.kv_heads == 0)
                for m in model.modules
            )
        ]
        tp = draw(st.sampled_from(tps))
    return ParallelSpec(
        pp=pp,
        microbatches=draw(st.integers(1, 1024)),
        tp=tp,
        dp=draw(st.integers(1, 1024)),
        seq_len=draw(st.integers(1, 1 << 20)),
        distributed_optimizer=draw(st.booleans()),
    )


@st.composite
def hardware_specs(draw: st.DrawFn) -> HardwareSpec:
    return HardwareSpec(
        name=draw(st.text(max_size=16)),
        peak_flops=draw(positive_floats),
        hbm_bandwidth=draw(positive_floats),
        memory_bytes=draw(positive_floats),
        nvlink_bandwidth=draw(positive_floats),
        internode_bandwidth=draw(positive_floats),
        gpus_per_node=draw(st.integers(1, 1024)),
        p2p_latency_s=draw(st.floats(min_value=0.0, max_value=1.0)),
        dtype_bytes=draw(st.sampled_from([2, 4])),
        host_link_bandwidth=draw(positive_floats),
        host_memory_bytes=draw(positive_floats),
    )


@st.composite
def media_items(draw: st.DrawFn, *, modalities: tuple[Modality, ...] = (Modality.IMAGE, Modality.VIDEO)) -> MediaItem:
    modality = draw(st.sampled_from(modalities))
    merged = draw(st.integers(0, 4096)) if modality is Modality.IMAGE else 0
    return MediaItem(modality=modality, tokens=draw(st.integers(1, 1 << 20)), merged_tokens=merged)


@st.composite
def batch_metadata(draw: st.DrawFn, *, model: ModelSpec | None = None, max_microbatches: int = 4) -> BatchMetadata:
    """A batch; with `model`, media only of the model's modalities and no empty microbatch.

    Token totals are not bounded by any `seq_len`: callers that run `validate_batch` pick a large one.
    """
    media_modalities: tuple[Modality, ...] = (Modality.IMAGE, Modality.VIDEO)
    if model is not None:
        media_modalities = tuple(m for m in media_modalities if m in {mod.input for mod in model.modules})
    media = st.lists(media_items(modalities=media_modalities), max_size=3) if media_modalities else st.just([])
    documents = st.builds(
        lambda text, items: Document(text_tokens=text, media=tuple(items)), st.integers(0, 4096), media
    )
    min_docs = 0 if model is None else 1
    microbatches = st.lists(documents, min_size=min_docs, max_size=4).map(lambda ds: Microbatch(tuple(ds)))
    return BatchMetadata(
        iteration=draw(st.integers(0, 1 << 40)),
        microbatches=tuple(draw(st.lists(microbatches, min_size=1, max_size=max_microbatches))),
        dp_replica=draw(st.integers(0, 1024)),
    )


# ---- plan --------------------------------------------------------------------------------------------------


@st.composite
def placements(draw: st.DrawFn, *, max_pp: int = 4) -> Placement:
    """1-3 pipelines of 1-3 chunks each, placed on random ranks of `pp`, with a random forward DAG."""
    pp = draw(st.integers(1, max_pp))
    names = draw(st.lists(identifiers, min_size=1, max_size=3, unique=True))
    pipelines = tuple(
        PipelineInfo(
            name=name,
            modules=tuple(draw(st.lists(identifiers, min_size=1, max_size=2, unique=True))),
            backward=draw(st.booleans()),
            weight_grad=draw(st.booleans()),
        )
        for name in names
    )
    chunks = []
    for p in pipelines:
        start = 0
        for index in range(draw(st.integers(1, 3))):
            stop = start + draw(st.integers(1, 8))
            layers = (LayerRange(module=draw(st.sampled_from(p.modules)), start=start, stop=stop),)
            chunks.append(Chunk(pipeline=p.name, index=index, rank=draw(st.integers(0, pp - 1)), layers=layers))
            start = stop
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True)) if pairs else []
    return Placement(
        pp=pp, pipelines=pipelines, chunks=tuple(chunks), edges=tuple(PipelineEdge(a, b) for a, b in edges)
    )


@st.composite
def stage_keys(draw: st.DrawFn, placement: Placement, *, num_microbatches: int, split_backward: bool) -> StageKey:
    chunk = draw(st.sampled_from(placement.chunks))
    passes = [Pass.F, Pass.I, Pass.W] if split_backward else [Pass.F, Pass.B]
    return StageKey(
        pipeline=chunk.pipeline,
        chunk=chunk.index,
        microbatch=draw(st.integers(0, num_microbatches - 1)),
        sub=draw(st.integers(0, 1)),
        pass_=draw(st.sampled_from(passes)),
    )


@st.composite
def rank_plans(
    draw: st.DrawFn, placement: Placement, rank: int, *, num_microbatches: int, split_backward: bool
) -> RankPlan:
    """Random computes (some offloading), prefetches, comm batches and waits; every wait names a batch posted
    earlier on this rank."""
    stages = stage_keys(placement, num_microbatches=num_microbatches, split_backward=split_backward)
    peers = st.integers(0, placement.pp - 1)
    transfers = st.builds(
        Transfer,
        direction=st.sampled_from(Direction),
        peer=peers,
        src=stages,
        dst=stages,
        tensors=st.lists(
            st.builds(
                TensorSpec,
                shape=st.lists(st.integers(1, 1 << 16), max_size=4).map(tuple),
                dtype=st.sampled_from(["bfloat16", "float32", "float16"]),
            ),
            max_size=2,
        ).map(tuple),
    )
    actions: list[Action] = []
    posted: list[int] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["compute", "comm", "prefetch", "wait"] if posted else ["compute", "comm"]))
        if kind == "compute":
            actions.append(Compute(draw(stages), draw(st.sampled_from(Recompute)), draw(st.booleans())))
        elif kind == "prefetch":
            actions.append(Prefetch(draw(stages)))
        elif kind == "comm":
            posted.append(len(posted))
            actions.append(CommBatch(posted[-1], tuple(draw(st.lists(transfers, min_size=1, max_size=3)))))
        else:
            actions.append(Wait(draw(st.sampled_from(posted))))
    predicted: tuple[tuple[float, float], ...] = ()
    if draw(st.booleans()) and actions:
        starts = sorted(draw(st.lists(durations_ms, min_size=len(actions), max_size=len(actions))))
        predicted = tuple((s, s + draw(durations_ms)) for s in starts)
    return RankPlan(rank=rank, actions=tuple(actions), predicted_ms=predicted)


@st.composite
def plans(draw: st.DrawFn, *, max_pp: int = 4) -> Plan:
    """A plan with a random placement, sub-microbatch split, predictions and per-rank actions."""
    placement = draw(placements(max_pp=max_pp))
    num_microbatches = draw(st.integers(1, 4))
    split_backward = draw(st.booleans())
    subs = tuple(
        SubMicrobatch(
            pipeline=p.name,
            microbatch=mb,
            index=index,
            instances=tuple((module, tuple(draw(st.lists(st.integers(0, 64), max_size=4)))) for module in p.modules),
        )
        for p in placement.pipelines
        for mb in range(num_microbatches)
        for index in range(draw(st.integers(1, 2)))
    )
    header = PlanHeader(
        job_id=draw(st.text(max_size=16)),
        iteration=draw(st.integers(0, 1 << 40)),
        placement=placement,
        sub_microbatches=subs,
        num_microbatches=num_microbatches,
        schedule=draw(st.sampled_from(["pipeweaver", "1f1b", "interleaved_1f1b", "zb_h1"])),
        source=draw(st.sampled_from(PlanSource)),
        dp_replica=draw(st.integers(0, 64)),
        split_backward=split_backward,
        predicted_makespan_ms=draw(durations_ms),
        lower_bound_ms=draw(durations_ms),
        peak_memory_bytes=tuple(draw(st.lists(positive_floats, min_size=placement.pp, max_size=placement.pp))),
        baseline_makespans_ms=tuple(
            draw(st.lists(st.tuples(st.sampled_from(["1f1b", "zb_h1"]), durations_ms), max_size=2))
        ),
    )
    ranks = tuple(
        draw(rank_plans(placement, r, num_microbatches=num_microbatches, split_backward=split_backward))
        for r in range(placement.pp)
    )
    return Plan(header=header, ranks=ranks)

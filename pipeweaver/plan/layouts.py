"""Building blocks of plan headers: chunk placements and sub-microbatch splits.

- `modular_placement`: every module its own pipeline of pp*K chunks of near-equal layer counts (PipeWeaver's
  modality-aware partitioning; also Optimus-style layouts with K = 1);
- `mixed_placement`: all modules laid end to end as one layer sequence cut into pp*v chunks balanced by parameter
  count (Megatron-LM's virtual pipeline on a multimodal model);
- `whole_sub_microbatches` / `split_sub_microbatches`: one sub-microbatch per microbatch, or M_i = ceil(N_i/B_i)
  balanced ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum

from pipeweaver.plan.ir import Chunk, LayerRange, PipelineEdge, PipelineInfo, Placement, SubMicrobatch
from pipeweaver.spec.batch import BatchMetadata, module_instances
from pipeweaver.spec.model import ModelSpec


class RankOrder(StrEnum):
    ROUND_ROBIN = "round_robin"
    """Chunk c on rank c % pp (Megatron virtual pipeline)."""
    V_SHAPE = "v_shape"
    """Chunks go down the ranks then back up: c on rank c for c < pp, else 2*pp-1-c (zero-bubble V)."""


def rank_of_chunk(c: int, pp: int, order: RankOrder) -> int:
    if order is RankOrder.ROUND_ROBIN:
        return c % pp
    lap, pos = divmod(c, pp)
    return pos if lap % 2 == 0 else pp - 1 - pos


def split_evenly(total: int, parts: int) -> list[int]:
    """`parts` sizes summing to `total` that differ by at most one (the larger ones last, where the loss is)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


def _pipeline_info(model: ModelSpec, name: str, modules: tuple[str, ...]) -> PipelineInfo:
    backward = any(model.needs_backward(m) for m in modules)
    weight_grad = any(model.module(m).trainable for m in modules)
    return PipelineInfo(name=name, modules=modules, backward=backward, weight_grad=weight_grad)


def modular_placement(
    model: ModelSpec, pp: int, segments: Mapping[str, int] | None = None, *, order: RankOrder = RankOrder.ROUND_ROBIN
) -> Placement:
    """One pipeline per module, cut into pp*K_i chunks of near-equal layers, never mixing modules."""
    pipelines: list[PipelineInfo] = []
    chunks: list[Chunk] = []
    for m in model.modules:
        k = (segments or {}).get(m.name, 1)
        n = pp * k
        if m.layers < n:
            raise ValueError(
                f"module '{m.name}' has {m.layers} layers, fewer than pp*K = {pp}*{k} = {n} chunks; lower K"
            )
        pipelines.append(_pipeline_info(model, m.name, (m.name,)))
        start = 0
        for c, size in enumerate(split_evenly(m.layers, n)):
            rng = LayerRange(module=m.name, start=start, stop=start + size)
            chunks.append(Chunk(pipeline=m.name, index=c, rank=rank_of_chunk(c, pp, order), layers=(rng,)))
            start += size
    edges = tuple(PipelineEdge(src=e.src, dst=e.dst) for e in model.edges)
    return Placement(pp=pp, pipelines=tuple(pipelines), chunks=tuple(chunks), edges=edges)


def _min_max_partition(weights: Sequence[float], parts: int) -> list[int]:
    """Contiguous split of `weights` into `parts` non-empty groups minimising the largest sum; returns sizes."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = math.inf
    # best[k][i]: minimal max-sum splitting the first i items into k groups.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    sizes: list[int] = []
    i = n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def mixed_placement(
    model: ModelSpec,
    pp: int,
    virtual: int = 1,
    *,
    order: RankOrder = RankOrder.ROUND_ROBIN,
    name: str = "model",
    layer_weights: Sequence[float] | None = None,
) -> Placement:
    """All modules end to end as one pipeline of pp*virtual chunks balanced by parameter count (Megatron).

    `layer_weights` (one per layer, modules in declaration order) balances by another cost instead, e.g. the
    FLOPs of a representative batch (nnScaler-style static partitioning).
    """
    layers: list[tuple[str, int, float]] = []
    for m in model.modules:
        for i in range(m.layers):
            w = float(m.block_params())
            if i == 0:
                w += m.pre_params()
            if i == m.layers - 1:
                w += m.post_params()
            layers.append((m.name, i, w))
    if layer_weights is not None:
        if len(layer_weights) != len(layers):
            raise ValueError(
                f"layer_weights has {len(layer_weights)} entries; model '{model.name}' has {len(layers)} layers"
            )
        layers = [(module, i, float(w)) for (module, i, _), w in zip(layers, layer_weights, strict=True)]
    n = pp * virtual
    if len(layers) < n:
        raise ValueError(f"model '{model.name}' has {len(layers)} layers, fewer than pp*virtual = {n} chunks")
    sizes = _min_max_partition([w for _, _, w in layers], n)
    chunks: list[Chunk] = []
    pos = 0
    for c, size in enumerate(sizes):
        group = layers[pos : pos + size]
        pos += size
        ranges: list[LayerRange] = []
        for module, i, _ in group:
            if ranges and ranges[-1].module == module and ranges[-1].stop == i:
                ranges[-1] = LayerRange(module=module, start=ranges[-1].start, stop=i + 1)
            else:
                ranges.append(LayerRange(module=module, start=i, stop=i + 1))
        chunks.append(Chunk(pipeline=name, index=c, rank=rank_of_chunk(c, pp, order), layers=tuple(ranges)))
    info = _pipeline_info(model, name, model.module_names)
    return Placement(pp=pp, pipelines=(info,), chunks=tuple(chunks))


def whole_sub_microbatches(model: ModelSpec, placement: Placement, batch: BatchMetadata) -> tuple[SubMicrobatch, ...]:
    """One sub-microbatch per (pipeline, microbatch) carrying all its instances; none where a pipeline has no work."""
    subs: list[SubMicrobatch] = []
    for info in placement.pipelines:
        for j, mb in enumerate(batch.microbatches):
            inst = tuple((m, tuple(range(len(module_instances(model, m, mb))))) for m in info.modules)
            if any(idx for _, idx in inst):
                subs.append(SubMicrobatch(pipeline=info.name, microbatch=j, index=0, instances=inst))
    return tuple(subs)


def split_sub_microbatches(
    model: ModelSpec, placement: Placement, batch: BatchMetadata, sizes: Mapping[str, int]
) -> tuple[SubMicrobatch, ...]:
    """Per single-module pipeline and microbatch, M = ceil(N/B) sub-microbatches of near-equal instance counts.

    Instances are dealt by size (longest first onto the lightest group) so sub-microbatches balance by tokens,
    not only by count. Pipelines not in `sizes` (or mixed ones) keep one sub-microbatch per microbatch.
    """
    subs: list[SubMicrobatch] = []
    for info in placement.pipelines:
        size = sizes.get(info.name) if len(info.modules) == 1 else None
        for j, mb in enumerate(batch.microbatches):
            if size is None:
                inst = tuple((m, tuple(range(len(module_instances(model, m, mb))))) for m in info.modules)
                if any(idx for _, idx in inst):
                    subs.append(SubMicrobatch(pipeline=info.name, microbatch=j, index=0, instances=inst))
                continue
            module = info.modules[0]
            instances = module_instances(model, module, mb)
            if not instances:
                continue
            groups_n = math.ceil(len(instances) / size)
            counts = split_evenly(len(instances), groups_n)
            groups: list[list[int]] = [[] for _ in range(groups_n)]
            loads = [0] * groups_n
            for i in sorted(range(len(instances)), key=lambda i: (-instances[i].tokens, i)):
                open_groups = [g for g in range(groups_n) if len(groups[g]) < counts[g]]
                g = min(open_groups, key=lambda g: (loads[g], g))
                groups[g].append(i)
                loads[g] += instances[i].tokens
            for k, group in enumerate(groups):
                subs.append(
                    SubMicrobatch(
                        pipeline=info.name, microbatch=j, index=k, instances=((module, tuple(sorted(group))),)
                    )
                )
    return tuple(subs)

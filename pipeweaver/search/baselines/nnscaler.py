"""nnScaler* (the PipeWeaver paper's re-implementation of nnScaler in Megatron-LM): one static plan, searched
once for a representative batch and reused unchanged for every batch.

nnScaler is restricted to 1F1B, so every module sits in one pipeline of pp chunks. The partition minimises the
largest chunk cost under a simple estimate: each layer costs the FLOPs it runs on the representative batch
(dense matmuls 2 * params * tokens, attention 4 * hidden * span^2, halved when causal; times 3 for forward
plus backward). The order is 1F1B. On later batches the order is kept and only the stage costs follow the
data.
"""

from __future__ import annotations

from pipeweaver.plan.ir import Placement
from pipeweaver.plan.layouts import mixed_placement
from pipeweaver.spec.batch import BatchMetadata, Document, Instance, MediaItem, Microbatch, module_instances
from pipeweaver.spec.model import LayerKind, Modality, ModelSpec, ModuleSpec
from pipeweaver.spec.parallel import ParallelSpec

NOMINAL_CLIP_S = 8.0
"""Seconds of video in a nominal microbatch: half the 16 s the paper packs at most."""
NOMINAL_CAPTION_TOKENS_PER_S = 10.0
"""Caption tokens per second of video in a nominal microbatch."""


def nominal_batch(model: ModelSpec, parallel: ParallelSpec) -> BatchMetadata:
    """A representative batch built from the model and parallelism alone, for when no sampled batch is given.

    Every microbatch is one document: image models fill half the language sequence with merged image tokens
    and the rest with text; video models carry one 8 s clip with a 10-tokens-a-second caption; text-only
    models fill the sequence. Pass a batch drawn from the workload (``datagen.sample_batch(workload,
    seed=0)``) to plan for the real data mix instead.
    """
    media: list[MediaItem] = []
    text = parallel.seq_len
    for m in model.modules:
        if m.input is Modality.IMAGE and m.image is not None:
            merged = m.image.tokens_per_image
            images = max(1, (parallel.seq_len // 2) // merged)
            media += [MediaItem(Modality.IMAGE, tokens=m.image.patches_per_image, merged_tokens=merged)] * images
            text = max(0, parallel.seq_len - images * merged)
        elif m.input is Modality.VIDEO and m.video is not None:
            media.append(MediaItem(Modality.VIDEO, tokens=m.video.tokens_for(NOMINAL_CLIP_S)))
            text = min(parallel.seq_len, round(NOMINAL_CLIP_S * NOMINAL_CAPTION_TOKENS_PER_S))
    mb = Microbatch(documents=(Document(text_tokens=text, media=tuple(media)),))
    return BatchMetadata(iteration=0, microbatches=(mb,) * parallel.microbatches)


def _training_factor(model: ModelSpec, module: ModuleSpec) -> float:
    """Forward plus backward FLOPs relative to forward: 3 trainable, 2 input-gradient only, 1 forward only."""
    if module.trainable:
        return 3.0
    return 2.0 if model.needs_backward(module.name) else 1.0


def _block_flops(module: ModuleSpec, inst: Instance) -> float:
    h = module.hidden
    attention = 4.0 * h * sum(s * s for s in inst.attention_spans)
    if module.kind is LayerKind.DECODER_BLOCK:
        attention /= 2  # causal
    if module.kind is LayerKind.DIT_BLOCK:
        attention += 4.0 * h * inst.tokens * inst.context_tokens
    return 2.0 * module.block_params() * inst.tokens + attention


def layer_flops(model: ModelSpec, batch: BatchMetadata) -> list[float]:
    """Estimated training FLOPs of every layer over `batch`, modules in declaration order.

    A module's pre part (patchify; embedding lookups cost nothing) is charged to its first layer and its post
    part (merger, LM head, unpatchify) to its last, as `mixed_placement` charges their parameters.
    """
    out: list[float] = []
    for m in model.modules:
        block = pre = post = 0.0
        for mb in batch.microbatches:
            for inst in module_instances(model, m.name, mb):
                block += _block_flops(m, inst)
                if m.kind is not LayerKind.DECODER_BLOCK:
                    pre += 2.0 * m.pre_params() * inst.tokens
                post += 2.0 * m.post_params() * inst.output_tokens
        factor = _training_factor(model, m)
        layers = [block] * m.layers
        layers[0] += pre
        layers[-1] += post
        out += [factor * f for f in layers]
    return out


def nnscaler_placement(model: ModelSpec, pp: int, representative: BatchMetadata) -> Placement:
    """All modules in one pipeline of pp chunks, cut to balance the representative batch's FLOPs."""
    weights = layer_flops(model, representative)
    if sum(weights) <= 0:  # a batch with no work at all: fall back to parameter balance
        return mixed_placement(model, pp)
    return mixed_placement(model, pp, layer_weights=weights)

"""SEMU's memory model: static bytes per rank (weights, gradients, optimizer states) and activation bytes per layer.

Static memory follows mixed-precision Adam as Megatron runs it: bf16 parameters (2 B), fp32 gradient buffers
(4 B), fp32 master weights plus Adam m and v (12 B), the 12 B sharded across data-parallel replicas by the
distributed optimizer; frozen modules hold their bf16 parameters only; tensor parallelism divides everything.

Activation memory is what a forward keeps until its backward, per layer and per token (Korthikanti et al.,
"Reducing Activation Recomputation in Large Transformer Models"), derived per block architecture with flash
attention (no sequence-squared term) and sequence parallelism (everything divided by tp):

=========  ================================  =============================================
kind       NONE (elements per token)          SELECTIVE (drops attention output, act. fn)
=========  ================================  =============================================
decoder    6h + 2kv + 3f  (Llama3 8B: 17h)   5h + 2kv + 2f
vit        8h + 2f                           7h + f
dit        16h + 2f  (+2h per context tok)   14h + f   (+2h per context token)
=========  ================================  =============================================

In bytes (bf16) the decoder's NONE line is ~34 h per token, Korthikanti's 34 sbh without the 5as/h score term.
FULL checkpoints every block: it keeps only the block's input (T h elements / tp, Korthikanti's 2sbh per layer)
and recomputes the rest in backward, one block at a time. A DiT chunk also keeps its projected caption once.

The executor's blocks keep exactly these counts (`tests/client/test_block_memory.py`; on an H200 within 0.5%,
`benchmarks/gpu/activation_memory.py`). While a backward runs it also needs working memory on top
(`backward_workspace_bytes`), which the engine counts for the duration of the pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeweaver.errors import DoesNotFit
from pipeweaver.plan.ir import Chunk, Placement, Recompute
from pipeweaver.simulator.ops import kv_width
from pipeweaver.spec.batch import Instance
from pipeweaver.spec.hardware import GB, HardwareSpec
from pipeweaver.spec.model import LayerKind, ModelSpec, ModuleSpec
from pipeweaver.spec.parallel import ParallelSpec

PARAM_BYTES = 2.0
"""bf16 weights."""
GRAD_BYTES = 4.0
"""fp32 gradient (main_grad) buffers."""
OPTIMIZER_BYTES = 12.0
"""fp32 master weights + Adam m + Adam v."""
ATTENTION_STATS_BYTES = 4.0
"""Flash attention keeps one fp32 log-sum-exp per head and token."""


# ---- static memory ---------------------------------------------------------------------------------------------


def chunk_params(model: ModelSpec, chunk: Chunk) -> tuple[float, float]:
    """(all, trainable) parameters of `chunk` before tensor parallelism: its blocks plus pre/post parts."""
    total = 0.0
    trainable = 0.0
    for rng in chunk.layers:
        m = model.module(rng.module)
        p = float((rng.stop - rng.start) * m.block_params())
        if rng.start == 0:
            p += m.pre_params()
        if rng.stop == m.layers:
            p += m.post_params()
        total += p
        if m.trainable:
            trainable += p
    return total, trainable


@dataclass(frozen=True, slots=True)
class RankStaticMemory:
    """Memory one pipeline rank (one GPU of its tp group) holds for the whole step."""

    rank: int
    params: float
    """Parameters on this GPU (after the tp split)."""
    trainable_params: float
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def static_memory(model: ModelSpec, parallel: ParallelSpec, placement: Placement) -> tuple[RankStaticMemory, ...]:
    """Per pipeline rank: weights, gradients and optimizer states of the chunks placed on it."""
    out: list[RankStaticMemory] = []
    for r in range(placement.pp):
        total = 0.0
        trainable = 0.0
        for c in placement.chunks:
            if c.rank == r:
                a, t = chunk_params(model, c)
                total += a
                trainable += t
        total /= parallel.tp
        trainable /= parallel.tp
        shards = parallel.dp if parallel.distributed_optimizer else 1
        out.append(
            RankStaticMemory(
                rank=r,
                params=total,
                trainable_params=trainable,
                param_bytes=PARAM_BYTES * total,
                grad_bytes=GRAD_BYTES * trainable,
                optimizer_bytes=OPTIMIZER_BYTES * trainable / shards,
            )
        )
    return tuple(out)


def static_memory_bytes(model: ModelSpec, parallel: ParallelSpec, placement: Placement) -> tuple[float, ...]:
    """Per pipeline rank static bytes (what `engine.StageCosts.static_bytes` takes)."""
    return tuple(m.total_bytes for m in static_memory(model, parallel, placement))


def check_fits(need_bytes: Sequence[float], capacity: HardwareSpec | float, *, what: str = "static memory") -> None:
    """Raise `DoesNotFit` naming the first rank whose need exceeds the capacity (bytes or a device's memory)."""
    cap = capacity.memory_bytes if isinstance(capacity, HardwareSpec) else float(capacity)
    device = f"the {capacity.name}'s" if isinstance(capacity, HardwareSpec) else "the capacity of"
    for r, need in enumerate(need_bytes):
        if need > cap:
            raise DoesNotFit(
                f"rank {r} needs {need / GB:.1f} GB of {what} but {device} {cap / GB:.1f} GB is all there is; "
                "raise tp or pp, enable the distributed optimizer, or recompute more"
            )


# ---- activations ---------------------------------------------------------------------------------------------


def _per_token_elements(module: ModuleSpec, tp: int, recompute: Recompute) -> float:
    """Activation elements one block keeps per (sub-microbatch) token on one tp rank, NONE or SELECTIVE."""
    h, f = module.hidden / tp, module.ffn_hidden / tp
    if module.kind is LayerKind.DECODER_BLOCK:
        kv = float(kv_width(module, tp))
        return 6 * h + 2 * kv + 3 * f if recompute is Recompute.NONE else 5 * h + 2 * kv + 2 * f
    if module.kind is LayerKind.VIT_BLOCK:
        return 8 * h + 2 * f if recompute is Recompute.NONE else 7 * h + f
    return 16 * h + 2 * f if recompute is Recompute.NONE else 14 * h + f


def layer_activation_bytes(
    module: ModuleSpec, instances: Sequence[Instance], *, tp: int, recompute: Recompute, dtype_bytes: int = 2
) -> float:
    """Bytes one block keeps from its forward to its backward (FULL: its input only).

    A DiT's projected caption, which every block reads, is the chunk's (`caption_bytes`), not the block's.
    """
    if not instances:
        return 0.0
    t = sum(i.tokens for i in instances)
    if recompute is Recompute.FULL:
        return float(t * module.hidden / tp * dtype_bytes)
    per_token = _per_token_elements(module, tp, recompute) * dtype_bytes
    per_token += ATTENTION_STATS_BYTES * module.heads / tp
    total = t * per_token
    if module.kind is LayerKind.DIT_BLOCK:
        c = sum(i.context_tokens for i in instances)
        total += c * 2 * module.hidden / tp * dtype_bytes  # cross-attention K and V over the caption
    return float(total)


BACKWARD_WORKSPACE_BLOCKS: dict[tuple[LayerKind, Recompute], float] = {
    (LayerKind.VIT_BLOCK, Recompute.NONE): 0.9,
    (LayerKind.VIT_BLOCK, Recompute.SELECTIVE): 1.2,
    (LayerKind.VIT_BLOCK, Recompute.FULL): 2.9,
    (LayerKind.DECODER_BLOCK, Recompute.NONE): 1.0,
    (LayerKind.DECODER_BLOCK, Recompute.SELECTIVE): 1.2,
    (LayerKind.DECODER_BLOCK, Recompute.FULL): 3.0,
    (LayerKind.DIT_BLOCK, Recompute.NONE): 0.3,
    (LayerKind.DIT_BLOCK, Recompute.SELECTIVE): 0.5,
    (LayerKind.DIT_BLOCK, Recompute.FULL): 1.4,
}
"""A chunk's backward working memory, in units of one of its blocks' NONE activation bytes, per block kind and
strategy: the peak above what the backward starts with (gradient temporaries; under selective recompute the
recomputed attention and activation outputs; under full recompute one block's whole forward, recomputed one block
at a time). Measured on an H200 with the executor's blocks (`benchmarks/gpu/activation_memory.py`, chunks of 4
blocks: ViT 0.83 / 1.17 / 2.82, decoder 0.93 / 1.13 / 2.90, DiT 0.28 / 0.41 / 1.36), rounded up."""


def backward_workspace_bytes(
    module: ModuleSpec, instances: Sequence[Instance], *, tp: int, recompute: Recompute, dtype_bytes: int = 2
) -> float:
    """Bytes a backward pass of a chunk of `module`'s blocks allocates on top of the activations while it runs
    (`BACKWARD_WORKSPACE_BLOCKS`)."""
    one_block = layer_activation_bytes(module, instances, tp=tp, recompute=Recompute.NONE, dtype_bytes=dtype_bytes)
    return BACKWARD_WORKSPACE_BLOCKS[(module.kind, recompute)] * one_block


LOSS_HEAD_WORKSPACE_LOGITS = 2.0
"""The backward of an LM head's loss, in units of its fp32 vocab-parallel logits (the gradient in fp32, then in
the logits' dtype while the head's GEMMs read it): 2.0 measured on an H200 (Llama3 8B's post part at 8,192 tokens,
`benchmarks/gpu/activation_memory.py`)."""


def loss_head_workspace_bytes(module: ModuleSpec, instances: Sequence[Instance], *, tp: int) -> float:
    """Bytes the backward of `module`'s loss head allocates on top while it runs (0 without an LM head)."""
    if not instances or not module.lm_head or module.vocab_size <= 0:
        return 0.0
    t = sum(i.tokens for i in instances)
    return float(LOSS_HEAD_WORKSPACE_LOGITS * t * module.vocab_size / tp * 4.0)


def caption_bytes(module: ModuleSpec, instances: Sequence[Instance], *, tp: int, dtype_bytes: int = 2) -> float:
    """Bytes of a DiT's projected caption context, read by every block's cross-attention (kept once per chunk)."""
    if module.kind is not LayerKind.DIT_BLOCK:
        return 0.0
    return float(sum(i.context_tokens for i in instances) * module.hidden / tp * dtype_bytes)


def pre_activation_bytes(module: ModuleSpec, instances: Sequence[Instance], *, tp: int, dtype_bytes: int = 2) -> float:
    """Bytes the pre part keeps for its weight gradients (patchify inputs; token ids are negligible)."""
    if not instances or not module.trainable:
        return 0.0
    t = sum(i.tokens for i in instances)
    if module.kind is LayerKind.VIT_BLOCK:
        assert module.image is not None
        return float(t * 3 * 2 * module.image.patch_px**2 * dtype_bytes)
    if module.kind is LayerKind.DIT_BLOCK:
        assert module.video is not None
        c = sum(i.context_tokens for i in instances)
        return float((t * 16 * module.video.patch**2 + c * module.context_hidden) * dtype_bytes)
    return 0.0


def post_activation_bytes(module: ModuleSpec, instances: Sequence[Instance], *, tp: int, dtype_bytes: int = 2) -> float:
    """Bytes the post part keeps: final norm in/out, merger activations, fp32 softmax of the vocab-parallel loss."""
    if not instances:
        return 0.0
    t = sum(i.tokens for i in instances)
    h = module.hidden / tp
    if module.kind is LayerKind.VIT_BLOCK:
        out = sum(i.output_tokens for i in instances)
        return float(t * 2 * h * dtype_bytes + out * 2 * module.projector_hidden / tp * dtype_bytes)
    if module.kind is LayerKind.DIT_BLOCK:
        return float(t * 2 * h * dtype_bytes)
    total = t * 2 * h * dtype_bytes
    if module.lm_head:
        total += t * module.vocab_size / tp * 4.0
    return float(total)

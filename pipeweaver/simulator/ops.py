"""Operator nodes of one transformer block (and a module's pre/post parts) for one sub-microbatch.

SEMU costs a stage as the sum of its operators' roofline times (`costmodel.op_time_s`). This module only counts
work: FLOPs, HBM bytes and network bytes per operator, per tensor-parallel rank, for a forward or backward pass and
a recompute strategy. All instances of a sub-microbatch run packed in one sequence, so GEMMs see the total token
count while attention follows each independent block (document, image, clip): its cost is the sum of each span's
length squared, never the packed length squared.

Conventions (Megatron-style tensor parallelism with sequence parallelism):
- GEMMs are split across tp (column then row parallel); norms, residual adds and activations run on T/tp tokens;
- each attention and MLP sub-block ends in one tensor-parallel all-reduce (reduce-scatter + all-gather with
  sequence parallelism, the same bytes), and backward has as many;
- backward GEMMs cost 2x forward (input gradient I, then weight gradient W); attention backward ~2.5x forward
  (flash attention recomputes the scores); elementwise backward moves ~2x the forward bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pipeweaver.plan.ir import Pass, Recompute
from pipeweaver.spec.batch import Instance
from pipeweaver.spec.model import LayerKind, ModuleSpec

ATTENTION_BACKWARD_FLOPS = 2.5
"""Flash attention backward / forward FLOPs (the hardware runs QK^T again, then four GEMM-like products)."""
ATTENTION_BACKWARD_MODEL_FLOPS = 2.0
"""Backward / forward FLOPs in the model-FLOPs (MFU) convention, which does not count the recomputed scores."""
ELEMENTWISE_FLOPS_PER_BYTE = 1.0
"""Norms and activations do a few FLOPs per element; they are memory bound, the exact number never binds."""


class OpClass(StrEnum):
    """Operator classes; each has its own efficiency factors (`costmodel.ClassFactors`)."""

    GEMM = "gemm"
    ATTENTION = "attention"
    """Fused (flash) attention core: QK^T, softmax, PV."""
    ELEMENTWISE = "elementwise"
    """Memory-bound work: norms, adaLN modulation, activations, residual adds, rotary, loss, embedding lookup."""
    TP_ALLREDUCE = "tp_allreduce"
    """Tensor-parallel all-reduce (or reduce-scatter + all-gather) inside a layer."""
    P2P = "p2p"
    """Pipeline point-to-point transfer of activations or gradients."""
    DP_ALLREDUCE = "dp_allreduce"
    """Data-parallel gradient reduction (and parameter all-gather with a distributed optimizer)."""
    OPTIMIZER = "optimizer"
    """The optimizer step (memory bound)."""


COMM_CLASSES = frozenset({OpClass.TP_ALLREDUCE, OpClass.P2P, OpClass.DP_ALLREDUCE})


@dataclass(frozen=True, slots=True)
class Op:
    """One operator node: the work of one tensor-parallel rank."""

    name: str
    op_class: OpClass
    flops: float
    mem_bytes: float
    net_bytes: float = 0.0
    rows: int = 1
    """Size that sets the kernel's efficiency: a GEMM's token rows, an attention's typical block length."""
    backward: bool = False
    """Runs as backward work (calibrated factors differ between forward and backward kernels)."""


# ---- forward operator descriptions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fwd:
    """A forward operator plus what its backward costs."""

    op: Op
    gemm: tuple[int, int, int] | None = None
    """(M, K, N) for GEMMs: backward is dX (M, N, K) then dW (K, M, N)."""
    weight_grad: bool = True
    """GEMM weights are trainable parameters of the module (False for frozen modules)."""
    input_grad: bool = True
    """The operator's input needs a gradient (False for patchify on raw pixels, embedding lookups)."""
    selective: bool = False
    """Recomputed in backward under `Recompute.SELECTIVE` (attention cores and activation functions)."""


def _gemm(name: str, m: int, k: int, n: int, b: int, *, trainable: bool, input_grad: bool = True) -> _Fwd:
    flops = 2.0 * m * k * n
    mem = float(b * (m * k + k * n + m * n))
    return _Fwd(
        Op(name, OpClass.GEMM, flops, mem, rows=m), gemm=(m, k, n), weight_grad=trainable, input_grad=input_grad
    )


def _elem(name: str, elements: float, b: int, *, selective: bool = False) -> _Fwd:
    mem = float(elements * b)
    return _Fwd(Op(name, OpClass.ELEMENTWISE, ELEMENTWISE_FLOPS_PER_BYTE * mem, mem, rows=1), selective=selective)


def _allreduce(name: str, elements: float, b: int, tp: int) -> _Fwd:
    net = 2.0 * (tp - 1) / tp * elements * b
    return _Fwd(Op(name, OpClass.TP_ALLREDUCE, 0.0, 0.0, net_bytes=net, rows=1))


def _attention(name: str, flops: float, mem: float, rows: int) -> _Fwd:
    return _Fwd(Op(name, OpClass.ATTENTION, flops, mem, rows=max(1, rows)), selective=True)


def _weighted_span(spans: Iterable[int]) -> int:
    """FLOP-weighted typical span length (sum s^3 / sum s^2): what an attention kernel's tiles mostly see."""
    s2 = 0
    s3 = 0
    for s in spans:
        s2 += s * s
        s3 += s * s * s
    return round(s3 / s2) if s2 else 1


def _self_attention_flops(instances: Sequence[Instance], module: ModuleSpec, tp: int, *, causal: bool) -> float:
    sq = sum(s * s for inst in instances for s in inst.attention_spans)
    flops = 4.0 * sq * module.head_dim * (module.heads // tp)
    return flops / 2.0 if causal else flops


def kv_width(module: ModuleSpec, tp: int) -> int:
    """K (or V) projection width on one tp rank; kv heads are replicated when tp exceeds them (Megatron)."""
    return max(module.kv_heads // tp, 1) * module.head_dim


def _block_forward(module: ModuleSpec, instances: Sequence[Instance], tp: int, b: int) -> list[_Fwd]:
    """Forward operators of one block, in execution order."""
    t = sum(i.tokens for i in instances)
    h, f = module.hidden, module.ffn_hidden
    hp, fp = h // tp, f // tp
    kvp = kv_width(module, tp)
    trainable = module.trainable
    spans = [s for i in instances for s in i.attention_spans]
    ts = t / tp  # sequence-parallel share of the tokens for norms and residuals
    ops: list[_Fwd] = []
    if module.kind is LayerKind.DECODER_BLOCK:
        ops.append(_elem("input_norm", 2 * ts * h, b))
        ops.append(_gemm("qkv_proj", t, h, hp + 2 * kvp, b, trainable=trainable))
        ops.append(_elem("rotary", 2 * t * (hp + kvp), b))
        ops.append(
            _attention(
                "self_attention",
                _self_attention_flops(instances, module, tp, causal=True),
                float(b * t * (2 * hp + 2 * kvp)),
                _weighted_span(spans),
            )
        )
        ops.append(_gemm("out_proj", t, hp, h, b, trainable=trainable))
        if tp > 1:
            ops.append(_allreduce("attention_allreduce", t * h, b, tp))
        ops.append(_elem("attention_residual", 3 * ts * h, b))
        ops.append(_elem("post_attention_norm", 2 * ts * h, b))
        ops.append(_gemm("gate_up_proj", t, h, 2 * fp, b, trainable=trainable))
        ops.append(_elem("swiglu", 3 * t * fp, b, selective=True))
        ops.append(_gemm("down_proj", t, fp, h, b, trainable=trainable))
        if tp > 1:
            ops.append(_allreduce("mlp_allreduce", t * h, b, tp))
        ops.append(_elem("mlp_residual", 3 * ts * h, b))
        return ops
    if module.kind is LayerKind.VIT_BLOCK:
        ops.append(_elem("norm1", 2 * ts * h, b))
        ops.append(_gemm("qkv_proj", t, h, 3 * hp, b, trainable=trainable))
        ops.append(_elem("rotary", 2 * t * 2 * hp, b))
        ops.append(
            _attention(
                "self_attention",
                _self_attention_flops(instances, module, tp, causal=False),
                float(b * t * 4 * hp),
                _weighted_span(spans),
            )
        )
        ops.append(_gemm("out_proj", t, hp, h, b, trainable=trainable))
        if tp > 1:
            ops.append(_allreduce("attention_allreduce", t * h, b, tp))
        ops.append(_elem("attention_residual", 3 * ts * h, b))
        ops.append(_elem("norm2", 2 * ts * h, b))
        ops.append(_gemm("fc1", t, h, fp, b, trainable=trainable))
        ops.append(_elem("gelu", 2 * t * fp, b, selective=True))
        ops.append(_gemm("fc2", t, fp, h, b, trainable=trainable))
        if tp > 1:
            ops.append(_allreduce("mlp_allreduce", t * h, b, tp))
        ops.append(_elem("mlp_residual", 3 * ts * h, b))
        return ops
    # DiT: adaLN-modulated self-attention, cross-attention to each clip's caption, adaLN-modulated GELU MLP.
    c = sum(i.context_tokens for i in instances)
    ops.append(_elem("norm1", 2 * ts * h, b))
    ops.append(_elem("modulate1", 2 * ts * h, b))
    ops.append(_gemm("qkv_proj", t, h, 3 * hp, b, trainable=trainable))
    ops.append(
        _attention(
            "self_attention",
            _self_attention_flops(instances, module, tp, causal=False),
            float(b * t * 4 * hp),
            _weighted_span(spans),
        )
    )
    ops.append(_gemm("out_proj", t, hp, h, b, trainable=trainable))
    if tp > 1:
        ops.append(_allreduce("attention_allreduce", t * h, b, tp))
    ops.append(_elem("gate_residual1", 3 * ts * h, b))
    ops.append(_elem("norm2", 2 * ts * h, b))
    ops.append(_gemm("cross_q_proj", t, h, hp, b, trainable=trainable))
    if c > 0:
        ops.append(_gemm("cross_kv_proj", c, h, 2 * hp, b, trainable=trainable))
        cross_flops = 4.0 * sum(i.tokens * i.context_tokens for i in instances) * module.head_dim * (module.heads // tp)
        ops.append(
            _attention("cross_attention", cross_flops, float(b * (2 * t * hp + 2 * c * hp)), _context_rows(instances))
        )
    ops.append(_gemm("cross_out_proj", t, hp, h, b, trainable=trainable))
    if tp > 1:
        ops.append(_allreduce("cross_attention_allreduce", t * h, b, tp))
    ops.append(_elem("residual2", 3 * ts * h, b))
    ops.append(_elem("norm3", 2 * ts * h, b))
    ops.append(_elem("modulate3", 2 * ts * h, b))
    ops.append(_gemm("fc1", t, h, fp, b, trainable=trainable))
    ops.append(_elem("gelu", 2 * t * fp, b, selective=True))
    ops.append(_gemm("fc2", t, fp, h, b, trainable=trainable))
    if tp > 1:
        ops.append(_allreduce("mlp_allreduce", t * h, b, tp))
    ops.append(_elem("gate_residual3", 3 * ts * h, b))
    return ops


def _context_rows(instances: Sequence[Instance]) -> int:
    """FLOP-weighted context length of the cross-attentions (flops of a clip are proportional to tokens * context)."""
    num = 0
    den = 0
    for i in instances:
        w = i.tokens * i.context_tokens
        num += w * i.context_tokens
        den += w
    return round(num / den) if den else 1


# ---- pre / post parts --------------------------------------------------------------------------------------------


def _pre_forward(module: ModuleSpec, instances: Sequence[Instance], tp: int, b: int) -> list[_Fwd]:
    t = sum(i.tokens for i in instances)
    h = module.hidden
    trainable = module.trainable
    if module.kind is LayerKind.VIT_BLOCK:
        assert module.image is not None
        # Conv3d patchify over 2 frames as one GEMM; small, replicated across tp.
        k = 3 * 2 * module.image.patch_px**2
        return [_gemm("patchify", t, k, h, b, trainable=trainable, input_grad=False)]
    if module.kind is LayerKind.DIT_BLOCK:
        assert module.video is not None
        ops = [_gemm("patchify", t, 16 * module.video.patch**2, h, b, trainable=trainable, input_grad=False)]
        c = sum(i.context_tokens for i in instances)
        if module.context_hidden and c > 0:
            ops.append(_gemm("context_proj", c, module.context_hidden, h, b, trainable=trainable))
        n = len(instances)
        ops.append(_gemm("timestep_mlp1", n, 256, h, b, trainable=trainable, input_grad=False))
        ops.append(_gemm("timestep_mlp2", n, h, 6 * h, b, trainable=trainable, input_grad=False))
        return ops
    if module.vocab_size <= 0:
        return []
    # Vocab-parallel embedding lookup: a gather, then (tp > 1) the all-reduce/reduce-scatter of the partial rows.
    ops = [_Fwd(Op("embedding", OpClass.ELEMENTWISE, 0.0, float(2 * t * h * b), rows=1), input_grad=False)]
    if tp > 1:
        ops.append(_allreduce("embedding_allreduce", t * h, b, tp))
    return ops


def _post_forward(module: ModuleSpec, instances: Sequence[Instance], tp: int, b: int) -> list[_Fwd]:
    t = sum(i.tokens for i in instances)
    h = module.hidden
    ts = t / tp
    trainable = module.trainable
    if module.kind is LayerKind.VIT_BLOCK:
        ops = [_elem("final_norm", 2 * ts * h, b)]
        if module.projector_hidden:
            assert module.image is not None
            out = sum(i.output_tokens for i in instances)
            merged = h * module.image.merge**2
            ph = module.projector_hidden // tp
            ops.append(_gemm("merger_fc1", out, merged, ph, b, trainable=trainable))
            ops.append(_elem("merger_gelu", 2 * out * ph, b))
            ops.append(_gemm("merger_fc2", out, ph, module.projector_out, b, trainable=trainable))
            if tp > 1:
                ops.append(_allreduce("merger_allreduce", out * module.projector_out, b, tp))
        return ops
    if module.kind is LayerKind.DIT_BLOCK:
        assert module.video is not None
        out_ch = 16 * module.video.patch**2
        return [
            _elem("final_norm_modulate", 4 * ts * h, b),
            _gemm("unpatchify", t, h, out_ch, b, trainable=trainable),
            _elem("diffusion_loss", 3 * t * out_ch, b),
        ]
    ops = [_elem("final_norm", 2 * ts * h, b)]
    if module.lm_head:
        vp = module.vocab_size // tp
        if tp > 1:
            # Sequence parallel: gather the normed tokens before the vocab-parallel head.
            ops.append(_Fwd(Op("head_allgather", OpClass.TP_ALLREDUCE, 0.0, 0.0, net_bytes=(tp - 1) / tp * t * h * b)))
        ops.append(_gemm("lm_head", t, h, vp, b, trainable=trainable))
        # Vocab-parallel cross-entropy: read bf16 logits, write and re-read fp32 softmax.
        ops.append(_Fwd(Op("cross_entropy", OpClass.ELEMENTWISE, float(5 * t * vp), float(t * vp * (b + 8)), rows=1)))
        if tp > 1:
            ops.append(_allreduce("cross_entropy_allreduce", 3 * t * 2, b, tp))  # max, sum, target logit (fp32)
    return ops


# ---- backward derivation -----------------------------------------------------------------------------------------


def _backward(fwd: Sequence[_Fwd], b: int, pass_: Pass, recompute: Recompute, *, trainable: bool) -> list[Op]:
    """Operators of backward pass `pass_` (B, I or W) given the forward operators."""
    want_i = pass_ in (Pass.B, Pass.I)
    want_w = pass_ in (Pass.B, Pass.W) and trainable
    ops: list[Op] = []
    if want_i:
        if recompute is Recompute.FULL:
            ops.extend(f.op for f in fwd)
        elif recompute is Recompute.SELECTIVE:
            ops.extend(f.op for f in fwd if f.selective)
    grads_i: list[Op] = []
    grads_w: list[Op] = []
    for f in reversed(fwd):
        op = f.op
        if op.op_class is OpClass.GEMM:
            assert f.gemm is not None
            m, k, n = f.gemm
            if f.input_grad:
                grads_i.append(
                    Op(
                        f"{op.name}.dgrad",
                        OpClass.GEMM,
                        2.0 * m * k * n,
                        float(b * (m * n + k * n + m * k)),
                        rows=m,
                        backward=True,
                    )
                )
            if f.weight_grad:
                # dW accumulates into fp32 main grads (read + write 4 B each).
                grads_w.append(
                    Op(
                        f"{op.name}.wgrad",
                        OpClass.GEMM,
                        2.0 * m * k * n,
                        float(b * (m * k + m * n) + 8 * k * n),
                        rows=m,
                        backward=True,
                    )
                )
        elif op.op_class is OpClass.ATTENTION:
            grads_i.append(
                Op(
                    f"{op.name}.bwd",
                    OpClass.ATTENTION,
                    ATTENTION_BACKWARD_FLOPS * op.flops,
                    2.0 * op.mem_bytes,
                    rows=op.rows,
                    backward=True,
                )
            )
        elif op.op_class is OpClass.TP_ALLREDUCE:
            grads_i.append(Op(f"{op.name}.bwd", OpClass.TP_ALLREDUCE, 0.0, 0.0, net_bytes=op.net_bytes, backward=True))
        elif op.name == "embedding":
            if f.weight_grad:
                # Scatter-add of the token gradients into the fp32 embedding gradient: a weight gradient.
                grads_w.append(
                    Op(
                        "embedding.wgrad",
                        OpClass.ELEMENTWISE,
                        0.0,
                        op.mem_bytes / 2 * (1 + 8 / b),
                        rows=1,
                        backward=True,
                    )
                )
        elif f.input_grad:
            grads_i.append(
                Op(
                    f"{op.name}.bwd",
                    OpClass.ELEMENTWISE,
                    2.0 * op.flops,
                    2.0 * op.mem_bytes,
                    rows=op.rows,
                    backward=True,
                )
            )
    if want_i:
        ops.extend(grads_i)
    if want_w:
        ops.extend(grads_w)
    return ops


def _ops_for(fwd: list[_Fwd], b: int, pass_: Pass, recompute: Recompute, *, trainable: bool) -> tuple[Op, ...]:
    if pass_ is Pass.F:
        return tuple(f.op for f in fwd)
    return tuple(_backward(fwd, b, pass_, recompute, trainable=trainable))


def layer_ops(
    module: ModuleSpec,
    instances: Sequence[Instance],
    *,
    tp: int,
    pass_: Pass,
    recompute: Recompute = Recompute.NONE,
    dtype_bytes: int = 2,
) -> tuple[Op, ...]:
    """Operators of ONE block of `module` running `pass_` on a sub-microbatch made of `instances`.

    Recompute strategies add forward work to the input-gradient pass (B or I): SELECTIVE the attention cores and
    activation functions, FULL the whole forward. A frozen module's backward is input-gradient only (W is empty).
    """
    if not instances:
        return ()
    fwd = _block_forward(module, instances, tp, dtype_bytes)
    return _ops_for(fwd, dtype_bytes, pass_, recompute, trainable=module.trainable)


def pre_ops(
    module: ModuleSpec, instances: Sequence[Instance], *, tp: int, pass_: Pass, dtype_bytes: int = 2
) -> tuple[Op, ...]:
    """Operators of the module's pre part (embedding, patchify, context projection), run by the chunk holding
    layer 0. Never recomputed."""
    if not instances:
        return ()
    fwd = _pre_forward(module, instances, tp, dtype_bytes)
    return _ops_for(fwd, dtype_bytes, pass_, Recompute.NONE, trainable=module.trainable)


def post_ops(
    module: ModuleSpec, instances: Sequence[Instance], *, tp: int, pass_: Pass, dtype_bytes: int = 2
) -> tuple[Op, ...]:
    """Operators of the module's post part (final norm, merger, LM head and loss, unpatchify), run by the chunk
    holding the last layer. Never recomputed."""
    if not instances:
        return ()
    fwd = _post_forward(module, instances, tp, dtype_bytes)
    return _ops_for(fwd, dtype_bytes, pass_, Recompute.NONE, trainable=module.trainable)


def model_flops(ops: Iterable[Op]) -> float:
    """FLOPs of GEMMs and attention cores (what MFU counts; elementwise work excluded)."""
    return sum(o.flops for o in ops if o.op_class in (OpClass.GEMM, OpClass.ATTENTION))

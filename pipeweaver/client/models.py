"""Reference multimodal models in plain torch, declared as modality modules: pre part, stack of blocks, post part.

A `ModalityModule` builds one part at a time, so each rank builds only the layers placed on it. Parameters are
initialised from a generator seeded by (init seed, module, part): every rank and the unpipelined reference hold
identical weights for the same layer, whatever the placement.

- ViT (`vit_block`): patchify, pre-norm MHA within each image + GELU MLP, LayerNorm; post: merger MLP over
  merge^2 patch windows to the language model's width.
- Decoder (`decoder_block`): token embedding (+ image tokens scattered into placeholders), RMSNorm, GQA with RoPE
  (causal per document), SwiGLU; post: final norm, and LM head with the iteration-normalised next-token loss.
- DiT (`dit_block`): latent patchify of x_t, self-attention per clip, cross-attention to the clip's caption,
  GELU MLP, adaLN modulation from the clip's diffusion timestep; post: unpatchify and the epsilon-MSE loss.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeweaver.client.data import stable_seed
from pipeweaver.client.geometry import (
    Geometry,
    Segment,
    TextGeometry,
    VideoGeometry,
    VisionGeometry,
    context_source,
    latent_dim,
    patch_dim,
)
from pipeweaver.spec.model import LayerKind, MergeKind, ModelSpec, ModuleSpec

TIMESTEP_DIM = 256
"""Width of the DiT's sinusoidal timestep embedding."""


class Stream(NamedTuple):
    """What flows between the blocks of one module: the hidden state and, for a DiT, its cross-attention context."""

    hidden: Tensor
    context: Tensor | None = None


class Piece(NamedTuple):
    """An upstream module's output for some of its instances (a ViT sub-microbatch's merged image tokens)."""

    instances: tuple[int, ...]
    tensor: Tensor


Pieces = Mapping[str, Sequence[Piece]]
"""Upstream module name -> the pieces of its output this module consumes."""


class PostOutput(NamedTuple):
    output: Tensor | None
    """What the module hands to downstream modules (None for a loss head)."""
    loss: Tensor | None
    """This microbatch's share of the iteration loss (already divided by the iteration's target count)."""


class PrePart(nn.Module, ABC):
    """Embedding/patchify/merge: builds the module's stream from local data and upstream pieces."""

    @abstractmethod
    def forward(self, pieces: Pieces, geom: Geometry) -> Stream: ...

    def run(self, pieces: Pieces, geom: Geometry) -> Stream:
        out: Stream = self(pieces, geom)
        return out


class BlockPart(nn.Module, ABC):
    """One transformer block; `selective` recomputes the attention core in backward instead of storing it."""

    @abstractmethod
    def forward(self, stream: Stream, geom: Geometry, selective: bool) -> Stream: ...

    def run(self, stream: Stream, geom: Geometry, selective: bool) -> Stream:
        out: Stream = self(stream, geom, selective)
        return out


class PostPart(nn.Module, ABC):
    """Final norm and merger, projector or loss head."""

    @abstractmethod
    def forward(self, stream: Stream, geom: Geometry) -> PostOutput: ...

    def run(self, stream: Stream, geom: Geometry) -> PostOutput:
        out: PostOutput = self(stream, geom)
        return out


# ---- shared pieces -------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight, in torch's own op: one fused kernel where torch has one, against
        # five elementwise passes over the activations written out.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def sinusoidal(positions: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """(N,) positions -> (N, dim) sin/cos features (parameter-free, so every chunk can compute them)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    out = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        out = F.pad(out, (0, 1))
    return out.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of (T, heads, head_dim) by the tables of `Geometry.rope_tables` (rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference_attention_pieces(
    q: Tensor, k: Tensor, v: Tensor, segments: tuple[Segment, ...], causal: bool
) -> list[Tensor]:
    """Attention of independent blocks; q: (T, H, d), k/v: (S, G, d) with G dividing H (GQA) -> one (ql, H*d)
    output per block with queries, in block order (their concatenation is the (T, H*d) result).

    Each block runs on its own (no T x T mask), so the result of a block does not depend on which other blocks
    share the call: a sub-microbatch computes exactly what the whole microbatch computes for its tokens. The pieces
    are views of what SDPA returns (token-major already), which SDPA keeps for its backward: the output projection
    reads them through `_ProjectPieces`, so no concatenated copy stays alive beside them.
    """
    t, h, d = q.shape
    g = k.shape[1]
    outs: list[Tensor] = []
    for qs, ql, ks, kl in segments:
        if ql == 0:
            continue
        if kl == 0:  # nothing to attend to (a clip without caption): no update
            outs.append(q.new_zeros(ql, h * d))
            continue
        # 4-D (batch, heads, tokens, dim) inputs: with 3-D ones SDPA cannot use its flash or memory-efficient
        # kernels (measured 19x slower at 4,096 tokens on an H100, benchmarks/results/sdpa_3d_vs_4d_h100.json).
        qh = q[qs : qs + ql].transpose(0, 1).unsqueeze(0)
        kh = k[ks : ks + kl].transpose(0, 1).unsqueeze(0)
        vh = v[ks : ks + kl].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, enable_gqa=g != h)
        outs.append(o.squeeze(0).transpose(0, 1).reshape(ql, h * d))
    return outs or [q.new_zeros(t, h * d)]  # never empty: a projection of no tokens still gets its 0 rows


AttentionPieces = Callable[[Tensor, Tensor, Tensor, tuple[Segment, ...], bool], list[Tensor]]

attention_pieces: AttentionPieces = reference_attention_pieces
"""The attention kernel the blocks use, looked up at call time (a benchmark may swap in a faster one with the same
contract, `benchmarks/gpu/fast_attention.py`)."""


def _attend(q: Tensor, k: Tensor, v: Tensor, segments: tuple[Segment, ...], causal: bool) -> Tensor:
    """The reference attention as one (T, H*d) tensor."""
    t, h, d = q.shape
    outs = reference_attention_pieces(q, k, v, segments, causal)
    return torch.cat(outs) if outs else q.new_zeros(t, h * d)


def _cat(pieces: Sequence[Tensor]) -> Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces))


def _linear_grads(
    ctx: Any, grad: Tensor, a: Tensor, weight: Tensor, has_bias: bool, input_index: int, weight_index: int
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(input, weight, bias) gradients of F.linear(a, weight, bias) for `grad`, each only where needed."""
    g2 = grad.reshape(-1, grad.shape[-1])
    ga = grad @ weight if ctx.needs_input_grad[input_index] else None
    gw = g2.t() @ a.reshape(-1, a.shape[-1]) if ctx.needs_input_grad[weight_index] else None
    gb = g2.sum(0) if has_bias and ctx.needs_input_grad[weight_index + 1] else None
    return ga, gw, gb


# The memory-lean autograd functions below keep what SEMU counts (`simulator.memory`). Under a split backward (the
# executor's I pass, then W: the zero-bubble baselines) autograd asks them for every gradient in each pass (a custom
# function sees only which inputs require one, not which the pass wants), so their GEMMs run in both passes there.


class _ProjectPieces(torch.autograd.Function):
    """y = cat(pieces) @ W^T + b, keeping the pieces (attention keeps them for its own backward anyway) instead of
    their concatenation: one copy of the attention output per block, as SEMU counts it (`simulator.memory`)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, bias: Tensor | None, *pieces: Tensor) -> Tensor:
        ctx.save_for_backward(weight, *pieces)
        ctx.has_bias = bias is not None
        return F.linear(_cat(pieces), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, *pieces = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gw = g2.t() @ _cat(pieces) if ctx.needs_input_grad[0] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        ga = grad @ weight
        return (gw, gb, *torch.split(ga, [p.shape[0] for p in pieces]))


class _AttendProject(torch.autograd.Function):
    """Selective recompute: attention and its output projection, keeping only q, k and v. The backward runs the
    attention again (not the projection's GEMM); the attention output is never kept (Korthikanti et al.)."""

    @staticmethod
    def forward(
        ctx: Any,
        kernel: AttentionPieces,
        segments: tuple[Segment, ...],
        causal: bool,
        weight: Tensor,
        bias: Tensor | None,
        q: Tensor,
        k: Tensor,
        v: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(weight, q, k, v)
        ctx.kernel, ctx.segments, ctx.causal, ctx.has_bias = kernel, segments, causal, bias is not None
        return F.linear(_cat(kernel(q, k, v, segments, causal)), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(True) for x in (q, k, v)]
            pieces = ctx.kernel(*inputs, ctx.segments, ctx.causal)
        g2 = grad.reshape(-1, grad.shape[-1])
        gw = g2.t() @ _cat(pieces).detach() if ctx.needs_input_grad[3] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        ga = torch.split(grad @ weight, [p.shape[0] for p in pieces])
        live = [(p, g) for p, g in zip(pieces, ga, strict=True) if p.requires_grad]
        grads: tuple[Tensor | None, ...] = (None, None, None)
        if live:
            grads = torch.autograd.grad(
                [p for p, _ in live], inputs, [g for _, g in live], allow_unused=True, materialize_grads=True
            )
        return (None, None, None, gw, gb, *grads)


def attend_project(
    q: Tensor, k: Tensor, v: Tensor, segments: tuple[Segment, ...], proj: nn.Linear, *, causal: bool, selective: bool
) -> Tensor:
    """proj(attention(q, k, v)); `selective` recomputes the attention in the backward instead of keeping its output."""
    if selective:
        out: Tensor = _AttendProject.apply(attention_pieces, segments, causal, proj.weight, proj.bias, q, k, v)  # type: ignore[no-untyped-call]
        return out
    pieces = attention_pieces(q, k, v, segments, causal)
    projected: Tensor = _ProjectPieces.apply(proj.weight, proj.bias, *pieces)  # type: ignore[no-untyped-call]
    return projected


class _GeluLinear(torch.autograd.Function):
    """fc2(gelu(u)). Without `selective` it keeps u and gelu(u), as autograd would; with it, u only, and gelu(u) is
    recomputed in the backward (selective recompute of the activation function)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, weight: Tensor, bias: Tensor | None, selective: bool) -> Tensor:
        a = F.gelu(u)
        ctx.save_for_backward(u, weight, None if selective else a)
        ctx.has_bias = bias is not None
        return F.linear(a, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        u, weight, a = ctx.saved_tensors
        if a is None:
            a = F.gelu(u)
        ga, gw, gb = _linear_grads(ctx, grad, a, weight, ctx.has_bias, 0, 1)
        gu = torch.ops.aten.gelu_backward(ga, u) if ga is not None else None
        return gu, gw, gb, None


class _SwiGLULinear(torch.autograd.Function):
    """down(silu(gate) * up). Without `selective` it keeps gate, up and their product (what the down projection
    reads); with it, gate and up only, and the product is recomputed in the backward. silu(gate) is recomputed
    either way (an elementwise pass; autograd would keep it, a fourth ffn-wide tensor SEMU does not count)."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor, weight: Tensor, selective: bool) -> Tensor:
        a = F.silu(gate) * up
        ctx.save_for_backward(gate, up, weight, None if selective else a)
        return F.linear(a, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        gate, up, weight, a = ctx.saved_tensors
        s = F.silu(gate)
        if a is None:
            a = s * up
        ga, gw, _ = _linear_grads(ctx, grad, a, weight, False, 0, 2)
        g_gate = g_up = None
        if ga is not None:
            g_gate = torch.ops.aten.silu_backward(ga * up, gate)
            g_up = ga * s
        return g_gate, g_up, gw, None


def gelu_mlp_out(u: Tensor, fc2: nn.Linear, *, selective: bool) -> Tensor:
    out: Tensor = _GeluLinear.apply(u, fc2.weight, fc2.bias, selective)  # type: ignore[no-untyped-call]
    return out


def swiglu_out(gate: Tensor, up: Tensor, down: nn.Linear, *, selective: bool) -> Tensor:
    out: Tensor = _SwiGLULinear.apply(gate, up, down.weight, selective)  # type: ignore[no-untyped-call]
    return out


class _ClipModulate(torch.autograd.Function):
    """adaLN modulation x * (1 + scale) + shift with one (shift, scale) per clip, `clip` the clip of each token. It
    keeps x and the per-clip table; autograd would keep the table gathered to every token (six hidden-wide tensors
    per block with the gates), which SEMU does not count."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shift: Tensor, scale: Tensor, clip: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale, clip)
        ctx.clips = shift.shape[0]
        return torch.addcmul(shift[clip], x, 1 + scale[clip])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, scale, clip = ctx.saved_tensors
        gx = grad * (1 + scale[clip]) if ctx.needs_input_grad[0] else None
        g_shift = _per_clip(grad, clip, ctx.clips) if ctx.needs_input_grad[1] else None
        g_scale = _per_clip(grad * x, clip, ctx.clips) if ctx.needs_input_grad[2] else None
        return gx, g_shift, g_scale, None


class _ClipGate(torch.autograd.Function):
    """Gated residual x + gate * y with one gate per clip: keeps y and the per-clip gates."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, gate: Tensor, clip: Tensor) -> Tensor:
        ctx.save_for_backward(y, gate, clip)
        ctx.clips = gate.shape[0]
        return torch.addcmul(x, gate[clip], y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        y, gate, clip = ctx.saved_tensors
        gy = grad * gate[clip] if ctx.needs_input_grad[1] else None
        g_gate = _per_clip(grad * y, clip, ctx.clips) if ctx.needs_input_grad[2] else None
        return grad, gy, g_gate, None


def _per_clip(values: Tensor, clip: Tensor, clips: int) -> Tensor:
    """Sum of each clip's rows of `values` (T, h) -> (clips, h), accumulated in fp32."""
    out = torch.zeros(clips, values.shape[-1], dtype=torch.float32, device=values.device)
    return out.index_add_(0, clip, values.float()).to(values.dtype)


def clip_modulate(x: Tensor, shift: Tensor, scale: Tensor, clip: Tensor) -> Tensor:
    out: Tensor = _ClipModulate.apply(x, shift, scale, clip)  # type: ignore[no-untyped-call]
    return out


def clip_gate(x: Tensor, y: Tensor, gate: Tensor, clip: Tensor) -> Tensor:
    out: Tensor = _ClipGate.apply(x, y, gate, clip)  # type: ignore[no-untyped-call]
    return out


# ---- ViT ------------------------------------------------------------------------------------------------------


class ViTPre(PrePart):
    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__()
        self.patchify = nn.Linear(patch_dim(spec), spec.hidden, bias=False)

    def forward(self, pieces: Pieces, geom: Geometry) -> Stream:
        assert isinstance(geom, VisionGeometry)
        x = self.patchify(geom.patches)
        return Stream(x + sinusoidal(geom.positions, x.shape[-1], x.dtype))


class ViTBlock(BlockPart):
    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__()
        h, f = spec.hidden, spec.ffn_hidden
        self.heads = spec.heads
        self.norm1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, f)
        self.fc2 = nn.Linear(f, h)

    def forward(self, stream: Stream, geom: Geometry, selective: bool) -> Stream:
        x = stream.hidden
        t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(t, 3, self.heads, h // self.heads).unbind(1)
        x = x + attend_project(q, k, v, geom.segments, self.proj, causal=False, selective=selective)
        x = x + gelu_mlp_out(self.fc1(self.norm2(x)), self.fc2, selective=selective)
        return Stream(x, stream.context)


class ViTPost(PostPart):
    """LayerNorm, then the merger: concatenate each window of merge^2 patches and project to the LM width."""

    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__()
        assert spec.image is not None
        h, w, out = spec.hidden, spec.image.merge**2, spec.output_hidden()
        self.norm = nn.LayerNorm(h)
        self.merger: nn.Module
        if spec.projector_hidden:
            self.merger = nn.Sequential(
                nn.Linear(w * h, spec.projector_hidden), nn.GELU(), nn.Linear(spec.projector_hidden, out)
            )
        else:
            self.merger = nn.Linear(w * h, out)

    def forward(self, stream: Stream, geom: Geometry) -> PostOutput:
        assert isinstance(geom, VisionGeometry)
        y = self.norm(stream.hidden)
        t, h = y.shape
        out: Tensor = self.merger(y.reshape(t // geom.window, geom.window * h))
        return PostOutput(out, None)


# ---- decoder (language model, text encoder) -----------------------------------------------------------------


class DecoderPre(PrePart):
    """Token embedding; image tokens from a token-scatter edge overwrite their placeholder positions."""

    def __init__(self, model: ModelSpec, spec: ModuleSpec) -> None:
        super().__init__()
        if spec.vocab_size <= 0:
            raise ValueError(f"module '{spec.name}': a reference decoder needs vocab_size > 0 for its embedding")
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden)
        self.scatter_from = tuple(e.src for e in model.upstream(spec.name) if e.merge is MergeKind.TOKEN_SCATTER)

    def forward(self, pieces: Pieces, geom: Geometry) -> Stream:
        assert isinstance(geom, TextGeometry)
        x = self.embed(geom.token_ids)
        for src in self.scatter_from:
            for piece in pieces.get(src, ()):
                x = torch.index_copy(x, 0, geom.image_slots(piece.instances), piece.tensor.to(x.dtype))
        return Stream(x)


class DecoderBlock(BlockPart):
    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__()
        h, f, kv = spec.hidden, spec.ffn_hidden, spec.kv_dim
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.norm1 = RMSNorm(h)
        self.q = nn.Linear(h, h)
        self.k = nn.Linear(h, kv)
        self.v = nn.Linear(h, kv)
        self.o = nn.Linear(h, h, bias=False)
        self.norm2 = RMSNorm(h)
        self.gate = nn.Linear(h, f, bias=False)
        self.up = nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, stream: Stream, geom: Geometry, selective: bool) -> Stream:
        assert isinstance(geom, TextGeometry)
        x = stream.hidden
        t = x.shape[0]
        y = self.norm1(x)
        cos, sin = geom.rope_tables(self.head_dim, y.dtype)
        q = apply_rope(self.q(y).view(t, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k(y).view(t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v(y).view(t, self.kv_heads, self.head_dim)
        x = x + attend_project(q, k, v, geom.segments, self.o, causal=True, selective=selective)
        y = self.norm2(x)
        x = x + swiglu_out(self.gate(y), self.up(y), self.down, selective=selective)
        return Stream(x, stream.context)


class DecoderPost(PostPart):
    """Final RMSNorm; with an LM head, the next-token loss summed and divided by the iteration's target count."""

    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__()
        self.norm = RMSNorm(spec.hidden)
        self.head = nn.Linear(spec.hidden, spec.vocab_size, bias=False) if spec.lm_head else None

    def forward(self, stream: Stream, geom: Geometry) -> PostOutput:
        assert isinstance(geom, TextGeometry)
        y = self.norm(stream.hidden)
        if self.head is None:
            return PostOutput(y, None)
        logits = self.head(y).float()
        loss = F.cross_entropy(logits, geom.labels, ignore_index=-100, reduction="sum") / geom.scale.text_targets
        return PostOutput(None, loss)


# ---- DiT ------------------------------------------------------------------------------------------------------


class DiTPre(PrePart):
    """Patchify the noisy latents x_t; the caption context is the text encoder's output, as received."""

    def __init__(self, model: ModelSpec, spec: ModuleSpec) -> None:
        super().__init__()
        self.patchify = nn.Linear(latent_dim(spec), spec.hidden)
        src = context_source(model, spec.name)
        self.context_from = src.name if src is not None else None
        self.context_width = src.output_hidden() if src is not None else 0

    def forward(self, pieces: Pieces, geom: Geometry) -> Stream:
        assert isinstance(geom, VideoGeometry)
        x = self.patchify(geom.noisy_latents)
        x = x + sinusoidal(geom.positions, x.shape[-1], x.dtype)
        if self.context_from is None:
            return Stream(x)
        got = [p.tensor.to(x.dtype) for p in pieces.get(self.context_from, ())]
        context = torch.cat(got) if got else x.new_zeros(0, self.context_width)
        if context.shape[0] != geom.context_tokens:
            raise ValueError(
                f"DiT '{geom.module.name}' microbatch {geom.microbatch}: context has {context.shape[0]} tokens, "
                f"the captions have {geom.context_tokens}"
            )
        return Stream(x, context)


class DiTBlock(BlockPart):
    def __init__(self, model: ModelSpec, spec: ModuleSpec) -> None:
        super().__init__()
        h, f = spec.hidden, spec.ffn_hidden
        src = context_source(model, spec.name)
        self.heads = spec.heads
        self.norm1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.cross: nn.ModuleDict | None = None
        if src is not None:
            cw = src.output_hidden()
            self.norm2 = nn.LayerNorm(h)
            self.cross = nn.ModuleDict(
                {"q": nn.Linear(h, h), "k": nn.Linear(cw, h, bias=False), "v": nn.Linear(cw, h), "o": nn.Linear(h, h)}
            )
        self.norm3 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, f)
        self.fc2 = nn.Linear(f, h)
        self.table = nn.Parameter(torch.zeros(6 * h))
        """adaLN-single per-block modulation table."""
        self.ada = nn.Linear(TIMESTEP_DIM, 6 * h)

    def forward(self, stream: Stream, geom: Geometry, selective: bool) -> Stream:
        assert isinstance(geom, VideoGeometry)
        x = stream.hidden
        t, h = x.shape
        d = h // self.heads
        temb = sinusoidal(geom.timesteps * 1000.0, TIMESTEP_DIM, x.dtype)
        clip = geom.clip_of_token
        # adaLN-single: one row of six modulation vectors per clip, applied per token without gathering it
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.table + self.ada(F.silu(temb))).chunk(6, dim=-1)
        q, k, v = self.qkv(clip_modulate(self.norm1(x), shift1, scale1, clip)).view(t, 3, self.heads, d).unbind(1)
        x = clip_gate(
            x, attend_project(q, k, v, geom.segments, self.proj, causal=False, selective=selective), gate1, clip
        )
        if self.cross is not None:
            assert stream.context is not None
            ctx = stream.context
            cq = self.cross["q"](self.norm2(x)).view(t, self.heads, d)
            ck = self.cross["k"](ctx).view(-1, self.heads, d)
            cv = self.cross["v"](ctx).view(-1, self.heads, d)
            out_proj = self.cross["o"]
            assert isinstance(out_proj, nn.Linear)
            x = x + attend_project(cq, ck, cv, geom.cross_segments, out_proj, causal=False, selective=selective)
        y = clip_modulate(self.norm3(x), shift2, scale2, clip)
        x = clip_gate(x, gelu_mlp_out(self.fc1(y), self.fc2, selective=selective), gate2, clip)
        return Stream(x, stream.context)


class DiTPost(PostPart):
    """Final norm, unpatchify to latent values, and the epsilon-prediction MSE over the iteration's latents."""

    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(spec.hidden)
        self.out = nn.Linear(spec.hidden, latent_dim(spec), bias=False)

    def forward(self, stream: Stream, geom: Geometry) -> PostOutput:
        assert isinstance(geom, VideoGeometry)
        pred = self.out(self.norm(stream.hidden)).float()
        loss = (pred - geom.noise.float()).pow(2).sum() / geom.scale.video_values
        return PostOutput(None, loss)


# ---- modules ----------------------------------------------------------------------------------------------------


class ModalityModule(ABC):
    """A modality module of a user's model: builds its pre part, each block and its post part on demand.

    Subclass it to run your own blocks; they take and return `Stream`s and read their inputs from the
    `Geometry` the executor builds from the batch metadata.
    """

    def __init__(self, model: ModelSpec, spec: ModuleSpec) -> None:
        self.model = model
        self.spec = spec

    @abstractmethod
    def build_pre(self) -> PrePart | None: ...

    @abstractmethod
    def build_block(self, layer: int) -> BlockPart: ...

    @abstractmethod
    def build_post(self) -> PostPart | None: ...


class ViTModule(ModalityModule):
    def build_pre(self) -> PrePart:
        return ViTPre(self.spec)

    def build_block(self, layer: int) -> BlockPart:
        return ViTBlock(self.spec)

    def build_post(self) -> PostPart:
        return ViTPost(self.spec)


class DecoderModule(ModalityModule):
    def build_pre(self) -> PrePart:
        return DecoderPre(self.model, self.spec)

    def build_block(self, layer: int) -> BlockPart:
        return DecoderBlock(self.spec)

    def build_post(self) -> PostPart:
        return DecoderPost(self.spec)


class DiTModule(ModalityModule):
    def build_pre(self) -> PrePart:
        return DiTPre(self.model, self.spec)

    def build_block(self, layer: int) -> BlockPart:
        return DiTBlock(self.model, self.spec)

    def build_post(self) -> PostPart:
        return DiTPost(self.spec)


def reference_modules(model: ModelSpec) -> dict[str, ModalityModule]:
    """The reference implementation of every module of `model`, by layer kind."""
    kinds: dict[LayerKind, type[ModalityModule]] = {
        LayerKind.VIT_BLOCK: ViTModule,
        LayerKind.DECODER_BLOCK: DecoderModule,
        LayerKind.DIT_BLOCK: DiTModule,
    }
    return {m.name: kinds[m.kind](model, m) for m in model.modules}


def part_key(module: str, part: str | int) -> str:
    """Name prefix of a part's parameters: ``vit.pre``, ``vit.blocks.3``, ``llm.post``."""
    return f"{module}.blocks.{part}" if isinstance(part, int) else f"{module}.{part}"


def init_part(part: nn.Module, *, seed: int, key: str) -> None:
    """Deterministic initialisation of one part from (seed, key) alone: identical on every rank."""
    g = torch.Generator().manual_seed(stable_seed("init", seed, key))
    with torch.no_grad():
        for name, p in sorted(part.named_parameters()):
            shape = tuple(p.shape)
            if p.dim() >= 2:
                value = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
            elif name.endswith("bias"):
                value = 0.02 * torch.randn(shape, generator=g)
            elif name.endswith("table"):
                value = 0.1 * torch.randn(shape, generator=g)
            else:  # norm gains
                value = 1.0 + 0.1 * torch.randn(shape, generator=g)
            p.copy_(value.to(p.dtype))


def build_part(
    module: ModalityModule,
    part: str | int,
    *,
    seed: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module | None:
    """Build and initialise `part` ("pre", "post" or a block index) of `module`; None when the module has none."""
    built: nn.Module | None
    if part == "pre":
        built = module.build_pre()
    elif part == "post":
        built = module.build_post()
    elif isinstance(part, int):
        built = module.build_block(part)
    else:
        raise ValueError(f"part must be 'pre', 'post' or a block index, got {part!r}")
    if built is None:
        return None
    init_part(built, seed=seed, key=part_key(module.spec.name, part))
    if module.spec.frozen:
        built.requires_grad_(False)
    return built.to(device=device or torch.device("cpu"), dtype=dtype)

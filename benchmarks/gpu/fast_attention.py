"""Benchmark-only attention for the reference blocks: `use_fast_attention()` swaps
`pipeweaver.client.models.attention_pieces`.

The reference `_attend` calls `scaled_dot_product_attention` once per document / image on 3-D (heads, T, d)
tensors. On CUDA, SDPA's flash and memory-efficient kernels need 4-D (batch, heads, T, d) inputs, so every call
falls back to the math kernel (T x T scores materialised, upcast to fp32), and a packed microbatch of many short
documents costs one Python-level SDPA call (and ~40 kernels with backward) per document per layer.

This module computes the same function with 4-D tensors:
- self-attention whose blocks tile the sequence in equal lengths (one document, or same-size images): one batched
  SDPA call (flash kernel; GQA through `enable_gqa`);
- self-attention over blocks of different lengths: one variable-length flash attention call
  (`torch.nn.attention.varlen.varlen_attn`, cumulative block offsets: each document costs its own length squared)
  when this torch has it and it agrees with the reference on a small case at start-up (`use_fast_attention`),
  else one SDPA call with a block-diagonal (causal) boolean mask, K/V expanded to all heads (memory-efficient
  kernel: the whole T x T square, whatever the documents; on the 2026-11-27 H200 runs SEMU, which charges each
  document its own square, under-predicted text-only batches of ~1,500 documents by 26-36%, see docs/gpu.md);
- anything else (cross-attention, empty blocks): the reference kernel (`models.reference_attention_pieces`).
Both sides of every comparison run the same (patched) blocks.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict

import _bare_client  # noqa: F401
import torch
import torch.nn.functional as F
from torch import Tensor

import pipeweaver.client.models as models

_MASKS: OrderedDict[tuple[tuple[int, ...], bool, str], Tensor] = OrderedDict()


def _mask(lengths: tuple[int, ...], causal: bool, device: torch.device) -> Tensor:
    key = (lengths, causal, str(device))
    m = _MASKS.get(key)
    if m is None:
        lens = torch.tensor(lengths)
        if device.type == "cuda":  # a pageable copy would make the host wait for the kernels queued before it
            lens = lens.pin_memory().to(device, non_blocking=True)
        # output_size: without it, CUDA's repeat_interleave reads the total back to the host (a sync)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens, output_size=sum(lengths))
        m = doc[:, None] == doc[None, :]
        if causal:
            m = m.tril()
        _MASKS[key] = m
        if len(_MASKS) > 48:  # a 4096-token mask is 16 MiB of GPU memory: keep about 3 iterations' worth
            _MASKS.popitem(last=False)
    else:
        _MASKS.move_to_end(key)
    return m


def fast_pieces(q: Tensor, k: Tensor, v: Tensor, segments: tuple[models.Segment, ...], causal: bool) -> list[Tensor]:
    """`models.attention_pieces`' contract: the outputs per block (here one piece for all blocks when they tile the
    sequence; else the reference kernel's pieces)."""
    t = q.shape[0]
    segs = [s for s in segments if s[1] > 0]
    pos = 0
    tiles = k.shape[0] == t
    for qs, ql, ks, kl in segs:
        if qs != pos or ks != qs or kl != ql:
            tiles = False
            break
        pos += ql
    if not segs or not tiles or pos != t:
        return models.reference_attention_pieces(q, k, v, segments, causal)
    return [_fast_tiled(q, k, v, tuple(ql for _, ql, _, _ in segs), causal)]


def _fast_tiled(q: Tensor, k: Tensor, v: Tensor, lengths: tuple[int, ...], causal: bool) -> Tensor:
    """Attention within consecutive blocks of `lengths` that tile the sequence; (T, H*d) out."""
    t, h, d = q.shape
    g = k.shape[1]
    if all(n == lengths[0] for n in lengths):
        n, length = len(lengths), lengths[0]
        qb = q.reshape(n, length, h, d).transpose(1, 2)
        kb = k.reshape(n, length, g, d).transpose(1, 2)
        vb = v.reshape(n, length, g, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, enable_gqa=g != h)
        return o.transpose(1, 2).reshape(t, h * d)
    if _VARLEN_OK and q.device.type == "cuda":
        return _varlen(q, k, v, lengths, causal).reshape(t, h * d)
    if g != h:
        k = k.repeat_interleave(h // g, dim=1)
        v = v.repeat_interleave(h // g, dim=1)
    mask = _mask(lengths, causal, q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask
    )
    return o[0].transpose(0, 1).reshape(t, h * d)


_VARLEN_OK = False
"""Set by `use_fast_attention` once varlen attention matched the reference on this machine."""
_OFFSETS: OrderedDict[tuple[tuple[int, ...], str], Tensor] = OrderedDict()


def _offsets(lengths: tuple[int, ...], device: torch.device) -> Tensor:
    """Cumulative block starts (int32, len + 1) on the device, cached per layout (one per microbatch)."""
    key = (lengths, str(device))
    cu = _OFFSETS.get(key)
    if cu is None:
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        host = torch.tensor(starts, dtype=torch.int32)
        cu = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        _OFFSETS[key] = cu
        if len(_OFFSETS) > 256:
            _OFFSETS.popitem(last=False)
    else:
        _OFFSETS.move_to_end(key)
    return cu


@functools.cache
def _varlen_params() -> frozenset[str]:
    """`varlen_attn`'s keyword names (looked up once: `inspect.signature` costs tens of microseconds a call)."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen(q: Tensor, k: Tensor, v: Tensor, lengths: tuple[int, ...], causal: bool) -> Tensor:
    """Blocks of different lengths in one variable-length flash attention call; (T, H, d) out. Handles the
    keyword differences between torch versions (causal as a flag or as a (-1, 0) window; GQA as a flag or by
    expanding K/V)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    h, g = q.shape[1], k.shape[1]
    kwargs: dict[str, object] = {}
    if causal:
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
    if g != h:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(h // g, dim=1)
            v = v.repeat_interleave(h // g, dim=1)
    cu = _offsets(lengths, q.device)
    longest = max(lengths)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _varlen_matches_reference(device: torch.device) -> str:
    """Empty when varlen attention gives the reference's output and gradients (bf16 tolerance) on a small packed
    causal GQA case, else why not."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        lengths = (5, 17, 9, 33)
        t, h, g, d = sum(lengths), 4, 2, 64
        segs = []
        pos = 0
        for n in lengths:
            segs.append((pos, n, pos, n))
            pos += n
        base = [torch.randn(t, n_heads, d, generator=gen, device=device) for n_heads in (h, g, g)]
        outs, grads = [], []
        for fn in (lambda a, b, c: _varlen(a, b, c, lengths, True).reshape(t, h * d),
                   lambda a, b, c: models._attend(a, b, c, tuple(segs), True)):  # fmt: skip
            qkv = [x.to(torch.bfloat16).requires_grad_() for x in base]
            o = fn(*qkv)
            o.float().square().sum().backward()
            outs.append(o.float())
            grads.append([x.grad.float() for x in qkv])
        if not torch.allclose(outs[0], outs[1], atol=3e-2, rtol=3e-2):
            return f"outputs differ by {(outs[0] - outs[1]).abs().max().item():.3g}"
        for a, b in zip(grads[0], grads[1], strict=True):
            if not torch.allclose(a, b, atol=1e-1, rtol=5e-2):
                return f"gradients differ by {(a - b).abs().max().item():.3g}"
        return ""
    except Exception as e:  # an older torch, no flash kernel for this card, ...
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {first[:200]}"


def use_fast_attention(device: torch.device | None = None) -> str:
    """Swap in `fast_pieces`; on a CUDA `device`, enable the variable-length path if it matches the reference.
    Returns what was chosen (one line, for the run's log). Selective recompute reruns whichever kernel is in place
    (`models.attend_project`)."""
    global _VARLEN_OK
    models.attention_pieces = fast_pieces  # the blocks look the kernel up in the module at call time
    if device is None or device.type != "cuda":
        return "fast attention: block-diagonal masks (no CUDA device)"
    why = _varlen_matches_reference(device)
    _VARLEN_OK = not why
    return "fast attention: varlen flash for packed documents" if _VARLEN_OK else f"fast attention: masks ({why})"

"""Benchmark-only attention for the reference blocks: `use_fast_attention()` swaps `pipeweaver.client.models.attend`.

The reference `_attend` calls `scaled_dot_product_attention` once per document / image on 3-D (heads, T, d)
tensors. On CUDA, SDPA's flash and memory-efficient kernels need 4-D (batch, heads, T, d) inputs, so every call
falls back to the math kernel (T x T scores materialised, upcast to fp32), and a packed microbatch of many short
documents costs one Python-level SDPA call (and ~40 kernels with backward) per document per layer.

This module computes the same function with 4-D tensors:
- self-attention whose blocks tile the sequence in equal lengths (one document, or same-size images): one batched
  SDPA call (flash kernel; GQA through `enable_gqa`);
- self-attention over blocks of different lengths: one SDPA call with a block-diagonal (causal) boolean mask,
  K/V expanded to all heads (memory-efficient kernel);
- anything else (cross-attention, empty blocks): the reference `_attend`.
Both sides of every comparison run the same (patched) blocks.
"""

from __future__ import annotations

from collections import OrderedDict

import _bare_client  # noqa: F401
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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


def _fast(q: Tensor, k: Tensor, v: Tensor, segments: tuple[models.Segment, ...], causal: bool) -> Tensor:
    t, h, d = q.shape
    g = k.shape[1]
    segs = [s for s in segments if s[1] > 0]
    pos = 0
    tiles = k.shape[0] == t
    for qs, ql, ks, kl in segs:
        if qs != pos or ks != qs or kl != ql:
            tiles = False
            break
        pos += ql
    if not segs or not tiles or pos != t:
        return models._attend(q, k, v, segments, causal)
    lengths = tuple(ql for _, ql, _, _ in segs)
    if all(n == lengths[0] for n in lengths):
        n, length = len(lengths), lengths[0]
        qb = q.reshape(n, length, h, d).transpose(1, 2)
        kb = k.reshape(n, length, g, d).transpose(1, 2)
        vb = v.reshape(n, length, g, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, enable_gqa=g != h)
        return o.transpose(1, 2).reshape(t, h * d)
    if g != h:
        k = k.repeat_interleave(h // g, dim=1)
        v = v.repeat_interleave(h // g, dim=1)
    mask = _mask(lengths, causal, q.device)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask
    )
    return o[0].transpose(0, 1).reshape(t, h * d)


def fast_attend(
    q: Tensor, k: Tensor, v: Tensor, segments: tuple[models.Segment, ...], *, causal: bool, selective: bool
) -> Tensor:
    if selective:
        out: Tensor = checkpoint(_fast, q, k, v, segments, causal, use_reentrant=False)
        return out
    return _fast(q, k, v, segments, causal)


def use_fast_attention() -> None:
    models.attend = fast_attend  # the blocks look `attend` up in the module at call time

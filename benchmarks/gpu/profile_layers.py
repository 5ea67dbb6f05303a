"""Profile one transformer block of each layer kind (ViT, GQA/SwiGLU decoder, DiT) over a sweep of token counts.

Writes a small JSON profile that `pipeweaver.simulator.calibration` fits SEMU's efficiency factors on:

    python benchmarks/gpu/profile_layers.py                       # CUDA, bf16, paper dims -> $OUT/layer_profile.json
    python benchmarks/gpu/profile_layers.py --device cpu --tiny   # smoke test: tiny dims, float32, seconds

Blocks are written to match the operator lists of `pipeweaver/simulator/ops.py` at tp = 1 (packed sequences,
attention per image / document / clip through `scaled_dot_product_attention`), at the paper's Table 2 dims:
ViT 5B block (1792, 15360, 16 heads; images of 2,704 patches), Llama3-8B decoder block (4096, 14336, GQA 32/8;
causal, documents of equal length packed), DiT-5B block (3584, 10240, 28 heads; self-attention over one or more
clips, cross-attention to each clip's caption, adaLN modulation). Forward and backward are timed separately with
CUDA events after warm-up; each row is the median of the timed repetitions.

Standalone on purpose: it needs torch and the standard library only, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "pipeweaver.layer_profile/1"


@dataclass(frozen=True)
class Dims:
    hidden: int
    ffn_hidden: int
    heads: int
    kv_heads: int

    def as_json(self) -> dict[str, int]:
        return {"hidden": self.hidden, "ffn_hidden": self.ffn_hidden, "heads": self.heads, "kv_heads": self.kv_heads}


# Paper Table 2 dims (pipeweaver/presets.py: vit_5b, llama3_8b, dit_5b).
PAPER = {
    "vit_block": Dims(1792, 15360, 16, 16),
    "decoder_block": Dims(4096, 14336, 32, 8),
    "dit_block": Dims(3584, 10240, 28, 28),
}
TINY = {
    "vit_block": Dims(64, 256, 4, 4),
    "decoder_block": Dims(64, 192, 4, 2),
    "dit_block": Dims(64, 256, 4, 4),
}
PATCHES_PER_IMAGE = 2704  # 728 px at 14 px patches
DIT_TOKENS_PER_SECOND = 4608  # 16 fps / 8 x (768 / 16)^2
CAPTION_TOKENS = 256
SMALL_CASE_MS = 10.0
"""Cases faster than this (forward + backward) get three times the repetitions."""


# ---- blocks --------------------------------------------------------------------------------------------------------


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (T, heads, d) with cos/sin of shape (T, 1, d/2)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rope_tables(t: int, d: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d // 2, device=device, dtype=torch.float32) / (d // 2)))
    ang = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos().to(dtype)[:, None, :], ang.sin().to(dtype)[:, None, :]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Sequence[int], *, causal: bool) -> torch.Tensor:
    """Attention within each span of a packed sequence: q (T, H, d), k/v (T, KV, d) -> (T, H*d)."""
    t, heads, d = q.shape
    gqa = k.shape[1] != heads
    if len(set(spans)) == 1:
        n, s = len(spans), spans[0]
        qb, kb, vb = (x.view(n, s, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, enable_gqa=gqa)
        return o.transpose(1, 2).reshape(t, heads * d)
    outs = []
    start = 0
    for s in spans:
        qs, ks, vs = (x[start : start + s].transpose(0, 1)[None] for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa)[0].transpose(0, 1))
        start += s
    return torch.cat(outs).reshape(t, heads * d)


class VitBlock(nn.Module):
    """Qwen2-VL-style ViT block: LayerNorm, MHA with rotary (per image), GELU MLP; biases everywhere."""

    def __init__(self, d: Dims) -> None:
        super().__init__()
        self.d = d
        h = d.hidden
        self.norm1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, d.ffn_hidden)
        self.fc2 = nn.Linear(d.ffn_hidden, h)

    def forward(self, x: torch.Tensor, spans: Sequence[int], rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t, hd = x.shape[0], self.d.hidden // self.d.heads
        q, k, v = self.qkv(self.norm1(x)).view(t, 3, self.d.heads, hd).unbind(1)
        q, k = _rope(q, *rope), _rope(k, *rope)
        x = x + self.proj(_attend(q, k, v, spans, causal=False))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class DecoderBlock(nn.Module):
    """Llama/Qwen2 decoder block: RMSNorm, GQA causal attention per document with rotary, SwiGLU MLP."""

    def __init__(self, d: Dims) -> None:
        super().__init__()
        self.d = d
        h, hd = d.hidden, d.hidden // d.heads
        self.kv = d.kv_heads * hd
        self.norm1 = nn.RMSNorm(h)
        self.qkv = nn.Linear(h, h + 2 * self.kv)  # Qwen2-style bias (pipeweaver counts it)
        self.o = nn.Linear(h, h, bias=False)
        self.norm2 = nn.RMSNorm(h)
        self.gate_up = nn.Linear(h, 2 * d.ffn_hidden, bias=False)
        self.down = nn.Linear(d.ffn_hidden, h, bias=False)

    def forward(self, x: torch.Tensor, spans: Sequence[int], rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        t, h, hd = x.shape[0], self.d.hidden, self.d.hidden // self.d.heads
        q, k, v = self.qkv(self.norm1(x)).split([h, self.kv, self.kv], dim=-1)
        q = _rope(q.view(t, self.d.heads, hd), *rope)
        k = _rope(k.view(t, self.d.kv_heads, hd), *rope)
        v = v.view(t, self.d.kv_heads, hd)
        x = x + self.o(_attend(q, k, v, spans, causal=True))
        g, u = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class DitBlock(nn.Module):
    """MovieGen-style DiT block: adaLN-modulated self-attention, cross-attention to the caption, GELU MLP."""

    def __init__(self, d: Dims) -> None:
        super().__init__()
        self.d = d
        h = d.hidden
        self.norm1 = nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h)
        self.cross_q = nn.Linear(h, h)
        self.cross_kv = nn.Linear(h, 2 * h)
        self.cross_o = nn.Linear(h, h)
        self.norm3 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, d.ffn_hidden)
        self.fc2 = nn.Linear(d.ffn_hidden, h)
        self.ada = nn.Parameter(torch.randn(6, h) / math.sqrt(h))  # adaLN-single per-block table

    def forward(self, x: torch.Tensor, spans: Sequence[int], ctx: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x (T, h) packs len(spans) equal clips; ctx (clips, C, h) is each clip's projected caption; temb (clips, 6h).
        n, s = len(spans), spans[0]
        t, h, heads = x.shape[0], self.d.hidden, self.d.heads
        hd = h // heads
        mod = (self.ada[None] + temb.view(n, 6, h))[:, :, None, :]  # (clips, 6, 1, h)
        shift1, scale1, gate1, shift3, scale3, gate3 = mod.unbind(1)
        xb = x.view(n, s, h)
        y = self.norm1(xb) * (1 + scale1) + shift1
        q, k, v = self.qkv(y).view(t, 3, heads, hd).unbind(1)
        xb = xb + gate1 * self.proj(_attend(q, k, v, spans, causal=False)).view(n, s, h)
        cq = self.cross_q(self.norm2(xb)).view(n, s, heads, hd).transpose(1, 2)
        ck, cv = self.cross_kv(ctx).view(n, -1, 2, heads, hd).unbind(2)
        co = F.scaled_dot_product_attention(cq, ck.transpose(1, 2), cv.transpose(1, 2))
        xb = xb + self.cross_o(co.transpose(1, 2).reshape(n, s, h))
        y = self.norm3(xb) * (1 + scale3) + shift3
        xb = xb + gate3 * self.fc2(F.gelu(self.fc1(y), approximate="tanh"))
        return xb.view(t, h)


# ---- timing --------------------------------------------------------------------------------------------------------


def _call(block: nn.Module, inputs: tuple[Any, ...], x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = block(x, *inputs)
    return out


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed_ms(self, a: Any, b: Any) -> float:
        if self.cuda:
            return float(a.elapsed_time(b))
        return (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def time_fb(
    block: nn.Module,
    run: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    warmup: int,
    reps: int,
    timer: Timer,
    extra: Sequence[torch.Tensor] = (),
) -> tuple[list[float], list[float]]:
    """Forward and backward times (ms) of `run` over `reps` repetitions after `warmup`."""
    dy = torch.randn_like(x0)
    f_ms: list[float] = []
    b_ms: list[float] = []
    for i in range(warmup + reps):
        for p in block.parameters():
            p.grad = None
        for e in extra:
            e.grad = None
        x = x0.detach().requires_grad_()
        timer.sync()
        a = timer.mark()
        y = run(x)
        c = timer.mark()
        y.backward(dy)
        d = timer.mark()
        timer.sync()
        if i >= warmup:
            f_ms.append(timer.elapsed_ms(a, c))
            b_ms.append(timer.elapsed_ms(c, d))
        del y, x
    return f_ms, b_ms


@dataclass(frozen=True)
class Case:
    kind: str
    spans: tuple[int, ...]
    context_tokens: int = 0

    @property
    def tokens(self) -> int:
        return sum(self.spans)


def sweep(tiny: bool) -> list[Case]:
    if tiny:
        return (
            [Case("vit_block", (16,) * n) for n in (1, 2, 4, 8)]
            + [Case("decoder_block", (t,)) for t in (64, 128, 256)]
            + [Case("decoder_block", (64,) * (t // 64)) for t in (128, 256)]
            + [Case("dit_block", (s,) * n, 8) for n, s in ((1, 32), (1, 64), (2, 32), (1, 128))]
        )
    cases = [Case("vit_block", (PATCHES_PER_IMAGE,) * n) for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)]
    for t in (1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384):
        cases.append(Case("decoder_block", (t,)))
        for doc in (512, 2048):
            if doc < t and t % doc == 0:
                cases.append(Case("decoder_block", (doc,) * (t // doc)))
    for seconds in (1, 2, 3, 4, 6, 8, 12, 16):
        cases.append(Case("dit_block", (DIT_TOKENS_PER_SECOND * seconds,), CAPTION_TOKENS))
    for clips, seconds in ((2, 2), (4, 2), (2, 4), (4, 4), (2, 8)):
        cases.append(Case("dit_block", (DIT_TOKENS_PER_SECOND * seconds,) * clips, CAPTION_TOKENS))
    return cases


def warm_up(device: torch.device, seconds: float) -> None:
    """Run large matrix products for a while so clocks and cuBLAS are warm before the first timed case."""
    if device.type != "cuda":
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)


def profile(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = TINY if args.tiny else PAPER
    timer = Timer(device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny blocks: threads only add contention
    warm_up(device, 3.0)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    kinds = [k for k in ("vit_block", "decoder_block", "dit_block") if not args.kinds or k in args.kinds]
    for kind in kinds:
        d = dims[kind]
        cls = {"vit_block": VitBlock, "decoder_block": DecoderBlock, "dit_block": DitBlock}[kind]
        block = cls(d).to(device=device, dtype=dtype)
        hd = d.hidden // d.heads
        for case in (c for c in sweep(args.tiny) if c.kind == kind):
            t = case.tokens
            x0 = torch.randn(t, d.hidden, device=device, dtype=dtype)
            extra: list[torch.Tensor] = []
            inputs: tuple[Any, ...]
            if kind == "dit_block":
                n = len(case.spans)
                ctx = torch.randn(n, case.context_tokens, d.hidden, device=device, dtype=dtype, requires_grad=True)
                temb = torch.randn(n, 6 * d.hidden, device=device, dtype=dtype)
                extra = [ctx]
                inputs = (case.spans, ctx, temb)
            else:
                # Rotary positions restart in each span, but the table cost is what matters: one per token.
                inputs = (case.spans, _rope_tables(t, hd, device, dtype))
            run = functools.partial(_call, block, inputs)
            f_ms, b_ms = time_fb(block, run, x0, warmup=args.warmup, reps=args.reps, timer=timer, extra=extra)
            if statistics.median(f_ms) + statistics.median(b_ms) < SMALL_CASE_MS:
                # Small blocks are bound by host dispatch, which jitters: take more samples (they are cheap).
                f2, b2 = time_fb(block, run, x0, warmup=0, reps=2 * args.reps, timer=timer, extra=extra)
                f_ms += f2
                b_ms += b2
            for pass_, samples in (("F", f_ms), ("B", b_ms)):
                rows.append(
                    {
                        "kind": kind,
                        "dims": d.as_json(),
                        "tokens": t,
                        "spans": list(case.spans),
                        "context_tokens": case.context_tokens,
                        "pass": pass_,
                        "measured_ms": statistics.median(samples),
                        "samples_ms": [round(s, 5) for s in samples],
                    }
                )
            print(
                f"{kind:14s} T={t:6d} spans={len(case.spans):3d}x{case.spans[0]:6d} "
                f"F {statistics.median(f_ms):9.3f} ms  B {statistics.median(b_ms):9.3f} ms",
                flush=True,
            )
            del x0
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del block
    transfers = profile_transfers(args) if device.type == "cuda" and args.transfers else []
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "format": FORMAT,
        "card": card,
        "torch_version": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "tp": 1,
        "warmup": args.warmup,
        "reps": args.reps,
        "tiny": bool(args.tiny),
        "rows": rows,
        "transfers": transfers,
    }


def profile_transfers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """GPU-to-GPU copies between cuda:0 and cuda:1 (NVLink), when two GPUs are visible."""
    if torch.cuda.device_count() < 2:
        return []
    out: list[dict[str, Any]] = []
    for mib in (1, 4, 16, 64, 256):
        n = mib * (1 << 20)
        src = torch.empty(n, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(n, dtype=torch.uint8, device="cuda:1")
        samples = []
        for i in range(args.warmup + args.reps):
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            a = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize("cuda:1")
            if i >= args.warmup:
                samples.append((time.perf_counter() - a) * 1e3)
        out.append({"op_class": "p2p", "bytes": n, "link": "nvlink", "measured_ms": statistics.median(samples)})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (bf16) or cpu (float32)")
    parser.add_argument("--tiny", action="store_true", help="tiny dims and token counts (smoke test)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--kinds", nargs="*", default=[], help="restrict to these layer kinds")
    parser.add_argument("--transfers", action="store_true", help="also time cuda:0 -> cuda:1 copies")
    parser.add_argument("--out", default=None, help="output JSON (default: $OUT/layer_profile.json or ./)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu --tiny for a smoke test")
    result = profile(args)
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "layer_profile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {len(result['rows'])} rows to {out}")


if __name__ == "__main__":
    main()

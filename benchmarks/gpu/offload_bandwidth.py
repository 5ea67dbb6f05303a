"""Activation offloading on one GPU: what the host link moves, and what `client.offload.HostStore` costs a chunk.

1. Copy bandwidth between the device and pinned host memory, per direction, alone and with both directions at once
   (CUDA events around `copy_(non_blocking=True)` of 256 MiB bf16 tensors). SEMU's `HardwareSpec.host_link_bandwidth`
   is the per-GPU share with every GPU of a node copying; one GPU alone is its ceiling.
2. A chunk of transformer layers (bf16) forward then backward, three ways: activations kept on the device; offloaded
   by `HostStore` with a prefetch issued right after the forward (the copy back overlaps nothing: the worst case);
   offloaded with the prefetch issued while a second, independent forward runs (as a plan places it). Reported:
   the wall time of each way, the device memory the offloaded forward frees, and the bytes it moves.

    python benchmarks/gpu/offload_bandwidth.py --out $OUT/offload_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from pipeweaver.client.offload import HostStore


def _bandwidth(device: torch.device, mib: int, repeats: int) -> dict[str, float]:
    n = mib * (1 << 20) // 2
    dev = torch.empty(n, dtype=torch.bfloat16, device=device)
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    host2 = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    dev2 = torch.empty(n, dtype=torch.bfloat16, device=device)
    s_out, s_in = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def timed(fn: object, streams: list[torch.cuda.Stream]) -> float:
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            for s in streams:
                s.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    def d2h() -> None:
        with torch.cuda.stream(s_out):
            host.copy_(dev, non_blocking=True)

    def h2d() -> None:
        with torch.cuda.stream(s_in):
            dev2.copy_(host2, non_blocking=True)

    def both() -> None:
        d2h()
        h2d()

    size = n * 2
    return {
        "bytes": size,
        "d2h_gbps": size / timed(d2h, [s_out]) / 1e9,
        "h2d_gbps": size / timed(h2d, [s_in]) / 1e9,
        "both_each_gbps": size / timed(both, [s_out, s_in]) / 1e9,
    }


def _chunk(layers: int, hidden: int, heads: int, device: torch.device) -> nn.Module:
    block = [
        nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        for _ in range(layers)
    ]
    return nn.Sequential(*block).to(device=device, dtype=torch.bfloat16)


def _step(model: nn.Module, x: torch.Tensor, store: HostStore | None, overlap: nn.Module | None) -> None:
    if store is None:
        y = model(x)
    else:
        with store.saving():
            y = model(x)
    if overlap is not None:
        assert store is not None
        store.prefetch()  # the copy back runs while an independent forward computes
        with torch.no_grad():
            overlap(x)
    elif store is not None:
        store.prefetch()
    y.float().pow(2).mean().backward()
    if store is not None:
        store.release()


def _chunk_costs(device: torch.device, args: argparse.Namespace) -> dict[str, object]:
    model = _chunk(args.layers, args.hidden, args.heads, device)
    other = _chunk(args.layers, args.hidden, args.heads, device)
    x = torch.randn(args.batch, args.tokens, args.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    s_out, s_in = torch.cuda.Stream(device), torch.cuda.Stream(device)
    params = list(model.parameters())

    def run(way: str) -> dict[str, float]:
        times = []
        moved = 0
        for i in range(args.iters + 2):
            store = None
            if way != "device":
                store = HostStore(device, params, offload_stream=s_out, prefetch_stream=s_in)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _step(model, x, store, other if way == "offload_overlapped" else None)
            torch.cuda.synchronize(device)
            if i >= 2:  # warm-up: allocator, pinned host pool
                times.append((time.perf_counter() - t0) * 1e3)
            moved = store.bytes if store is not None else 0
            model.zero_grad(set_to_none=True)
            x.grad = None
        times.sort()
        return {"ms_median": times[len(times) // 2], "ms_min": times[0], "offloaded_bytes": moved}

    def held_after_forward(offload: bool) -> float:
        """Device bytes the forward leaves allocated once its copies are done."""
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        store = HostStore(device, params, offload_stream=s_out, prefetch_stream=s_in) if offload else None
        if store is None:
            y = model(x)
        else:
            with store.saving():
                y = model(x)
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - base
        del y
        if store is not None:
            store.release()
        x.grad = None
        return float(held)

    ways = {w: run(w) for w in ("device", "offload_prefetch_at_once", "offload_overlapped")}
    # The overlapped way also runs a second forward: its time alone, to subtract.
    times = []
    for i in range(args.iters + 2):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            other(x)
        torch.cuda.synchronize(device)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "ways": ways,
        "overlap_forward_alone_ms": times[len(times) // 2],
        "forward_held_bytes": {"device": held_after_forward(False), "offload": held_after_forward(True)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    report = {
        "script": "benchmarks/gpu/offload_bandwidth.py",
        "card": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "chunk": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "tokens", "batch")},
        "host_link": _bandwidth(device, args.mib, args.repeats),
        **_chunk_costs(device, args),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

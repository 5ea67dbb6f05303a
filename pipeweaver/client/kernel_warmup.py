"""Load the GEMM kernels a rank will need before any transfer is in flight.

cuBLASLt loads its kernels lazily, per kernel family, the first time its heuristic picks one
(``cuLibraryLoadData``, whatever ``CUDA_MODULE_LOADING`` says), and that load waits for the whole device to drain.
In a pipeline the device usually has NCCL receives waiting for a peer that is itself waiting for this rank's next
send, which the host posts only after the stuck launch: a deadlock. Measured on 4 H200s: every rank blocked, one
host inside ``cublasLtTSTMatmul -> cuLibraryLoadData`` in a decoder block's projection on an idle GPU (py-spy's
native stack), in the first iterations of a modality-aware plan whose token counts the earlier iterations had not
used. NVIDIA's advice for kernels that run next to waiting kernels is to load them ahead of time.

Per-batch plans change the row count M of every GEMM each iteration, and the heuristic's choice depends on M, so
this runs every distinct linear layer of the rank's chunks forward and backward (the three GEMMs: output, input
gradient, weight gradient) over a sweep of row counts up to the largest the run will see: every M up to 64, then
every multiple of 8 up to 1,024, of 64 beyond, and one odd count per 128 (unaligned shapes pick other kernels).
The sweep cannot prove that no family is left (the heuristic is NVIDIA's), but after it no new load was seen (see
docs/gpu.md). Parameters' ``.grad`` are not touched (``torch.autograd.grad``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def gemm_row_sweep(max_rows: int) -> list[int]:
    """The row counts `warm_up_gemms` runs, ascending, all in [1, max_rows]."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    rows = set(range(1, min(64, max_rows) + 1))
    rows.update(range(8, min(1024, max_rows) + 1, 8))
    rows.update(range(64, max_rows + 1, 64))
    rows.update(m + 1 for m in range(128, max_rows, 128))
    rows.add(max_rows)
    return sorted(rows)


def distinct_linears(modules: Iterable[nn.Module]) -> list[nn.Linear]:
    """One `nn.Linear` per distinct (in, out, bias, dtype): layers of one shape run the same kernels."""
    seen: dict[tuple[int, int, bool, torch.dtype], nn.Linear] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                key = (sub.in_features, sub.out_features, sub.bias is not None, sub.weight.dtype)
                seen.setdefault(key, sub)
    return list(seen.values())


_Shape = tuple[int, int, bool, torch.dtype, torch.device]
_warmed: dict[_Shape, int] = {}
"""Layer shape -> the largest row count warmed in this process (loaded kernels serve every later executor)."""


def warm_up_gemms(modules: Iterable[nn.Module], max_rows: int) -> int:
    """Run each distinct linear layer of `modules` forward and backward at every row count of
    `gemm_row_sweep(max_rows)`, except shapes this process already warmed as far; returns the number of
    (layer, rows) pairs run. Call before the first iteration, with no transfer in flight."""
    runs = 0
    sweep = gemm_row_sweep(max_rows)
    for lin in distinct_linears(modules):
        w = lin.weight
        key = (lin.in_features, lin.out_features, lin.bias is not None, w.dtype, w.device)
        if _warmed.get(key, 0) >= max_rows:
            continue
        _warmed[key] = max_rows
        x_all = torch.randn(max_rows, lin.in_features, device=w.device, dtype=w.dtype)
        g_all = torch.randn(max_rows, lin.out_features, device=w.device, dtype=w.dtype)
        params = [p for p in (lin.weight, lin.bias) if p is not None and p.requires_grad]
        for m in sweep:
            x = x_all[:m].detach().requires_grad_()
            with torch.enable_grad():
                out = lin(x)
                torch.autograd.grad(out, [x, *params], grad_outputs=g_all[:m])
            runs += 1
    return runs

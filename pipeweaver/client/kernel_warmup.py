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
The sweep cannot cover every row count: on 4 H200s a plan still stopped in ``cuLibraryLoadData`` under a biased
projection (``gemm_and_bias``) at a token count outside it. So the executor also runs, at the start of every
iteration (nothing in flight: the previous iteration ended with a synchronize), the exact row counts of the
iteration's computes that this process has not run yet (`warm_up_rows`): a few GEMMs per new count, nothing once
the counts repeat. Parameters' ``.grad`` are not touched (``torch.autograd.grad``).
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
_loaded: set[tuple[_Shape, int]] = set()
"""(layer shape, row count) pairs run in this process: loaded kernels serve every later executor."""


def _shape(lin: nn.Linear) -> _Shape:
    return (lin.in_features, lin.out_features, lin.bias is not None, lin.weight.dtype, lin.weight.device)


def _run(lin: nn.Linear, rows: list[int]) -> int:
    """Forward and backward of `lin` at each row count (its three GEMMs), on scratch inputs."""
    if not rows:
        return 0
    w = lin.weight
    x_all = torch.randn(max(rows), lin.in_features, device=w.device, dtype=w.dtype)
    g_all = torch.randn(max(rows), lin.out_features, device=w.device, dtype=w.dtype)
    params = [p for p in (lin.weight, lin.bias) if p is not None and p.requires_grad]
    for m in rows:
        x = x_all[:m].detach().requires_grad_()
        with torch.enable_grad():
            out = lin(x)
            torch.autograd.grad(out, [x, *params], grad_outputs=g_all[:m])
    return len(rows)


def warm_up_rows(modules: Iterable[nn.Module], rows: Iterable[int]) -> int:
    """Run each distinct linear layer of `modules` forward and backward at each of `rows` (positive counts) this
    process has not run it at; returns the number of (layer, rows) pairs run. Call with no transfer in flight:
    the executor does at the start of an iteration, for the row counts of its computes."""
    wanted = sorted({int(m) for m in rows if m > 0})
    runs = 0
    for lin in distinct_linears(modules):
        key = _shape(lin)
        new = [m for m in wanted if (key, m) not in _loaded]
        runs += _run(lin, new)
        _loaded.update((key, m) for m in new)
    return runs


def warm_up_gemms(modules: Iterable[nn.Module], max_rows: int) -> int:
    """`warm_up_rows` over `gemm_row_sweep(max_rows)`: before the first iteration."""
    return warm_up_rows(modules, gemm_row_sweep(max_rows))

"""Keep freed heap memory in the planner's main process instead of handing it back to the kernel (glibc only).

A plan's answers go out in bursts: when a search ends, every waiting rank stream gets its answer at once (64 of
~60-90 KB for 16 replicas of a vlm-s pipeline), built and copied by Python and by gRPC, then freed. glibc's
malloc returns the top of its heap to the kernel once more than `M_TRIM_THRESHOLD` (128 KiB by default) is free
there, and serves blocks above its (dynamic) mmap threshold with fresh mappings. So every burst faults its pages
in again: measured here, building 64 such answers costs 1.7 us each with the heap kept and 33 us at p90 without,
which on the serving loop is ~2 ms of a burst (docs/benchmarks.md). Raising both thresholds keeps the pages
mapped; the process then holds on to its high-water mark of freed memory (a few tens of MB for a burst).
Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("pipeweaver.server")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's `mallopt` parameter numbers (malloc.h)."""

TRIM_THRESHOLD_BYTES = 256 << 20
"""Free memory at the heap's top kept before trimming: far above a burst's answers."""
MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks below this come from the heap, not from a fresh mapping each time (glibc's largest allowed value on
64-bit hosts): a vlm-l rank's answer (~1.3 MiB) included."""


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for this process; True when both were accepted."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt), or no C library to load
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    trim: int = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    mmap: int = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    ok = trim == 1 and mmap == 1
    if not ok:
        log.warning("mallopt refused the allocator settings; answers may fault their pages in again per burst")
    return ok

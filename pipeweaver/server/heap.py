"""Keep the C heap's pages mapped between allocations, in the server and its workers (glibc only).

glibc serves an allocation above its mmap threshold (128 KiB to start) with a fresh `mmap`, and trims the heap's
free top above 128 KiB back to the kernel. Either way the next buffer of that size starts on unmapped pages, and
touching them costs a page fault per 4 KiB. A vlm-s search result is ~330 KB, pickled in the worker into a buffer
that grows as it goes and read on the event loop into another: its hand-back from the task's end to the loop took
0.73 ms p50 with glibc's defaults and 0.46 ms with the pages kept, on the 2-core machine
(`benchmarks/bench_result_transfer.py`). That hand-back is on every searched plan's delivery.

The cost is memory the process holds and does not give back: at most `TRIM_THRESHOLD_BYTES` of free heap beyond
what it uses at its peak, per process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("pipeweaver.server")

MMAP_THRESHOLD_BYTES = 8 << 20
"""Allocations below this come from the heap, whose pages stay mapped (glibc's dynamic threshold starts at 128
KiB and only rises after a large block is freed)."""
TRIM_THRESHOLD_BYTES = 64 << 20
"""Free memory at the heap's top kept rather than returned to the kernel."""
TOP_PAD_BYTES = 16 << 20
"""Extra the heap grows by each time it must grow (fewer, larger growths)."""

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def keep_heap_pages() -> bool:
    """Set this process's glibc malloc to keep its pages (the module docstring); whether it could. Call early:
    the settings apply to allocations from then on. A no-op (False) without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
    if not done:
        log.debug("mallopt refused a setting; the C heap keeps its defaults")
    return done

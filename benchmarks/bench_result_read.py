"""How long the event loop is held while a worker's result comes in: the longest single callback of
`LoopProcessPool`'s result reading per result, and all of them together, for results of a given size.

    .venv/bin/python benchmarks/bench_result_read.py [--sizes 20000 300000 2000000] [--results 40] [--out FILE]

A pool of one worker returns `--results` byte strings of each size; the pool's result callback is timed on the
loop (`time.perf_counter` around each call). The longest call is how long the loop could not answer anyone; the
sum is the loop's whole cost of the result. Run it with `PYTHONPATH` at another checkout to compare versions.
A vlm-s plan's pickled outcome is a few hundred KB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeweaver.server.loop_pool import LoopProcessPool

_held: list[float] = []


def _sized(n: int) -> bytes:
    return b"r" * n


def _timed_results() -> None:
    """Wrap the pool's result callback (before any pool exists: the loop's reader binds it at creation)."""
    read = LoopProcessPool._on_result

    def timed(self: LoopProcessPool, worker: Any) -> None:
        t = time.perf_counter()
        read(self, worker)
        _held.append(time.perf_counter() - t)

    LoopProcessPool._on_result = timed  # type: ignore[method-assign]


async def measure(sizes: list[int], results: int) -> dict[str, Any]:
    pool = LoopProcessPool(1)
    out: dict[str, Any] = {}
    try:
        await asyncio.wrap_future(pool.submit(_sized, 1))  # the worker is up
        for n in sizes:
            rows = []
            for _ in range(results):
                _held.clear()
                await asyncio.wrap_future(pool.submit(_sized, n))
                rows.append((sum(_held) * 1e3, max(_held) * 1e3, len(_held)))
            a = np.asarray(rows)
            out[str(n)] = {
                "longest_call_ms": {
                    "p50": round(float(np.median(a[:, 1])), 3),
                    "p99": round(float(np.percentile(a[:, 1], 99)), 3),
                    "max": round(float(a[:, 1].max()), 3),
                },
                "all_calls_ms_p50": round(float(np.median(a[:, 0])), 3),
                "calls_p50": float(np.median(a[:, 2])),
            }
    finally:
        pool.shutdown()
        await pool.join(30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 300_000, 2_000_000])
    parser.add_argument("--results", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.results < 1 or min(args.sizes) < 1:
        parser.error("--results and --sizes must be positive")
    _timed_results()
    report = {
        "command": "python benchmarks/bench_result_read.py",
        "results_per_size": args.results,
        "by_size_bytes": asyncio.run(measure(args.sizes, args.results)),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

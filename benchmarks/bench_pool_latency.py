"""How long a task takes to reach its worker while the event loop is busy: `ProcessPoolExecutor` against the
server's `LoopProcessPool`, side by side.

    .venv/bin/python benchmarks/bench_pool_latency.py [--trials 30] [--busy-steps 0 64] [--out FILE]

Each trial submits a no-op task (5 KB argument) from a coroutine and, at the same moment, starts a task that keeps
the event loop busy for `busy-steps` x 0.3 ms, yielding between steps, as the server's loop is while it reads a
burst of 64 requests. "To worker" runs from the submit to the worker's first line (wall clock, shared by the
processes); "round trip" to the submitter having the result. `--switch-intervals` repeats the executor's rows
under other `sys.setswitchinterval` values (the GIL hand-over interval its helper threads wait on; default 5 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pipeweaver.server.loop_pool import LoopProcessPool

STEP_MS = 0.3


def _started_at(_: bytes) -> float:
    return time.time()


def _busy(ms: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < ms / 1e3:
        pass


async def _trial(pool: Any, steps: int) -> tuple[float, float]:
    t = time.time()
    result = asyncio.wrap_future(pool.submit(_started_at, bytes(5000)))

    async def burner() -> None:
        for _ in range(steps):
            _busy(STEP_MS)
            await asyncio.sleep(0)

    burning = asyncio.create_task(burner())
    started = await result
    end = time.time()
    await burning
    return (started - t) * 1e3, (end - t) * 1e3


async def _measure(trials: int, busy_steps: list[int], switch_intervals_ms: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    default_interval = sys.getswitchinterval()
    runs = [("ProcessPoolExecutor", default_interval * 1e3)]
    runs += [("ProcessPoolExecutor", ms) for ms in switch_intervals_ms]
    runs += [("LoopProcessPool", default_interval * 1e3)]
    for name, interval_ms in runs:
        sys.setswitchinterval(interval_ms / 1e3)
        label = name if interval_ms == default_interval * 1e3 else f"{name} (switch interval {interval_ms:g} ms)"
        if name == "LoopProcessPool":
            pool: Any = LoopProcessPool(1)
        else:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        await asyncio.wrap_future(pool.submit(_started_at, b""))  # started and imported
        for steps in busy_steps:
            samples = [await _trial(pool, steps) for _ in range(trials)]
            to_worker = sorted(s[0] for s in samples)
            round_trip = sorted(s[1] for s in samples)
            out[f"{label}, loop busy {steps} x {STEP_MS} ms"] = {
                "to_worker_ms": {"p50": round(statistics.median(to_worker), 2), "max": round(to_worker[-1], 2)},
                "round_trip_ms": {"p50": round(statistics.median(round_trip), 2), "max": round(round_trip[-1], 2)},
            }
        pool.shutdown()
        if isinstance(pool, LoopProcessPool):
            await pool.join(10)
    sys.setswitchinterval(default_interval)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--busy-steps", type=int, nargs="+", default=[0, 64])
    parser.add_argument("--switch-intervals", type=float, nargs="*", default=[], metavar="MS")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    report = {
        "command": "python benchmarks/bench_pool_latency.py " + " ".join(sys.argv[1:]),
        "cpu_cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "trials": args.trials,
        "results": asyncio.run(_measure(args.trials, args.busy_steps, args.switch_intervals)),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

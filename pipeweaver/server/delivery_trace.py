"""Timestamps of each streamed answer's way through the service, for finding where delivery latency goes.

Off unless `pipeweaver serve --delivery-trace FILE` (`PIPEWEAVER_DELIVERY_TRACE`) turns it on; then the service
records, on `time.perf_counter` (CLOCK_MONOTONIC on Linux, so a client on the same host can join its own
timestamps to these), when each request was taken, when its entry's search was submitted and came back, when the
entry resolved, when each answer was handed to its stream and when each write returned, and every garbage
collection of the server process (a pause of the event loop); each request taken, resolution, answer handed
over and write also carries the event loop thread's CPU time and run-queue wait so far and the process's CPU
time (`sched`). The file is written when the server stops (one JSON object per line).
`benchmarks/bench_service.py --delivery-trace` joins it with the clients' send and receive times into a
per-step breakdown of the latency.

Recording is an append on the event loop; with tracing off each call site pays one global lookup. The events stay
in memory until the server stops, the last `MAX_EVENTS` of them (a few per answer: hours of a 64-stream job).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

MAX_EVENTS = 1_000_000
"""Events kept (the oldest are dropped beyond it): about 150 MB."""

events: deque[tuple[Any, ...]] | None = None
"""The recorded events, or None when tracing is off (the call sites test this before building an event)."""


_gc_started = 0.0

_schedstat: int | None = None
"""The event loop thread's /proc schedstat, open while recording (None where there is none)."""


def sched() -> tuple[int, int, int]:
    """The event loop thread's CPU time, its time spent runnable but waiting for a CPU, and the whole server
    process's CPU time (every thread), in ns (zeros where there is no /proc schedstat). Across a stretch in which
    the loop recorded nothing, they tell whether it was running (a long call), descheduled (waiting for a core),
    or neither (blocked), and whether another thread of the server ran meanwhile (holding the GIL, likely) or
    none did (a system call, a lock). About 2.5 us. The CPU times are the kernel's clocks, exact at any moment;
    schedstat's own run time only moves at the scheduler's ticks, while its wait is settled each time the
    thread gets a CPU back, so it is exact whenever the thread itself reads it."""
    if _schedstat is None:
        return 0, 0, 0
    return time.thread_time_ns(), int(os.pread(_schedstat, 64, 0).split()[1]), time.process_time_ns()


def _on_gc(phase: str, info: dict[str, int]) -> None:
    """Garbage collections of the server process: a pause of the event loop, whoever's answer it delays."""
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    elif events is not None:
        events.append(("gc", info["generation"], _gc_started, time.perf_counter()))


IDLE_MIN_S = 2e-4
"""Waits of the event loop for I/O or a timer recorded (`idle`): those longer than this."""


def _watch_selector(loop: asyncio.AbstractEventLoop) -> None:
    """Record each wait of the event loop's selector longer than `IDLE_MIN_S` (an ``idle`` event: the loop had
    nothing ready, with the timeout it chose and how many events woke it). A stretch of a burst with no other
    event that such a wait covers is the loop waiting for I/O (gRPC's completions come through a file
    descriptor), not held up. Wraps asyncio's private selector: a benchmark's tool, off unless tracing."""
    selector = getattr(loop, "_selector", None)
    if selector is None or getattr(selector.select, "_traced", False):
        return
    select = selector.select

    def traced(timeout: float | None = None) -> Any:
        t_start = time.perf_counter()
        ready = select(timeout)
        t_end = time.perf_counter()
        if events is not None and t_end - t_start > IDLE_MIN_S:
            events.append(("idle", t_start, t_end, -1.0 if timeout is None else timeout, len(ready)))
        return ready

    traced._traced = True  # type: ignore[attr-defined]
    selector.select = traced


def start() -> None:
    """Record from now on (forgetting anything recorded before). Call it on the event loop's thread: `sched`
    reads the thread that called this, and the loop's waits are recorded (`_watch_selector`)."""
    global events, _schedstat
    events = deque(maxlen=MAX_EVENTS)
    with contextlib.suppress(RuntimeError):  # no running loop: a test that records by hand
        _watch_selector(asyncio.get_running_loop())
    if _schedstat is None:
        try:
            _schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)  # this thread's, from now on
        except OSError:  # not Linux, or schedstats compiled out
            _schedstat = None
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def stop(path: Path) -> int:
    """Write what was recorded to `path` (JSON lines), stop recording; the number of events written."""
    global events, _schedstat
    recorded, events = events or deque(), None
    if _schedstat is not None:
        os.close(_schedstat)
        _schedstat = None
    if _on_gc in gc.callbacks:
        gc.callbacks.remove(_on_gc)
    fields = {
        "take": (
            "session",
            "replica",
            "iteration",
            "rank",
            "t_start",
            "t_end",
            "answered",
            "cpu_ns",
            "wait_ns",
            "process_cpu_ns",
        ),
        "answer": ("session", "replica", "iteration", "rank", "t", "cpu_ns", "wait_ns", "process_cpu_ns"),
        "write": ("session", "t_start", "t_end", "cpu_ns", "wait_ns", "process_cpu_ns"),
        "submit": ("replica", "iteration", "t"),
        "searched": ("replica", "iteration", "t", "worker_ms", "worker_start", "worker_end"),
        "resolve": ("replica", "iteration", "t", "source", "cpu_ns", "wait_ns", "process_cpu_ns"),
        "gc": ("generation", "t_start", "t_end"),
        "idle": ("t_start", "t_end", "timeout", "ready"),
    }
    with open(path, "w") as out:
        for kind, *values in recorded:
            out.write(json.dumps({"event": kind, **dict(zip(fields[kind], values, strict=True))}) + "\n")
    return len(recorded)

"""Timestamps of each streamed answer's way through the service, for finding where delivery latency goes.

Off unless `pipeweaver serve --delivery-trace FILE` (`PIPEWEAVER_DELIVERY_TRACE`) turns it on; then the service
records, on `time.perf_counter` (CLOCK_MONOTONIC on Linux, so a client on the same host can join its own
timestamps to these), when each request was taken, when its entry's search was submitted and came back, when the
entry resolved, when each answer was handed to its stream and when each write returned; the file is written when
the server stops (one JSON object per line). `benchmarks/bench_service.py --delivery-trace` joins it with the
clients' send and receive times into a per-step breakdown of the latency.

Recording is an append on the event loop; with tracing off each call site pays one global lookup. The events stay
in memory until the server stops, the last `MAX_EVENTS` of them (a few per answer: hours of a 64-stream job).
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

MAX_EVENTS = 1_000_000
"""Events kept (the oldest are dropped beyond it): about 150 MB."""

events: deque[tuple[Any, ...]] | None = None
"""The recorded events, or None when tracing is off (the call sites test this before building an event)."""


def start() -> None:
    """Record from now on (forgetting anything recorded before)."""
    global events
    events = deque(maxlen=MAX_EVENTS)


def stop(path: Path) -> int:
    """Write what was recorded to `path` (JSON lines), stop recording; the number of events written."""
    global events
    recorded, events = events or deque(), None
    fields = {
        "take": ("session", "replica", "iteration", "rank", "t_start", "t_end", "answered"),
        "answer": ("session", "replica", "iteration", "rank", "t"),
        "write": ("session", "t_start", "t_end"),
        "submit": ("replica", "iteration", "t"),
        "searched": ("replica", "iteration", "t", "worker_ms", "worker_start", "worker_end"),
        "resolve": ("replica", "iteration", "t", "source"),
    }
    with open(path, "w") as out:
        for kind, *values in recorded:
            out.write(json.dumps({"event": kind, **dict(zip(fields[kind], values, strict=True))}) + "\n")
    return len(recorded)

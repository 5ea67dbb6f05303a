"""The trainer host's garbage collector: keep its full passes off the iterations, and measure what it costs.

On GPUs our iterations are host-bound (docs/gpu.md section 7): the host's time per action sets the pace, so
anything else the host does adds to the iteration. CPython's cyclic collector is such a thing. A full (generation
2) pass walks every container object the process holds, and a trainer holds hundreds of thousands (modules,
parameters, plans, the CUDA and NCCL wrappers): 119 ms per pass for the 263,000 objects of a process that has
planned one batch of the scaled T2V model, on the 2-core development machine. The interpreter starts such passes
on its own, at points no one chooses, in the middle of an iteration's dispatch or of the idle hook's plan check
(3 in 30 checks there: median 35 ms, max 178 ms; `benchmarks/bench_plan_check.py --gc`).

Most of those objects live as long as the trainer. `settle_host_objects` collects once and then freezes what is
left (`gc.freeze`): the collector never walks the frozen objects again, so a later full pass walks only what was
allocated since (0.01 ms instead of 119 ms in the example above). Frozen objects are still freed by reference
counting; only a reference cycle among them would never be reclaimed, which is why this runs once the trainer's
long-lived state exists (after its first iteration).

That alone left PipeWeaver's ranks 29 ms of collection per T2V iteration on 4 H200s (run 19, docs/gpu.md section
8): each iteration decodes and checks a plan of ~3,000 actions, tens of thousands of objects that survive a few
iterations, so young and full passes kept walking them. So settling also switches the automatic collector off,
and `PipelineExecutor` runs one full pass every `FULL_PASS_EVERY` iterations itself, at the same iteration on every
rank (a pass on one rank would stall its peers) and where the host would otherwise wait for the device. This is
Megatron-LM's `--manual-gc`. What it risks is memory held by reference cycles until the next pass: the executor's
own iterations make no cycle that holds a tensor (tests/client/test_host_gc.py checks; torch's pytree makes a few
small ones per call), and a trainer whose own code does can pass `settle_gc=False`.

`CollectorClock` times every collection through `gc.callbacks`, so that `IterationStats` can say how much of an
iteration the collector took.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FULL_PASS_EVERY",
    "CollectorClock",
    "CollectorTime",
    "is_settled",
    "settle_host_objects",
    "unsettle_host_objects",
]

FULL_PASS_EVERY = 16
"""Iterations between the executor's own full collections once the process is settled."""

_settled = False


def settle_host_objects() -> int:
    """Collect garbage once, freeze every surviving object out of the collector's future passes, and switch the
    automatic collector off (full passes are then the executor's, every `FULL_PASS_EVERY` iterations).

    Returns the number of objects frozen. Affects the whole process (the collector is global): call it once the
    trainer's long-lived objects exist; `PipelineExecutor` does after its first iteration unless told not to, or
    the process is settled already. Calling it again collects and freezes again.
    """
    global _settled
    gc.collect()
    gc.freeze()
    gc.disable()
    _settled = True
    return gc.get_freeze_count()


def unsettle_host_objects() -> None:
    """Undo `settle_host_objects`: unfreeze every object and switch the automatic collector back on."""
    global _settled
    gc.unfreeze()
    gc.enable()
    _settled = False


def is_settled() -> bool:
    """Whether `settle_host_objects` ran in this process (and was not undone)."""
    return _settled


@dataclass(frozen=True, slots=True)
class CollectorTime:
    """Collections and the wall time they took, since the clock's last `take`."""

    ms: float = 0.0
    collections: tuple[int, int, int] = (0, 0, 0)
    """Passes per generation (0: young objects only, 2: every unfrozen object)."""


class CollectorClock:
    """Accumulates the wall time of the cyclic collector's passes in this process (`gc.callbacks`).

    Use as a context manager or with `start` / `stop`; `take` returns the time since its previous call. The
    callback costs two `perf_counter` calls per collection.
    """

    def __init__(self) -> None:
        self._ms = 0.0
        self._counts = [0, 0, 0]
        self._began: float | None = None
        self._running = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        if self._began is not None:
            self._ms += (time.perf_counter() - self._began) * 1e3
            self._began = None
        generation = int(info.get("generation", 0))
        if 0 <= generation < 3:
            self._counts[generation] += 1

    def start(self) -> CollectorClock:
        if not self._running:
            gc.callbacks.append(self._callback)
            self._running = True
        return self

    def stop(self) -> None:
        if self._running:
            gc.callbacks.remove(self._callback)
            self._running = False

    def take(self) -> CollectorTime:
        """Time and passes since the last `take` (or since `start`), and reset."""
        out = CollectorTime(ms=self._ms, collections=(self._counts[0], self._counts[1], self._counts[2]))
        self._ms = 0.0
        self._counts = [0, 0, 0]
        return out

    def __enter__(self) -> CollectorClock:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

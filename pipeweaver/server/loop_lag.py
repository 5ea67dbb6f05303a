"""How late the server's event loop runs: the time every request and answer waits behind whatever holds it.

Every stream's reading, planning hand-offs and answers share one asyncio event loop, so a loop held up for a few
milliseconds (CPU work that should be in a worker, a long collection, the process descheduled, a long call inside
gRPC) delays every trainer's plan by as much. A task asks to wake every `PERIOD_S` and records how late it woke
(`pipeweaver_event_loop_lag_seconds`). It samples: a stall shows if it covers one of the wake-ups, so short
stalls are caught in proportion to how often they happen. The benchmark's delivery trace measured stalls of 1-3 ms
in 4 of 200 bursts on a 16-core host that its own events could not explain (docs/benchmarks.md, "Twelfth
session"); this is the same signal for a sidecar in production, at ten wake-ups a second.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from pipeweaver.server.loop_task import LoopTask

PERIOD_S = 0.1
"""How often the monitor asks to wake."""


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class LoopLagMonitor(LoopTask):
    """Runs as a task of the server's event loop (`start`, `stop`); each wake-up's lateness goes to `observer`."""

    task_name = "loop-lag"

    def __init__(self, observer: Observer, *, period_s: float = PERIOD_S) -> None:
        super().__init__()
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.observer = observer
        self.period_s = period_s
        self.samples = 0
        self.worst_s = 0.0
        """The latest any wake-up has been, in seconds (for logs and tests)."""

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.period_s
            await asyncio.sleep(self.period_s)
            # The selector may wake a little early or late by its clock's resolution; early counts as on time.
            lag = max(0.0, loop.time() - due)
            self.samples += 1
            self.worst_s = max(self.worst_s, lag)
            self.observer.observe(lag)

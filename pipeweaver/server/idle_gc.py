"""The server process's garbage collection, moved to the moments its event loop is idle.

Python's collector runs when allocations pass a threshold, and a burst of 64 requests and their answers is when a
server allocates most: so the passes landed inside bursts, where every answer waits for them. On the 2-core
machine, 42 of the server's 50 passes in 40 vlm-s iterations fell while an iteration's requests were taken or its
answers written (`bench_service.py --delivery-trace`, `delivery_breakdown.gc_summary`; another such run had a
full pass of 29 ms); on a 32-core host 200 iterations at 2 s had a planning-pass p99 of 12.4 ms and a maximum of
24 ms where 30 iterations had 8.3 ms. Here the automatic collector is off while the server serves, and a task
collects once requests and answers have paused for `IDLE_S`: the young generations when enough objects have piled
up, everything at most every `FULL_EVERY_S`. Should the server never pause, a collection runs anyway once
`HARD_LIMIT` objects wait, as the automatic collector would have.

`touch()` marks activity (a request taken, an answer written): a clock read and a store. `waiting()` counts the
requests waiting for a plan: the collector waits for them to be answered too, so that a pass runs after a
burst's answers have gone out rather than while a search may return.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass

from pipeweaver.server.loop_task import LoopTask

log = logging.getLogger("pipeweaver.server")

IDLE_S = 0.02
"""No request taken and no answer written for this long: the loop is between bursts."""
CHECK_S = 0.05
"""How often the collector looks."""
YOUNG_LIMIT = 20_000
"""Objects allocated since the last collection (`gc.get_count()[0]`) that make an idle moment collect."""
FULL_EVERY_S = 30.0
"""The oldest generation is collected at an idle moment at most this often."""
HARD_LIMIT = 100_000
"""Objects waiting that make a collection run even while busy (the server never paused): about 30 bursts' worth,
and a pass over them is as long as one of the automatic collector's older-generation passes."""

_last_activity = 0.0
_waiting = 0
"""Requests waiting for a plan: while any waits, its plan may arrive at any moment (and a pass would hold up its
answers), so an idle moment then is not taken."""


def touch() -> None:
    """Note activity: a collection now would delay someone's answer."""
    global _last_activity
    _last_activity = time.monotonic()


def waiting(change: int) -> None:
    """One more (+1) or one fewer (-1) request waits for its plan."""
    global _waiting
    _waiting += change


@dataclass
class Stats:
    """What the collector did (for tests and logs)."""

    young: int = 0
    full: int = 0
    forced: int = 0
    longest_pause_s: float = 0.0
    """Bounded state for a server that runs for weeks: the longest pass, not every pass."""


class IdleCollector(LoopTask):
    """Runs as a task of the server's event loop (`start`, `stop`)."""

    task_name = "idle-gc"

    def __init__(
        self,
        *,
        idle_s: float = IDLE_S,
        check_s: float = CHECK_S,
        young_limit: int = YOUNG_LIMIT,
        full_every_s: float = FULL_EVERY_S,
        hard_limit: int = HARD_LIMIT,
    ) -> None:
        super().__init__()
        self.idle_s = idle_s
        self.check_s = check_s
        self.young_limit = young_limit
        self.full_every_s = full_every_s
        self.hard_limit = hard_limit
        self.stats = Stats()
        self._was_enabled = True
        self._last_full = time.monotonic()

    def start(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._was_enabled:
            gc.enable()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            self.collect_if_due()

    def collect_if_due(self) -> int | None:
        """One look: the generation collected, or None."""
        now = time.monotonic()
        waiting = gc.get_count()[0]
        idle = _waiting == 0 and now - _last_activity >= self.idle_s
        if waiting >= self.hard_limit:
            generation = 1
            self.stats.forced += 1
        elif idle and now - self._last_full >= self.full_every_s:
            generation = 2
        elif idle and waiting >= self.young_limit:
            generation = 1
        else:
            return None
        t0 = time.perf_counter()
        gc.collect(generation)
        pause = time.perf_counter() - t0
        self.stats.longest_pause_s = max(self.stats.longest_pause_s, pause)
        if generation == 2:
            self._last_full = now
            self.stats.full += 1
        else:
            self.stats.young += 1
        if pause > 0.01:
            log.debug("garbage collection of generation %d took %.1f ms", generation, pause * 1e3)
        return generation

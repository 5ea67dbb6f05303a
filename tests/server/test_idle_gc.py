"""`idle_gc`: the server's garbage collection waits for a pause in requests and answers, unless too much piles up."""

from __future__ import annotations

import asyncio
import gc
import time

from pipeweaver.server import idle_gc
from pipeweaver.server.idle_gc import IdleCollector


def _garbage(n: int) -> None:
    """`n` tracked objects allocated and kept until the function returns (then unreachable cycles remain)."""
    keep = []
    for _ in range(n):
        a: list[object] = []
        a.append(a)  # a cycle: only the collector frees it
        keep.append(a)


def test_the_collector_replaces_the_automatic_one_while_it_runs() -> None:
    async def main() -> None:
        collector = IdleCollector(check_s=0.01)
        collector.start()
        assert not gc.isenabled()
        await collector.stop()
        assert gc.isenabled()

    assert gc.isenabled()
    asyncio.run(main())


def test_busy_means_no_collection_idle_means_one() -> None:
    collector = IdleCollector(idle_s=0.05, young_limit=1_000, full_every_s=3600.0, hard_limit=10**9)
    was = gc.isenabled()
    gc.disable()
    try:
        gc.collect()
        _garbage(5_000)
        idle_gc.touch()
        assert collector.collect_if_due() is None  # a request just came: the answers must not wait
        assert gc.get_count()[0] >= 1_000
        time.sleep(0.06)
        assert collector.collect_if_due() == 1  # a pause: the young generations go
        assert gc.get_count()[0] < 1_000
        assert collector.collect_if_due() is None  # nothing piled up since
        assert collector.stats.young == 1 and collector.stats.full == 0
    finally:
        if was:
            gc.enable()


def test_a_full_collection_at_most_every_interval_and_a_forced_one_when_never_idle() -> None:
    collector = IdleCollector(idle_s=0.0, young_limit=10**9, full_every_s=0.0, hard_limit=10**9)
    was = gc.isenabled()
    gc.disable()
    try:
        assert collector.collect_if_due() == 2
        busy = IdleCollector(idle_s=3600.0, young_limit=10**9, full_every_s=3600.0, hard_limit=2_000)
        _garbage(5_000)
        idle_gc.touch()
        assert busy.collect_if_due() == 1 and busy.stats.forced == 1  # never idle, but too much waits
    finally:
        if was:
            gc.enable()


def test_no_collection_while_a_request_waits_for_its_plan() -> None:
    """A plan may come back at any moment while someone waits: the answers would wait for the pass."""
    collector = IdleCollector(idle_s=0.0, young_limit=0, full_every_s=3600.0, hard_limit=10**9)
    was = gc.isenabled()
    gc.disable()
    try:
        idle_gc.waiting(+1)
        assert collector.collect_if_due() is None
        idle_gc.waiting(-1)
        assert collector.collect_if_due() == 1
    finally:
        if was:
            gc.enable()

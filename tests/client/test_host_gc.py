"""The trainer host's garbage collector: collections are timed per iteration, and the executor freezes the
process's long-lived objects after its first iteration (`pipeweaver.client.host_gc`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pipeweaver.client.host_gc import CollectorClock, settle_host_objects


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    """Each test starts and ends with nothing frozen (the collector is process-wide)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_clock_counts_each_generations_passes_and_their_time_then_resets() -> None:
    clock = CollectorClock().start()
    try:
        gc.collect()
        gc.collect(0)
        got = clock.take()
        assert got.collections[2] >= 1 and got.collections[0] >= 1
        assert got.ms > 0
        assert clock.take().collections == (0, 0, 0)  # take resets
    finally:
        clock.stop()
    gc.collect()
    with CollectorClock() as c:
        pass
    assert c.take().collections == (0, 0, 0)  # stopped clocks hear nothing
    assert c._callback not in gc.callbacks


def test_settling_freezes_survivors_and_full_passes_then_skip_them() -> None:
    keep = [_Cycle() for _ in range(20_000)]
    frozen = settle_host_objects()
    assert frozen >= len(keep) and gc.get_freeze_count() == frozen
    garbage = _Cycle()
    del garbage
    assert gc.collect() >= 1  # cycles made after the freeze are still collected
    del keep

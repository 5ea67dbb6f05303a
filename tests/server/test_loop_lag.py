"""The event-loop lag monitor: a loop held up shows as a late wake-up of that length, and stop ends the task."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram

from pipeweaver.server.loop_lag import LoopLagMonitor
from pipeweaver.server.metrics import LAG_BUCKETS, Metrics


def test_a_blocked_loop_is_recorded_as_a_late_wake_up() -> None:
    registry = CollectorRegistry()
    lag = Histogram("lag_seconds", "test", buckets=LAG_BUCKETS, registry=registry)
    monitor = LoopLagMonitor(lag, period_s=0.01)

    async def run() -> None:
        monitor.start()
        await asyncio.sleep(0.05)  # a few quiet periods
        time.sleep(0.06)  # the loop held for 60 ms: the monitor's timer fires that late, at most 10 ms early
        await asyncio.sleep(0.03)
        await monitor.stop()
        await monitor.stop()  # idempotent

    asyncio.run(run())
    assert monitor.samples >= 3
    assert 0.045 <= monitor.worst_s < 1.0
    late = registry.get_sample_value("lag_seconds_count") - registry.get_sample_value(
        "lag_seconds_bucket", {"le": "0.02"}
    )
    assert late >= 1  # the blocked wake-up, in a bucket above 20 ms
    assert registry.get_sample_value("lag_seconds_count") == monitor.samples


def test_the_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="period_s"):
        LoopLagMonitor(Metrics().loop_lag, period_s=0)


def test_the_service_exports_the_metric() -> None:
    m = Metrics()
    m.loop_lag.observe(0.003)
    assert m.registry.get_sample_value("pipeweaver_event_loop_lag_seconds_bucket", {"le": "0.005"}) == 1

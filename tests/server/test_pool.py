"""The worker lanes with real spawned processes: admission limits, cancellation, crash replacement, shutdown."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time

import pytest

from pipeweaver.server.pool import Lane, PoolClosed, QueueFull, WorkerCrashed


async def _lane(workers: int = 1, queue_size: int = 1, nice: int = 0) -> Lane:
    lane = Lane("search", workers, queue_size, nice=nice)
    lane.spawn()
    await lane.warmed(240)
    return lane


def test_a_full_queue_is_refused_at_once() -> None:
    async def main() -> None:
        lane = await _lane(queue_size=1)
        try:
            running = asyncio.create_task(lane.run(time.sleep, 1.0))
            await asyncio.sleep(0.1)
            waiting = asyncio.create_task(lane.run(abs, -3))
            await asyncio.sleep(0.05)
            assert (lane.running, lane.waiting) == (1, 1)
            started = time.monotonic()
            with pytest.raises(QueueFull):
                await lane.run(abs, -4)
            assert time.monotonic() - started < 0.1
            assert await waiting == 3
            await running
            assert (lane.running, lane.waiting) == (0, 0)
        finally:
            await lane.close(5)

    asyncio.run(main())


def test_a_cancelled_waiting_task_leaves_the_queue() -> None:
    async def main() -> None:
        lane = await _lane(queue_size=2)
        try:
            running = asyncio.create_task(lane.run(time.sleep, 0.5))
            await asyncio.sleep(0.1)
            waiting = asyncio.create_task(lane.run(abs, -1))
            await asyncio.sleep(0.05)
            assert lane.waiting == 1
            waiting.cancel()
            await asyncio.sleep(0.05)
            assert lane.waiting == 0
            await running
            assert await lane.run(abs, -7) == 7
            assert lane.running == 0
        finally:
            await lane.close(5)

    asyncio.run(main())


def test_submit_hands_the_task_to_a_free_worker_before_the_caller_yields() -> None:
    async def main() -> None:
        lane = await _lane(workers=1, queue_size=2)
        try:
            first = lane.submit(time.sleep, 0.3)
            assert lane.running == 1  # submitted already: no await in between
            second = lane.submit(abs, -2)  # no worker free: it queues, as `run` does
            await asyncio.sleep(0.05)
            assert (lane.running, lane.waiting) == (1, 1)
            assert await second == 2 and await first is None
            # Cancelled before its first step, a submitted task still gives its worker back.
            cancelled = lane.submit(time.sleep, 0.2)
            cancelled.cancel()
            await asyncio.sleep(0.5)
            assert (lane.running, lane.waiting) == (0, 0)
            assert await lane.run(abs, -3) == 3
        finally:
            await lane.close(5)

    asyncio.run(main())


def test_a_dead_worker_is_replaced_and_its_tasks_fail_as_crashed() -> None:
    async def main() -> None:
        lane = await _lane(workers=1, queue_size=4)
        try:
            old = lane.pids
            with pytest.raises(WorkerCrashed):
                await lane.run(os._exit, 3)  # the worker process dies mid-task
            assert lane.restarts == 1
            assert await lane.run(abs, -5) == 5  # the replacement serves
            deadline = time.monotonic() + 240
            while not lane.ready and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert lane.ready and lane.pids and set(lane.pids).isdisjoint(old)
        finally:
            await lane.close(5)

    asyncio.run(main())


def test_a_niced_lane_runs_its_workers_at_the_added_nice_value_and_a_replacement_too() -> None:
    async def main() -> None:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        lane = await _lane(workers=2, queue_size=4, nice=3)
        try:
            want = min(19, own + 3)
            assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in lane.pids] == [want, want]
            assert (
                await lane.run(functools.partial(os.getpriority, os.PRIO_PROCESS), 0) == want
            )  # tasks run niced, not just idle
            with pytest.raises(WorkerCrashed):
                await lane.run(os._exit, 3)
            assert await lane.run(functools.partial(os.getpriority, os.PRIO_PROCESS), 0) == want
        finally:
            await lane.close(5)
        assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the server itself keeps its priority

    asyncio.run(main())


def test_closing_refuses_new_and_waiting_tasks() -> None:
    async def main() -> None:
        lane = await _lane(queue_size=2)
        running = asyncio.create_task(lane.run(time.sleep, 0.3))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(lane.run(abs, -1))
        await asyncio.sleep(0.05)
        await lane.close(5)
        await running  # a running task finishes within the grace
        with pytest.raises(PoolClosed):
            await waiting
        with pytest.raises(PoolClosed):
            await lane.run(abs, -1)

    asyncio.run(main())


def test_a_worker_that_dies_while_idle_is_replaced_before_the_next_task() -> None:
    async def main() -> None:
        lane = await _lane(workers=1, queue_size=4)
        try:
            os.kill(lane.pids[0], signal.SIGKILL)
            await asyncio.sleep(1.0)  # the pool notices the death on the event loop
            assert await lane.run(abs, -9) == 9  # resubmitted to the replacement, not failed
            assert lane.restarts == 1
        finally:
            await lane.close(5)

    asyncio.run(main())

"""`LoopProcessPool`: the event loop drives spawned workers itself (no helper threads), with the executor's
semantics for results, errors, queueing, cancellation, a dead worker and shutdown."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest

from pipeweaver.server.loop_pool import _LONG, _SHORT, LoopProcessPool, RemoteTraceback, _Inbox, frame


def _fail(message: str) -> None:
    raise ValueError(message)


def _unpicklable(_: int) -> Any:
    return threading.Lock()


_MARK_ENV = "PIPEWEAVER_TEST_AFTER_REPLY_MARK"


def _mark_later() -> None:
    """An `after_reply` hook: takes a while, then leaves a mark."""
    time.sleep(1.0)
    with open(os.environ[_MARK_ENV], "a") as mark:
        mark.write("x")


def _marks(_: int) -> int:
    path = os.environ[_MARK_ENV]
    return len(open(path).read()) if os.path.exists(path) else 0


def _with_pool(
    workers: int, body: Callable[[LoopProcessPool], Awaitable[None]], after_reply: Callable[[], None] | None = None
) -> None:
    async def main() -> None:
        pool = LoopProcessPool(workers, after_reply=after_reply)
        try:
            await body(pool)
        finally:
            pool.shutdown()
            assert await pool.join(30)

    asyncio.run(main())


def test_results_errors_and_their_remote_tracebacks_come_back() -> None:
    async def body(pool: LoopProcessPool) -> None:
        assert await asyncio.wrap_future(pool.submit(abs, -4)) == 4
        with pytest.raises(ValueError, match="no good") as info:
            await asyncio.wrap_future(pool.submit(_fail, "no good"))
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "_fail" in str(info.value.__cause__)
        with pytest.raises(RuntimeError, match="cannot be pickled"):
            await asyncio.wrap_future(pool.submit(_unpicklable, 1))
        with pytest.raises(TypeError, match="pickle"):  # an argument that cannot go to a worker fails its future
            await asyncio.wrap_future(pool.submit(abs, threading.Lock()))
        assert await asyncio.wrap_future(pool.submit(abs, -5)) == 5  # the worker survived all of it

    _with_pool(1, body)


def test_after_reply_runs_once_the_result_is_sent_and_before_the_next_task(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_MARK_ENV, str(tmp_path / "mark"))  # the spawned worker inherits it

    async def body(pool: LoopProcessPool) -> None:
        # The first result comes back while the hook still sleeps; the next task runs after it.
        assert await asyncio.wrap_future(pool.submit(_marks, 0)) == 0
        assert _marks(0) == 0
        assert await asyncio.wrap_future(pool.submit(_marks, 0)) == 1

    _with_pool(1, body, after_reply=_mark_later)


def test_no_helper_thread_carries_tasks_or_results() -> None:
    """The reason the pool exists: a busy event loop starves helper threads (`loop_pool` docstring)."""

    async def body(pool: LoopProcessPool) -> None:
        threads = threading.active_count()
        results = await asyncio.gather(*(asyncio.wrap_future(pool.submit(abs, -i)) for i in range(20)))
        assert results == list(range(20))
        assert threading.active_count() == threads

    _with_pool(2, body)


def test_tasks_wait_for_a_free_worker_in_order_and_a_cancelled_one_never_runs() -> None:
    async def body(pool: LoopProcessPool) -> None:
        first = pool.submit(time.sleep, 0.3)
        queued = [pool.submit(abs, -i) for i in range(3)]
        dropped = pool.submit(os._exit, 9)  # would kill the worker, were it run
        assert dropped.cancel()
        last = pool.submit(abs, -7)
        assert await asyncio.wrap_future(first) is None
        assert [await asyncio.wrap_future(f) for f in queued] == [0, 1, 2]
        assert await asyncio.wrap_future(last) == 7
        assert dropped.cancelled()

    _with_pool(1, body)


def test_a_dead_worker_breaks_the_pool_and_fails_its_waiting_tasks() -> None:
    async def main() -> None:
        pool = LoopProcessPool(1)
        dying = pool.submit(os._exit, 3)
        waiting = pool.submit(abs, -1)
        with pytest.raises(BrokenProcessPool, match="exited with 3"):
            await asyncio.wrap_future(dying)
        with pytest.raises(BrokenProcessPool):
            await asyncio.wrap_future(waiting)
        with pytest.raises(BrokenProcessPool):
            pool.submit(abs, -2)
        pool.shutdown()
        assert await pool.join(30)

    asyncio.run(main())


def test_shutdown_lets_a_running_task_finish_and_every_worker_exit() -> None:
    async def main() -> None:
        pool = LoopProcessPool(2)
        running = pool.submit(time.sleep, 0.3)
        await asyncio.sleep(0.1)
        waiting = [pool.submit(abs, -1), pool.submit(abs, -2), pool.submit(abs, -3)]
        pool.shutdown(cancel_futures=True)
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit(abs, -4)
        assert await asyncio.wrap_future(running) is None
        assert await pool.join(30)
        assert all(p.exitcode == 0 for p in pool.processes)
        # The second worker was idle when the three arrived: the first of them ran there, the rest were dropped.
        assert [f.cancelled() for f in waiting] == [False, True, True]

    asyncio.run(main())


def test_the_inbox_gathers_a_frame_as_its_bytes_arrive_without_waiting_for_the_rest() -> None:
    """The event loop reads a worker's result in pieces: a read returns what has come, never waits for more."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    inbox = _Inbox()
    payload = bytes(range(256)) * 1000
    data = frame(payload) + frame(b"second")
    assert inbox.read(reader.fileno()) == []  # nothing yet: no wait
    writer.sendall(data[:2])  # half a length
    assert inbox.read(reader.fileno()) == []
    writer.sendall(data[2:100_000])  # the length and part of the payload
    assert inbox.read(reader.fileno()) == []
    writer.sendall(data[100_000:])  # the rest and a whole second frame at once
    got: list[bytes] = []
    while len(got) < 2:
        frames = inbox.read(reader.fileno())
        assert frames is not None
        got += frames
    assert got == [payload, b"second"]
    writer.close()
    assert inbox.read(reader.fileno()) is None  # end of file: the worker is gone
    reader.close()


def test_frames_match_what_a_connection_reads_including_the_long_form() -> None:
    parent, child = multiprocessing.Pipe()
    parent.send_bytes(b"x" * 20_000)
    assert frame(b"x" * 20_000) == _SHORT.pack(20_000) + b"x" * 20_000
    assert child.recv_bytes() == b"x" * 20_000
    # Beyond 2 GiB a connection writes -1 and an 8-byte length; the inbox reads that form without the 2 GiB.
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.sendall(_LONG.pack(-1, 3) + b"abc")
    assert _Inbox().read(reader.fileno()) == [b"abc"]
    for s in (reader, writer, parent, child):
        s.close()


def _sized(n: int) -> bytes:
    return b"r" * n


def _length(data: bytes) -> int:
    return len(data)


def test_large_results_and_tasks_cross_intact() -> None:
    """Results of several MB (more than a pipe holds) from two workers at once, gathered piece by piece, and a
    task larger than the pipe (the pool writes what fits and the rest as the worker reads)."""

    async def body(pool: LoopProcessPool) -> None:
        big = await asyncio.gather(*(asyncio.wrap_future(pool.submit(_sized, (8 << 20) + i)) for i in range(4)))
        assert [len(b) for b in big] == [(8 << 20) + i for i in range(4)]
        assert await asyncio.wrap_future(pool.submit(_length, b"t" * (6 << 20))) == 6 << 20
        assert await asyncio.wrap_future(pool.submit(abs, -3)) == 3  # the frames after a large one line up

    _with_pool(2, body)

"""Worker processes next to the gRPC server: spawn pools behind bounded admission queues.

gRPC Python must never fork, so workers are *spawned* (a fresh interpreter each), started and warmed before the
service reports SERVING. Two lanes keep short work from queueing behind searches: ``search`` (N workers) runs the
per-batch searches; ``control`` (one worker per 16 cores by default) runs registrations, fallback plans and
simulations. Each lane
admits at most `workers` running tasks plus `queue_size` waiting ones (`QueueFull` past that, which the service
answers with RESOURCE_EXHAUSTED). The pools are `loop_pool.LoopProcessPool`s, which the event loop drives without
helper threads (a busy loop starves those: see that module). A worker that dies breaks its pool: the lane
replaces it with a fresh pool at once, and every task that was on the broken one raises `WorkerCrashed` (the
service then answers with fallback plans). A running task cannot be interrupted; cancelling `run` drops a waiting
task and abandons a running one, whose worker stays busy until the task's own time limit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from pipeweaver.server import work
from pipeweaver.server.loop_pool import LoopProcessPool

log = logging.getLogger("pipeweaver.server")

T = TypeVar("T")
R = TypeVar("R")

WARM_HOLD_S = 0.3
"""Each warm-up task holds its worker this long, so N concurrent warm-ups reach N different workers."""


class QueueFull(Exception):
    """The lane's admission queue is full."""

    def __init__(self, lane: str, waiting: int) -> None:
        super().__init__(f"the {lane} queue is full ({waiting} waiting)")
        self.lane = lane


class WorkerCrashed(Exception):
    """The worker running (or about to run) the task died; its lane has been replaced."""


class PoolClosed(Exception):
    """The pool is shutting down."""


class Lane:
    """One spawn `LoopProcessPool` plus a FIFO admission queue in front of it."""

    def __init__(
        self,
        name: str,
        workers: int,
        queue_size: int,
        *,
        on_change: Callable[[Lane], None] | None = None,
        on_restart: Callable[[Lane], None] | None = None,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.workers = workers
        self.nice = nice
        """Added to each worker's nice value (`work.init_worker`)."""
        self.queue_size = queue_size
        self.restarts = 0
        self.pids: tuple[int, ...] = ()
        self._on_change = on_change
        self._on_restart = on_restart
        self._running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._generation = 0
        self._closing = False
        self._executor: LoopProcessPool | None = None
        self._warming: Future[list[work.WarmReport]] | None = None
        self._ready = False
        self._rewarm: asyncio.Task[None] | None = None

    # ---- state ----
    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def running(self) -> int:
        return self._running

    @property
    def ready(self) -> bool:
        """Started and warmed (false while a replacement pool warms up)."""
        return self._ready and not self._closing

    # ---- lifecycle ----
    def spawn(self) -> None:
        """Create the executor and start its workers warming up (returns at once; see `warmed`)."""
        self._executor = self._new_executor()
        self._warming = self._submit_warm_up(self._executor)

    async def warmed(self, timeout_s: float) -> None:
        """Wait until every worker has warmed up; raises the warm-up's own error if one failed."""
        assert self._warming is not None, "spawn() first"
        reports = await asyncio.wait_for(asyncio.wrap_future(self._warming), timeout_s)
        self._ready_with(reports)

    async def close(self, timeout_s: float) -> None:
        """Refuse new tasks, let running ones finish for up to `timeout_s`, then kill what is left."""
        self._closing = True
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(PoolClosed(f"the {self.name} pool is shutting down"))
        if self._rewarm is not None:
            self._rewarm.cancel()
        executor = self._executor
        if executor is None:
            return
        executor.shutdown(cancel_futures=True)
        if await executor.join(timeout_s):
            return
        level = logging.WARNING if self._ready else logging.INFO  # still warming up: expected
        for p in executor.processes:
            if p.exitcode is None:
                log.log(level, "%s worker %d did not stop within %.1f s; killing it", self.name, p.pid, timeout_s)
                p.kill()
        await executor.join(10.0)

    # ---- running tasks ----
    async def run(self, fn: Callable[[T], R], arg: T) -> R:
        """Run `fn(arg)` in a worker. Raises QueueFull, WorkerCrashed or PoolClosed, or what `fn` raised."""
        await self._acquire()
        return await self._result(*self._submit(fn, arg))

    def submit(self, fn: Callable[[T], R], arg: T) -> asyncio.Future[R]:
        """`run(fn, arg)` as a future; with a worker free, the task goes to it now, not when the caller next
        yields to the event loop (a burst of requests read meanwhile would hold it back by milliseconds).
        Cancelling the future is cancelling `run`."""
        if self._closing or self._running >= self.workers or self._waiters:
            return asyncio.ensure_future(self.run(fn, arg))
        self._running += 1
        try:
            cfut, generation = self._submit(fn, arg)
        except (WorkerCrashed, PoolClosed) as exc:  # `_submit` released the slot (and reported it)
            failed: asyncio.Future[R] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed
        self._changed()  # after the task is on its way: the worker starts while the gauges are set
        result = asyncio.ensure_future(self._result(cfut, generation))
        # Cancelled before its first step, the coroutine never runs to cancel the task it submitted.
        result.add_done_callback(lambda f: cfut.cancel() if f.cancelled() else None)
        return result

    async def _result(self, cfut: Future[R], generation: int) -> R:
        try:
            return await asyncio.wrap_future(cfut)
        except BrokenProcessPool as exc:
            if self._closing:
                raise PoolClosed(f"the {self.name} pool is shutting down") from exc
            self._broken(generation)
            raise WorkerCrashed(f"a {self.name} worker died while running this task; it has been replaced") from exc

    def _submit(self, fn: Callable[[T], R], arg: T) -> tuple[Future[R], int]:
        """Submit to the current executor, holding a slot; one that broke while idle is replaced and the task
        resubmitted once. The slot is released when the worker is done with the task."""
        for attempt in range(2):
            generation = self._generation
            executor = self._executor
            assert executor is not None, "spawn() first"
            try:
                cfut = executor.submit(fn, arg)
            except (BrokenProcessPool, RuntimeError) as exc:
                if self._closing:
                    self._release()
                    raise PoolClosed(f"the {self.name} pool is shutting down") from exc
                self._broken(generation)
                if attempt == 1:
                    self._release()
                    raise WorkerCrashed(f"the {self.name} pool is broken; it is being replaced") from exc
                continue
            cfut.add_done_callback(self._done_callback(generation))
            return cfut, generation
        raise AssertionError("unreachable")  # pragma: no cover

    def _done_callback(self, generation: int) -> Callable[[Future[Any]], None]:
        loop = asyncio.get_running_loop()

        def done(f: Future[Any]) -> None:
            # Runs on the loop, inside the pool's own bookkeeping: the release waits for the loop's next step.
            # The slot is only free once the worker is; a pool that broke under a task nobody awaits any more
            # (its requester left) is still replaced now, not at the next request.
            broken = not f.cancelled() and isinstance(f.exception(), BrokenProcessPool)
            if not loop.is_closed():  # a closed loop has nothing left to release for
                loop.call_soon(self._finished, generation, broken)

        return done

    def _finished(self, generation: int, broken: bool) -> None:
        self._release()
        if broken:
            self._broken(generation)

    async def _acquire(self) -> None:
        if self._closing:
            raise PoolClosed(f"the {self.name} pool is shutting down")
        if self._running < self.workers and not self._waiters:
            self._running += 1
            self._changed()
            return
        if len(self._waiters) >= self.queue_size:
            raise QueueFull(self.name, len(self._waiters))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._changed()
        try:
            await fut  # `_release` counts us as running before it wakes us
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release()  # granted, then cancelled before we could use it
            elif fut in self._waiters:
                self._waiters.remove(fut)
                self._changed()
            raise

    def _release(self) -> None:
        self._running -= 1
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                self._running += 1
                w.set_result(None)
                break
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    # ---- executors ----
    def _new_executor(self) -> LoopProcessPool:
        return LoopProcessPool(
            self.workers, initializer=functools.partial(work.init_worker, self.nice), after_reply=work.release_held
        )

    def _submit_warm_up(self, executor: LoopProcessPool) -> Future[list[work.WarmReport]]:
        futures = [executor.submit(work.warm_up, WARM_HOLD_S) for _ in range(self.workers)]
        combined: Future[list[work.WarmReport]] = Future()
        remaining = [len(futures)]

        def one_done(_: object) -> None:
            remaining[0] -= 1
            if remaining[0] == 0 and not combined.done():
                errors = [f.exception() for f in futures if f.exception() is not None]
                if errors:
                    combined.set_exception(errors[0])
                else:
                    combined.set_result([f.result() for f in futures])

        for f in futures:
            f.add_done_callback(one_done)
        return combined

    def _ready_with(self, reports: list[work.WarmReport]) -> None:
        self.pids = tuple(sorted({r.pid for r in reports}))
        self._ready = True
        slowest = max((r.seconds for r in reports), default=0.0)
        log.info("%s workers ready: pids %s (warm-up %.1f s)", self.name, list(self.pids), slowest)
        self._changed()

    def _broken(self, generation: int) -> None:
        """Replace a broken executor once (many tasks report the same breakage)."""
        if generation != self._generation or self._closing:
            return
        self._generation += 1
        self.restarts += 1
        self._ready = False
        old = self._executor
        log.warning("a %s worker died; replacing the pool (restart %d)", self.name, self.restarts)
        if old is not None:
            old.shutdown(cancel_futures=True)
        self._executor = self._new_executor()
        warming = self._submit_warm_up(self._executor)
        if self._on_restart is not None:
            self._on_restart(self)
        self._changed()
        self._rewarm = asyncio.get_running_loop().create_task(self._await_rewarm(warming, self._generation))

    async def _await_rewarm(self, warming: Future[list[work.WarmReport]], generation: int) -> None:
        try:
            reports = await asyncio.wrap_future(warming)
        except BrokenProcessPool:
            return  # broke again while warming; `_broken` has started another replacement
        except Exception:
            log.exception("replacement %s workers failed to warm up", self.name)
            return
        if generation == self._generation and not self._closing:
            self._ready_with(reports)


class WorkerPool:
    """The server's two lanes: ``search`` and ``control``."""

    def __init__(
        self,
        search_workers: int,
        queue_size: int,
        *,
        control_workers: int = 1,
        search_nice: int = 0,
        on_change: Callable[[Lane], None] | None = None,
        on_restart: Callable[[Lane], None] | None = None,
    ) -> None:
        # Only searches are niced: the control lane builds the fallback plans of late searches, which are due.
        self.search = Lane(
            "search", search_workers, queue_size, on_change=on_change, on_restart=on_restart, nice=search_nice
        )
        self.control = Lane(
            "control",
            control_workers,
            max(64, queue_size + search_workers),
            on_change=on_change,
            on_restart=on_restart,
        )
        self.lanes = (self.search, self.control)

    def spawn(self) -> None:
        for lane in self.lanes:
            lane.spawn()

    async def warmed(self, timeout_s: float) -> None:
        await asyncio.gather(*(lane.warmed(timeout_s) for lane in self.lanes))

    @property
    def ready(self) -> bool:
        return all(lane.ready for lane in self.lanes)

    async def close(self, timeout_s: float) -> None:
        await asyncio.gather(*(lane.close(timeout_s) for lane in self.lanes))

"""A spawn process pool driven by the asyncio event loop itself: no helper threads in the server's process.

Why not `concurrent.futures.ProcessPoolExecutor`: its tasks reach the workers through two helper threads (the
executor's manager thread and the call queue's feeder thread), and its results come back through the manager
thread. Those threads need the GIL, and an event loop that is busy, as it is while it reads a burst of 64
requests, releases the GIL only briefly at each of its `select` calls and takes it straight back, so the threads
rarely win it: a no-op task submitted at the start of 64 x 0.3 ms of event-loop work reached its worker after
about 20 ms, the whole burst, with `sys.setswitchinterval` at 5 or 0.5 ms; with the loop idle, 0.2-0.3 ms
(`benchmarks/bench_pool_latency.py`). Every search started that late, and its plan went out that much later.

Here the event loop writes a task straight into an idle worker's pipe when it is submitted, and reads results
with `loop.add_reader` on the workers' pipes, so nothing waits for a thread. Nor does the loop wait for a worker:
its ends of the pipes do not block, and a result is gathered from whatever has arrived each time its pipe turns
readable (`_Inbox`). `Connection.recv_bytes` would read a whole result once its first bytes came, and a plan of
a few hundred KB arrives in pieces as the worker writes it: the loop thread sat in the read for 0.1-0.25 ms per
result on the 16-core host (`benchmarks/watch_thread.py`), and for a whole scheduler slice where the worker lost
its core between two writes. The interface is the part of
`ProcessPoolExecutor` that `pool.Lane` uses: `submit` returns a `concurrent.futures.Future` (completed on the
loop's thread), a worker that dies breaks the pool (every task on it or waiting for it fails with
`BrokenProcessPool`, as the executor does), and `shutdown`. Workers are daemonic, so a server that fails
does not wait for them at exit, and a worker whose server went away reads end-of-file and exits; a task cannot
start processes of its own (the server's searches run in one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import struct
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("pipeweaver.server")

_STOP = b""
"""Sent to a worker: exit."""


_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!iQ")
"""`multiprocessing.Connection`'s framing: a signed 4-byte length, or -1 and an 8-byte length beyond 2 GiB; the
workers read their tasks with `Connection.recv_bytes`."""


def _length(n: int) -> bytes:
    return _SHORT.pack(n) if n <= 0x7FFFFFFF else _LONG.pack(-1, n)


def frame(payload: bytes) -> bytes:
    """`payload` as `Connection.recv_bytes` reads it."""
    return _length(len(payload)) + payload


def _write_frame(fd: int, payload: bytes) -> None:
    """Write one frame to a blocking file descriptor in as few system calls as the pipe allows (one, where it has
    room): a reader woken by the length alone would have to come back for the rest."""
    parts = [memoryview(_length(len(payload))), memoryview(payload)]
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts.pop(0)
        if parts and written:
            parts[0] = parts[0][written:]


class _Inbox:
    """Frames gathered from a non-blocking file descriptor as their bytes arrive, without waiting for the rest.
    Once a frame's length is in, the rest of its payload is read straight into a buffer of that size, which is
    then handed over as it is: past the first read's 64 KB, a plan's bytes are copied once, by the kernel."""

    __slots__ = ("_body", "_got", "_head")

    def __init__(self) -> None:
        self._head = bytearray()
        """Bytes read while no payload was under way: a length, and whatever came after it in the same read."""
        self._body: bytearray | None = None
        self._got = 0

    def read(self, fd: int) -> list[bytearray] | None:
        """Read what `fd` holds now; the payloads of the frames it completed, in order (often none), or None at
        end-of-file."""
        frames: list[bytearray] = []
        try:
            while True:
                if self._body is None:
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        return None
                    self._head += chunk
                    self._start_bodies(frames)
                else:
                    n = os.readv(fd, [memoryview(self._body)[self._got :]])
                    if n == 0:
                        return None
                    self._got += n
                    if self._got == len(self._body):
                        frames.append(self._body)
                        self._body = None
        except BlockingIOError:
            pass
        return frames

    def _start_bodies(self, frames: list[bytearray]) -> None:
        """Parse the lengths in `_head`: payloads it holds whole become frames; the first it does not becomes
        the payload under way, with the part that came."""
        while self._body is None and len(self._head) >= _SHORT.size:
            (n,) = _SHORT.unpack_from(self._head)
            start = _SHORT.size
            if n == -1:
                if len(self._head) < _LONG.size:
                    return
                n, start = _LONG.unpack_from(self._head)[1], _LONG.size
            body = bytearray(n)
            part = min(n, len(self._head) - start)
            body[:part] = self._head[start : start + part]
            del self._head[: start + part]
            if part == n:
                frames.append(body)
            else:
                self._body, self._got = body, part


class RemoteTraceback(Exception):
    """The worker-side traceback of a task's exception (set as its `__cause__`)."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


def _worker_main(
    conn: Connection, initializer: Callable[[], None] | None, after_reply: Callable[[], None] | None
) -> None:
    if initializer is not None:
        initializer()
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:  # the server went away
            return
        if data == _STOP:
            return
        fn, args = pickle.loads(data)
        try:
            outcome: tuple[bool, Any, str] = (True, fn(*args), "")
        except BaseException as exc:
            outcome = (False, exc, traceback.format_exc())
        try:
            payload = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an unpicklable result or exception: say so rather than die
            error = RuntimeError(f"the task's {'result' if outcome[0] else 'exception'} cannot be pickled: {exc!r}")
            payload = pickle.dumps((False, error, outcome[2]), protocol=pickle.HIGHEST_PROTOCOL)
        _write_frame(conn.fileno(), payload)
        del outcome, payload
        if after_reply is not None:
            after_reply()


class _Worker:
    __slots__ = ("conn", "inbox", "outbox", "process", "task")

    def __init__(self, conn: Connection, process: BaseProcess) -> None:
        self.conn = conn
        self.process = process
        self.task: Future[Any] | None = None
        self.inbox = _Inbox()
        self.outbox = bytearray()
        """What the pipe had no room for yet (a large task, rare): written as it drains."""


class LoopProcessPool:
    """`workers` spawned processes; create, submit to and shut down on the event loop's thread. Each worker calls
    `initializer` once, and `after_reply` after each task's result is on its way back: work a task leaves for
    later, such as freeing its large structures (`work.release_held`), is then off the waiting caller's path."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[[], None] | None = None,
        after_reply: Callable[[], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
        self._workers: list[_Worker] = []
        self._idle: deque[_Worker] = deque()
        self._queue: deque[tuple[Future[Any], bytes]] = deque()
        self._broken = False
        self._shutdown = False
        for _ in range(workers):
            parent, child = ctx.Pipe(duplex=True)
            process = ctx.Process(target=_worker_main, args=(child, initializer, after_reply), daemon=True)
            process.start()
            child.close()
            os.set_blocking(parent.fileno(), False)  # the event loop never waits on a worker's pipe
            worker = _Worker(parent, process)
            self._workers.append(worker)
            self._idle.append(worker)
            self._loop.add_reader(parent.fileno(), self._on_result, worker)
            self._loop.add_reader(process.sentinel, self._on_exit, worker)

    @property
    def processes(self) -> list[BaseProcess]:
        return [w.process for w in self._workers]

    # ---- tasks ----
    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        if self._broken:
            raise BrokenProcessPool("a worker of this pool died")
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        future: Future[Any] = Future()
        try:
            data = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # as the executor does: the task's future fails, the caller is not interrupted
            future.set_exception(exc)
            return future
        self._queue.append((future, data))
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            future, data = self._queue.popleft()
            if not future.set_running_or_notify_cancel():  # cancelled while it waited
                continue
            worker = self._idle.popleft()
            worker.task = future
            if not self._send(worker, data):
                return

    def _send(self, worker: _Worker, data: bytes) -> bool:
        """Queue a frame to `worker` and write what its pipe takes now (the rest as it drains); False, with the
        pool broken, if the pipe broke."""
        worker.outbox += frame(data)
        if self._flush(worker):
            return True
        self._break(f"worker {worker.process.pid}'s pipe broke")
        return False

    def _flush(self, worker: _Worker) -> bool:
        """Write what `worker`'s pipe takes of its outbox; False if the pipe broke."""
        fd = worker.conn.fileno()
        try:
            while worker.outbox:
                del worker.outbox[: os.write(fd, worker.outbox)]
        except BlockingIOError:  # full (a large task): the rest goes once the worker has read some
            self._loop.add_writer(fd, self._on_writable, worker)
            return True
        except OSError:
            return False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(fd)
        return True

    def _on_writable(self, worker: _Worker) -> None:
        if not self._flush(worker) and not self._shutdown:
            self._break(f"worker {worker.process.pid}'s pipe broke")

    def _on_result(self, worker: _Worker) -> None:
        try:
            frames = worker.inbox.read(worker.conn.fileno())
        except OSError:
            frames = None
        if frames is None:  # the worker is gone: its sentinel reports it, with its exit code
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(worker.conn.fileno())
            return
        for data in frames:
            self._resolve(worker, data)

    def _resolve(self, worker: _Worker, data: bytearray) -> None:
        ok, value, remote_tb = pickle.loads(data)
        future, worker.task = worker.task, None
        if self._shutdown:
            self._stop(worker)
        else:
            self._idle.append(worker)
        if future is not None:
            if ok:
                future.set_result(value)
            else:
                if remote_tb:
                    value.__cause__ = RemoteTraceback(remote_tb)
                future.set_exception(value)
        self._dispatch()

    def _on_exit(self, worker: _Worker) -> None:
        self._forget(worker)
        # The sentinel turns readable when the worker's files close, a moment before the kernel can report its
        # exit: wait that moment (only ever on a death) so that the error names the exit code.
        worker.process.join(1.0)
        if not self._shutdown or worker.task is not None:
            self._break(f"worker {worker.process.pid} exited with {worker.process.exitcode}")

    def _break(self, why: str) -> None:
        """Like the executor: one dead worker breaks the pool; its tasks and the waiting ones fail."""
        if self._broken:
            return
        self._broken = True
        error = BrokenProcessPool(f"a worker of this pool died ({why})")
        pending = [w.task for w in self._workers if w.task is not None] + [f for f, _ in self._queue]
        self._queue.clear()
        for worker in self._workers:
            worker.task = None
            self._forget(worker)
            if worker.process.exitcode is None:
                worker.process.kill()
        for future in pending:
            if not future.done():
                future.set_exception(error)

    def _forget(self, worker: _Worker) -> None:
        with contextlib.suppress(ValueError, OSError):  # already removed / closed
            self._loop.remove_reader(worker.conn.fileno())
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(worker.conn.fileno())
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.process.sentinel)

    # ---- shutdown ----
    def shutdown(self, wait: bool = False, *, cancel_futures: bool = True) -> None:
        """Refuse new tasks; drop the waiting ones (`cancel_futures`); idle workers exit now, busy ones after
        their task. `wait` is not supported here (it would block the event loop): see `join`."""
        assert not wait, "use join() to wait"
        self._shutdown = True
        if cancel_futures:
            while self._queue:
                self._queue.popleft()[0].cancel()
        while self._idle:
            self._stop(self._idle.popleft())

    def _stop(self, worker: _Worker) -> None:
        worker.outbox += frame(_STOP)
        self._flush(worker)  # a broken pipe: the worker is gone already

    async def join(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every worker to exit; whether they all did."""
        deadline = self._loop.time() + timeout_s
        while any(w.process.exitcode is None for w in self._workers):
            if self._loop.time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        for worker in self._workers:
            self._forget(worker)
            worker.process.join(0)
            worker.conn.close()
        return True

"""One StreamPlans stream's state, apart from the transport that carries it.

A session takes a stream's requests (serialized `StreamPlansRequest`s) one at a time and hands its answers, its
error or its end to a `StreamSink`; the gRPC handler (`service.PlannerService.StreamPlans`) only moves bytes
between the call and the session.

A request whose plan is there (a cache hit, a rank after the first) is answered as it is taken; the others wait
on their entry's plan through a callback, so one search's answers go to every waiting stream at once, without a
task per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pipeweaver.server import delivery_trace, idle_gc
from pipeweaver.server.jobs import JobClosed, JobState, PlanEntry, Served
from pipeweaver.server.planning import Planning, shutting_down
from pipeweaver.server.pool import PoolClosed
from pipeweaver.server.validation import RequestError, internal_error, unknown_job

if TYPE_CHECKING:
    from pipeweaver.server.service import PlannerService

log = logging.getLogger("pipeweaver.server")


class StreamSink(Protocol):
    """Where a session's output goes. Each method is called on the event loop, never after `end` or `fail`."""

    def answer(self, data: bytes) -> None:
        """One serialized `StreamPlansResponse`."""

    def end(self) -> None:
        """The client is done writing and every request it sent is answered: the stream ends OK."""

    def fail(self, error: RequestError) -> None:
        """The stream ends with this status (after the answers already handed over)."""


_sessions = itertools.count()
"""Session numbers, as the delivery trace names streams."""

_Waiter = tuple[JobState, PlanEntry, float | None, Callable[[asyncio.Future[Served]], None]]
"""(job, entry, deadline, the entry's done callback)."""


class StreamSession:
    """The requests of one stream, their waiting plans, and how the stream ends."""

    def __init__(self, service: PlannerService, planning: Planning, sink: StreamSink, grace_s: float) -> None:
        self._service = service
        self._planning = planning
        self._sink = sink
        self._grace_s = grace_s
        self._waiting: dict[int, _Waiter] = {}
        """Requests whose plan is not fixed yet, by key: their entry and the callback that answers them."""
        self._keys = itertools.count()
        self._done_writing = False
        self._draining = False
        self.number = next(_sessions)
        """This stream's number in the delivery trace."""
        self.finished = False
        """The sink got `end` or `fail`: the session takes nothing more."""

    # ---- input ----
    def take(self, data: bytes) -> None:
        """One request, as the bytes that arrived. A bad one ends the stream with its error."""
        if self.finished or self._draining:  # draining: requests after the drain are not planned
            return
        idle_gc.touch()
        trace = delivery_trace.events
        t_start = time.perf_counter() if trace is not None else 0.0
        try:
            job, rank, batch, deadline, timings, early = self._service.stream_request(data, start_early=True)
            entry = self._planning.attach(job, batch, budget_ms=job.budget_ms, deadline=deadline, early=early)
            served = entry.served()
            if served is not None:
                answer = served.response_bytes(rank, timings=timings)
                if trace is not None:
                    t, counters = time.perf_counter(), delivery_trace.sched()
                    trace.append(
                        ("take", self.number, batch.replica, batch.iteration, rank, t_start, t, True, *counters)
                    )
                    trace.append(("answer", self.number, batch.replica, batch.iteration, rank, t, *counters))
                self._sink.answer(answer)
            else:
                self._wait_for(job, entry, rank, deadline, timings)
                if trace is not None:
                    t = time.perf_counter()
                    trace.append(
                        (
                            "take",
                            self.number,
                            batch.replica,
                            batch.iteration,
                            rank,
                            t_start,
                            t,
                            False,
                            *delivery_trace.sched(),
                        )
                    )
        except RequestError as exc:
            self._finish(exc)
        except PoolClosed:
            self._finish(shutting_down())
        except Exception as exc:
            log.exception("unexpected error taking a streamed batch")
            self._finish(internal_error(exc))

    def done_writing(self) -> None:
        """The client half-closed: answer what it asked, then end."""
        self._done_writing = True
        if not self._waiting and not self._draining:
            self._finish(None)

    def drain(self) -> None:
        """The server is draining: take no more requests, send the answers in flight for up to the grace period,
        then end the stream UNAVAILABLE (the client reconnects to this planner's replacement)."""
        if self.finished or self._draining:
            return
        self._draining = True
        if not self._waiting:
            self._finish(shutting_down())
            return
        asyncio.get_running_loop().call_later(self._grace_s, self._finish, shutting_down())

    def fail(self, error: RequestError) -> None:
        """End the stream with `error` (its transport broke in a way the client should hear about)."""
        self._finish(error)

    def close(self) -> None:
        """The stream went away (its client cancelled, its connection broke): it waits for nothing more."""
        self.finished = True
        for job, entry, deadline, deliver in self._waiting.values():
            entry.final.remove_done_callback(deliver)
            self._planning.unwatch(job, entry, deadline)
        self._waiting.clear()  # a `deliver` already scheduled finds nothing to do

    # ---- output ----
    def _wait_for(self, job: JobState, entry: PlanEntry, rank: int, deadline: float | None, timings: bool) -> None:
        key = next(self._keys)

        def deliver(final: asyncio.Future[Served]) -> None:
            if self._waiting.pop(key, None) is None:  # the stream ended while this callback was scheduled
                return
            self._planning.unwatch(job, entry, deadline)
            answer = self._answer(job, final, rank, timings)
            if isinstance(answer, RequestError):
                self._finish(answer)
                return
            if delivery_trace.events is not None:
                delivery_trace.events.append(
                    (
                        "answer",
                        self.number,
                        entry.replica,
                        entry.iteration,
                        rank,
                        time.perf_counter(),
                        *delivery_trace.sched(),
                    )
                )
            self._sink.answer(answer)
            if not self._waiting and (self._done_writing or self._draining):
                self._finish(shutting_down() if self._draining else None)

        self._planning.watch(job, entry, deadline)
        self._waiting[key] = (job, entry, deadline, deliver)
        entry.final.add_done_callback(deliver)

    def _answer(self, job: JobState, final: asyncio.Future[Served], rank: int, timings: bool) -> bytes | RequestError:
        """A resolved entry's answer to `rank`, or the error that ends the stream."""
        error = None if final.cancelled() else final.exception()
        if error is None and not final.cancelled():
            try:
                return final.result().response_bytes(rank, timings=timings)
            except Exception as exc:  # in a callback: nobody else would see it, and the stream would hang
                log.exception("unexpected error answering a streamed batch")
                return internal_error(exc)
        if isinstance(error, RequestError):
            return error
        if isinstance(error, JobClosed):
            return unknown_job(job.job_id)
        log.error("unexpected outcome of a streamed batch's plan: %r", error)
        return internal_error(error or asyncio.CancelledError())

    def _finish(self, error: RequestError | None) -> None:
        if self.finished:
            return
        if error is None:
            self._sink.end()
        else:
            self._sink.fail(error)
        self.close()

"""The PlannerService servicer: request checks, then `planning.Planning`, then one rank's slice of the plan.

Every handler turns a `RequestError` into its status with details; anything unexpected is logged and answered
INTERNAL, and the server goes on serving everyone else. A stream answers its requests as their plans arrive
(out of order), and ends with UNAVAILABLE when the server drains, after the answers already in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from pipeweaver.server import delivery_trace, idle_gc, rawproto
from pipeweaver.server.config import ServerConfig
from pipeweaver.server.jobs import Batch, JobState, Served
from pipeweaver.server.planning import EarlySearch, Planning, shutting_down
from pipeweaver.server.pool import PoolClosed
from pipeweaver.server.streams import StreamSession, StreamSink
from pipeweaver.server.validation import (
    MAX_DEADLINE_AHEAD_S,
    RequestError,
    Violation,
    abort,
    check_batch,
    check_budget,
    check_message_size,
    check_rank,
    check_register,
    internal_error,
    invalid,
    message_too_large,
)
from pipeweaver.v1 import planner_pb2 as pb

log = logging.getLogger("pipeweaver.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["PlannerService"].full_name

if TYPE_CHECKING:  # grpc's classes are generic only in its stubs
    Context = grpc.aio.ServicerContext[Any, Any]


def _largest_field(msg: Any) -> str:
    """The top-level field that makes a message big (what a too-large violation points at)."""
    best, size = "", -1
    for fd, value in msg.ListFields():
        if fd.type == fd.TYPE_MESSAGE:
            n = sum(v.ByteSize() for v in value) if fd.label == fd.LABEL_REPEATED else value.ByteSize()
        else:
            n = len(value) if fd.label == fd.LABEL_REPEATED else 0
        if n > size:
            best, size = fd.name, n
    return best or "request"


def _deadline(seconds: int, nanos: int) -> float:
    """A request's wall-clock deadline timestamp on the monotonic clock."""
    if not 0 <= nanos < 1_000_000_000:
        raise invalid([Violation("deadline.nanos", f"must be in 0..999999999, got {nanos}")])
    ahead = seconds + nanos / 1e9 - time.time()
    if ahead > MAX_DEADLINE_AHEAD_S:
        limit_h = MAX_DEADLINE_AHEAD_S / 3600
        raise invalid([Violation("deadline", f"is {ahead / 3600:.0f} h ahead; at most {limit_h:.0f} h")])
    return time.monotonic() + float(ahead)


def _call_deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or not math.isfinite(remaining) or remaining > MAX_DEADLINE_AHEAD_S:
        return None
    return time.monotonic() + remaining


def _parse(message_type: Any, data: bytes) -> Any:
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise invalid([Violation("request", f"not a valid {message_type.DESCRIPTOR.name}: {exc}")]) from None


def _check_size(data: bytes, max_bytes: int, message_type: Any) -> None:
    """The request's own size against the limit (the largest field named, parsing only a request that is over)."""
    if len(data) > max_bytes:
        raise message_too_large(len(data), max_bytes, _largest_field(_parse(message_type, data)))


def _serialize(response: Any) -> bytes:
    """Responses are messages or bytes the handler serialized itself (plans, built once per plan and rank)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_planner_service(servicer: Any, server: Any) -> None:
    """`planner_pb2_grpc.add_PlannerServiceServicer_to_server`, with responses that may be pre-serialized and,
    for the methods in the servicer's `raw_requests`, requests handed over as the bytes that arrived."""
    service = pb.DESCRIPTOR.services_by_name["PlannerService"]
    raw: frozenset[str] = getattr(servicer, "raw_requests", frozenset())
    handlers = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        request_type = None if method.name in raw else getattr(pb, method.input_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behavior,
            request_deserializer=None if request_type is None else request_type.FromString,
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


_WAKE = b""
"""Put on a stream's queue when answers wait to be written by the handler (a serialized answer is never empty)."""


class StreamRequest(NamedTuple):
    """A checked `StreamPlansRequest` (`PlannerService.stream_request`)."""

    job: JobState
    rank: int
    batch: Batch
    deadline: float | None
    """On the `time.monotonic` clock."""
    predicted_timings: bool
    early: EarlySearch | None = None
    """The batch's search, submitted before the checks (`Planning.start_early`)."""


class _StreamSink:
    """A session's output for a gRPC stream: answers wait in `pending` until one of the stream's two tasks writes
    them (under `writing`, so they go out in order). An answer that taking a request produced (a cache hit, a rank
    after the first) is written by the reader right away; one that a callback produced (a plan arriving) wakes the
    handler through `out`, which also carries the end (None) or the error, after the answers."""

    def __init__(self) -> None:
        self.number = -1
        """The session's number in the delivery trace (set once the session exists)."""
        self.out: asyncio.Queue[bytes | RequestError | None] = asyncio.Queue()
        self.pending: deque[bytes] = deque()
        self.writing = asyncio.Lock()
        self.taking = False
        """The reader is inside `StreamSession.take`: it writes what the request produced itself."""

    def answer(self, data: bytes) -> None:
        self.pending.append(data)
        if not self.taking:
            self.out.put_nowait(_WAKE)

    def end(self) -> None:
        self.out.put_nowait(None)

    def fail(self, error: RequestError) -> None:
        self.out.put_nowait(error)

    async def flush(self, context: Context, sent: Any) -> None:
        """Write every pending answer."""
        async with self.writing:
            pending = self.pending
            while pending:
                trace = delivery_trace.events
                t_start = time.perf_counter() if trace is not None else 0.0
                await context.write(pending.popleft())
                idle_gc.touch()
                sent.inc()
                if trace is not None:
                    trace.append(("write", self.number, t_start, time.perf_counter(), *delivery_trace.sched()))


class PlannerService:
    """The handlers of `pipeweaver.v1.PlannerService`. Not the generated servicer's subclass: two handlers take
    bytes, not the request messages it declares."""

    raw_requests = frozenset({"StreamPlans", "GetPlan"})
    """Methods whose handlers get the request's bytes: its size is their length (no ByteSize walk), and a streamed
    batch already checked is not parsed again (`rawproto`)."""

    def __init__(self, config: ServerConfig, planning: Planning) -> None:
        self._config = config
        self._planning = planning
        self._draining = False
        self._sessions: set[StreamSession] = set()
        self._messages = planning.m.stream_messages("bidi_stream", SERVICE_NAME, "StreamPlans")

    def drain(self) -> None:
        """Stop taking requests on open streams; they end once their in-flight answers are sent."""
        self._draining = True
        for session in list(self._sessions):
            session.drain()

    async def _fail(self, context: Context, exc: BaseException) -> None:
        if isinstance(exc, RequestError):
            await abort(context, exc)
        if isinstance(exc, PoolClosed):
            await abort(context, shutting_down())
        log.exception("unexpected error in a handler", exc_info=exc)
        await abort(context, internal_error(exc))

    # ---- RegisterJob ----
    async def RegisterJob(self, request: Any, context: Context) -> Any:
        try:
            check_message_size(request, self._config.max_message_bytes, _largest_field)
            job_request = check_register(
                request,
                limits=self._config.limits,
                default_budget_ms=self._config.budget_ms,
                max_budget_ms=self._config.max_budget_ms,
                compare_baselines=self._config.compare_baselines,
            )
            job = await self._planning.register(job_request)
            return job.response
        except (RequestError, PoolClosed) as exc:
            await self._fail(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(context, exc)

    # ---- GetPlan ----
    async def GetPlan(self, data: bytes, context: Context) -> Any:
        idle_gc.touch()
        try:
            _check_size(data, self._config.max_message_bytes, pb.GetPlanRequest)
            request = _parse(pb.GetPlanRequest, data)
            job = self._planning.job(request.job_id)
            parallel = job.job.spec.parallel
            check_rank(request.rank, parallel)
            if not request.HasField("batch"):
                raise invalid([Violation("batch", "missing")])
            check_batch(request.batch, parallel, self._config.limits)
            budget = job.budget_ms
            if request.HasField("budget_ms"):
                check_budget(request.budget_ms, "budget_ms", self._config.max_budget_ms)
                budget = request.budget_ms
            served = await self._planning.plan(
                job, Batch.of(request.batch), budget_ms=budget, deadline=_call_deadline(context)
            )
            return self._response(served, request.rank)
        except (RequestError, PoolClosed) as exc:
            await self._fail(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(context, exc)

    @staticmethod
    def _response(served: Served, rank: int) -> bytes:
        """Already serialized (see `jobs.SharedPlan`); `add_planner_service` passes bytes through."""
        return served.response_bytes(rank)

    # ---- StreamPlans ----
    def stream_request(self, data: bytes, *, start_early: bool = False) -> StreamRequest:
        """Check one serialized `StreamPlansRequest`: its job, rank, batch, deadline and whether the answer carries
        the predicted action times. A batch byte-equal to another rank's copy of the same (replica, iteration),
        or whose microbatches the job has checked before (an equal replica's, an earlier iteration's), is not
        parsed, checked or digested again (`rawproto.batch_layouts`, `JobState.known_contents`).

        `start_early`: a batch the job has not seen, for a (replica, iteration) nobody asked for yet, has its
        search submitted as soon as its identity is read, before the checks (`Planning.start_early`); it is
        cancelled here if they fail, and handed on as `early` otherwise (for `Planning.attach`)."""
        _check_size(data, self._config.max_message_bytes, pb.StreamPlansRequest)
        head = rawproto.stream_request(data)
        walked = None  # the batch's records as found by reading them, remembered once the batch is checked
        if head is not None:
            job = self._planning.job(head.job_id)
            parallel = job.job.spec.parallel
            check_rank(head.rank, parallel)
            for layout in rawproto.batch_layouts(head.batch):
                if not layout.guessed:
                    walked = layout
                if layout.iteration < 0 or not 0 <= layout.replica < parallel.dp:
                    continue  # the full path names the field
                # Another rank's copy of this (replica, iteration), byte for byte: checked when it came.
                entry = job.entry(layout.replica, layout.iteration)
                digest = entry.digest if entry is not None and entry.batch == head.batch else None
                if digest is None:
                    digest = job.known_contents(head.batch[layout.start : layout.end])
                if digest is not None:
                    deadline = None if head.deadline is None else _deadline(*head.deadline)
                    batch = Batch(layout.iteration, layout.replica, digest, head.batch)
                    return StreamRequest(job, head.rank, batch, deadline, head.predicted_timings)
        early = None
        if (
            start_early
            and head is not None
            and walked is not None
            and walked.iteration >= 0
            and 0 <= walked.replica < job.job.spec.parallel.dp
            and job.entry(walked.replica, walked.iteration) is None
        ):
            deadline = None if head.deadline is None else _deadline(*head.deadline)
            early = self._planning.start_early(
                job, walked.replica, walked.iteration, head.batch, budget_ms=job.budget_ms, deadline=deadline
            )
        try:
            req = _parse(pb.StreamPlansRequest, data)
            job = self._planning.job(req.job_id)
            check_rank(req.rank, job.job.spec.parallel)
            if not req.HasField("batch"):
                raise invalid([Violation("batch", "missing")])
            check_batch(req.batch, job.job.spec.parallel, self._config.limits)
            deadline = _deadline(req.deadline.seconds, req.deadline.nanos) if req.HasField("deadline") else None
            # The bytes as sent, when the fast reader found them (what the workers decode, and what the pipeline's
            # other ranks send): serializing the parsed batch again costs as much as parsing it.
            batch = Batch.of(req.batch, data=head.batch if head is not None else None)
        except BaseException:
            if early is not None:
                self._planning.cancel_early(early)
            raise
        if head is not None and walked is not None:  # the records as they arrived, for the next rank or replica
            job.remember_contents(head.batch[walked.start : walked.end], batch.digest)
        return StreamRequest(job, req.rank, batch, deadline, req.predicted_timings, early)

    async def StreamPlans(self, request_iterator: object, context: Context) -> None:
        """Answers go out as their plans are fixed, in that order (`streams.StreamSession`).

        On gRPC's reader/writer API (`context.read`, `context.write`; gRPC still passes a request iterator, unused):
        no async generator sits between a message and the transport, and the messages are counted here. An answer
        ready when its request is taken is written by the reader task at once: handing it to the handler task
        first cost an event-loop pass per request, which under a burst of 64 requests raised a do-nothing server's
        delivery latency from 2.0 / 4.8 to 3.4 / 8.5 ms p50 / p99 (`bench_service.py --queued-floor`)."""
        sink = _StreamSink()
        session = self._open_session(sink)
        sink.number = session.number
        received, sent = self._messages

        async def read() -> None:
            try:
                while True:
                    data = await context.read()
                    if data is grpc.aio.EOF:  # type: ignore[attr-defined]  # missing from the stubs
                        session.done_writing()
                        return
                    received.inc()
                    sink.taking = True
                    try:
                        session.take(data)
                    finally:
                        sink.taking = False
                    if sink.pending:
                        await sink.flush(context, sent)
                    if session.finished:
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reading the stream failed: end it
                log.exception("unexpected error reading a stream")
                session.fail(internal_error(exc))

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await sink.out.get()
                await sink.flush(context, sent)  # the answers before the end or the error
                if item is None:
                    return
                if isinstance(item, RequestError):
                    await abort(context, item)
        finally:
            reader.cancel()
            self._close_session(session)

    def _open_session(self, sink: StreamSink) -> StreamSession:
        """A new stream's session (drained at once if the server is draining)."""
        session = StreamSession(self, self._planning, sink, self._config.grace_s)
        self._sessions.add(session)
        if self._draining:
            session.drain()
        return session

    def _close_session(self, session: StreamSession) -> None:
        self._sessions.discard(session)
        session.close()

    # ---- ReportTimings ----
    async def ReportTimings(self, request: Any, context: Context) -> Any:
        try:
            check_message_size(request, self._config.max_message_bytes, _largest_field)
            job = self._planning.job(request.job_id)
            return self._planning.report(job, request)
        except (RequestError, PoolClosed) as exc:
            await self._fail(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(context, exc)

    # ---- Simulate ----
    async def Simulate(self, request: Any, context: Context) -> Any:
        try:
            check_message_size(request, self._config.max_message_bytes, _largest_field)
            return await self._planning.simulate(request)
        except (RequestError, PoolClosed) as exc:
            await self._fail(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(context, exc)

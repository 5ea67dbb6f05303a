"""The PlannerService servicer: request checks, then `planning.Planning`, then one rank's slice of the plan.

Every handler turns a `RequestError` into its status with details; anything unexpected is logged and answered
INTERNAL, and the server goes on serving everyone else. A stream answers its requests as their plans arrive
(out of order), and ends with UNAVAILABLE when the server drains, after the answers already in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from pipeweaver.server import rawproto
from pipeweaver.server.config import ServerConfig
from pipeweaver.server.jobs import Batch, JobClosed, JobState, PlanEntry, Served
from pipeweaver.server.planning import Planning, shutting_down
from pipeweaver.server.pool import PoolClosed
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
    invalid,
    message_too_large,
    unknown_job,
)
from pipeweaver.v1 import planner_pb2 as pb

log = logging.getLogger("pipeweaver.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["PlannerService"].full_name

if TYPE_CHECKING:  # grpc's classes are generic only in its stubs
    Context = grpc.aio.ServicerContext[Any, Any]


def _internal(exc: BaseException) -> RequestError:
    return RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", reason="INTERNAL")


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


_END = object()
"""A stream's client is done writing and every request it sent is answered."""
_DRAIN = object()
"""The server is draining: the stream stops reading and ends after its answers in flight."""


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
        self._streams: set[asyncio.Queue[Any]] = set()

    def drain(self) -> None:
        """Stop taking requests on open streams; they end once their in-flight answers are sent."""
        self._draining = True
        for responses in self._streams:
            responses.put_nowait(_DRAIN)

    async def _fail(self, context: Context, exc: BaseException) -> None:
        if isinstance(exc, RequestError):
            await abort(context, exc)
        if isinstance(exc, PoolClosed):
            await abort(context, shutting_down())
        log.exception("unexpected error in a handler", exc_info=exc)
        await abort(context, _internal(exc))

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
    def _stream_request(self, data: bytes) -> tuple[JobState, int, Batch, float | None]:
        """Check one serialized `StreamPlansRequest`: its job, rank, batch and deadline. A batch whose microbatches
        the job has checked before (another rank's request, an equal replica's, an earlier iteration's) is not
        parsed, checked or digested again (`rawproto`, `JobState.known_contents`)."""
        _check_size(data, self._config.max_message_bytes, pb.StreamPlansRequest)
        head = rawproto.stream_request(data)
        if head is not None:
            job = self._planning.job(head.job_id)
            parallel = job.job.spec.parallel
            check_rank(head.rank, parallel)
            digest = job.known_contents(head.microbatches)
            if digest is not None and head.iteration >= 0 and 0 <= head.replica < parallel.dp:
                deadline = None if head.deadline is None else _deadline(*head.deadline)
                return job, head.rank, Batch(head.iteration, head.replica, digest, head.batch), deadline
        req = _parse(pb.StreamPlansRequest, data)
        job = self._planning.job(req.job_id)
        check_rank(req.rank, job.job.spec.parallel)
        if not req.HasField("batch"):
            raise invalid([Violation("batch", "missing")])
        check_batch(req.batch, job.job.spec.parallel, self._config.limits)
        deadline = _deadline(req.deadline.seconds, req.deadline.nanos) if req.HasField("deadline") else None
        batch = Batch.of(req.batch)
        if head is not None:  # remember the contents as they arrived, for the next rank, replica or iteration
            job.remember_contents(head.microbatches, batch.digest)
        return job, req.rank, batch, deadline

    def _answer(self, job: JobState, final: asyncio.Future[Served], rank: int) -> bytes | RequestError:
        """A resolved entry's answer to `rank`, or the error that ends the stream."""
        error = None if final.cancelled() else final.exception()
        if error is None and not final.cancelled():
            try:
                return self._response(final.result(), rank)
            except Exception as exc:  # in a callback: nobody else would see it, and the stream would hang
                log.exception("unexpected error answering a streamed batch")
                return _internal(exc)
        if isinstance(error, RequestError):
            return error
        if isinstance(error, JobClosed):
            return unknown_job(job.job_id)
        log.error("unexpected outcome of a streamed batch's plan: %r", error)
        return _internal(error or asyncio.CancelledError())

    async def StreamPlans(self, request_iterator: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        """Answers go out as their plans are fixed, in that order. A request whose plan is there already (a cache
        hit, a rank after the first) is answered as it is read; the others wait on their entry's plan through a
        callback, so one search's answers go to every waiting stream at once, without a task per request."""
        responses: asyncio.Queue[Any] = asyncio.Queue()
        waiting: dict[int, tuple[JobState, PlanEntry, float | None, Callable[[Any], None]]] = {}
        keys = itertools.count()
        done_reading = False
        planning = self._planning

        def wait_for(job: JobState, entry: PlanEntry, rank: int, deadline: float | None) -> None:
            key = next(keys)

            def deliver(final: asyncio.Future[Served]) -> None:
                if waiting.pop(key, None) is None:  # the stream ended while this callback was scheduled
                    return
                planning.unwatch(job, entry, deadline)
                responses.put_nowait(self._answer(job, final, rank))
                if done_reading and not waiting:
                    responses.put_nowait(_END)

            planning.watch(job, entry, deadline)
            waiting[key] = (job, entry, deadline, deliver)
            entry.final.add_done_callback(deliver)

        async def read() -> None:
            nonlocal done_reading
            try:
                async for data in request_iterator:
                    try:
                        job, rank, batch, deadline = self._stream_request(data)
                        entry = planning.attach(job, batch, budget_ms=job.budget_ms, deadline=deadline)
                        served = entry.served()
                        if served is not None:  # a cache hit, or another rank's request has its plan: answer now
                            responses.put_nowait(self._response(served, rank))
                        else:
                            wait_for(job, entry, rank, deadline)
                    except RequestError as exc:
                        responses.put_nowait(exc)
                        return
                    except PoolClosed:
                        responses.put_nowait(shutting_down())
                        return
                done_reading = True  # the client is done writing: answer what it asked, then end the stream
                if not waiting:
                    responses.put_nowait(_END)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reading the stream failed: end it
                log.exception("unexpected error taking a streamed batch")
                responses.put_nowait(_internal(exc))

        self._streams.add(responses)
        if self._draining:
            responses.put_nowait(_DRAIN)
        reader = asyncio.create_task(read())
        try:
            while True:
                item = await responses.get()
                if item is _DRAIN:
                    # Stop reading, send the answers in flight (for up to grace_s), then tell the client to
                    # reconnect (to this planner's replacement).
                    reader.cancel()
                    loop = asyncio.get_running_loop()
                    until = loop.time() + self._config.grace_s
                    while waiting and loop.time() < until:
                        try:
                            item = await asyncio.wait_for(responses.get(), until - loop.time())
                        except TimeoutError:
                            break
                        if isinstance(item, bytes):
                            yield item
                    while not responses.empty():
                        item = responses.get_nowait()
                        if isinstance(item, bytes):
                            yield item
                    await abort(context, shutting_down())
                if item is _END:
                    return
                if isinstance(item, RequestError):
                    await abort(context, item)
                yield item
        finally:
            self._streams.discard(responses)
            reader.cancel()
            for job, entry, deadline, deliver in waiting.values():  # the stream went away: it waits no more
                entry.final.remove_done_callback(deliver)
                planning.unwatch(job, entry, deadline)
            waiting.clear()  # a `deliver` already scheduled finds nothing to do

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

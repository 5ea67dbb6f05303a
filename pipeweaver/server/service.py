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
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from pipeweaver.server.config import ServerConfig
from pipeweaver.server.jobs import Served
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
)
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.v1 import planner_pb2_grpc

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


def _deadline(req: Any) -> float | None:
    """The request's wall-clock deadline on the monotonic clock (None when unset)."""
    if not req.HasField("deadline"):
        return None
    ts = req.deadline
    if not 0 <= ts.nanos < 1_000_000_000:
        raise invalid([Violation("deadline.nanos", f"must be in 0..999999999, got {ts.nanos}")])
    ahead = ts.seconds + ts.nanos / 1e9 - time.time()
    if ahead > MAX_DEADLINE_AHEAD_S:
        limit_h = MAX_DEADLINE_AHEAD_S / 3600
        raise invalid([Violation("deadline", f"is {ahead / 3600:.0f} h ahead; at most {limit_h:.0f} h")])
    return time.monotonic() + float(ahead)


def _call_deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or not math.isfinite(remaining) or remaining > MAX_DEADLINE_AHEAD_S:
        return None
    return time.monotonic() + remaining


def _serialize(response: Any) -> bytes:
    """Responses are messages or bytes the handler serialized itself (plans, built once per plan and rank)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_planner_service(servicer: Any, server: Any) -> None:
    """`planner_pb2_grpc.add_PlannerServiceServicer_to_server`, with responses that may be pre-serialized."""
    service = pb.DESCRIPTOR.services_by_name["PlannerService"]
    handlers = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        request_type = getattr(pb, method.input_type.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behavior, request_deserializer=request_type.FromString, response_serializer=_serialize
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class PlannerService(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, config: ServerConfig, planning: Planning) -> None:
        self._config = config
        self._planning = planning
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """Stop taking requests on open streams; they end once their in-flight answers are sent."""
        self._draining.set()

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
    async def GetPlan(self, request: Any, context: Context) -> Any:
        try:
            check_message_size(request, self._config.max_message_bytes, _largest_field)
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
            served = await self._planning.plan(job, request.batch, budget_ms=budget, deadline=_call_deadline(context))
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
    def _check_stream_request(self, req: Any) -> tuple[Any, float | None]:
        check_message_size(req, self._config.max_message_bytes, _largest_field)
        job = self._planning.job(req.job_id)
        check_rank(req.rank, job.job.spec.parallel)
        if not req.HasField("batch"):
            raise invalid([Violation("batch", "missing")])
        check_batch(req.batch, job.job.spec.parallel, self._config.limits)
        return job, _deadline(req)

    async def StreamPlans(self, request_iterator: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        responses: asyncio.Queue[Any] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()
        end = object()

        async def answer(req: Any, job: Any, deadline: float | None) -> None:
            try:
                served = await self._planning.plan(job, req.batch, budget_ms=job.budget_ms, deadline=deadline)
            except RequestError as exc:
                responses.put_nowait(exc)
            except PoolClosed:
                responses.put_nowait(shutting_down())
            except Exception as exc:
                log.exception("unexpected error planning a streamed batch")
                responses.put_nowait(_internal(exc))
            else:
                responses.put_nowait(self._response(served, req.rank))

        async def read() -> None:
            try:
                async for req in request_iterator:
                    try:
                        job, deadline = self._check_stream_request(req)
                    except RequestError as exc:
                        responses.put_nowait(exc)
                        return
                    task = asyncio.create_task(answer(req, job, deadline))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:  # the client is done writing: answer what it asked, then end the stream
                    await asyncio.wait(set(pending))
                responses.put_nowait(end)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reading the stream failed: end it
                responses.put_nowait(exc)

        reader = asyncio.create_task(read())
        draining = asyncio.create_task(self._draining.wait())
        try:
            while True:
                get = asyncio.ensure_future(responses.get())
                await asyncio.wait({get, draining}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    # The server is draining: stop reading, send the answers in flight, then tell the client to
                    # reconnect (to this planner's replacement).
                    get.cancel()
                    reader.cancel()
                    if pending:
                        await asyncio.wait(set(pending), timeout=self._config.grace_s)
                    while not responses.empty():
                        item = responses.get_nowait()
                        if not isinstance(item, BaseException) and item is not end:
                            yield item
                    await abort(context, shutting_down())
                item = get.result()
                if item is end:
                    return
                if isinstance(item, RequestError):
                    await abort(context, item)
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            draining.cancel()
            for task in list(pending):
                task.cancel()

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

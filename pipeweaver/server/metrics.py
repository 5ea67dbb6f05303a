"""Prometheus metrics of the planner service, all recorded in the main process (workers return their numbers).

Names follow prometheus.io practice: one `pipeweaver_` prefix, base units (`_seconds`), `_total` counters, `_ratio`
for fractions; labels are bounded (gRPC method and code, plan source, fallback reason, lane, baseline name) and
never carry a job, rank, iteration or replica. RPC metrics reuse go-grpc-prometheus's names under the prefix, so
existing dashboards need only the prefix changed. Each server owns its registry (tests run several in one process).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, cast

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""RPC latency and search time share these (a search's budget reaches a minute at most)."""
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
"""Event-loop lag: a millisecond already shows in a 64-stream burst's p99 (docs/benchmarks.md)."""
SPEEDUP_BUCKETS = (0.5, 0.8, 0.9, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0)

PLAN_SOURCES = ("search", "cache", "fallback")
FALLBACK_REASONS = ("deadline", "worker_crash", "error")
LANES = ("search", "control")


def _version() -> str:
    try:
        return version("pipeweaver")
    except PackageNotFoundError:
        return "unknown"


class Metrics:
    """The service's metrics in their own registry (served by `start_http_server(..., registry=m.registry)`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge("pipeweaver_build_info", "Version of the running planner (always 1)", ["version"], registry=r).labels(
            version=_version()
        ).set(1)

        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.rpc_started = Counter("pipeweaver_grpc_server_started", "RPCs started", rpc, registry=r)
        self.rpc_handled = Counter(
            "pipeweaver_grpc_server_handled", "RPCs completed, by status code", [*rpc, "grpc_code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "pipeweaver_grpc_server_handling_seconds",
            "Time from the start of an RPC to its status",
            rpc,
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "pipeweaver_event_loop_lag_seconds",
            "How late the server's event loop ran a timer due every 0.1 s: what every request and answer waits "
            "behind (sampled)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.msg_received = Counter("pipeweaver_grpc_server_msg_received", "Stream messages received", rpc, registry=r)
        self.msg_sent = Counter("pipeweaver_grpc_server_msg_sent", "Stream messages sent", rpc, registry=r)

        self.plans = Counter(
            "pipeweaver_plans",
            "Plans produced (once per job, replica and iteration), by source",
            ["source"],
            registry=r,
        )
        self.fallbacks = Counter(
            "pipeweaver_fallback_plans", "Fallback plans, by why the searched plan was missing", ["reason"], registry=r
        )
        self.plan_cache = Counter(
            "pipeweaver_plan_cache_lookups",
            "Plan-cache lookups by batch signature (temporal reuse), by result (in_flight: the same signature was "
            "being searched, the request shared that search)",
            ["result"],
            registry=r,
        )
        self.early_searches = Counter(
            "pipeweaver_early_searches",
            "Searches submitted as soon as a new batch's identity was read, before its checks and digest, by what "
            "became of them (used; cancelled: the checks failed, or the digest found a cached or in-flight plan)",
            ["result"],
            registry=r,
        )
        self.deduplicated = Counter(
            "pipeweaver_plan_requests_deduplicated",
            "Rank requests answered with the plan another rank's request for the same iteration started",
            registry=r,
        )
        self.search_seconds = Histogram(
            "pipeweaver_search_seconds",
            "Search time per batch, as the planner reports it",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.job_warmup_seconds = Histogram(
            "pipeweaver_job_warmup_seconds",
            "Time from a job's registration until every worker has planned one batch of it (warm caches)",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.worker_task_seconds = Histogram(
            "pipeweaver_worker_task_seconds",
            "Wall time of a worker task (decode, search or fallback, baselines, encode)",
            ["lane", "task"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.speedup = Histogram(
            "pipeweaver_predicted_speedup_ratio",
            "Predicted makespan of a baseline divided by the searched plan's",
            ["baseline"],
            buckets=SPEEDUP_BUCKETS,
            registry=r,
        )
        self.bubble = Histogram(
            "pipeweaver_predicted_bubble_ratio",
            "Predicted idle share of the pipeline's time for searched plans",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.semu_cache_hit = Histogram(
            "pipeweaver_semu_cache_hit_ratio",
            "Share of SEMU stage-cost lookups answered from its cache, per searched batch",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("pipeweaver_queue_depth", "Tasks waiting for a worker", ["lane"], registry=r)
        self.workers_busy = Gauge("pipeweaver_workers_busy", "Workers running a task", ["lane"], registry=r)
        self.worker_restarts = Counter(
            "pipeweaver_worker_restarts", "Worker pools replaced after a worker died", ["lane"], registry=r
        )
        self.prediction_error = Histogram(
            "pipeweaver_prediction_error_ratio",
            "|predicted - measured| / measured iteration time, from ReportTimings (once per iteration)",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge("pipeweaver_jobs", "Registered jobs", registry=r)

        # Create every bounded series up front, so queries and rate() see zeros instead of nothing.
        for source in PLAN_SOURCES:
            self.plans.labels(source=source)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason=reason)
        for result in ("hit", "miss", "in_flight"):
            self.plan_cache.labels(result=result)
        for result in ("used", "cancelled"):
            self.early_searches.labels(result=result)
        for lane in LANES:
            self.queue_depth.labels(lane=lane)
            self.workers_busy.labels(lane=lane)
            self.worker_restarts.labels(lane=lane)

    def stream_messages(self, rpc_type: str, service: str, method: str) -> tuple[Any, Any]:
        """The (received, sent) message counters of a streaming method whose handler counts its own messages: one
        on gRPC's reader/writer API, which `MetricsInterceptor` wraps once per RPC, not per message."""
        labels = {"grpc_type": rpc_type, "grpc_service": service, "grpc_method": method}
        return self.msg_received.labels(**labels), self.msg_sent.labels(**labels)


# ---- gRPC interceptor ----------------------------------------------------------------------------------------

_Behaviour = Callable[..., Any]


def _rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _code_of(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    """The status an RPC ended with: what the handler set or aborted with, else what its exception implies."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpcio versions hand back the raw status number
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    if error is None:
        return "OK"
    if isinstance(error, BaseException) and type(error).__name__ == "CancelledError":
        return "CANCELLED"
    return "UNKNOWN"


if TYPE_CHECKING:  # grpc's classes are generic only in its stubs
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class MetricsInterceptor(_Interceptor):
    """Counts and times every RPC by (type, service, method, code); counts stream messages both ways."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED; no label for arbitrary names
            return handler
        service, method = _split(handler_call_details.method)
        labels = {"grpc_type": _rpc_type(handler), "grpc_service": service, "grpc_method": method}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, labels),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, labels, streaming_in=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(handler.stream_unary, labels),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, labels, streaming_in=True),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _finish(self, labels: dict[str, str], context: Any, started: float, error: BaseException | None) -> None:
        self._m.rpc_handled.labels(**labels, grpc_code=_code_of(context, error)).inc()
        self._m.rpc_seconds.labels(**labels).observe(time.perf_counter() - started)

    def _unary(self, behaviour: _Behaviour, labels: dict[str, str]) -> _Behaviour:
        async def wrapped(request: Any, context: Any) -> Any:
            self._m.rpc_started.labels(**labels).inc()
            started, error = time.perf_counter(), None
            try:
                return await behaviour(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(labels, context, started, error)

        return wrapped

    def _counted(self, requests: AsyncIterator[Any], labels: dict[str, str]) -> AsyncIterator[Any]:
        received = self._m.msg_received.labels(**labels)

        async def gen() -> AsyncIterator[Any]:
            async for r in requests:
                received.inc()
                yield r

        return gen()

    def _stream_unary(self, behaviour: _Behaviour, labels: dict[str, str]) -> _Behaviour:
        async def wrapped(requests: AsyncIterator[Any], context: Any) -> Any:
            self._m.rpc_started.labels(**labels).inc()
            started, error = time.perf_counter(), None
            try:
                return await behaviour(self._counted(requests, labels), context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(labels, context, started, error)

        return wrapped

    def _streaming(self, behaviour: _Behaviour, labels: dict[str, str], *, streaming_in: bool) -> _Behaviour:
        if inspect.iscoroutinefunction(behaviour):
            # A handler on gRPC's reader/writer API (context.read/write; StreamPlans, health Watch) counts its own
            # messages (`Metrics.stream_messages`): wrapping it once per RPC, not once per message, keeps async
            # generator layers (this wrapper's, the request counter's) off every message of a burst.
            return self._unary(behaviour, labels)  # a coroutine, timed and counted as a unary call is
        sent = self._m.msg_sent.labels(**labels)

        async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
            self._m.rpc_started.labels(**labels).inc()
            started, error = time.perf_counter(), None
            arg = self._counted(request, labels) if streaming_in else request
            try:
                async for response in cast(AsyncIterator[Any], behaviour(arg, context)):
                    sent.inc()
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(labels, context, started, error)

        return wrapped

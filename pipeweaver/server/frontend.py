"""A front-end process of `pipeweaver serve --frontends N`: it holds trainers' connections, the core plans.

Each front-end binds the public port with SO_REUSEPORT (the kernel spreads incoming connections over them),
terminates TLS, answers health checks (readiness mirrors the core's) and reflection, forwards unary calls to the
core as bytes, and carries its StreamPlans streams over one relay link (`relay.py`). It does no planning and keeps
no state a restart would lose beyond its open streams, whose clients reconnect.

Front-ends ignore SIGTERM and SIGINT: the core coordinates the shutdown (drains the streams, then ends the
links), and a front-end stops when its link ends, so it never outlives the core.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pipeweaver.server import relay
from pipeweaver.server.config import ServerConfig
from pipeweaver.server.forward import call_timeout, relay_status
from pipeweaver.server.service import SERVICE_NAME, add_planner_service
from pipeweaver.server.validation import DOMAIN
from pipeweaver.v1 import planner_pb2 as pb

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger("pipeweaver.frontend")

_UPSTREAM = "the planner's core process"
_GONE = (grpc.StatusCode.UNAVAILABLE, f"{_UPSTREAM} is unavailable ({DOMAIN}): the front-end's link ended", ())


def link_options() -> list[tuple[str, Any]]:
    """The link carries a burst's answers in one message: no size limit of its own."""
    return [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class FrontendLink:
    """The front-end's side of its relay link: stream ids, their answer queues, the core's readiness."""

    def __init__(self, channel: grpc.aio.Channel, on_ready: Any) -> None:
        self._channel = channel
        self._on_ready = on_ready
        self.outbox = relay.Outbox()
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._next = 0
        self.ended = asyncio.Event()

    async def run(self) -> None:
        """Until the core ends the link (or goes away); then every open stream ends UNAVAILABLE."""
        call = self._channel.stream_stream(relay.RELAY_METHOD, None, None)(self.outbox.messages())
        try:
            async for message in call:
                self._take(message)
        except grpc.aio.AioRpcError as err:
            log.warning("the link to the core ended: %s %s", err.code().name, err.details())
        finally:
            self.ended.set()
            self.outbox.close()
            for queue in self._streams.values():
                queue.put_nowait(_GONE)
            self._streams.clear()

    def _take(self, message: bytes) -> None:
        parts: list[bytes] = []
        for kind, stream, payload in relay.records(message):
            if kind == relay.PART:
                parts.append(payload)
                continue
            if kind == relay.READY:
                self._on_ready(payload == b"\x01")
                continue
            queue = self._streams.get(stream)
            if queue is None:  # the stream went away here first
                continue
            if kind == relay.ANSWER:
                queue.put_nowait(relay.answer_of(payload, parts))
            elif kind == relay.END:
                del self._streams[stream]
                queue.put_nowait(None)
            elif kind == relay.FAIL:
                del self._streams[stream]
                queue.put_nowait(relay.decode_status(payload))

    def open(self) -> tuple[int, asyncio.Queue[Any]]:
        self._next += 1
        queue: asyncio.Queue[Any] = asyncio.Queue()
        if self.ended.is_set():
            queue.put_nowait(_GONE)
        else:
            self._streams[self._next] = queue
            self.outbox.put(relay.OPEN, self._next)
        return self._next, queue

    def send(self, kind: int, stream: int, payload: bytes = b"") -> None:
        self.outbox.put(kind, stream, payload)

    def forget(self, stream: int) -> None:
        """The stream went away before the core ended it: tell the core."""
        if self._streams.pop(stream, None) is not None:
            self.outbox.put(relay.CANCEL, stream)


class FrontendService:
    """PlannerService on a front-end: StreamPlans over the link, every unary method forwarded as bytes."""

    raw_requests = frozenset(m.name for m in pb.DESCRIPTOR.services_by_name["PlannerService"].methods)

    def __init__(self, channel: grpc.aio.Channel, link: FrontendLink) -> None:
        self._channel = channel
        self._link = link
        self._draining = False

    def drain(self) -> None:
        self._draining = True

    async def _unary(self, name: str, data: bytes, context: Context) -> Any:
        method = self._channel.unary_unary(f"/{SERVICE_NAME}/{name}", None, None)  # bytes both ways
        try:
            return await method(data, timeout=call_timeout(context))
        except grpc.aio.AioRpcError as err:
            await relay_status(context, err, _UPSTREAM)

    async def RegisterJob(self, data: bytes, context: Context) -> Any:
        return await self._unary("RegisterJob", data, context)

    async def GetPlan(self, data: bytes, context: Context) -> Any:
        return await self._unary("GetPlan", data, context)

    async def ReportTimings(self, data: bytes, context: Context) -> Any:
        return await self._unary("ReportTimings", data, context)

    async def Simulate(self, data: bytes, context: Context) -> Any:
        return await self._unary("Simulate", data, context)

    async def StreamPlans(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        link = self._link
        stream, answers = link.open()

        async def read() -> None:
            async for data in requests:
                link.send(relay.REQUEST, stream, data)
            link.send(relay.HALF_CLOSE, stream)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await answers.get()
                if isinstance(item, bytes):
                    yield item
                elif item is None:
                    return
                else:
                    code, message, trailing = item
                    await context.abort(code, message, trailing)
        finally:
            reader.cancel()
            link.forget(stream)


async def _serve(config: ServerConfig, core_address: str, port: int) -> int:
    from pipeweaver.server.app import StartupError, bind_port, grpc_options

    channel = grpc.aio.insecure_channel(core_address, options=link_options())
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # untyped submodule
    loop = asyncio.get_running_loop()

    pending: set[asyncio.Task[None]] = set()

    def on_ready(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        task = loop.create_task(health_servicer.set(SERVICE_NAME, status))
        pending.add(task)
        task.add_done_callback(pending.discard)

    link = FrontendLink(channel, on_ready)
    service = FrontendService(channel, link)
    server = grpc.aio.server(options=grpc_options(config, reuse_port=True))
    add_planner_service(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        bind_port(server, config, replace(config, port=port).address)
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    await health_servicer.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    gc.collect()
    gc.freeze()  # as in the core: a full collection must not land in a burst
    await link.run()  # the core ends the link when it shuts down
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    await channel.close(None)
    return 0


def run_frontend(config: ServerConfig, core_address: str, port: int, index: int) -> None:
    """A spawned front-end process's entry point."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[{index}]: %(message)s",
    )
    sys.exit(asyncio.run(_serve(config, core_address, port)))

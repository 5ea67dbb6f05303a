"""Follower mode: a sidecar that forwards every PlannerService call to the job's leader sidecar.

How every rank of a pipeline runs the same plan when the pipeline spans several nodes, each pod with its own
sidecar: one sidecar per job plans (the *leader*, by convention the one in the pod of global rank 0); the others
run with ``--leader HOST:PORT`` and forward. Trainers always dial their own pod's sidecar on 127.0.0.1, and the
leader's plan window gives every rank of a (replica, iteration) the one plan it made. Statuses and their details
(BadRequest, ErrorInfo, RetryInfo) come back unchanged; a leader that cannot be reached is UNAVAILABLE, which
trainers retry with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from pipeweaver.server.config import ServerConfig
from pipeweaver.server.validation import DOMAIN
from pipeweaver.v1 import planner_pb2_grpc

if TYPE_CHECKING:  # grpc's classes are generic only in its stubs
    Context = grpc.aio.ServicerContext[Any, Any]

_DETAILS_KEY = "grpc-status-details-bin"


def leader_channel(config: ServerConfig) -> grpc.aio.Channel:
    """A channel to the leader: TLS when a leader CA is configured (mutual TLS with this server's own
    certificate as the client identity, when it has one)."""
    assert config.leader is not None
    options = [
        ("grpc.max_receive_message_length", 4 * config.max_message_bytes),
        ("grpc.max_send_message_length", 2 * config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.leader_ca_file is None:
        return grpc.aio.insecure_channel(config.leader, options=options)
    key = cert = None
    if config.tls is not None:
        key, cert = Path(config.tls.key_file).read_bytes(), Path(config.tls.cert_file).read_bytes()
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(config.leader_ca_file).read_bytes(), private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(config.leader, creds, options=options)


def _timeout(context: Context) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 24 * 3600 else None


async def _relay(context: Context, err: grpc.aio.AioRpcError) -> None:
    """End this call with the leader's status, passing its rich details through."""
    metadata: Any = err.trailing_metadata() or ()
    details = tuple((k, v) for k, v in metadata if k == _DETAILS_KEY)
    message = err.details() or ""
    if err.code() is grpc.StatusCode.UNAVAILABLE and not details:
        message = f"the leader planner is unavailable ({DOMAIN}): {message}"
    await context.abort(err.code(), message, details)


class ForwardingService(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = planner_pb2_grpc.PlannerServiceStub(channel)
        self._draining = asyncio.Event()

    def drain(self) -> None:
        self._draining.set()

    async def _unary(self, method: Any, request: Any, context: Context) -> Any:
        try:
            return await method(request, timeout=_timeout(context))
        except grpc.aio.AioRpcError as err:
            await _relay(context, err)

    async def RegisterJob(self, request: Any, context: Context) -> Any:
        return await self._unary(self._stub.RegisterJob, request, context)

    async def GetPlan(self, request: Any, context: Context) -> Any:
        return await self._unary(self._stub.GetPlan, request, context)

    async def ReportTimings(self, request: Any, context: Context) -> Any:
        return await self._unary(self._stub.ReportTimings, request, context)

    async def Simulate(self, request: Any, context: Context) -> Any:
        return await self._unary(self._stub.Simulate, request, context)

    async def StreamPlans(self, request_iterator: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async def requests() -> AsyncIterator[Any]:
            async for req in request_iterator:
                if self._draining.is_set():
                    return
                yield req

        call = self._stub.StreamPlans(requests())
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as err:
            await _relay(context, err)
        finally:
            call.cancel()

"""The link between the planner's core process and its front-end processes (`pipeweaver serve --frontends N`).

Why front-ends: when a search ends, its plan is due on every rank's stream at once (64 streams for 16 replicas x
pp 4), and one event loop spends ~0.3 ms per answer in gRPC, so the last answer of a burst left ~20 ms after the
first (docs/benchmarks.md, the planner service). Front-ends own the trainers' connections (they share the public
port through SO_REUSEPORT, so the kernel spreads connections over them) and write the answers, in parallel; the
core keeps everything else: jobs, the plan window, the cache, the workers, the metrics.

One bidirectional call per front-end (`/pipeweaver.internal.v1.FrontendRelay/Relay`, over a Unix socket) carries
every stream of that front-end, multiplexed as records: a kind byte, the stream's id, the payload's length, the
payload. The records of one event-loop turn travel as one message, so a plan's answers to the 16 streams of a
front-end cost the core one gRPC message, not 16. Unary methods do not use the link: a front-end forwards them
to the core's PlannerService on the same socket, statuses and details unchanged (`forward.ForwardingService`).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from pipeweaver.server.metrics import Metrics
from pipeweaver.server.validation import RequestError

if TYPE_CHECKING:
    from pipeweaver.server.service import PlannerService
    from pipeweaver.server.streams import StreamSession

    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger("pipeweaver.server")

RELAY_SERVICE = "pipeweaver.internal.v1.FrontendRelay"
RELAY_METHOD = f"/{RELAY_SERVICE}/Relay"

# front-end -> core
OPEN = 4
"""A new stream (ids count up from 1 per link)."""
REQUEST = 1
"""A stream's request, as the bytes its client sent."""
HALF_CLOSE = 2
"""The stream's client is done writing."""
CANCEL = 3
"""The stream went away before it ended (its client cancelled, its connection broke)."""
# core -> front-end
ANSWER = 11
"""One serialized `StreamPlansResponse` for the stream: `_COUNT` n, n `_INDEX` part numbers (PART records of the
same message), then the answer's own last bytes."""
PART = 15
"""Bytes that answers of this message start with (a plan's header, a rank's actions), sent once per message
however many of its streams get them; the stream id field numbers the part."""
END = 12
"""The stream ends OK."""
FAIL = 13
"""The stream ends with a status: `encode_status`."""
READY = 14
"""The core's readiness (payload b"\\x01" or b"\\x00"); stream id 0."""

_HEAD = struct.Struct("<BII")
_COUNT = struct.Struct("<I")
_STATUS = struct.Struct("<HI")
_CODES = {code.value[0]: code for code in grpc.StatusCode}
DETAILS_KEY = "grpc-status-details-bin"


def records(message: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The (kind, stream id, payload) records of one link message."""
    at, end = 0, len(message)
    while at < end:
        kind, stream, size = _HEAD.unpack_from(message, at)
        at += _HEAD.size
        yield kind, stream, message[at : at + size]
        at += size


def encode_status(error: RequestError) -> bytes:
    status = error.to_status()
    details = b"".join(v for k, v in status.trailing_metadata if k == DETAILS_KEY and isinstance(v, bytes))
    message = status.details.encode()
    return _STATUS.pack(status.code.value[0], len(message)) + message + details


def decode_status(payload: bytes) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata) of a FAIL record, for `context.abort`."""
    code, size = _STATUS.unpack_from(payload)
    message = payload[_STATUS.size : _STATUS.size + size].decode()
    details = payload[_STATUS.size + size :]
    return _CODES.get(code, grpc.StatusCode.UNKNOWN), message, ((DETAILS_KEY, details),) if details else ()


def answer_of(payload: bytes, parts: list[bytes]) -> bytes:
    """The answer an ANSWER record stands for, given its message's PART records in order."""
    (n,) = _COUNT.unpack_from(payload)
    indices = struct.unpack_from(f"<{n}I", payload, _COUNT.size)
    return b"".join([*(parts[i] for i in indices), payload[_COUNT.size + 4 * n :]])


class Outbox:
    """Records written during one event-loop turn leave as one message (`messages` yields them)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._parts: dict[int, tuple[int, bytes]] = {}
        """id() of each part already in the buffer -> (its number, the part, kept alive so the id stays its)."""
        self._ready = asyncio.Event()
        self._closed = False

    def put_answer(self, stream: int, parts: tuple[bytes, ...]) -> None:
        """An ANSWER record, and a PART record for each shared part not yet in this message."""
        *shared, own = parts
        indices = []
        for part in shared:
            known = self._parts.get(id(part))
            if known is None:
                known = self._parts[id(part)] = (len(self._parts), part)
                self.put(PART, known[0], part)
            indices.append(known[0])
        self.put(ANSWER, stream, struct.pack(f"<I{len(indices)}I", len(indices), *indices) + own)

    def put(self, kind: int, stream: int, payload: bytes = b"") -> None:
        if self._closed:
            return
        self._buffer += _HEAD.pack(kind, stream, len(payload))
        self._buffer += payload
        self._ready.set()

    def close(self) -> None:
        """Send what is written, then end."""
        self._closed = True
        self._ready.set()

    async def messages(self) -> AsyncIterator[bytes]:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._buffer:
                message = bytes(self._buffer)
                self._buffer.clear()
                self._parts.clear()
                yield message
            if self._closed and not self._buffer:
                return


_STREAM_LABELS = {"grpc_type": "bidi_stream", "grpc_service": "pipeweaver.v1.PlannerService"}


class _RelayedStream:
    """A front-end's stream as the core sees it: a session whose output is the link's records. Counted in the
    core's RPC metrics like a stream the core holds itself."""

    def __init__(self, link: CoreLink, stream: int) -> None:
        self._link = link
        self._stream = stream
        self._started = time.perf_counter()
        self.session: StreamSession | None = None
        metrics = link.metrics
        self._labels = {**_STREAM_LABELS, "grpc_method": "StreamPlans"}
        metrics.rpc_started.labels(**self._labels).inc()
        self._sent = metrics.msg_sent.labels(**self._labels)
        self.received = metrics.msg_received.labels(**self._labels)

    def answer(self, parts: tuple[bytes, ...]) -> None:
        self._sent.inc()
        self._link.outbox.put_answer(self._stream, parts)

    def end(self) -> None:
        self._link.outbox.put(END, self._stream)
        self.finish("OK")

    def fail(self, error: RequestError) -> None:
        self._link.outbox.put(FAIL, self._stream, encode_status(error))
        self.finish(error.code.name)

    def finish(self, code: str) -> None:
        if self._link.streams.pop(self._stream, None) is None:
            return
        metrics = self._link.metrics
        metrics.rpc_handled.labels(**self._labels, grpc_code=code).inc()
        metrics.rpc_seconds.labels(**self._labels).observe(time.perf_counter() - self._started)
        if self.session is not None:
            self._link.service.close_session(self.session)


class CoreLink:
    """The core's side of one front-end's link: its streams' sessions."""

    def __init__(self, service: PlannerService, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics
        self.outbox = Outbox()
        self.streams: dict[int, _RelayedStream] = {}

    def take(self, message: bytes) -> None:
        for kind, stream, payload in records(message):
            if kind == OPEN:
                opened = _RelayedStream(self, stream)
                self.streams[stream] = opened
                opened.session = self.service.open_session(opened)
                if stream not in self.streams:  # ended as it opened (the server is draining)
                    self.service.close_session(opened.session)
                continue
            relayed = self.streams.get(stream)
            if relayed is None:  # the stream already ended here (its end and the front-end's record crossed)
                continue
            assert relayed.session is not None
            if kind == REQUEST:
                relayed.received.inc()
                relayed.session.take(payload)
            elif kind == HALF_CLOSE:
                relayed.session.done_writing()
            elif kind == CANCEL:
                relayed.finish("CANCELLED")
            else:
                log.error("front-end link: unknown record kind %d", kind)

    def close(self) -> None:
        """The front-end went away: its streams are gone with it."""
        for relayed in list(self.streams.values()):
            relayed.finish("CANCELLED")
        self.outbox.close()


class CoreRelay:
    """The core's `FrontendRelay` service: one `CoreLink` per connected front-end."""

    def __init__(self, service: PlannerService, metrics: Metrics) -> None:
        self._service = service
        self._metrics = metrics
        self.links: set[CoreLink] = set()
        self._ready = False
        self.connected = asyncio.Event()
        """Set whenever a front-end connects (startup waits for all of them)."""

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        method = grpc.stream_stream_rpc_method_handler(self._relay)  # bytes both ways
        return grpc.method_handlers_generic_handler(RELAY_SERVICE, {"Relay": method})

    def set_ready(self, ready: bool) -> None:
        self._ready = ready
        for link in self.links:
            link.outbox.put(READY, 0, b"\x01" if ready else b"\x00")

    def busy(self) -> bool:
        """Some front-end stream is still open."""
        return any(link.streams for link in self.links)

    def close(self) -> None:
        """End every link (front-ends stop when theirs ends)."""
        for link in list(self.links):
            link.outbox.close()

    async def _relay(self, messages: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        link = CoreLink(self._service, self._metrics)
        self.links.add(link)
        link.outbox.put(READY, 0, b"\x01" if self._ready else b"\x00")
        self.connected.set()

        async def read() -> None:
            try:
                async for message in messages:
                    link.take(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("front-end link: reading failed")
            link.close()

        reader = asyncio.create_task(read())
        try:
            async for message in link.outbox.messages():
                yield message
        finally:
            reader.cancel()
            self.links.discard(link)
            link.close()

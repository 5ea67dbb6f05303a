"""Protobuf wire bytes read and written by hand, where building messages costs the event loop too much.

Reading: every rank of a pipeline sends the same batch, and batches repeat (equal replicas, temporal reuse);
parsing, checking and digesting each copy cost ~0.5 ms of the event loop per vlm-s request (a 15-20 KB batch), and
64 of them arrive at once. `stream_request` reads a `StreamPlansRequest`'s top-level fields with a few varint
reads; `batch_layouts` reads the batch's identity (iteration, replica) and where its microbatch records lie, first
from its two ends only. The service then matches the bytes against what it has checked: another rank's copy of the
same batch, or microbatch bytes the job maps to their digest (`jobs.JobState.known_contents`). Anything unusual
(an unknown or repeated field, an unexpected wire type, microbatches interleaved with other fields, truncated bytes)
gives None, and the request takes the full path (parse, checks, digest): an odd encoding costs time, never
correctness.

Writing: `field` and `varint_field` build messages from already serialized parts (a plan's answer to one rank is
its header and that rank's actions, serialized once in the worker; see `work.EncodedPlan`). No grpc here: workers
import this module.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple

# ---- reading --------------------------------------------------------------------------------------------------


class StreamRequestHead(NamedTuple):  # a tuple: built for every request, in a quarter of a dataclass's time
    """The fields of a `StreamPlansRequest` the fast path reads, as protobuf would decode them."""

    job_id: str
    rank: int
    batch: bytes
    """The serialized `BatchMetadata`, as sent (what the workers decode; `batch_layouts` reads its identity)."""
    deadline: tuple[int, int] | None
    """(seconds, nanos) of the deadline timestamp; None when unset."""
    predicted_timings: bool
    """The answer should carry the rank's predicted action times."""


class BatchLayout(NamedTuple):
    """One reading of a serialized `BatchMetadata`: its identity and where its microbatch records lie."""

    iteration: int
    replica: int
    start: int
    """`batch[start:end]` are the microbatches' records as sent: the batch without its identity."""
    end: int
    guessed: bool
    """Read from the canonical layout without walking the records: the identity holds only if
    `batch[start:end]` is, byte for byte, a run of records already checked (see `batch_layouts`)."""


class _Unusual(Exception):
    """Bytes this scanner leaves to the full parser."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = data[pos]
    if value < 0x80:  # tags and small values: one byte
        return value, pos + 1
    value = shift = 0
    for i in range(pos, pos + 10):  # a varint is at most 10 bytes
        b = data[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if value >> 64:  # wider than 64 bits
                raise _Unusual
            return value, i + 1
        shift += 7
    raise _Unusual


def _int32(v: int) -> int:
    """A varint as an int32 field decodes it (the low 32 bits, two's complement)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _int64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def _span(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A length-delimited field's (start, end), its length read at `pos`."""
    n, start = _varint(data, pos)
    if start + n > end:
        raise _Unusual
    return start, start + n


def _fields(
    data: bytes, start: int, end: int, varints: tuple[int, ...], spans: tuple[int, ...]
) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
    """The fields of the message in `data[start:end]`: varint fields' values and length-delimited fields' spans,
    by field number. Only the given fields may occur, each at most once."""
    values: dict[int, int] = {}
    found: dict[int, tuple[int, int]] = {}
    pos = start
    while pos < end:
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if number in values or number in found:
            raise _Unusual
        if wire == 0 and number in varints:
            values[number], pos = _varint(data, pos)
        elif wire == 2 and number in spans:
            found[number] = _span(data, pos, end)
            pos = found[number][1]
        else:
            raise _Unusual
    if pos != end:
        raise _Unusual
    return values, found


def _batch(data: bytes, start: int, end: int) -> tuple[int, int, int, int]:
    """(iteration, replica, microbatches start, microbatches end) of a `BatchMetadata`: fields 1 (int64), 2
    (repeated message, its records contiguous) and 3 (int32)."""
    iteration = replica = 0
    seen: set[int] = set()
    first = last = -1
    pos = start
    while pos < end:
        tag = data[pos]
        if tag == 0x12:  # microbatches (field 2, length-delimited): the hot loop, one record per microbatch
            if first < 0:
                first = pos
            elif last != pos:  # another field between two microbatches
                raise _Unusual
            n = data[pos + 1]
            if n < 0x80:
                pos += 2 + n
            elif data[pos + 2] < 0x80:
                pos += 3 + ((n & 0x7F) | (data[pos + 2] << 7))
            else:
                pos = _span(data, pos + 1, end)[1]
            last = pos
        elif tag in (0x08, 0x18) and tag not in seen:  # iteration, dp_replica (fields 1 and 3, varints)
            seen.add(tag)
            value, pos = _varint(data, pos + 1)
            if tag == 0x08:
                iteration = _int64(value)
            else:
                replica = _int32(value)
        else:
            raise _Unusual
    if pos != end:  # a record ran past the batch
        raise _Unusual
    if first < 0:
        first = last = start
    return iteration, replica, first, last


def _guessed(batch: bytes) -> list[BatchLayout]:
    """The canonical layouts of a `BatchMetadata` (protobuf writes fields in number order: iteration, the
    microbatches, dp_replica; zeros left out), read from its two ends without looking at the records between."""
    end = len(batch)
    iteration, start = 0, 0
    if end and batch[0] == 0x08:  # iteration (field 1, varint)
        value, start = _varint(batch, 1)
        iteration = _int64(value)
    out = []
    # dp_replica (field 3) last: a tag byte, then a varint whose last byte is below 0x80 and the others above.
    if end - start >= 2 and batch[end - 1] < 0x80:
        tag = end - 2
        while tag > start and end - tag <= 11 and batch[tag] >= 0x80:
            tag -= 1
        if batch[tag] == 0x18 and tag >= start:
            out.append(BatchLayout(iteration, _int32(_varint(batch, tag + 1)[0]), start, tag, True))
    out.append(BatchLayout(iteration, 0, start, end, True))  # dp_replica 0, left out
    return out


def batch_layouts(batch: bytes) -> Iterator[BatchLayout]:
    """Readings of a serialized `BatchMetadata`, cheapest first: the canonical layouts guessed from its ends
    (`guessed`), then the one found by walking every record (none when the bytes are unusual: parse them).

    A guessed layout reads a prefix that is exactly one iteration field and a suffix that is exactly one
    dp_replica field. If the bytes between are a run of records that protobuf has read as such before (a checked
    batch's microbatches, or the middle of a whole batch byte-equal to a checked one), protobuf reads this batch
    with that identity too. Walking the records of each of the 64 copies of a batch that arrive at once was a
    fifth of a streamed request's time on the event loop; the walk now runs only for a batch not seen before.
    """
    try:
        guesses = _guessed(batch)
    except (_Unusual, IndexError):
        guesses = []
    yield from guesses
    try:
        iteration, replica, start, end = _batch(batch, 0, len(batch))
    except (_Unusual, IndexError):
        return
    yield BatchLayout(iteration, replica, start, end, False)


def stream_request(data: bytes) -> StreamRequestHead | None:
    """The fast path's view of a serialized `StreamPlansRequest`; None: parse it in full instead."""
    try:
        # job_id = 1, rank = 2, batch = 3, deadline = 4, predicted_timings = 5
        values, spans = _fields(data, 0, len(data), varints=(2, 5), spans=(1, 3, 4))
        if 3 not in spans:  # no batch: the full path says so
            return None
        job_start, job_end = spans.get(1, (0, 0))
        job_id = data[job_start:job_end].decode()
        deadline = None
        if 4 in spans:  # google.protobuf.Timestamp: seconds = 1, nanos = 2
            ts, _ = _fields(data, *spans[4], varints=(1, 2), spans=())
            deadline = (_int64(ts.get(1, 0)), _int32(ts.get(2, 0)))
    except (_Unusual, IndexError, UnicodeDecodeError):
        return None
    batch_start, batch_end = spans[3]
    return StreamRequestHead(
        job_id=job_id,
        rank=_int32(values.get(2, 0)),
        batch=data[batch_start:batch_end],
        deadline=deadline,
        predicted_timings=values.get(5, 0) != 0,  # a bool is any non-zero varint, as protobuf reads it
    )


# ---- writing --------------------------------------------------------------------------------------------------


def _varint_bytes(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # negative integers are 10-byte varints on the wire
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    """An integer, enum or bool field, written even when it is 0 (which a serializer leaves out): merged after
    other bytes of the same message, it overrides their value."""
    return _varint_bytes(number << 3) + _varint_bytes(value)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: an embedded message (already serialized), a string or bytes."""
    return field_head(number, len(payload)) + payload


def field_head(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field whose `length` bytes of payload follow (written in parts)."""
    return _varint_bytes(number << 3 | 2) + _varint_bytes(length)


def double_field(number: int, value: float) -> bytes:
    return _varint_bytes(number << 3 | 1) + struct.pack("<d", value)

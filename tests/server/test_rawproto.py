"""The hand-read and hand-written protobuf bytes of the streaming fast path agree with protobuf itself."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver.server import rawproto
from pipeweaver.server.rawproto import StreamRequestHead
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.wire import batch_to_proto
from tests.strategies import batch_metadata

INT32 = st.integers(-(1 << 31), (1 << 31) - 1)
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)


@st.composite
def stream_requests(draw: Any) -> Any:
    batch = batch_to_proto(draw(batch_metadata()))
    batch.iteration = draw(INT64)
    batch.dp_replica = draw(INT32)
    req = pb.StreamPlansRequest(
        job_id=draw(st.text(max_size=30)), rank=draw(INT32), batch=batch, predicted_timings=draw(st.booleans())
    )
    if draw(st.booleans()):
        req.deadline.seconds, req.deadline.nanos = draw(INT64.filter(lambda s: abs(s) < 1 << 60)), draw(INT32)
    return req


def _agrees(head: StreamRequestHead, req: Any) -> None:
    assert (head.job_id, head.rank) == (req.job_id, req.rank)
    assert (head.iteration, head.replica) == (req.batch.iteration, req.batch.dp_replica)
    assert pb.BatchMetadata.FromString(head.batch) == req.batch
    assert pb.BatchMetadata.FromString(head.microbatches).microbatches == req.batch.microbatches
    deadline = (req.deadline.seconds, req.deadline.nanos) if req.HasField("deadline") else None
    assert head.deadline == deadline
    assert head.predicted_timings == req.predicted_timings


@settings(max_examples=80, deadline=None)
@given(stream_requests())
def test_a_request_reads_as_protobuf_decodes_it(req: Any) -> None:
    head = rawproto.stream_request(req.SerializeToString())
    assert head is not None
    _agrees(head, req)
    assert head.microbatches == b"".join(rawproto.field(2, mb.SerializeToString()) for mb in req.batch.microbatches)


@settings(max_examples=200, deadline=None)
@given(stream_requests(), st.data())
def test_damaged_bytes_take_the_full_path_or_read_as_protobuf_does(req: Any, data: Any) -> None:
    raw = bytearray(req.SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    head = rawproto.stream_request(bytes(raw))
    if head is None:
        return
    try:
        parsed = pb.StreamPlansRequest.FromString(bytes(raw))
    except Exception:  # protobuf refuses it: the service parses it on the full path only if its batch is unknown
        return
    _agrees(head, parsed)


def _request(**fields: Any) -> Any:
    batch = pb.BatchMetadata(iteration=7, dp_replica=2)
    for tokens in (5, 6, 7):
        batch.microbatches.add().documents.add(text_tokens=tokens)
    return pb.StreamPlansRequest(job_id="job-a", rank=1, batch=batch, **fields)


def test_odd_encodings_take_the_full_path() -> None:
    req = _request()
    raw = req.SerializeToString()
    batch = req.batch
    mb = [rawproto.field(2, m.SerializeToString()) for m in batch.microbatches]
    job, rank = rawproto.field(1, b"job-a"), rawproto.varint_field(2, 1)
    odd = {
        "an unknown field": raw + rawproto.varint_field(9, 1),
        "a repeated field": raw + rawproto.field(1, b"job-b"),
        "a field of the wrong type": job + rawproto.field(2, b"1"),
        "no batch": job + rank,
        "truncated": raw[:-3],
        "a job id that is not UTF-8": rawproto.field(1, b"\xff\xfe") + rawproto.field(3, batch.SerializeToString()),
        "a field between two microbatches": job
        + rawproto.field(3, mb[0] + rawproto.varint_field(1, 7) + mb[1] + mb[2]),
        "an unknown field in the batch": job + rawproto.field(3, b"".join(mb) + rawproto.varint_field(9, 1)),
        "a varint wider than 64 bits": job + rank[:1] + b"\xff" * 9 + b"\x7f",
    }
    for what, data in odd.items():
        assert rawproto.stream_request(data) is None, what
    # Reordered but unambiguous: still read, and as protobuf reads it.
    reordered = rawproto.field(3, rawproto.varint_field(3, 2) + b"".join(mb) + rawproto.varint_field(1, 7)) + job
    head = rawproto.stream_request(reordered + rank)
    assert head is not None
    _agrees(head, pb.StreamPlansRequest.FromString(reordered + rank))


def test_written_fields_override_what_they_are_merged_after() -> None:
    base = pb.PlanHeader(iteration=9, dp_replica=3, source=pb.PLAN_SOURCE_SEARCH, job_id="job-x").SerializeToString()
    zeros = rawproto.varint_field(2, 0) + rawproto.varint_field(8, 0) + rawproto.varint_field(7, 2)
    merged = pb.PlanHeader.FromString(base + zeros)
    assert (merged.iteration, merged.dp_replica, merged.source, merged.job_id) == (0, 0, 2, "job-x")
    assert pb.PlanHeader.FromString(rawproto.varint_field(2, -5)).iteration == -5
    response = pb.StreamPlansResponse.FromString(rawproto.double_field(4, 12.25) + rawproto.field(1, base))
    assert response.search_ms == 12.25 and response.header.job_id == "job-x"

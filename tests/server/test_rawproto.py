"""The hand-read and hand-written protobuf bytes of the streaming fast path agree with protobuf itself."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver.server import rawproto
from pipeweaver.server.rawproto import BatchLayout, StreamRequestHead
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


def _walked(batch: bytes) -> BatchLayout | None:
    """The layout found by reading every record (the last of `batch_layouts`, when there is one)."""
    layouts = [layout for layout in rawproto.batch_layouts(batch) if not layout.guessed]
    assert len(layouts) <= 1
    return layouts[0] if layouts else None


def _agrees(head: StreamRequestHead, req: Any) -> None:
    assert (head.job_id, head.rank) == (req.job_id, req.rank)
    assert pb.BatchMetadata.FromString(head.batch) == req.batch
    walked = _walked(head.batch)
    if walked is not None:
        assert (walked.iteration, walked.replica) == (req.batch.iteration, req.batch.dp_replica)
        records = head.batch[walked.start : walked.end]
        assert pb.BatchMetadata.FromString(records).microbatches == req.batch.microbatches
    deadline = (req.deadline.seconds, req.deadline.nanos) if req.HasField("deadline") else None
    assert head.deadline == deadline
    assert head.predicted_timings == req.predicted_timings


@settings(max_examples=80, deadline=None)
@given(stream_requests())
def test_a_request_reads_as_protobuf_decodes_it(req: Any) -> None:
    head = rawproto.stream_request(req.SerializeToString())
    assert head is not None
    _agrees(head, req)
    walked = _walked(head.batch)
    assert walked is not None
    records = b"".join(rawproto.field(2, mb.SerializeToString()) for mb in req.batch.microbatches)
    assert head.batch[walked.start : walked.end] == records
    # Protobuf's own encoding is canonical: one of the layouts guessed from the ends is the walked one.
    guessed = [layout for layout in rawproto.batch_layouts(head.batch) if layout.guessed]
    assert walked._replace(guessed=True) in guessed


@settings(max_examples=300, deadline=None)
@given(batch_metadata(), st.binary(max_size=12), st.binary(max_size=12), st.data())
def test_a_guess_whose_middle_is_a_checked_run_of_records_reads_as_protobuf_does(
    meta: Any, prefix: bytes, suffix: bytes, data: Any
) -> None:
    """Around a run of records the service has checked, any bytes: whenever a guessed layout puts its middle on
    that run, protobuf reads the batch with the guessed identity and those records."""
    batch = batch_to_proto(meta)
    records = b"".join(rawproto.field(2, mb.SerializeToString()) for mb in batch.microbatches)
    if data.draw(st.booleans()):  # real identity fields, as a client writes them
        prefix = rawproto.varint_field(1, data.draw(INT64)) if data.draw(st.booleans()) else b""
        suffix = rawproto.varint_field(3, data.draw(INT32)) if data.draw(st.booleans()) else b""
    raw = prefix + records + suffix
    for layout in rawproto.batch_layouts(raw):
        if not layout.guessed or raw[layout.start : layout.end] != records:
            continue
        parsed = pb.BatchMetadata.FromString(raw)  # must not raise: the guess vouches for every byte
        assert (parsed.iteration, parsed.dp_replica) == (layout.iteration, layout.replica)
        assert parsed.microbatches == batch.microbatches


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
        head = rawproto.stream_request(data)
        # An odd request is not read; an odd batch is, but has no walked layout (the full path parses it).
        assert head is None or _walked(head.batch) is None, what
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

"""A streamed batch whose microbatches the job has checked before (the other ranks of its pipeline, an equal
replica, a later iteration) skips the parse, the checks and the digest, and still gets every answer and every
error the full path gives; encodings that differ are never mistaken for different batches."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import grpc
import pytest

from pipeweaver.server import rawproto, work
from pipeweaver.server.config import ServerConfig
from pipeweaver.server.jobs import JobState, PlanEntry, batch_digest
from pipeweaver.server.metrics import Metrics
from pipeweaver.server.service import PlannerService
from pipeweaver.server.validation import RequestError, unknown_job
from pipeweaver.v1 import planner_pb2 as pb
from tests.server.harness import ServerProcess, bad_request, batch, error_reason, tiny_workload

W = tiny_workload()
STREAM = "/pipeweaver.v1.PlannerService/StreamPlans"


def _stream(planner: ServerProcess, *requests: bytes) -> list[Any]:
    """One stream carrying these serialized requests; its answers, parsed."""
    call = planner.channel().stream_stream(STREAM, request_serializer=None, response_deserializer=None)
    return [pb.StreamPlansResponse.FromString(r) for r in call(iter(requests), timeout=30)]


def _request(job_id: str, rank: int, b: Any, **fields: Any) -> bytes:
    return bytes(pb.StreamPlansRequest(job_id=job_id, rank=rank, batch=b, **fields).SerializeToString())


def _error(planner: ServerProcess, request: bytes) -> tuple[grpc.StatusCode, list[str]]:
    with pytest.raises(grpc.RpcError) as info:
        _stream(planner, request)
    return info.value.code(), [f for f, _ in bad_request(info.value)]


def test_every_check_still_applies_to_a_known_batch(planner: ServerProcess, job_id: str) -> None:
    known = batch(W, 600, seed=41)
    assert [r.header.iteration for r in _stream(planner, _request(job_id, 0, known))] == [600]
    again = pb.BatchMetadata()
    again.CopyFrom(known)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert _error(planner, _request(job_id, 5, again)) == (invalid, ["rank"])
    again.dp_replica = 3  # the job has one replica
    assert _error(planner, _request(job_id, 0, again)) == (invalid, ["batch.dp_replica"])
    again.dp_replica, again.iteration = 0, -1
    assert _error(planner, _request(job_id, 0, again)) == (invalid, ["batch.iteration"])
    again.iteration = 601
    bad_deadline = _request(job_id, 0, again, deadline={"seconds": int(time.time()) + 10, "nanos": -1})
    assert _error(planner, bad_deadline) == (invalid, ["deadline.nanos"])
    assert _error(planner, _request("job-none", 0, again)) == (grpc.StatusCode.FAILED_PRECONDITION, ["job_id"])
    # The same microbatches, sent again with valid fields, are served (a cache hit: the same signature).
    (answer,) = _stream(planner, _request(job_id, 1, again))
    assert answer.header.iteration == 601 and answer.header.source == pb.PLAN_SOURCE_CACHE
    assert answer.rank_plan.rank == 1 and not answer.fallback


def test_ranks_whose_encodings_differ_share_the_plan_and_ranks_whose_batches_differ_are_refused(
    planner: ServerProcess, job_id: str
) -> None:
    b = batch(W, 610, seed=42)
    records = [rawproto.field(2, mb.SerializeToString()) for mb in b.microbatches]
    # The same batch with its iteration between two microbatches: valid protobuf, but not the bytes rank 0 sent
    # (and not what the fast path reads), so rank 1's request takes the full path and its digest.
    odd = records[0] + rawproto.varint_field(1, 610) + b"".join(records[1:])
    odd_request = rawproto.field(1, job_id.encode()) + rawproto.varint_field(2, 1) + rawproto.field(3, odd)
    (r0,) = _stream(planner, _request(job_id, 0, b))
    (r1,) = _stream(planner, odd_request)
    assert (r0.rank_plan.rank, r1.rank_plan.rank) == (0, 1)
    assert r0.header.SerializeToString(deterministic=True) == r1.header.SerializeToString(deterministic=True)

    # Two batches the job knows, sent by the two ranks for one iteration: refused, as unknown ones are.
    a, c = batch(W, 611, seed=43), batch(W, 612, seed=44)
    _stream(planner, _request(job_id, 0, a), _request(job_id, 0, c))
    a.iteration = c.iteration = 613
    _stream(planner, _request(job_id, 0, a))
    with pytest.raises(grpc.RpcError) as info:
        _stream(planner, _request(job_id, 1, c))
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "BATCH_CONFLICT"


def test_bytes_that_are_no_request_are_invalid_arguments(planner: ServerProcess, job_id: str) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a job_id longer than the message
    assert _error(planner, garbage) == (grpc.StatusCode.INVALID_ARGUMENT, ["request"])
    get_plan = planner.channel().unary_unary(
        "/pipeweaver.v1.PlannerService/GetPlan", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as info:
        get_plan(garbage, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(info.value)] == ["request"]


def test_a_streamed_request_over_the_size_limit_names_its_largest_field(planner: ServerProcess, job_id: str) -> None:
    big = batch(W, 620)
    filler = [pb.Document(text_tokens=1, media=[pb.MediaItem(modality=pb.MODALITY_IMAGE, tokens=16)])] * 10_000
    while big.ByteSize() < 1_500_000:  # the shared server's limit is 1 MiB
        big.microbatches[0].documents.extend(filler)
    with pytest.raises(grpc.RpcError) as info:
        _stream(planner, _request(job_id, 0, big))
    assert error_reason(info.value) == "MESSAGE_TOO_LARGE"
    assert [f for f, _ in bad_request(info.value)] == ["batch"]


class _Planning:
    """Just the job lookup `PlannerService.stream_request` needs."""

    def __init__(self, job: JobState) -> None:
        self._job = job
        self.m = Metrics()

    def job(self, job_id: str) -> JobState:
        if job_id != self._job.job_id:
            raise unknown_job(job_id)
        return self._job


def test_known_microbatches_are_not_parsed_or_digested_again() -> None:
    spec = work.JobSpec(model=W.model, parallel=replace(W.parallel, dp=2), hardware=W.hardware)

    async def main() -> None:
        job = JobState(work.Job("job-k", spec), None, budget_ms=50.0, plan_window=4, plan_cache_size=4)
        service = PlannerService(ServerConfig(), _Planning(job))  # type: ignore[arg-type]
        first = batch(W, 5, seed=45)
        _, rank, checked, deadline, timings, _ = service.stream_request(_request("job-k", 1, first))
        assert not timings
        assert (rank, checked.iteration, checked.replica, deadline) == (1, 5, 0, None)
        assert checked.digest == batch_digest(first) and checked.data == first.SerializeToString()

        # Contents the job has seen before resolve to the digest it remembered, whatever it is: no digest ran.
        seen = batch(W, 6, seed=46)
        job.remember_contents(b"".join(rawproto.field(2, mb.SerializeToString()) for mb in seen.microbatches), b"d")
        seen.iteration, seen.dp_replica = 9, 1
        soon = {"seconds": int(time.time()) + 5, "nanos": 0}
        _, rank, fast, deadline, _, _ = service.stream_request(_request("job-k", 0, seen, deadline=soon))
        assert (rank, fast.iteration, fast.replica, fast.digest) == (0, 9, 1, b"d")
        assert fast.data == seen.SerializeToString() and deadline is not None
        assert 4 < deadline - time.monotonic() < 5.1
        # Another rank's copy of a (replica, iteration) already attached, byte for byte: the entry's digest, with no
        # lookup of its records (they are not among the known contents); other bytes for it are not taken for it.
        copy = batch(W, 7, seed=47)
        copy.iteration, copy.dp_replica = 11, 1
        job.add_entry(PlanEntry(1, 11, b"entry", copy.SerializeToString()))
        _, _, same, _, _, _ = service.stream_request(_request("job-k", 1, copy))
        assert (same.iteration, same.replica, same.digest) == (11, 1, b"entry")
        other = batch(W, 7, seed=48)
        other.iteration, other.dp_replica = 11, 1
        _, _, differs, _, _, _ = service.stream_request(_request("job-k", 1, other))
        assert differs.digest == batch_digest(other) != b"entry"
        # ...and the request's own fields are still checked.
        for bad, field in ((_request("job-k", 2, seen), "rank"), (_request("job-x", 0, seen), "job_id")):
            with pytest.raises(RequestError) as info:
                service.stream_request(bad)
            assert [v.field for v in info.value.violations] == [field]

    asyncio.run(main())

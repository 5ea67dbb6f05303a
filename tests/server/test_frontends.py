"""`pipeweaver serve --frontends N`: front-end processes share the port, relay streams to the core, forward the
rest; a dead one is replaced; SIGTERM drains through them; a busy port fails the start."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pipeweaver.server import relay
from pipeweaver.server.validation import Violation, invalid
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.v1 import planner_pb2_grpc
from tests.server.harness import (
    SERVICE,
    ServerProcess,
    bad_request,
    batch,
    error_reason,
    process_alive,
    register_request,
    start_server,
    stream_requests,
    tiny_workload,
    wait_until,
)

W = replace(tiny_workload(), parallel=replace(tiny_workload().parallel, dp=8))
LOCAL_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
"""Each channel its own connection, as each trainer process has (else channels to one address share one)."""


@pytest.fixture(scope="module")
def fronted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("fronted"), "--frontends", "2", "--budget-ms", "50")
    assert len(server.frontend_pids) == 2
    yield server
    assert server.stop() == 0, server.log()
    for pid in server.frontend_pids:
        wait_until(lambda pid=pid: not process_alive(pid), 10, f"front-end {pid} to exit")


@pytest.fixture(scope="module")
def job_id(fronted: ServerProcess) -> str:
    return str(fronted.stub().RegisterJob(register_request(W), timeout=120).job_id)


def _connections(pid: int, port: int) -> int:
    """Established TCP connections on `port` that process `pid` holds (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01" and cols[9] in inodes:
                count += 1
    return count


# ---- the relay's records ---------------------------------------------------------------------------------------


def test_relay_records_come_back_as_written() -> None:
    outbox_bytes = b"".join(
        relay._HEAD.pack(kind, stream, len(payload)) + payload
        for kind, stream, payload in [(relay.OPEN, 1, b""), (relay.REQUEST, 1, b"abc"), (relay.HALF_CLOSE, 70000, b"")]
    )
    assert list(relay.records(outbox_bytes)) == [(relay.OPEN, 1, b""), (relay.REQUEST, 1, b"abc"), (2, 70000, b"")]


def test_an_answer_burst_sends_each_shared_part_once_per_message() -> None:
    """A plan's answers to many streams of one front-end carry its header and each rank's actions once."""
    header, rank0, rank1 = b"H" * 1000, b"A" * 500, b"B" * 700
    answers = {s: ((header, rank0 if s % 2 else rank1), bytes([s]) * 3) for s in range(1, 17)}

    async def one_message() -> bytes:
        outbox = relay.Outbox()
        for stream, (shared, own) in answers.items():
            outbox.put_answer(stream, (*shared, own))
        outbox.close()
        return b"".join([m async for m in outbox.messages()])

    message = asyncio.run(one_message())
    assert len(message) < 1000 + 500 + 700 + 16 * 40
    parts: list[bytes] = []
    got = {}
    for kind, stream, payload in relay.records(message):
        if kind == relay.PART:
            parts.append(payload)
        else:
            assert kind == relay.ANSWER
            got[stream] = relay.answer_of(payload, parts)
    assert got == {s: b"".join((*shared, own)) for s, (shared, own) in answers.items()}


def test_a_failed_streams_status_crosses_the_link_with_its_details() -> None:
    error = invalid([Violation("batch.microbatches[3]", "too many tokens: 10 > 4")])
    code, message, trailing = relay.decode_status(relay.encode_status(error))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message == error.message
    assert trailing == tuple((k, v) for k, v in error.to_status().trailing_metadata)


# ---- streams and calls through the front-ends --------------------------------------------------------------------


def test_every_rank_gets_its_replicas_plan_through_either_frontend(fronted: ServerProcess, job_id: str) -> None:
    """16 streams (8 replicas x 2 ranks) on their own connections: the kernel spreads them over both front-ends,
    and each rank of a replica gets the same header and its own actions, for every iteration."""
    handled = fronted.sample("pipeweaver_grpc_server_handled_total", grpc_method="StreamPlans", grpc_code="OK")
    channels = [grpc.insecure_channel(fronted.address, options=LOCAL_CONNECTION) for _ in range(16)]
    try:
        for ch in channels:
            grpc.channel_ready_future(ch).result(timeout=10)
        held = [_connections(pid, fronted.port) for pid in fronted.frontend_pids]
        assert sum(held) >= 16 and min(held) > 0, f"connections per front-end: {held}"  # + the fixtures'

        def stream(i: int) -> list[Any]:
            replica, rank = divmod(i, 2)
            stub = planner_pb2_grpc.PlannerServiceStub(channels[i])
            batches = [batch(W, it, seed=replica % 3, dp_replica=replica) for it in range(3)]
            return list(stub.StreamPlans(iter(stream_requests(job_id, rank, batches)), timeout=120))

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(stream, range(16)))
    finally:
        for ch in channels:
            ch.close()
    for replica in range(8):
        ranks = answers[2 * replica], answers[2 * replica + 1]
        for rank, responses in enumerate(ranks):
            assert sorted(r.header.iteration for r in responses) == [0, 1, 2]
            assert all(r.rank_plan.rank == rank and r.header.dp_replica == replica for r in responses)
        by_iteration = [{r.header.iteration: r.header.SerializeToString() for r in rs} for rs in ranks]
        assert by_iteration[0] == by_iteration[1], f"replica {replica}: the ranks got different plans"
    wait_until(
        lambda: (
            fronted.sample("pipeweaver_grpc_server_handled_total", grpc_method="StreamPlans", grpc_code="OK")
            == handled + 16
        ),
        10,
        "the core to count the 16 relayed streams",
    )


def test_bad_input_through_the_frontends_keeps_its_status_and_details(fronted: ServerProcess, job_id: str) -> None:
    stub = fronted.stub()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamPlans(iter(stream_requests(job_id, 7, [batch(W, 0)])), timeout=30))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(info.value)] == ["rank"]
    with pytest.raises(grpc.RpcError) as info:
        stub.GetPlan(pb.GetPlanRequest(job_id="job-gone", rank=0, batch=batch(W, 1)), timeout=30)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "UNKNOWN_JOB"
    request = register_request(W)
    request.ClearField("model")
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterJob(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert {f.split(".")[0] for f, _ in bad_request(info.value)} == {"model"}
    # ... and everyone else is still served, the unary way too.
    plan = stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=1, batch=batch(W, 5)), timeout=60)
    assert plan.rank_plan.rank == 1 and plan.header.iteration == 5


def test_health_and_reflection_answer_on_the_frontends(fronted: ServerProcess) -> None:
    assert fronted.health("") == health_pb2.HealthCheckResponse.SERVING
    assert fronted.health(SERVICE) == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(fronted.channel())
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names
    assert not any("internal" in name for name in names)  # the relay is on the core's private socket only


# ---- failures and shutdown ---------------------------------------------------------------------------------------


def test_a_killed_frontend_is_replaced_and_new_streams_are_served(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--frontends", "2", "--budget-ms", "50")
    try:
        job = server.stub().RegisterJob(register_request(W), timeout=120).job_id
        os.kill(server.frontend_pids[0], signal.SIGKILL)
        wait_until(lambda: server.sample("pipeweaver_frontend_restarts_total") == 1, 20, "a new front-end")
        for i in range(4):  # fresh connections land on the survivor or the replacement
            with grpc.insecure_channel(server.address, options=LOCAL_CONNECTION) as ch:
                stub = planner_pb2_grpc.PlannerServiceStub(ch)
                (answer,) = stub.StreamPlans(iter(stream_requests(job, 0, [batch(W, i)])), timeout=60)
                assert answer.header.iteration == i
    finally:
        assert server.stop() == 0, server.log()
    assert "front-end pipeweaver-frontend-0 exited with -9; starting a new one" in server.log()


def test_sigterm_drains_relayed_streams_after_their_answers(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--frontends", "2", "--grace-s", "8", "--budget-ms", "50")
    hold = threading.Event()
    outcome: dict[str, Any] = {"responses": []}
    try:
        stub = server.stub()
        job = stub.RegisterJob(register_request(W, planning_budget_ms=1_200.0), timeout=60).job_id

        def requests() -> Any:
            yield from stream_requests(job, 0, [batch(W, 30, seed=4)])
            hold.wait(60)  # a trainer keeps its stream open for the next iterations

        def stream() -> None:
            try:
                for r in stub.StreamPlans(requests(), timeout=60):
                    outcome["responses"].append(r)
            except grpc.RpcError as err:
                outcome["error"] = err

        streaming = threading.Thread(target=stream, daemon=True)
        streaming.start()
        wait_until(lambda: server.sample("pipeweaver_workers_busy", lane="search") == 1, 30, "a running search")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        streaming.join(30)
        assert not streaming.is_alive()
        assert [r.header.iteration for r in outcome["responses"]] == [30], "the answer in flight was lost"
        assert outcome["error"].code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 8.0 + 5.0
        code = server.proc.wait(30)
    finally:
        hold.set()
        server.stop()
    assert code == 0, server.log()
    for pid in server.frontend_pids:
        wait_until(lambda pid=pid: not process_alive(pid), 10, f"front-end {pid} to exit")


def test_a_busy_port_fails_the_start_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as info:
            start_server(tmp_path, "--frontends", "2", "--port", str(port))
    assert f"cannot bind 127.0.0.1:{port}" in str(info.value)

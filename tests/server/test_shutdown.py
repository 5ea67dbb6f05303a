"""SIGTERM under load: readiness drops, in-flight requests finish within the grace, the pool stops, exit 0."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeweaver import wire
from pipeweaver.v1 import planner_pb2 as pb
from tests.server.harness import (
    SERVICE,
    batch,
    error_reason,
    process_alive,
    register_request,
    start_server,
    stream_requests,
    tiny_workload,
    wait_until,
)

W = tiny_workload()
GRACE_S = 8.0


def test_sigterm_under_load(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--grace-s", str(GRACE_S), "--budget-ms", "50")
    hold = threading.Event()
    try:
        stub = server.stub()
        job_id = stub.RegisterJob(register_request(W, planning_budget_ms=1_200.0), timeout=60).job_id

        statuses: list[int] = []

        def watch() -> None:
            health = health_pb2_grpc.HealthStub(server.channel())
            try:
                for r in health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60):
                    statuses.append(r.status)
            except grpc.RpcError:
                pass  # the server ends the watch when it stops

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        wait_until(lambda: statuses == [health_pb2.HealthCheckResponse.SERVING], 10, "the readiness watch")

        stream_outcome: dict[str, Any] = {"responses": []}

        def requests() -> Any:
            yield from stream_requests(job_id, 0, [batch(W, 30, seed=4)])
            hold.wait(60)  # a trainer keeps its stream open for the next iterations

        def stream() -> None:
            try:
                for r in stub.StreamPlans(requests(), timeout=60):
                    stream_outcome["responses"].append(r)
            except grpc.RpcError as err:
                stream_outcome["error"] = err

        with ThreadPoolExecutor(6) as pool:
            unaries = [
                pool.submit(
                    stub.GetPlan, pb.GetPlanRequest(job_id=job_id, rank=r, batch=batch(W, it, seed=4)), timeout=60
                )
                for it in (10, 20)
                for r in (0, 1)
            ]
            streaming = threading.Thread(target=stream, daemon=True)
            streaming.start()
            wait_until(lambda: server.sample("pipeweaver_workers_busy", lane="search") == 1, 30, "a running search")
            wait_until(
                lambda: server.sample("pipeweaver_grpc_server_msg_received_total", grpc_method="StreamPlans") == 1,
                30,
                "the streamed request to arrive",
            )
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(grpc.RpcError) as refused:  # new calls are refused once shutdown began
                stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=batch(W, 40)), timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            plans = [u.result(timeout=60) for u in unaries]  # every in-flight request finishes
            code = server.proc.wait(timeout=GRACE_S + 30)
        elapsed = time.monotonic() - started

        assert code == 0, server.log()
        assert elapsed < GRACE_S + 30
        assert all(wire.action_count(p.rank_plan) and not p.fallback for p in plans)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
        streaming.join(30)
        assert [r.header.iteration for r in stream_outcome["responses"]] == [30]
        assert stream_outcome["error"].code() is grpc.StatusCode.UNAVAILABLE
        assert error_reason(stream_outcome["error"]) == "SHUTTING_DOWN"
        assert "stopped" in server.log()
        wait_until(
            lambda: not any(process_alive(p) for p in server.search_worker_pids + server.control_worker_pids),
            30,
            "the workers to exit",
        )
    finally:
        hold.set()
        server.stop(signal.SIGKILL)

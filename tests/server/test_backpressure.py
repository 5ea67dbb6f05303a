"""A full queue answers RESOURCE_EXHAUSTED (with RetryInfo); a cancelled stream cancels its searches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pipeweaver.v1 import planner_pb2 as pb
from tests.server.harness import (
    batch,
    error_reason,
    register_request,
    running_server,
    stream_requests,
    tiny_workload,
    wait_until,
)

W = tiny_workload()


def _plans(server: Any) -> float:
    return sum(server.sample("pipeweaver_plans_total", source=s) for s in ("search", "cache", "fallback"))


def test_queue_full_and_stream_cancellation(tmp_path: Path) -> None:
    with running_server(tmp_path, "--queue-size", "1") as server:
        stub = server.stub()
        job_id = stub.RegisterJob(register_request(W, planning_budget_ms=3_000.0), timeout=60).job_id
        # The workers' warm-up for the new job runs first; this test counts the lane's tasks from an idle worker.
        wait_until(lambda: server.sample("pipeweaver_job_warmup_seconds_count") == 1, 60, "the job's warm-up")
        hold = threading.Event()

        def requests() -> Iterator[Any]:
            yield from stream_requests(job_id, 0, [batch(W, 1, seed=51), batch(W, 2, seed=51)])
            hold.wait(60)

        call = stub.StreamPlans(requests(), timeout=60)
        try:
            # Iteration 1 runs on the only search worker, iteration 2 waits in the queue (size 1)...
            wait_until(
                lambda: (
                    server.sample("pipeweaver_workers_busy", lane="search") == 1
                    and server.sample("pipeweaver_queue_depth", lane="search") == 1
                ),
                30,
                "one running and one queued search",
            )
            # ...so a third search does not fit.
            with pytest.raises(grpc.RpcError) as info:
                stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=batch(W, 3, seed=51)), timeout=30)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(info.value) == "QUEUE_FULL"
            status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
            assert status is not None and any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)

            # The trainer goes away: its queued search leaves the queue at once, the running one is abandoned.
            call.cancel()
            wait_until(lambda: server.sample("pipeweaver_queue_depth", lane="search") == 0, 5, "the queue to empty")
            wait_until(lambda: server.sample("pipeweaver_workers_busy", lane="search") == 0, 30, "the worker to idle")
            assert _plans(server) == 0  # neither iteration was planned for anyone
        finally:
            hold.set()

        # The server serves the next request normally.
        r = stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=1, batch=batch(W, 4, seed=51), budget_ms=50), timeout=30)
        assert not r.fallback and _plans(server) == 1
        assert server.stop() == 0, server.log()


def test_every_control_worker_is_warmed_for_a_new_job(tmp_path: Path) -> None:
    """With several control workers (many-core hosts: fallbacks of distinct replicas' batches in parallel), the
    warm-up reaches each of them, as it does each search worker."""
    with running_server(tmp_path, control_workers=2) as server:
        assert len(server.control_worker_pids) == 2
        server.stub().RegisterJob(register_request(W, planning_budget_ms=100.0), timeout=60)
        wait_until(lambda: server.sample("pipeweaver_job_warmup_seconds_count") == 1, 60, "the job's warm-up")
        assert server.sample("pipeweaver_worker_task_seconds_count", lane="control", task="warm_job") == 2
        line = next(x for x in server.log().splitlines() if "warmed " in x)
        assert "on 1 of 1 search workers and 2 of 2 control workers" in line, line
        assert server.health() == 1  # SERVING

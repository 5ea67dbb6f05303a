"""A search worker killed mid-search: its requests get flagged fallback plans and the pool is replaced."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grpc_health.v1 import health_pb2

from pipeweaver.plan.validator import validate
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.wire import plan_from_proto
from tests.server.harness import (
    SERVICE,
    batch,
    register_request,
    running_server,
    stream_requests,
    tiny_workload,
    wait_until,
)

W = tiny_workload()


def test_a_worker_killed_mid_search_yields_flagged_fallbacks_and_a_new_worker(tmp_path: Path) -> None:
    with running_server(tmp_path, "--budget-ms", "50") as server:
        stub = server.stub()
        job_id = stub.RegisterJob(register_request(W, planning_budget_ms=8_000.0), timeout=60).job_id
        # The workers' warm-up for the new job first: the worker killed below must be running the real search.
        wait_until(lambda: server.sample("pipeweaver_job_warmup_seconds_count") == 1, 60, "the job's warm-up")
        b = batch(W, 0, seed=21)
        with ThreadPoolExecutor(2) as pool:
            unary = pool.submit(stub.GetPlan, pb.GetPlanRequest(job_id=job_id, rank=0, batch=b), timeout=60)
            streamed = pool.submit(lambda: list(stub.StreamPlans(iter(stream_requests(job_id, 1, [b])), timeout=60)))
            wait_until(lambda: server.sample("pipeweaver_workers_busy", lane="search") == 1, 30, "a running search")
            time.sleep(0.5)  # well inside the 8 s search
            os.kill(server.search_worker_pids[0], signal.SIGKILL)
            r0 = unary.result(timeout=60)
            (r1,) = streamed.result(timeout=60)

        assert r0.fallback and r1.fallback
        assert r0.header.source == pb.PLAN_SOURCE_FALLBACK
        assert r0.header.SerializeToString(deterministic=True) == r1.header.SerializeToString(deterministic=True)
        validate(plan_from_proto(pb.Plan(header=r0.header, ranks=[r0.rank_plan, r1.rank_plan])))
        assert server.sample("pipeweaver_worker_restarts_total", lane="search") == 1
        assert server.sample("pipeweaver_fallback_plans_total", reason="worker_crash") == 1

        # The replacement warms up, readiness comes back, and searches work again.
        wait_until(lambda: server.health(SERVICE) == health_pb2.HealthCheckResponse.SERVING, 240, "readiness")
        after = stub.GetPlan(
            pb.GetPlanRequest(job_id=job_id, rank=0, batch=batch(W, 1, seed=22), budget_ms=50.0), timeout=60
        )
        assert not after.fallback and after.header.source == pb.PLAN_SOURCE_SEARCH
        # The replacement workers were warmed for the job too (a second warm-up, of the search lane only).
        wait_until(lambda: server.sample("pipeweaver_job_warmup_seconds_count") == 2, 60, "the replacement's warm-up")
        n = len(server.search_worker_pids)
        assert (
            f"warmed {job_id} on {n} of {n} search workers and 0 of 0 control workers (lanes: search)" in server.log()
        )
        assert server.stop() == 0, server.log()

"""A pipeline across two nodes, each pod with its own sidecar: the follower forwards to the leader, so every
rank runs the one plan the leader made."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pipeweaver.v1 import planner_pb2 as pb
from tests.server.harness import (
    SERVICE,
    bad_request,
    batch,
    register_request,
    running_server,
    stream_requests,
    tiny_workload,
)

W = tiny_workload(pp=4)
ITERATIONS = range(4)


def test_ranks_on_two_sidecars_run_the_same_plans(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, "--budget-ms", "40") as leader,
        running_server(tmp_path, "--leader", leader.address) as follower,
    ):
        assert follower.health(SERVICE) == health_pb2.HealthCheckResponse.SERVING
        # Node A hosts ranks 0-1 and the leader; node B hosts ranks 2-3, whose trainers dial their own sidecar.
        sidecar_of = {0: leader, 1: leader, 2: follower, 3: follower}
        ids = {r: sidecar_of[r].stub().RegisterJob(register_request(W), timeout=120).job_id for r in range(4)}
        assert len(set(ids.values())) == 1
        job_id = ids[0]
        batches = [batch(W, it, seed=41) for it in ITERATIONS]

        def run(rank: int) -> dict[int, Any]:
            stub = sidecar_of[rank].stub()
            return {
                r.header.iteration: r
                for r in stub.StreamPlans(iter(stream_requests(job_id, rank, batches)), timeout=120)
            }

        with ThreadPoolExecutor(4) as pool:
            by_rank = list(pool.map(run, range(4)))

        for it in ITERATIONS:
            headers = {by_rank[r][it].header.SerializeToString(deterministic=True) for r in range(4)}
            assert len(headers) == 1
            assert [by_rank[r][it].rank_plan.rank for r in range(4)] == [0, 1, 2, 3]
        produced = sum(leader.sample("pipeweaver_plans_total", source=s) for s in ("search", "cache", "fallback"))
        assert produced == len(ITERATIONS)  # the leader planned each iteration once
        assert sum(follower.sample("pipeweaver_plans_total", source=s) for s in ("search", "cache", "fallback")) == 0

        # Errors come back through the follower with their details intact.
        with pytest.raises(grpc.RpcError) as info:
            follower.stub().GetPlan(
                pb.GetPlanRequest(job_id=job_id, rank=9, batch=batches[0]),
                timeout=30,
            )
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in bad_request(info.value)] == ["rank"]
        assert follower.stop() == 0 and leader.stop() == 0

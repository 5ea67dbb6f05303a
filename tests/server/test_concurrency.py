"""Many concurrent streams from separate trainer processes: every rank gets its iteration's one plan."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from pipeweaver.datagen import sample_batch
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.wire import batch_to_proto
from tests.server.harness import ServerProcess, register_request, stream_client, tiny_workload

REPLICAS = 3
ITERATIONS = 6


def test_streams_from_separate_processes(planner: ServerProcess) -> None:
    base = tiny_workload()
    w = replace(base, parallel=replace(base.parallel, dp=REPLICAS))
    job_id = planner.stub().RegisterJob(register_request(w, planning_budget_ms=30.0), timeout=60).job_id
    plans_before = sum(planner.sample("pipeweaver_plans_total", source=s) for s in ("search", "cache", "fallback"))
    dedup_before = planner.sample("pipeweaver_plan_requests_deduplicated_total")
    received_before = planner.sample("pipeweaver_grpc_server_msg_received_total", grpc_method="StreamPlans")
    sent_before = planner.sample("pipeweaver_grpc_server_msg_sent_total", grpc_method="StreamPlans")

    clients = [(replica, rank) for replica in range(REPLICAS) for rank in range(w.parallel.pp)]
    batches = {
        replica: [
            batch_to_proto(sample_batch(w, seed=31, iteration=it, dp_replica=replica)).SerializeToString()
            for it in range(ITERATIONS)
        ]
        for replica in range(REPLICAS)
    }
    with ProcessPoolExecutor(len(clients), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            (replica, rank): pool.submit(stream_client, planner.address, job_id, rank, batches[replica])
            for replica, rank in clients
        }
        results = {key: f.result(timeout=240) for key, f in futures.items()}

    for replica in range(REPLICAS):
        for it in range(ITERATIONS):
            answers = [results[(replica, rank)][it] for rank in range(w.parallel.pp)]
            assert [rank for _, rank, _ in answers] == list(range(w.parallel.pp))
            assert len({header for header, _, _ in answers}) == 1  # every rank of the pipeline: one plan
            header = pb.PlanHeader.FromString(answers[0][0])
            assert (header.dp_replica, header.iteration, header.job_id) == (replica, it, job_id)
    plans_after = sum(planner.sample("pipeweaver_plans_total", source=s) for s in ("search", "cache", "fallback"))
    assert plans_after - plans_before == REPLICAS * ITERATIONS  # planned once per (replica, iteration)
    dedup = planner.sample("pipeweaver_plan_requests_deduplicated_total") - dedup_before
    assert dedup == REPLICAS * ITERATIONS * (w.parallel.pp - 1)
    messages = REPLICAS * ITERATIONS * w.parallel.pp
    assert (
        planner.sample("pipeweaver_grpc_server_msg_received_total", grpc_method="StreamPlans") - received_before
        == messages
    )
    assert planner.sample("pipeweaver_grpc_server_msg_sent_total", grpc_method="StreamPlans") - sent_before == messages

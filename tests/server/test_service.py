"""The planner service end to end on a real server: registration, plans per rank, dedup, cache, streams,
deadlines and fallbacks, timing reports, simulation, health and reflection."""

from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pipeweaver import wire
from pipeweaver.plan.ir import Compute, Pass
from pipeweaver.plan.validator import validate
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.wire import plan_from_proto
from tests.server.harness import (
    SERVICE,
    ServerProcess,
    bad_request,
    batch,
    register_request,
    start_server,
    stream_requests,
    tiny_workload,
    wait_until,
)

W = tiny_workload()


def whole_plan(responses: list[Any]) -> Any:
    """The plan the ranks run together, from each rank's response (all share one header)."""
    header = responses[0].header
    return pb.Plan(header=header, ranks=sorted((r.rank_plan for r in responses), key=lambda rp: rp.rank))


def same_header(a: Any, b: Any) -> bool:
    return bool(a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True))


# ---- health and reflection ---------------------------------------------------------------------------------


def test_liveness_and_readiness_are_serving(planner: ServerProcess) -> None:
    assert planner.health("") == health_pb2.HealthCheckResponse.SERVING
    assert planner.health(SERVICE) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        planner.health("no.such.Service")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(planner: ServerProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(planner.channel())
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_workers_never_load_grpc(planner: ServerProcess) -> None:
    for pid in planner.search_worker_pids + planner.control_worker_pids:
        maps = Path(f"/proc/{pid}/maps")
        if not maps.exists():
            pytest.skip("needs /proc")
        assert "cygrpc" not in maps.read_text(), f"worker {pid} loaded grpc"


# ---- RegisterJob -------------------------------------------------------------------------------------------


def test_a_new_job_is_warmed_on_every_search_worker_and_the_control_worker(planner: ServerProcess) -> None:
    w = tiny_workload(pp=4)  # a job no other test registers: its warm-up is this test's alone
    before = planner.sample("pipeweaver_job_warmup_seconds_count")
    response = planner.stub().RegisterJob(register_request(w), timeout=120)
    wait_until(lambda: planner.sample("pipeweaver_job_warmup_seconds_count") > before, 60, "the job's worker warm-up")
    line = next(x for x in planner.log().splitlines() if f"warmed {response.job_id}" in x)
    workers = len(planner.search_worker_pids)
    assert f"on {workers} of {workers} search workers and 1 of 1 control workers" in line, line
    assert planner.sample("pipeweaver_worker_task_seconds_count", lane="control", task="warm_job") >= 1
    # Registering again is idempotent: no second warm-up.
    planner.stub().RegisterJob(register_request(w), timeout=120)
    time.sleep(0.5)
    assert planner.sample("pipeweaver_job_warmup_seconds_count") == before + 1


def test_register_job_is_idempotent_and_returns_the_partition(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    again = stub.RegisterJob(register_request(W), timeout=60)
    assert again.job_id == job_id
    assert again.placement.pp == W.parallel.pp
    assert {c.rank for c in again.placement.chunks} == set(range(W.parallel.pp))
    assert [s.module for s in again.module_splits] == [m.name for m in W.model.modules]
    assert all(s.sub_microbatch_size >= 1 and s.segments >= 1 for s in again.module_splits)
    assert len(again.static_memory_bytes) == W.parallel.pp and min(again.static_memory_bytes) > 0

    other = stub.RegisterJob(register_request(W, planning_budget_ms=75.0), timeout=60)
    assert other.job_id != job_id  # a different spec (budget) is a different job


def test_a_job_registered_with_activation_offloading_gets_offloading_plans(planner: ServerProcess) -> None:
    """tiny-t2v on a device 10 MB above its static memory, so that memory binds: registered with
    activation_offloading, its plans offload some stage pairs and prefetch each once, and pass the validator; the
    same spec without the option is another job. The budget leaves room for every starting point (a shorter one
    may cut the memory programs short, and which ones run then depends on the machine's speed)."""
    from dataclasses import replace

    from pipeweaver.plan.ir import Compute, Prefetch
    from pipeweaver.presets import workload

    base = workload("tiny-t2v")
    stub = planner.stub()
    static = max(stub.RegisterJob(register_request(base), timeout=120).static_memory_bytes)
    w = replace(base, hardware=replace(base.hardware, memory_bytes=static + 10e6))
    plain = stub.RegisterJob(register_request(w, planning_budget_ms=600.0), timeout=120).job_id
    job = stub.RegisterJob(register_request(w, planning_budget_ms=600.0, activation_offloading=True), timeout=120)
    assert job.job_id != plain
    offloaded = 0
    for seed in (1, 2):
        responses = [
            stub.GetPlan(pb.GetPlanRequest(job_id=job.job_id, rank=r, batch=batch(w, seed, seed=seed)), timeout=60)
            for r in range(w.parallel.pp)
        ]
        assert not any(r.fallback for r in responses)
        plan = plan_from_proto(whole_plan(responses))
        validate(plan)
        actions = [a for rp in plan.ranks for a in rp.actions]
        prefetched = [a.stage for a in actions if isinstance(a, Prefetch)]
        assert len(prefetched) == len(set(prefetched)) == len(plan.offloaded())
        offloaded += sum(1 for a in actions if isinstance(a, Compute) and a.offload)
    assert offloaded > 0


def test_registration_with_a_calibration_profile(planner: ServerProcess, job_id: str) -> None:
    request = register_request(W)
    for module, tokens in (("vit", 16), ("vit", 64), ("llm", 64), ("llm", 256)):
        for pass_kind, ms in ((pb.PASS_FORWARD, tokens / 100), (pb.PASS_BACKWARD, tokens / 50)):
            request.calibration.timings.add(module=module, tokens=tokens, pass_kind=pass_kind, measured_ms=ms)
    response = planner.stub().RegisterJob(request, timeout=60)
    assert response.job_id != job_id and response.placement.pp == W.parallel.pp


def test_concurrent_registrations_of_one_job_agree(planner: ServerProcess) -> None:
    stub = planner.stub()
    request = register_request(W, planning_budget_ms=33.0)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: stub.RegisterJob(request, timeout=60), range(4)))
    assert len({r.SerializeToString(deterministic=True) for r in responses}) == 1


# ---- GetPlan -----------------------------------------------------------------------------------------------


def test_each_rank_gets_its_own_actions_and_the_shared_header(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    b = batch(W, 100)
    responses = [stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=r, batch=b), timeout=30) for r in (0, 1)]
    assert [r.rank_plan.rank for r in responses] == [0, 1]
    assert same_header(responses[0].header, responses[1].header)
    header = responses[0].header
    assert header.job_id == job_id and header.iteration == 100
    assert header.source in (pb.PLAN_SOURCE_SEARCH, pb.PLAN_SOURCE_CACHE) and not responses[0].fallback
    assert header.predicted_makespan_ms > 0
    assert [b.schedule for b in header.baseline_makespans] == ["1f1b"]
    # Together the ranks' action lists form one valid plan (every send meets its receive).
    validate(plan_from_proto(whole_plan(responses)))


def test_an_iteration_is_planned_once_however_many_ranks_ask(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    b = batch(W, 110, seed=7)
    plans_before = sum(planner.sample("pipeweaver_plans_total", source=s) for s in ("search", "cache", "fallback"))
    dedup_before = planner.sample("pipeweaver_plan_requests_deduplicated_total")
    with ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(
                lambda r: stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=r % 2, batch=b), timeout=30), range(6)
            )
        )
    assert all(same_header(r.header, responses[0].header) for r in responses)
    plans_after = sum(planner.sample("pipeweaver_plans_total", source=s) for s in ("search", "cache", "fallback"))
    assert plans_after - plans_before == 1
    assert planner.sample("pipeweaver_plan_requests_deduplicated_total") - dedup_before == 5


def test_a_repeated_batch_signature_is_served_from_the_plan_cache(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    first = batch(W, 120, seed=11)
    hits_before = planner.sample("pipeweaver_plan_cache_lookups_total", result="hit")
    a = stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=first), timeout=30)
    repeat = pb.BatchMetadata()
    repeat.CopyFrom(first)
    repeat.iteration = 121  # same microbatches, later iteration: same signature
    b = stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=repeat), timeout=30)
    assert a.header.source == pb.PLAN_SOURCE_SEARCH
    assert b.header.source == pb.PLAN_SOURCE_CACHE and b.header.iteration == 121 and not b.fallback
    assert b.rank_plan == a.rank_plan
    assert planner.sample("pipeweaver_plan_cache_lookups_total", result="hit") - hits_before == 1

    different = batch(W, 122, seed=12)
    c = stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=different), timeout=30)
    assert c.header.source == pb.PLAN_SOURCE_SEARCH


def test_an_equal_batch_in_flight_shares_the_running_search(planner: ServerProcess, job_id: str) -> None:
    """Two iterations (or replicas) with equal shapes asked at once: one search, the other served its plan."""
    stub = planner.stub()
    first = batch(W, 140, seed=21)
    twin = pb.BatchMetadata()
    twin.CopyFrom(first)
    twin.iteration = 141
    searches_before = planner.sample("pipeweaver_plans_total", source="search")
    shared_before = planner.sample("pipeweaver_plan_cache_lookups_total", result="in_flight")
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(
            lambda m: stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=1, batch=m), timeout=30), (first, twin)
        )
    assert planner.sample("pipeweaver_plans_total", source="search") - searches_before == 1
    # The second request arrives while the first search runs (shared) or after it (a plain cache hit).
    assert {a.header.source, b.header.source} == {pb.PLAN_SOURCE_SEARCH, pb.PLAN_SOURCE_CACHE}
    assert (a.header.iteration, b.header.iteration) == (140, 141)
    assert a.rank_plan == b.rank_plan and not a.fallback and not b.fallback
    assert planner.sample("pipeweaver_plan_cache_lookups_total", result="in_flight") - shared_before <= 1


def test_a_new_streamed_batch_is_searched_from_before_its_checks(planner: ServerProcess, job_id: str) -> None:
    """The first request of an iteration with new contents submits its search as soon as its identity is read
    (`Planning.start_early`); the checks and the digest follow while the worker starts."""
    stub = planner.stub()
    used_before = planner.sample("pipeweaver_early_searches_total", result="used")
    searches_before = planner.sample("pipeweaver_plans_total", source="search")
    (answer,) = stub.StreamPlans(iter(stream_requests(job_id, 0, [batch(W, 150, seed=61)])), timeout=60)
    assert answer.header.source == pb.PLAN_SOURCE_SEARCH and not answer.fallback
    assert answer.header.iteration == 150 and answer.rank_plan.rank == 0
    assert planner.sample("pipeweaver_early_searches_total", result="used") - used_before == 1
    assert planner.sample("pipeweaver_plans_total", source="search") - searches_before == 1


def test_an_early_search_is_cancelled_when_its_plan_was_cached_after_all(planner: ServerProcess, job_id: str) -> None:
    """Contents planned before but not yet seen as these bytes on a stream (here: through GetPlan): the early
    search is cancelled once the digest finds the cached plan, and the answer is the cache's."""
    stub = planner.stub()
    first = batch(W, 152, seed=62)
    assert stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=first), timeout=60).header.source == (
        pb.PLAN_SOURCE_SEARCH
    )
    again = pb.BatchMetadata()
    again.CopyFrom(first)
    again.iteration = 153
    cancelled_before = planner.sample("pipeweaver_early_searches_total", result="cancelled")
    searches_before = planner.sample("pipeweaver_plans_total", source="search")
    (answer,) = stub.StreamPlans(iter(stream_requests(job_id, 1, [again])), timeout=60)
    assert answer.header.source == pb.PLAN_SOURCE_CACHE and answer.header.iteration == 153
    assert planner.sample("pipeweaver_early_searches_total", result="cancelled") - cancelled_before == 1
    assert planner.sample("pipeweaver_plans_total", source="search") == searches_before


def test_an_early_search_is_cancelled_when_its_request_fails_the_checks(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    bad = batch(W, 154, seed=63)
    del bad.microbatches[1].documents[:]
    cancelled_before = planner.sample("pipeweaver_early_searches_total", result="cancelled")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamPlans(iter(stream_requests(job_id, 0, [bad])), timeout=60))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(info.value)] == ["batch.microbatches[1].documents"]
    assert planner.sample("pipeweaver_early_searches_total", result="cancelled") - cancelled_before == 1
    # The iteration was not taken by the failed request: a good batch for it is planned as usual.
    (answer,) = stub.StreamPlans(iter(stream_requests(job_id, 0, [batch(W, 154, seed=64)])), timeout=60)
    assert answer.header.iteration == 154 and not answer.fallback


def test_ranks_that_disagree_on_an_iterations_batch_are_refused(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=batch(W, 130, seed=1)), timeout=30)
    other = batch(W, 130, seed=2)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=1, batch=other), timeout=30)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION


# ---- StreamPlans -------------------------------------------------------------------------------------------


def test_streams_answer_every_iteration_for_every_rank(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    batches = [batch(W, it, seed=3) for it in range(200, 205)]

    def run(rank: int) -> dict[int, Any]:
        responses = stub.StreamPlans(iter(stream_requests(job_id, rank, batches)), timeout=60)
        return {r.header.iteration: r for r in responses}

    with ThreadPoolExecutor(2) as pool:
        by_rank = list(pool.map(run, (0, 1)))
    for it in range(200, 205):
        r0, r1 = by_rank[0][it], by_rank[1][it]
        assert r0.rank_plan.rank == 0 and r1.rank_plan.rank == 1
        assert same_header(r0.header, r1.header)
        validate(plan_from_proto(whole_plan([r0, r1])))


def test_streamed_answers_carry_predicted_times_only_when_asked(planner: ServerProcess, job_id: str) -> None:
    """A streamed answer leaves the rank's predicted action times out (a third of its bytes) unless the request
    asks; asked, they are GetPlan's, one per action; the actions are the same either way."""
    stub = planner.stub()
    b = batch(W, 230, seed=4)
    plain = next(iter(stub.StreamPlans(iter(stream_requests(job_id, 1, [b])), timeout=60)))
    timed = next(iter(stub.StreamPlans(iter(stream_requests(job_id, 1, [b], predicted_timings=True)), timeout=60)))
    unary = stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=1, batch=b), timeout=60)
    assert plain.header.source == timed.header.source == pb.PLAN_SOURCE_SEARCH  # one entry: the same plan
    assert plain.rank_plan.HasField("packed")  # the service sends the actions in columns
    assert plain.rank_plan.packed == timed.rank_plan.packed == unary.rank_plan.packed
    assert not plain.rank_plan.predicted_start_ms and not plain.rank_plan.predicted_end_ms
    n = wire.action_count(unary.rank_plan)
    assert len(unary.rank_plan.predicted_start_ms) == len(unary.rank_plan.predicted_end_ms) == n > 0
    assert list(timed.rank_plan.predicted_start_ms) == list(unary.rank_plan.predicted_start_ms)
    assert list(timed.rank_plan.predicted_end_ms) == list(unary.rank_plan.predicted_end_ms)
    assert plain.ByteSize() < timed.ByteSize()


# ---- deadlines ---------------------------------------------------------------------------------------------


def test_a_deadline_shorter_than_the_budget_still_gets_a_searched_plan(planner: ServerProcess) -> None:
    stub = planner.stub()
    slow = stub.RegisterJob(register_request(W, planning_budget_ms=20_000.0), timeout=60).job_id
    builds = {"name": "pipeweaver_worker_task_seconds_count", "lane": "control", "task": "fallback"}
    builds_before = planner.sample(**builds)
    started = time.monotonic()
    r = stub.GetPlan(pb.GetPlanRequest(job_id=slow, rank=0, batch=batch(W, 300, seed=5)), timeout=3.0)
    assert time.monotonic() - started < 3.0
    assert not r.fallback and r.header.source == pb.PLAN_SOURCE_SEARCH
    # The deadline cut the search short, so its fallback was built at once, in case (and not served).
    assert planner.sample(**builds) - builds_before == 1


def test_no_plan_by_the_deadline_means_the_flagged_fallback(planner: ServerProcess) -> None:
    stub = planner.stub()
    busy = stub.RegisterJob(register_request(W, planning_budget_ms=4_000.0), timeout=60).job_id
    fallbacks_before = planner.sample("pipeweaver_fallback_plans_total", reason="deadline")
    with ThreadPoolExecutor(1) as pool:
        # Keep the only search worker busy for seconds...
        long_search = pool.submit(
            stub.GetPlan, pb.GetPlanRequest(job_id=busy, rank=0, batch=batch(W, 400, seed=6)), timeout=60
        )
        time.sleep(0.5)
        # ...so this request's search cannot even start before its deadline.
        r = stub.GetPlan(pb.GetPlanRequest(job_id=busy, rank=1, batch=batch(W, 401, seed=6)), timeout=1.5)
        assert r.fallback and r.header.source == pb.PLAN_SOURCE_FALLBACK and r.rank_plan.rank == 1
        # The fallback is now *the* plan of that iteration: the other rank gets it too.
        r0 = stub.GetPlan(pb.GetPlanRequest(job_id=busy, rank=0, batch=batch(W, 401, seed=6)), timeout=30)
        assert r0.fallback and same_header(r0.header, r.header)
        validate(plan_from_proto(whole_plan([r0, r])))
        assert not long_search.result().fallback
    assert planner.sample("pipeweaver_fallback_plans_total", reason="deadline") - fallbacks_before == 1


def test_a_rank_that_goes_away_takes_its_deadline_with_it(planner: ServerProcess) -> None:
    """The earliest deadline among the requests waiting for an iteration decides when its fallback starts; once
    that request is gone, the deadlines of those still waiting do."""
    stub = planner.stub()
    job = stub.RegisterJob(register_request(W, planning_budget_ms=2_000.0), timeout=60).job_id
    b = batch(W, 450, seed=8)
    patient = stub.GetPlan.future(pb.GetPlanRequest(job_id=job, rank=1, batch=b), timeout=30)
    time.sleep(0.3)  # its 2 s search is running
    # Were it to stay, this rank's deadline would make the iteration fall back after about 1.4 s.
    hasty = stub.GetPlan.future(pb.GetPlanRequest(job_id=job, rank=0, batch=b), timeout=1.5)
    time.sleep(0.3)
    hasty.cancel()
    r = patient.result()
    assert not r.fallback and r.header.source == pb.PLAN_SOURCE_SEARCH


def test_equal_batches_that_fall_back_share_one_fallback_build(planner: ServerProcess) -> None:
    """Fallbacks depend on the shapes only: replicas (here: iterations) with equal batches share one build."""
    stub = planner.stub()
    # A fresh job reserves its prior worker overhead and fallback time (360 ms) before a deadline, so with 300 ms
    # left no search starts: each request falls back at once.
    job = stub.RegisterJob(register_request(W, planning_budget_ms=55.0), timeout=60).job_id
    builds = {"name": "pipeweaver_worker_task_seconds_count", "lane": "control", "task": "fallback"}
    builds_before = planner.sample(**builds)
    first = batch(W, 501, seed=9)
    twins = []
    for iteration in (501, 502, 503):
        twin = pb.BatchMetadata()
        twin.CopyFrom(first)
        twin.iteration = iteration
        twins.append(twin)
    with ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(lambda m: stub.GetPlan(pb.GetPlanRequest(job_id=job, rank=0, batch=m), timeout=0.3), twins)
        )
    assert all(a.fallback for a in answers), [(a.header.iteration, a.header.source) for a in answers]
    assert [a.header.iteration for a in answers] == [501, 502, 503]
    assert all(a.rank_plan == answers[0].rank_plan for a in answers)
    assert planner.sample(**builds) - builds_before == 1


# ---- ReportTimings -----------------------------------------------------------------------------------------


def test_per_action_timings_refit_the_stage_costs_of_the_module_and_pass_they_measure(
    planner: ServerProcess, tmp_path: Path
) -> None:
    """Measured stage times teach the service per (module, pass), relative to the rank's other stages: the language
    model's forwards measured at twice their prediction (the rest as predicted) shift the job's stage costs
    towards them (seen through Simulate of a baseline on the job: each rank's busy time), once per (iteration,
    rank); reports whose actions overlap are not per-action times and teach nothing. Off by default (the module's
    server): the same reports leave the costs alone there."""
    refitting = start_server(tmp_path, "--budget-ms", "100", "--stage-refit", "true")
    try:
        moved = _stage_refit_moves_costs(refitting)
    finally:
        assert refitting.stop() == 0, refitting.log()
    assert moved
    assert not _stage_refit_moves_costs(planner)


def _stage_refit_moves_costs(server: ServerProcess) -> bool:
    """Report llm forwards at 2x their prediction; whether a baseline's simulated busy times moved (asserting the
    junk and repeated reports teach nothing)."""
    stub = server.stub()
    jid = stub.RegisterJob(register_request(W, planning_budget_ms=41.0), timeout=60).job_id  # a job of its own
    probe = batch(W, 700, seed=9)

    def simulated() -> tuple[float, ...]:
        got = stub.Simulate(pb.SimulateRequest(job_id=jid, batch=probe, schedule="1f1b"), timeout=60)
        return (got.makespan_ms, *got.busy_ms)

    before = simulated()
    it = 701
    b = batch(W, it, seed=9)
    plans = [stub.GetPlan(pb.GetPlanRequest(job_id=jid, rank=r, batch=b), timeout=30) for r in (0, 1)]
    assert plans[0].header.source == pb.PLAN_SOURCE_SEARCH

    def report(rank: int, stretch: float, overlap: bool = False) -> None:
        rp = wire.rank_plan_from_proto(plans[rank].rank_plan)
        starts, ends, t = [], [], 0.0
        for action, (s, e) in zip(rp.actions, rp.predicted_ms, strict=True):
            stage = action.stage if isinstance(action, Compute) else None
            slow = stage is not None and stage.pipeline == "llm" and stage.pass_ is Pass.F
            d = (e - s) * (stretch if slow else 1.0)
            starts.append(0.0 if overlap else t)
            ends.append((0.0 if overlap else t) + d + (10.0 if overlap else 0.0))
            t += d
        stub.ReportTimings(
            pb.ReportTimingsRequest(
                job_id=jid, iteration=it, rank=rank, measured_start_ms=starts, measured_end_ms=ends,
                measured_iteration_ms=t,
            ),
            timeout=10,
        )  # fmt: skip

    report(0, 2.0, overlap=True)  # every action [0, d + 10 ms): not a timeline, ignored
    assert simulated() == pytest.approx(before, rel=1e-9)
    report(0, 2.0)
    report(1, 2.0)
    after = simulated()
    report(0, 2.0)  # the same (iteration, rank) again: folded once
    assert simulated() == pytest.approx(after, rel=1e-9)
    # 1F1B's two ranks hold different shares of the language model's forward: their busy times move apart.
    return abs(after[1] / after[2] - before[1] / before[2]) > 0.01 * before[1] / before[2]


def test_timing_reports_refit_the_predictions_and_export_the_error(planner: ServerProcess) -> None:
    stub = planner.stub()
    jid = stub.RegisterJob(register_request(W, planning_budget_ms=40.0), timeout=60).job_id
    count_before = planner.sample("pipeweaver_prediction_error_ratio_count")
    slowdown, alpha = 1.5, 0.3  # the hardware is 1.5x slower than modelled; the server's refit is an EWMA
    scale, errors = 1.0, []
    for it in range(500, 506):
        b = batch(W, it, seed=8)
        plans = [stub.GetPlan(pb.GetPlanRequest(job_id=jid, rank=r, batch=b), timeout=30) for r in (0, 1)]
        served = plans[0].header.predicted_makespan_ms
        assert served > 0 and plans[0].header.source == pb.PLAN_SOURCE_SEARCH
        measured = slowdown * served / scale  # served = unscaled prediction x the refit's current scale
        reports = []
        for r in (0, 1):  # every rank reports; the refit counts the iteration once
            n = wire.action_count(plans[r].rank_plan)
            request = pb.ReportTimingsRequest(
                job_id=jid,
                iteration=it,
                rank=r,
                measured_start_ms=[0.0] * n,
                measured_end_ms=[measured] * n,
                measured_iteration_ms=measured,
            )
            reports.append(stub.ReportTimings(request, timeout=10))
        assert math.isclose(reports[0].iteration_error, abs(served - measured) / measured, rel_tol=1e-6)
        assert math.isclose(reports[1].iteration_error, reports[0].iteration_error, rel_tol=1e-9)
        errors.append(reports[0].iteration_error)
        scale = (1 - alpha) * scale + alpha * slowdown
    assert math.isclose(errors[0], 1 / 3, rel_tol=1e-6)  # |p - 1.5p| / 1.5p before any refit
    assert errors[-1] < errors[0] / 3, errors  # the refit has learned most of the 1.5x
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert planner.sample("pipeweaver_prediction_error_ratio_count") - count_before == 6  # once per iteration

    with pytest.raises(grpc.RpcError) as info:  # a report that does not match the plan served to that rank
        stub.ReportTimings(
            pb.ReportTimingsRequest(job_id=jid, iteration=505, rank=0, measured_start_ms=[0.0], measured_end_ms=[1.0]),
            timeout=10,
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# ---- Simulate ----------------------------------------------------------------------------------------------


def test_simulate_a_baseline_on_a_registered_job_and_an_inline_spec(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    b = batch(W, 0, seed=9)
    r = stub.Simulate(pb.SimulateRequest(job_id=job_id, batch=b, schedule="interleaved_1f1b"), timeout=60)
    assert r.makespan_ms > 0 and 0 <= r.bubble_fraction < 1 and len(r.busy_ms) == W.parallel.pp
    spec = pb.JobSpec(
        model=register_request(W).model, parallel=register_request(W).parallel, hardware=register_request(W).hardware
    )
    inline = stub.Simulate(pb.SimulateRequest(spec=spec, batch=b, schedule="1f1b"), timeout=60)
    assert inline.makespan_ms > 0
    searched = stub.Simulate(pb.SimulateRequest(job_id=job_id, batch=b, schedule="pipeweaver"), timeout=60)
    assert searched.makespan_ms > 0

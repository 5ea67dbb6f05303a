"""Job ids, the batch digest behind the plan cache, the plan window and the online refit (no server needed)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver.server import jobs, work
from pipeweaver.server.jobs import JobRegistry, JobState, PlanEntry, Served, SharedPlan, batch_digest, job_id_for
from pipeweaver.spec import BatchMetadata
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.wire import batch_to_proto
from tests.server.harness import tiny_workload
from tests.strategies import batch_metadata

W = tiny_workload()
SPEC = work.JobSpec(model=W.model, parallel=W.parallel, hardware=W.hardware)


def test_job_ids_are_stable_and_follow_the_spec() -> None:
    assert job_id_for(SPEC, 50.0) == job_id_for(
        work.JobSpec(model=W.model, parallel=W.parallel, hardware=W.hardware), 50
    )
    assert job_id_for(SPEC, 50.0) != job_id_for(SPEC, 60.0)
    assert job_id_for(SPEC, 50.0) != job_id_for(replace(SPEC, parallel=replace(W.parallel, microbatches=9)), 50.0)
    calibrated = replace(SPEC, calibration=(work.LayerTiming("vit", 16, work.Pass.F, 1.0),))
    assert job_id_for(SPEC, 50.0) != job_id_for(calibrated, 50.0)
    assert job_id_for(SPEC, 50.0) != job_id_for(replace(SPEC, offload=True), 50.0)
    # The baselines compared against are a server setting, not part of what the job is.
    assert job_id_for(SPEC, 50.0) == job_id_for(replace(SPEC, compare_baselines=("zb-h1",)), 50.0)


@settings(max_examples=60, deadline=None)
@given(batch_metadata(), batch_metadata())
def test_the_digest_is_equal_exactly_when_the_signature_is(a: BatchMetadata, b: BatchMetadata) -> None:
    same_signature = a.signature() == b.signature()
    assert (batch_digest(batch_to_proto(a)) == batch_digest(batch_to_proto(b))) == same_signature


@settings(max_examples=30, deadline=None)
@given(batch_metadata(), st.integers(0, 1 << 30), st.integers(0, 64))
def test_the_digest_ignores_iteration_and_replica(a: BatchMetadata, iteration: int, replica: int) -> None:
    moved = replace(a, iteration=iteration, dp_replica=replica)
    assert batch_digest(batch_to_proto(a)) == batch_digest(batch_to_proto(moved))


@settings(max_examples=20, deadline=None)
@given(batch_metadata(), st.integers(0, 1 << 30), st.integers(0, 64))
def test_the_digest_leaves_the_request_as_it_was(a: BatchMetadata, iteration: int, replica: int) -> None:
    msg = batch_to_proto(replace(a, iteration=iteration, dp_replica=replica))
    before = msg.SerializeToString(deterministic=True)
    batch_digest(msg)
    assert msg.SerializeToString(deterministic=True) == before


def test_a_served_plan_answers_each_rank_with_its_own_identity() -> None:
    """Pre-serialized answers (shared bytes + identity) parse to exactly the message built field by field, for
    the identity of the iteration served, zero values included (proto3 does not write them)."""
    plan = _plan(12.5).plan
    plan.header.job_id, plan.header.schedule = "job-x", "pipeweaver"
    plan.header.iteration, plan.header.dp_replica, plan.header.source = 9, 3, pb.PLAN_SOURCE_SEARCH
    shared = SharedPlan.of(plan)

    async def entry_of_iteration_0() -> PlanEntry:
        return PlanEntry(0, 0, b"d", b"")

    entry = asyncio.run(entry_of_iteration_0())
    for served in (
        Served(shared, "search", 9, 3, 12.5, search_ms=40.0),
        Served(shared, "search", 9, 3, 12.5).reissued(entry),  # cache hit: iteration 0, replica 0
        Served(shared, "fallback", 4, 1),
    ):
        for rank in (0, 1):
            want = pb.StreamPlansResponse(
                header=plan.header, rank_plan=plan.ranks[rank], fallback=served.fallback, search_ms=served.search_ms
            )
            want.header.iteration, want.header.dp_replica = served.iteration, served.replica
            want.header.source = {"search": 1, "cache": 2, "fallback": 3}[served.source]
            for cls in (pb.StreamPlansResponse, pb.GetPlanResponse):
                got = cls.FromString(served.response_bytes(rank))
                assert got.SerializeToString(deterministic=True) == cls.FromString(
                    want.SerializeToString()
                ).SerializeToString(deterministic=True)
    assert plan.header.iteration == 9 and plan.header.source == pb.PLAN_SOURCE_SEARCH  # never mutated


def _state() -> JobState:
    job = work.Job("job-x", SPEC)
    return JobState(job, pb.RegisterJobResponse(job_id="job-x"), budget_ms=50.0, plan_window=4, plan_cache_size=2)


def _plan(predicted_ms: float, actions: int = 3) -> SharedPlan:
    plan = pb.Plan(header=pb.PlanHeader(predicted_makespan_ms=predicted_ms))
    for r in range(2):
        plan.ranks.add(rank=r, actions=[pb.Action(wait=pb.Wait(handle=i)) for i in range(actions)])
    return SharedPlan.of(plan)


def test_an_entry_resolves_once_and_the_window_keeps_the_latest_iterations() -> None:
    async def main() -> None:
        job = _state()
        entries = [PlanEntry(0, it, b"d", b"") for it in range(6)]
        for e in entries:
            job.add_entry(e)
        assert job.entry(0, 0) is None and job.entry(0, 1) is None and job.entry(0, 5) is entries[5]
        e = entries[5]
        assert e.resolve(Served(_plan(10.0), "search", 5, 0, 10.0))
        assert not e.resolve(Served(_plan(99.0), "fallback", 5, 0))
        assert e.served() is not None and e.served().source == "search"  # type: ignore[union-attr]
        job.drop(e)
        assert job.entry(0, 5) is None

    asyncio.run(main())


def test_the_plan_cache_keeps_the_most_recently_used() -> None:
    job = _state()
    for key in (b"a", b"b"):
        job.remember(key, _plan(1.0), 1.0)
    assert job.cached(b"a") is not None  # a is now the most recent
    job.remember(b"c", _plan(1.0), 1.0)
    assert job.cached(b"b") is None and job.cached(b"a") is not None and job.cached(b"c") is not None


def test_known_contents_are_forgotten_past_either_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "KNOWN_CONTENTS", 3)
    monkeypatch.setattr(jobs, "KNOWN_CONTENTS_BYTES", 10)
    job = _state()
    for contents in (b"aaa", b"bbb"):
        job.remember_contents(contents, b"digest of " + contents)
    assert job.known_contents(b"aaa") == b"digest of aaa"  # a is now the most recent
    job.remember_contents(b"ccc", b"digest of ccc")
    job.remember_contents(b"dddddd", b"digest of dddddd")  # 15 bytes: b, then a go
    assert [job.known_contents(c) is not None for c in (b"aaa", b"bbb", b"ccc", b"dddddd")] == [0, 0, 1, 1]
    job.remember_contents(b"e", b"digest of e")
    job.remember_contents(b"f", b"digest of f")  # 4 contents: c goes
    assert [job.known_contents(c) is not None for c in (b"ccc", b"dddddd", b"e", b"f")] == [0, 1, 1, 1]
    job.remember_contents(b"x" * 11, b"too big")  # larger than the whole budget: never kept
    assert job.known_contents(b"x" * 11) is None and job.known_contents(b"dddddd") is not None


def test_the_refit_learns_the_measured_ratio_once_per_iteration() -> None:
    async def main() -> None:
        job = _state()
        entry = PlanEntry(0, 7, b"d", b"")
        job.add_entry(entry)
        entry.resolve(Served(_plan(100.0), "search", 7, 0, raw_predicted_ms=100.0))
        error, mean, folded = job.fold_report(7, 200.0)
        assert folded and math.isclose(error, 0.5) and math.isclose(mean, 0.5)
        assert math.isclose(job.time_scale, 0.7 + 0.3 * 2.0)
        again = job.fold_report(7, 200.0)  # another rank's report of the same iteration
        assert not again[2] and math.isclose(job.time_scale, 0.7 + 0.3 * 2.0)
        unknown = job.fold_report(8, 200.0)
        assert math.isnan(unknown[0]) and not unknown[2]

    asyncio.run(main())


def test_concurrent_registrations_share_one_creation() -> None:
    async def main() -> None:
        registry = JobRegistry(max_jobs=1)
        calls = 0

        async def create() -> JobState:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            return _state()

        first, second = await asyncio.gather(registry.register("job-x", create), registry.register("job-x", create))
        assert first is second and calls == 1 and registry.get("job-x") is first
        await registry.register("job-y", create)
        assert registry.get("job-x") is None and len(registry) == 1  # least recently used forgotten

    asyncio.run(main())


def test_a_reserve_inflated_by_one_slow_search_recovers() -> None:
    """Only searches refresh the overhead estimate; if an outlier makes every iteration fall back, the estimate
    must still come down, or the job would never search again."""
    job = _state()
    job.record_overhead(worker_ms=300.0, budget_ms=100.0)
    job.record_overhead(worker_ms=20_100.0, budget_ms=100.0)  # a cold start
    assert job.overhead_ms == 20_000.0
    job.note_reserve_fallback()
    job.note_reserve_fallback()
    assert job.overhead_ms == 20_000.0  # one or two fallbacks in a row may be real
    job.note_reserve_fallback()
    assert job.overhead_ms == 200.0
    job.record_fallback(5_000.0)
    for _ in range(3):
        job.note_reserve_fallback()
    assert job.fallback_ms == 100.0  # back to the prior once the outlier is forgotten
    for ms in (400.0, 450.0, 420.0, 4_000.0):
        job.record_fallback(ms)
    for _ in range(3):
        job.note_reserve_fallback()
    assert job.fallback_ms == 450.0  # the outlier goes
    for _ in range(6):
        job.note_reserve_fallback()
    assert job.fallback_ms == 450.0  # typical fallback times stay: they are what the next deadline needs


def test_a_cold_first_search_does_not_set_the_reserve_once_a_warm_one_is_measured() -> None:
    """A worker's first search for a job fills its caches; its overhead stands in only until a warm search."""
    job = _state()
    assert job.overhead_ms == 250.0  # the prior
    job.record_overhead(worker_ms=3_100.0, budget_ms=100.0, first_search=True)
    assert job.overhead_ms == 3_000.0  # nothing better known yet
    job.record_overhead(worker_ms=160.0, budget_ms=100.0)
    assert job.overhead_ms == 60.0
    job.record_overhead(worker_ms=2_100.0, budget_ms=100.0, first_search=True)  # another worker's first
    assert job.overhead_ms == 60.0

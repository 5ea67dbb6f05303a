"""The worker tasks, run in this process: partition, search, fallback, rejection, expiry, the refit's scale."""

from __future__ import annotations

import math
import pickle
import time

import pytest

from pipeweaver import wire
from pipeweaver.plan.ir import Pass, PlanSource
from pipeweaver.server import work
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.wire import plan_from_proto
from tests.server.harness import batch, tiny_workload

W = tiny_workload()
SPEC = work.JobSpec(model=W.model, parallel=W.parallel, hardware=W.hardware, compare_baselines=("1f1b",))


@pytest.fixture(scope="module")
def job() -> work.Job:
    registered = work.register_job(work.Job("job-work", SPEC))
    assert isinstance(registered, work.Registered)
    assert pb.Placement.FromString(registered.placement).pp == W.parallel.pp
    return work.Job("job-work", SPEC, registered.partition)


def test_a_search_and_its_scaled_predictions(job: work.Job) -> None:
    data = batch(W, 3).SerializeToString()
    plain = work.plan_batch(work.PlanTask(job, data, "search", 30.0))
    scaled = work.plan_batch(work.PlanTask(job, data, "search", 30.0, time_scale=2.0))
    assert isinstance(plain, work.PlanOutcome) and isinstance(scaled, work.PlanOutcome)
    a, b = (
        plan_from_proto(pb.Plan.FromString(plain.plan.serialized())),
        plan_from_proto(pb.Plan.FromString(scaled.plan.serialized())),
    )
    assert a.header.source is PlanSource.SEARCH and a.header.iteration == 3
    assert math.isclose(scaled.predicted_ms, 2 * scaled.raw_predicted_ms)
    assert math.isclose(b.header.predicted_makespan_ms, 2 * scaled.raw_predicted_ms)
    # Per-action predictions are scaled with the makespan: the last action ends at the scaled makespan.
    assert math.isclose(max(end for rp in b.ranks for _, end in rp.predicted_ms), b.header.predicted_makespan_ms)
    assert set(plain.baseline_ms) == {"1f1b"}


def test_an_encoded_rank_plan_is_its_lean_part_then_its_predicted_times(job: work.Job) -> None:
    """The parts a streamed answer is built from: each rank's actions without predicted times, and the times
    alone; together, the rank's whole `RankPlan`. The actions travel packed (`PackedActions`)."""
    outcome = work.plan_batch(work.PlanTask(job, batch(W, 4).SerializeToString(), "search", 30.0))
    assert isinstance(outcome, work.PlanOutcome)
    whole = pb.Plan.FromString(outcome.plan.serialized())
    encoded = work.EncodedPlan.of(whole)
    for rp, lean, times, count in zip(whole.ranks, encoded.lean, encoded.timings, encoded.actions, strict=True):
        assert rp.HasField("packed") and not rp.actions
        assert pb.RankPlan.FromString(encoded.rank_plan(rp.rank)) == rp == pb.RankPlan.FromString(lean + times)
        bare = pb.RankPlan.FromString(lean)
        assert bare.packed == rp.packed and bare.rank == rp.rank
        assert not bare.predicted_start_ms and not bare.predicted_end_ms
        assert len(pb.RankPlan.FromString(times).predicted_end_ms) == count == len(rp.packed.kinds) > 0
        decoded = wire.rank_plan_from_proto(rp)
        assert len(decoded.actions) == count and len(decoded.predicted_ms) == count


def test_the_fallback_is_built_on_the_registered_placement(job: work.Job) -> None:
    out = work.plan_batch(work.PlanTask(job, batch(W, 4).SerializeToString(), "fallback", 0.0))
    assert isinstance(out, work.PlanOutcome)
    plan = plan_from_proto(pb.Plan.FromString(out.plan.serialized()))
    assert plan.header.source is PlanSource.FALLBACK
    assert job.partition is not None and plan.header.placement == job.partition.placement


def test_a_bad_batch_is_rejected_with_its_field_path(job: work.Job) -> None:
    bad = batch(W, 5)
    bad.microbatches[2].documents[0].media.add(modality=pb.MODALITY_IMAGE, tokens=-3)
    out = work.plan_batch(work.PlanTask(job, bad.SerializeToString(), "search", 30.0))
    assert isinstance(out, work.Rejected)
    assert [v.field for v in out.violations] == ["batch.microbatches[2].documents[0].media[0]"]


def test_a_task_that_waited_past_its_deadline_expires(job: work.Job) -> None:
    task = work.PlanTask(job, batch(W, 6).SerializeToString(), "search", 30.0, deadline=time.monotonic() - 1)
    assert isinstance(work.plan_batch(task), work.Expired)


def test_a_model_that_does_not_fit_is_a_failed_precondition() -> None:
    from dataclasses import replace

    tiny_memory = replace(W.hardware, memory_bytes=1e3)
    out = work.register_job(work.Job("job-small", replace(SPEC, hardware=tiny_memory)))
    assert isinstance(out, work.Rejected) and out.precondition


def test_simulate_a_baseline(job: work.Job) -> None:
    out = work.simulate(work.SimulateTask(job, batch(W, 7).SerializeToString(), "1f1b"))
    assert isinstance(out, work.SimulateOutcome)
    assert out.makespan_ms > 0 and len(out.busy_ms) == W.parallel.pp


def test_a_calibration_profile_changes_the_cost_model(job: work.Job) -> None:
    rows = tuple(
        work.LayerTiming(module, tokens, pass_, ms)
        for module, tokens, pass_, ms in [
            ("vit", 16, Pass.F, 0.2), ("vit", 64, Pass.F, 0.5), ("vit", 256, Pass.F, 1.6),
            ("vit", 16, Pass.B, 0.4), ("vit", 64, Pass.B, 1.0), ("vit", 256, Pass.B, 3.3),
            ("llm", 64, Pass.F, 0.3), ("llm", 128, Pass.F, 0.6), ("llm", 256, Pass.F, 1.2),
            ("llm", 64, Pass.B, 0.6), ("llm", 128, Pass.B, 1.2), ("llm", 256, Pass.B, 2.5),
        ]
    )  # fmt: skip
    spec = work.JobSpec(model=W.model, parallel=W.parallel, hardware=W.hardware, calibration=rows)
    registered = work.register_job(work.Job("job-calibrated", spec))
    assert isinstance(registered, work.Registered)
    calibrated = work.Job("job-calibrated", spec, registered.partition)
    data = batch(W, 8).SerializeToString()
    a = work.plan_batch(work.PlanTask(job, data, "search", 30.0))
    b = work.plan_batch(work.PlanTask(calibrated, data, "search", 30.0))
    assert isinstance(a, work.PlanOutcome) and isinstance(b, work.PlanOutcome)
    assert not math.isclose(a.raw_predicted_ms, b.raw_predicted_ms, rel_tol=0.05)


def test_warming_a_worker_for_a_job_plans_one_heavy_batch_and_marks_the_job_searched() -> None:
    job_id = "job-warm"
    registered = work.register_job(work.Job(job_id, SPEC))
    assert isinstance(registered, work.Registered)
    job = work.Job(job_id, SPEC, registered.partition)
    work._planners.pop(job_id, None)  # as on a search worker that has not seen the job
    work._searched.discard(job_id)
    out = work.warm_job(work.WarmJobTask(job, "search", 30.0, 0.0))
    assert isinstance(out, work.WarmJobOutcome)
    assert out.mode == "search" and out.worker_ms > 0 and out.setup_ms > 0
    assert job_id in work._planners
    # The job's first real search in this worker is not a cold one any more (its overhead counts as warm).
    first = work.plan_batch(work.PlanTask(job, batch(W, 6).SerializeToString(), "search", 30.0))
    assert isinstance(first, work.PlanOutcome) and not first.first_search and first.setup_ms == 0.0
    fallback = work.warm_job(work.WarmJobTask(job, "fallback", 0.0, 0.0))
    assert isinstance(fallback, work.WarmJobOutcome) and fallback.mode == "fallback" and fallback.setup_ms < 1.0


def _new_numba_signatures_after_warm_up() -> dict[str, list[str]]:
    """In a fresh process: the worker's warm-up, then a vlm-s job's warm-up (a search whose memory binds, and its
    fallback); returns the pipeweaver kernels that gained a signature in the job's warm-up."""
    import gc
    from dataclasses import replace

    from numba.core.registry import CPUDispatcher

    from pipeweaver.presets import workload

    def signatures() -> dict[str, set[str]]:
        gc.unfreeze()  # the warm-up froze its objects out of the collector, which also hides them from get_objects
        return {
            f"{o.py_func.__module__}.{o.py_func.__name__}": {str(s) for s in o.signatures}
            for o in gc.get_objects()
            if isinstance(o, CPUDispatcher) and o.py_func.__module__.startswith("pipeweaver")
        }

    work.warm_up(0.0)
    before = signatures()
    w = workload("vlm-s")
    spec = work.JobSpec(w.model, replace(w.parallel, dp=2), w.hardware)
    registered = work.register_job(work.Job("job-warm", spec))
    assert isinstance(registered, work.Registered)
    job = work.Job("job-warm", spec, registered.partition)
    for mode in ("search", "fallback"):
        assert isinstance(work.warm_job(work.WarmJobTask(job, mode, 100.0, 0.0)), work.WarmJobOutcome)
    after = signatures()
    return {
        name: sorted(sigs - before.get(name, set())) for name, sigs in after.items() if sigs - before.get(name, set())
    }


def test_the_worker_warm_up_compiles_every_kernel_a_job_needs() -> None:
    # A kernel first compiled in a job's first search costs seconds with an empty numba cache (vlm-s,
    # whose memory program the tiny warm-up plan never reached): the first iterations' plans came late.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        new = pool.apply(_new_numba_signatures_after_warm_up)
    assert new == {}, f"kernels compiled after the worker's warm-up: {new}"


def test_a_job_is_pickled_once_and_unpickled_once_per_worker(job: work.Job) -> None:
    """Every search task carries its job: the specs are pickled on the first task only, and a worker rebuilds
    the job once, handing the same object to the later tasks."""
    first = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    assert job._pickled is not None
    assert pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL) == first
    work._unpickled_jobs.clear()
    a, b = pickle.loads(first), pickle.loads(first)
    assert a == job and a.partition == job.partition and a is b
    # The job's own value decides, not the cache: another spec is another job.
    other = work.Job("job-other", SPEC)
    assert pickle.loads(pickle.dumps(other)) == other != job

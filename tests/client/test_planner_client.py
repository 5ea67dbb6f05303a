"""PlannerClient against the real planner service (a subprocess on a loopback port): registration, plans for four
ranks, streaming, reports, simulations, typed errors, bounded retries, reconnects, and fork safety."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeweaver import presets
from pipeweaver.client import (
    JobRegistration,
    LayerTiming,
    PipelineExecutor,
    PlannerClient,
    PlanReply,
    RetryPolicy,
    assemble_plan_replies,
    profile_layers,
    rpc_failure,
)
from pipeweaver.datagen import dynamic_batch
from pipeweaver.errors import InvalidPlan, PipeWeaverError, PlannerUnavailable, PlanRejected, PlanTimeout
from pipeweaver.plan.ir import Pass, Plan
from pipeweaver.plan.validator import validate
from pipeweaver.spec import ParallelSpec, Workload
from tests.server.harness import ServerProcess, start_server

PP = 4
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.02, max_backoff_s=0.1)


def test_the_executor_side_imports_without_grpc() -> None:
    """GPU images without grpc still run plans: the gRPC side of pipeweaver.client loads on first use."""
    code = (
        "import sys, pipeweaver.client, pipeweaver.client.executor, pipeweaver.client.profiler;"
        "from pipeweaver.client import PipelineExecutor, TimedExecutor, profile_layers;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'ortools', 'numba'));"
        "assert not bad and 'pipeweaver.v1.planner_pb2' not in sys.modules, bad;"
        "from pipeweaver.client import PlannerClient, PlanPrefetcher;"
        "assert 'grpc' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_channel_opens_lazily_and_never_travels_in_a_pickle() -> None:
    client = PlannerClient("127.0.0.1:1", timeout_s=5)
    assert not client.connected
    copy = pickle.loads(pickle.dumps(client))
    assert copy.address == client.address and copy.timeout_s == 5 and not copy.connected
    client.stub()
    assert client.connected
    again = pickle.loads(pickle.dumps(client))
    assert not again.connected  # settings only: the new process opens its own channel
    client.close()
    with pytest.raises(PlannerUnavailable, match="closed"):
        client.stub()


def test_retry_policy_backs_off_exponentially_within_bounds() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, jitter=0.0)
    assert [policy.backoff_s(n) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.backoff_s(1, retry_after_s=0.5) == 0.5
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


# ---- a shared server -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("client"), "--budget-ms", "100")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def workload() -> Workload:
    return presets.tiny_vlm(pp=PP)


@pytest.fixture(scope="module")
def profile(workload: Workload) -> list[LayerTiming]:
    counts = {"vit": (16, 64, 128), "llm": (32, 64, 128)}
    return profile_layers(workload.model, workload.parallel, tokens=counts, repeats=1, warmup=1)


@pytest.fixture(scope="module")
def job(planner: ServerProcess, workload: Workload, profile: list[LayerTiming]) -> JobRegistration:
    with PlannerClient(planner.address) as client:
        return client.register_job(workload.model, workload.parallel, workload.hardware, profile)


def test_profile_rows_cover_every_module_and_pass(profile: list[LayerTiming], workload: Workload) -> None:
    keys = {(t.module, t.tokens, t.pass_) for t in profile}
    for m in ("vit", "llm"):
        for p in (Pass.F, Pass.B):
            assert len([k for k in keys if k[0] == m and k[2] is p]) == 3
    assert all(t.measured_ms > 0 for t in profile)


def test_profiles_time_dit_blocks_against_the_caption_length_the_service_assumes() -> None:
    from pipeweaver.client.profiler import DIT_CONTEXT_TOKENS, default_token_counts
    from pipeweaver.server.work import DIT_CALIBRATION_CONTEXT_TOKENS

    assert DIT_CONTEXT_TOKENS == DIT_CALIBRATION_CONTEXT_TOKENS
    w = presets.tiny_t2v(pp=2)
    assert all(len(c) >= 3 for c in default_token_counts(w.model, w.parallel).values())
    rows = profile_layers(w.model, w.parallel, tokens={"text_encoder": (16, 32), "dit": (32, 64)}, repeats=1)
    assert {(r.module, r.tokens, r.pass_) for r in rows} == {
        (m, n, p) for m, ns in (("text_encoder", (16, 32)), ("dit", (32, 64))) for n in ns for p in (Pass.F, Pass.B)
    }
    with pytest.raises(ValueError, match=r"Pass\.F or Pass\.B"):
        LayerTiming("dit", 8, Pass.W, 1.0)


def test_registration_is_idempotent_and_describes_the_job(
    planner: ServerProcess, workload: Workload, profile: list[LayerTiming], job: JobRegistration
) -> None:
    assert job.job_id.startswith("job-") and job.pp == PP
    assert set(job.sub_microbatch_size) == {"vit", "llm"} == set(job.segments)
    assert len(job.static_memory_bytes) == PP and all(b > 0 for b in job.static_memory_bytes)
    assert {c.rank for c in job.placement.chunks} == set(range(PP))
    with PlannerClient(planner.address) as client:  # another rank registering the same spec
        again = client.register_job(workload.model, workload.parallel, workload.hardware, profile)
        uncalibrated = client.register_job(workload.model, workload.parallel, workload.hardware)
    assert again.job_id == job.job_id and again.placement == job.placement
    assert uncalibrated.job_id != job.job_id  # the calibration is part of what the job is


def test_four_ranks_get_the_same_header_and_their_own_actions(
    planner: ServerProcess, workload: Workload, job: JobRegistration
) -> None:
    batch = dynamic_batch(workload, seed=3, iteration=5)
    replies: dict[int, PlanReply] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:  # each "rank" has its own client and channel, as trainer processes do
        try:
            with PlannerClient(planner.address) as client:
                replies[rank] = client.get_plan(job.job_id, rank, batch, deadline_s=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(PP)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(replies) == list(range(PP))
    headers = {r: replies[r].header for r in range(PP)}
    assert all(h == headers[0] for h in headers.values())
    assert headers[0].job_id == job.job_id and headers[0].iteration == 5
    assert headers[0].placement == job.placement
    assert [replies[r].rank_plan.rank for r in range(PP)] == list(range(PP))
    assert len({replies[r].rank_plan.actions for r in range(PP)}) == PP  # each rank its own list
    assert not replies[0].fallback and headers[0].predicted_makespan_ms > 0
    plan, fallback = assemble_plan_replies([replies[r] for r in (2, 0, 3, 1)])
    assert not fallback and [rp.rank for rp in plan.ranks] == list(range(PP))
    validate(plan)
    for r in range(PP):  # what run_with_fallback checks on each rank before running it
        PipelineExecutor(workload.model, job.placement, r).check(plan, batch)
    # The unary path asked for all ranks at once gives the same plan (one entry per iteration in the service)...
    with PlannerClient(planner.address) as client:
        whole, _ = client.get_full_plan(job, batch, deadline_s=60)
    assert whole == plan
    # ...with the same digest of the bytes it came from, which is what the ranks' vote compares.
    assert plan.wire_digest is not None and whole.wire_digest == plan.wire_digest
    ex = PipelineExecutor(workload.model, job.placement, 0)
    ex.prepare(plan, batch)
    assert ex._accepted(plan, batch).vote_digest() == plan.wire_digest


def test_assembly_refuses_mismatched_or_incomplete_replies(
    planner: ServerProcess, workload: Workload, job: JobRegistration
) -> None:
    with PlannerClient(planner.address) as client:
        a = client.get_plans(job.job_id, range(PP), dynamic_batch(workload, seed=4, iteration=6), 60)
        b = client.get_plans(job.job_id, range(PP), dynamic_batch(workload, seed=4, iteration=7), 60)
    with pytest.raises(InvalidPlan, match="another header"):
        assemble_plan_replies([a[0], b[1], a[2], a[3]])
    # Any other rank plan under the same header gives another digest (the vote would send everyone to fallback).
    plan_a = assemble_plan_replies(a)[0]
    swapped = a[1]._replace(wire_digest=a[2].wire_digest)
    assert assemble_plan_replies([a[0], swapped, a[2], a[3]])[0].wire_digest != plan_a.wire_digest
    # A plan built here (no wire bytes) has none: the vote hashes the object instead.
    assert assemble_plan_replies([r._replace(wire_digest=b"") for r in a])[0].wire_digest is None
    with pytest.raises(InvalidPlan, match="pp=4"):
        assemble_plan_replies(a[:3])


def test_stream_answers_every_rank_of_an_upcoming_iteration(
    planner: ServerProcess, workload: Workload, job: JobRegistration
) -> None:
    with PlannerClient(planner.address) as client:
        stream = client.stream(job.job_id)
        batches = [dynamic_batch(workload, seed=5, iteration=k) for k in (10, 11)]
        for b in batches:
            stream.send(range(PP), b, time.time() + 30)
        for b in batches:
            replies = [stream.result(b.iteration, r, 30) for r in range(PP)]
            plan, _ = assemble_plan_replies(replies)
            assert plan.header.iteration == b.iteration
            PipelineExecutor(workload.model, job.placement, 0).check(plan, b)
        with pytest.raises(PlannerUnavailable, match="no request pending"):
            stream.result(99, 0, 0.1)
        stream.send([0], dynamic_batch(workload, seed=5, iteration=12), time.time() + 30)
        with pytest.raises(PlanTimeout, match="iteration 12"):
            stream.result(12, 0, 0.0)
        stream.close()


def test_report_timings_and_simulate(planner: ServerProcess, workload: Workload, job: JobRegistration) -> None:
    batch = dynamic_batch(workload, seed=6, iteration=20)
    with PlannerClient(planner.address) as client:
        plan, fallback = client.get_full_plan(job, batch, 60)
        assert not fallback
        measured = plan.header.predicted_makespan_ms * 2
        report = client.report_timings(job.job_id, 20, 0, measured)
        assert report.iteration_error == pytest.approx(0.5, rel=1e-6)
        per_action = [(float(i), float(i) + 0.5) for i in range(len(plan.ranks[1].actions))]
        client.report_timings(job.job_id, 20, 1, 0.0, per_action)
        with pytest.raises(PlanRejected, match="measured_start_ms"):
            client.report_timings(job.job_id, 20, 1, 0.0, per_action[:-1])
        by_job = client.simulate(batch, "1f1b", job_id=job.job_id)
        w = workload
        inline = client.simulate(batch, "1f1b", model=w.model, parallel=w.parallel, hardware=w.hardware)
        assert by_job.makespan_ms > 0 and inline.makespan_ms > 0
        assert len(inline.busy_ms) == PP and 0 <= inline.bubble_fraction < 1
        with pytest.raises(PlanRejected, match="unknown schedule"):
            client.simulate(batch, "no-such-schedule", job_id=job.job_id)
        with pytest.raises(ValueError, match="job_id"):
            client.simulate(batch, "1f1b")


# ---- typed errors ------------------------------------------------------------------------------------------------


def test_bad_input_is_plan_rejected_with_the_field_violations(
    planner: ServerProcess, workload: Workload, job: JobRegistration
) -> None:
    batch = dynamic_batch(workload, seed=7, iteration=30)
    with PlannerClient(planner.address, retry=FAST_RETRY) as client:
        with pytest.raises(PlanRejected) as bad_rank:
            client.get_plan(job.job_id, PP + 3, batch, 10)
        failure = rpc_failure(bad_rank.value)
        assert failure is not None and failure.code == "INVALID_ARGUMENT"
        assert ("rank", f"must be a pipeline rank in 0..{PP - 1}, got {PP + 3}") in failure.violations
        assert "field violations: rank: must be a pipeline rank" in str(bad_rank.value)

        with pytest.raises(PlanRejected, match="UNKNOWN_JOB") as unknown:
            client.get_plan("job-does-not-exist", 0, batch, 10)
        failure = rpc_failure(unknown.value)
        assert failure is not None and failure.code == "FAILED_PRECONDITION" and failure.reason == "UNKNOWN_JOB"

        # Two mistakes the dataclasses cannot see alone (pp against the model's layers, a service limit): the
        # service reports both, each under its field path.
        too_deep = ParallelSpec(pp=16, microbatches=100_000, seq_len=256)
        with pytest.raises(PlanRejected) as bad_spec:
            client.register_job(workload.model, too_deep, workload.hardware)
        failure = rpc_failure(bad_spec.value)
        assert failure is not None and failure.code == "INVALID_ARGUMENT"
        fields = {f for f, _ in failure.violations}
        assert {"parallel.pp", "parallel.microbatches"} <= fields, failure.violations
        assert "parallel.pp: pp (16) must not exceed the layers" in str(bad_spec.value)

        with pytest.raises(PlanRejected, match=r"calibration\.timings"):
            client.register_job(
                workload.model, workload.parallel, workload.hardware, [LayerTiming("no_such_module", 8, Pass.F, 1.0)]
            )


def test_a_missed_deadline_is_plan_timeout(planner: ServerProcess, workload: Workload, job: JobRegistration) -> None:
    with PlannerClient(planner.address) as client:
        with pytest.raises(PlanTimeout, match="DEADLINE_EXCEEDED"):
            client.get_plan(job.job_id, 0, dynamic_batch(workload, seed=8, iteration=40), deadline_s=0.002)
        with pytest.raises(PlanTimeout):
            client.get_plan(job.job_id, 0, dynamic_batch(workload, seed=8, iteration=41), deadline_s=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_stopped_server_is_unavailable_and_retries_are_bounded(tmp_path: Path, workload: Workload) -> None:
    port = _free_port()
    server = start_server(tmp_path, "--port", str(port), "--budget-ms", "50")
    address = f"127.0.0.1:{port}"
    client = PlannerClient(address, retry=FAST_RETRY, timeout_s=10)
    try:
        job = client.register_job(workload.model, workload.parallel, workload.hardware)
        batch = dynamic_batch(workload, seed=9, iteration=0)
        client.get_plan(job.job_id, 0, batch, 30)
        assert server.stop() == 0
        start = time.monotonic()
        with pytest.raises(PlannerUnavailable, match="UNAVAILABLE"):
            client.get_plan(job.job_id, 0, batch, 30)
        assert time.monotonic() - start < 3.0  # 3 attempts with at most 0.1 s between them, not the 30 s deadline
        stream = client.stream(job.job_id)
        stream.send([0], batch, time.time() + 5)
        with pytest.raises(PlannerUnavailable):
            stream.result(0, 0, 5)
        with pytest.raises(PlannerUnavailable, match="reconnecting"):  # backing off: no new attempt yet
            stream.send([0], batch, time.time() + 5)

        # The planner comes back on the same address: the same channel reconnects; the restarted planner forgot
        # the job, so the client registers it again (same id, same placement) and plans flow.
        server = start_server(tmp_path, "--port", str(port), "--budget-ms", "50")
        with pytest.raises(PlanRejected, match="UNKNOWN_JOB"):
            client.get_plan(job.job_id, 0, batch, 30)
        threads = threading.active_count()
        for _ in range(12):  # streams the planner ends with an error leave no threads behind
            time.sleep(FAST_RETRY.max_backoff_s * 1.3)
            stream.send([0], batch, time.time() + 5)
            with pytest.raises(PlanRejected, match="UNKNOWN_JOB"):
                stream.result(0, 0, 5)
        time.sleep(0.2)
        assert threading.active_count() <= threads + 1
        again = client.reregister(job)
        assert again.job_id == job.job_id and again.placement == job.placement
        reply = client.get_plan(job.job_id, 0, batch, 30)
        assert reply.header.job_id == job.job_id
    finally:
        client.close()
        server.stop()


def test_an_unreachable_planner_fails_fast_with_planner_unavailable() -> None:
    workload = presets.tiny_vlm(pp=2)
    client = PlannerClient(f"127.0.0.1:{_free_port()}", retry=FAST_RETRY)
    start = time.monotonic()
    with pytest.raises(PlannerUnavailable) as err:
        client.register_job(workload.model, workload.parallel, workload.hardware)
    assert time.monotonic() - start < 3.0
    assert isinstance(err.value, PipeWeaverError)
    client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_touches_the_parents_channel(planner: ServerProcess, job: JobRegistration) -> None:
    client = PlannerClient(planner.address)
    client.simulate(dynamic_batch(presets.tiny_vlm(pp=PP), seed=1, iteration=0), "1f1b", job_id=job.job_id)
    assert client.connected
    pid = os.fork()
    if pid == 0:  # the child: refuse at once, before any gRPC object is touched
        code = 1
        try:
            client.stub()
        except PlannerUnavailable as exc:
            code = 0 if "fork" in str(exc) else 2
        except BaseException:
            code = 3
        try:
            client.close()  # drops the inherited channel without touching it
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.connected  # the parent's channel still works
    client.close()


def test_plans_are_our_dataclasses(planner: ServerProcess, workload: Workload, job: JobRegistration) -> None:
    with PlannerClient(planner.address) as client:
        plan, _ = client.get_full_plan(job, dynamic_batch(workload, seed=2, iteration=50), 60)
    assert isinstance(plan, Plan)
    assert plan == assemble_plan_replies([PlanReply(plan.header, rp, False) for rp in plan.ranks])[0]

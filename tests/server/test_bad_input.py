"""Bad input gets INVALID_ARGUMENT or FAILED_PRECONDITION with google.rpc.BadRequest field paths, and the server
goes on serving everyone else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pipeweaver.v1 import planner_pb2 as pb
from tests.server.harness import (
    SERVICE,
    ServerProcess,
    bad_request,
    batch,
    error_reason,
    register_request,
    stream_requests,
    tiny_workload,
    wait_until,
)

W = tiny_workload()
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def _register(**changes: Any) -> Callable[[str], Any]:
    def build(job_id: str) -> Any:
        req = register_request(W)
        for path, value in changes.items():
            target = req
            *parents, leaf = path.split("__")
            for p in parents:
                target = getattr(target, p)
            if value is None:
                target.ClearField(leaf)
            else:
                setattr(target, leaf, value)
        return req

    return build


def _bad_calibration(module: str, tokens: int, pass_kind: int, ms: float) -> Callable[[str], Any]:
    def build(job_id: str) -> Any:
        req = register_request(W)
        req.calibration.timings.add(module=module, tokens=tokens, pass_kind=pass_kind, measured_ms=ms)
        return req

    return build


def _unspecified_kind() -> Any:
    req = register_request(W)
    req.model.modules[0].kind = pb.LAYER_KIND_UNSPECIFIED
    return req


def _plan(rank: int = 0, **batch_edits: Any) -> Callable[[str], Any]:
    def build(job_id: str) -> Any:
        b = batch(W, 900)
        for edit in batch_edits.values():
            edit(b)
        return pb.GetPlanRequest(job_id=job_id, rank=rank, batch=b)

    return build


def _set_text_tokens(b: Any) -> None:
    b.microbatches[0].documents[0].text_tokens = -5


def _huge_media(b: Any) -> None:
    doc = b.microbatches[0].documents[0]
    doc.media.add(modality=pb.MODALITY_IMAGE, tokens=1 << 30, merged_tokens=4)


def _video_in_a_vlm(b: Any) -> None:
    b.microbatches[0].documents[0].media.add(modality=pb.MODALITY_VIDEO, tokens=64)


def _unspecified_modality(b: Any) -> None:
    b.microbatches[0].documents[0].media.add(tokens=16, merged_tokens=4)


def _too_long_for_seq_len(b: Any) -> None:
    b.microbatches[1].documents[0].text_tokens = 100_000


def _too_many_microbatches(b: Any) -> None:
    for _ in range(70):
        b.microbatches.add().documents.add(text_tokens=1)


def _too_many_documents(b: Any) -> None:
    for _ in range(300):
        b.microbatches[0].documents.add(text_tokens=0)


def _too_many_media(b: Any) -> None:
    for _ in range(40):
        b.microbatches[0].documents[0].media.add(modality=pb.MODALITY_IMAGE, tokens=16)


def _no_microbatches(b: Any) -> None:
    del b.microbatches[:]


def _empty_microbatch(b: Any) -> None:
    b.microbatches.add()


def _replica(b: Any) -> None:
    b.dp_replica = 3


def _iteration(b: Any) -> None:
    b.iteration = -1


CASES: list[tuple[str, str, Callable[[str], Any], grpc.StatusCode, str]] = [
    ("register: missing model", "RegisterJob", _register(model=None), INVALID, "model"),
    ("register: tp does not divide heads", "RegisterJob", _register(parallel__tp=3), INVALID, "parallel.tp"),
    ("register: pp beyond the layers", "RegisterJob", _register(parallel__pp=16), INVALID, "parallel.pp"),
    ("register: zero pp", "RegisterJob", _register(parallel__pp=0), INVALID, "parallel"),
    (
        "register: microbatches over the limit",
        "RegisterJob",
        _register(parallel__microbatches=5000),
        INVALID,
        "parallel.microbatches",
    ),
    ("register: absurd pp", "RegisterJob", _register(parallel__pp=100_000), INVALID, "parallel.pp"),
    (
        "register: unspecified layer kind",
        "RegisterJob",
        lambda _: _unspecified_kind(),
        INVALID,
        "model.modules[0].kind",
    ),
    ("register: negative hardware", "RegisterJob", _register(hardware__peak_flops=-1.0), INVALID, "hardware"),
    ("register: negative budget", "RegisterJob", _register(planning_budget_ms=-3.0), INVALID, "planning_budget_ms"),
    (
        "register: calibration names no module",
        "RegisterJob",
        _bad_calibration("nope", 16, pb.PASS_FORWARD, 1.0),
        INVALID,
        "calibration.timings[0].module",
    ),
    (
        "register: calibration of a split pass",
        "RegisterJob",
        _bad_calibration("vit", 16, pb.PASS_BACKWARD_WEIGHT, 1.0),
        INVALID,
        "calibration.timings[0].pass_kind",
    ),
    (
        "register: calibration with negative time",
        "RegisterJob",
        _bad_calibration("vit", 16, pb.PASS_FORWARD, -1.0),
        INVALID,
        "calibration.timings[0].measured_ms",
    ),
    ("plan: rank beyond pp", "GetPlan", _plan(rank=2), INVALID, "rank"),
    ("plan: negative rank", "GetPlan", _plan(rank=-1), INVALID, "rank"),
    ("plan: negative text tokens", "GetPlan", _plan(e=_set_text_tokens), INVALID, "batch.microbatches[0].documents[0]"),
    (
        "plan: absurd media tokens",
        "GetPlan",
        _plan(e=_huge_media),
        INVALID,
        "batch.microbatches[0].documents[0].media[",
    ),
    (
        "plan: video for a VLM",
        "GetPlan",
        _plan(e=_video_in_a_vlm),
        INVALID,
        "batch.microbatches[0].documents[0].media[",
    ),
    (
        "plan: unspecified modality",
        "GetPlan",
        _plan(e=_unspecified_modality),
        INVALID,
        "batch.microbatches[0].documents[0].media[",
    ),
    ("plan: longer than seq_len", "GetPlan", _plan(e=_too_long_for_seq_len), INVALID, "batch.microbatches[1]"),
    ("plan: microbatches over the limit", "GetPlan", _plan(e=_too_many_microbatches), INVALID, "batch.microbatches"),
    (
        "plan: documents over the limit",
        "GetPlan",
        _plan(e=_too_many_documents),
        INVALID,
        "batch.microbatches[0].documents",
    ),
    ("plan: media items over the limit", "GetPlan", _plan(e=_too_many_media), INVALID, "batch.microbatches[0]"),
    ("plan: no microbatches", "GetPlan", _plan(e=_no_microbatches), INVALID, "batch.microbatches"),
    ("plan: empty microbatch", "GetPlan", _plan(e=_empty_microbatch), INVALID, "batch.microbatches[8].documents"),
    ("plan: replica beyond dp", "GetPlan", _plan(e=_replica), INVALID, "batch.dp_replica"),
    ("plan: negative iteration", "GetPlan", _plan(e=_iteration), INVALID, "batch.iteration"),
    (
        "plan: missing batch",
        "GetPlan",
        lambda job_id: pb.GetPlanRequest(job_id=job_id, rank=0),
        INVALID,
        "batch",
    ),
    (
        "plan: zero budget",
        "GetPlan",
        lambda job_id: pb.GetPlanRequest(job_id=job_id, rank=0, batch=batch(W, 901), budget_ms=0.0),
        INVALID,
        "budget_ms",
    ),
    (
        "plan: unknown job",
        "GetPlan",
        lambda job_id: pb.GetPlanRequest(job_id="job-nope", rank=0, batch=batch(W, 902)),
        PRECONDITION,
        "job_id",
    ),
    (
        "plan: no job id",
        "GetPlan",
        lambda job_id: pb.GetPlanRequest(rank=0, batch=batch(W, 903)),
        INVALID,
        "job_id",
    ),
    (
        "report: unknown job",
        "ReportTimings",
        lambda job_id: pb.ReportTimingsRequest(job_id="job-nope", iteration=1, measured_iteration_ms=5.0),
        PRECONDITION,
        "job_id",
    ),
    (
        "report: ends without starts",
        "ReportTimings",
        lambda job_id: pb.ReportTimingsRequest(job_id=job_id, iteration=1, measured_end_ms=[1.0]),
        INVALID,
        "measured_end_ms",
    ),
    (
        "report: NaN time",
        "ReportTimings",
        lambda job_id: pb.ReportTimingsRequest(job_id=job_id, iteration=1, measured_iteration_ms=float("nan")),
        INVALID,
        "measured_iteration_ms",
    ),
    (
        "report: end before start",
        "ReportTimings",
        lambda job_id: pb.ReportTimingsRequest(
            job_id=job_id, iteration=1, measured_start_ms=[2.0], measured_end_ms=[1.0]
        ),
        INVALID,
        "measured_end_ms[0]",
    ),
    (
        "simulate: unknown schedule",
        "Simulate",
        lambda job_id: pb.SimulateRequest(job_id=job_id, batch=batch(W, 0), schedule="best"),
        INVALID,
        "schedule",
    ),
    (
        "simulate: no job",
        "Simulate",
        lambda job_id: pb.SimulateRequest(batch=batch(W, 0), schedule="1f1b"),
        INVALID,
        "job",
    ),
]


@pytest.mark.parametrize(("method", "build", "code", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_field(
    planner: ServerProcess, job_id: str, method: str, build: Callable[[str], Any], code: grpc.StatusCode, field: str
) -> None:
    request = build(job_id)
    with pytest.raises(grpc.RpcError) as info:
        getattr(planner.stub(), method)(request, timeout=30)
    assert info.value.code() is code, info.value.details()
    violations = bad_request(info.value)
    assert violations, "no BadRequest detail"
    assert any(f.startswith(field) for f, _ in violations), violations
    assert all(description for _, description in violations)


def test_several_violations_are_reported_together(planner: ServerProcess) -> None:
    request = register_request(W)
    request.ClearField("model")
    request.hardware.peak_flops = -1.0
    request.planning_budget_ms = 10**9
    with pytest.raises(grpc.RpcError) as info:
        planner.stub().RegisterJob(request, timeout=30)
    fields = {f.split(".")[0] for f, _ in bad_request(info.value)}
    assert fields == {"model", "hardware"}  # budget is checked once the spec is valid


def test_unknown_job_carries_a_machine_readable_reason(planner: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError) as info:
        planner.stub().GetPlan(pb.GetPlanRequest(job_id="job-gone", rank=0, batch=batch(W, 1)), timeout=30)
    assert error_reason(info.value) == "UNKNOWN_JOB"


def test_a_message_over_the_size_limit_is_refused_with_a_field_violation(planner: ServerProcess, job_id: str) -> None:
    # The shared server runs with --max-message-bytes 1 MiB: a 1.5 MiB batch reaches the service and is refused
    # with a field violation; one beyond twice the limit is stopped by the transport itself.
    big = batch(W, 950)
    filler = [pb.Document(text_tokens=1, media=[pb.MediaItem(modality=pb.MODALITY_IMAGE, tokens=16)])] * 10_000
    while big.ByteSize() < 1_500_000:
        big.microbatches[0].documents.extend(filler)
    with pytest.raises(grpc.RpcError) as info:
        planner.stub().GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=big), timeout=30)
    assert info.value.code() is INVALID
    assert error_reason(info.value) == "MESSAGE_TOO_LARGE"
    assert [f for f, _ in bad_request(info.value)] == ["batch"]

    while big.ByteSize() < 2_200_000:
        big.microbatches[0].documents.extend(filler)
    with pytest.raises(grpc.RpcError) as info:
        planner.stub().GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=big), timeout=30)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_bad_streamed_request_ends_that_stream_only(planner: ServerProcess, job_id: str) -> None:
    stub = planner.stub()
    good = batch(W, 960)
    bad = batch(W, 961)
    bad.microbatches[0].documents[0].text_tokens = -1
    requests = [*stream_requests(job_id, 0, [good]), *stream_requests(job_id, 5, [bad])]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamPlans(iter(requests), timeout=30))
    assert info.value.code() is INVALID
    assert [f for f, _ in bad_request(info.value)] == ["rank"]

    # Everyone else is still served: a fresh stream and a unary call both work.
    fine = list(stub.StreamPlans(iter(stream_requests(job_id, 1, [good])), timeout=30))
    assert [r.header.iteration for r in fine] == [960]
    assert stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=good), timeout=30).rank_plan.rank == 0
    assert planner.health(SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_a_stream_for_an_unknown_job_fails_its_precondition(planner: ServerProcess) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(planner.stub().StreamPlans(iter(stream_requests("job-none", 0, [batch(W, 1)])), timeout=30))
    assert info.value.code() is PRECONDITION
    assert [f for f, _ in bad_request(info.value)] == ["job_id"]


def test_bad_rpcs_are_counted_by_code(planner: ServerProcess) -> None:
    before = planner.sample(
        "pipeweaver_grpc_server_handled_total", grpc_method="GetPlan", grpc_code="FAILED_PRECONDITION"
    )
    with pytest.raises(grpc.RpcError):
        planner.stub().GetPlan(pb.GetPlanRequest(job_id="job-x", rank=0, batch=batch(W, 1)), timeout=30)

    def counted() -> float:
        return planner.sample(
            "pipeweaver_grpc_server_handled_total", grpc_method="GetPlan", grpc_code="FAILED_PRECONDITION"
        )

    # The status reaches the client as the handler ends; the counter moves just after (the interceptor's finally).
    wait_until(lambda: counted() - before >= 1, 5, "the failed GetPlan to be counted")
    assert counted() - before == 1

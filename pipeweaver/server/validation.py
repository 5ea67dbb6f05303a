"""Request checks and the errors they raise, as gRPC statuses with google.rpc details (AIP-193).

Every check names the offending field by its path in the request (``batch.microbatches[3].documents``) in a
`google.rpc.BadRequest`, plus an `ErrorInfo` reason a client can switch on. Cheap, structural checks run here in
the main process; the deep batch checks (every document and media item) run in the worker with the batch's
decoding (`work._decode_batch`), and come back as `work.Rejected`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pipeweaver.errors import SpecError
from pipeweaver.plan.ir import Pass
from pipeweaver.server import work
from pipeweaver.spec.batch import BatchLimits
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import ModelSpec
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.wire import hardware_from_proto, model_from_proto, parallel_from_proto

DOMAIN = "pipeweaver"

MAX_PP = 512
MAX_TP = 1024
MAX_DP = 1 << 20
MAX_CALIBRATION_ROWS = 100_000
MAX_CALIBRATION_TOKENS = 1 << 24
MAX_DEADLINE_AHEAD_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Violation:
    field: str
    description: str


class RequestError(Exception):
    """A request the service answers with a non-OK status; `abort` sends it with its details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: Sequence[Violation] = (),
        *,
        reason: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = tuple(violations)
        self.reason = reason
        self.retry_after_s = retry_after_s

    def to_status(self) -> grpc.Status:
        details: list[any_pb2.Any] = []
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(bad))
        if self.reason:
            details.append(_pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(status)


def _pack(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: RequestError) -> NoReturn:
    """End the RPC with `error`'s status and details (what `abort_with_status` does, in typed form)."""
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def invalid(violations: Sequence[Violation], *, reason: str = "INVALID_ARGUMENT") -> RequestError:
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return RequestError(
        grpc.StatusCode.INVALID_ARGUMENT, f"{first.field}: {first.description}{more}", violations, reason=reason
    )


def from_rejected(rejected: work.Rejected) -> RequestError:
    violations = [Violation(v.field, v.description) for v in rejected.violations]
    if rejected.precondition:
        return RequestError(grpc.StatusCode.FAILED_PRECONDITION, rejected.message, violations, reason="DOES_NOT_FIT")
    return invalid(violations)


def internal_error(exc: BaseException) -> RequestError:
    """What a client gets for a bug of ours: INTERNAL, naming the exception (the server logs its traceback)."""
    return RequestError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", reason="INTERNAL")


def unknown_job(job_id: str) -> RequestError:
    return RequestError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"job_id: unknown job '{job_id}'; register it with RegisterJob first",
        [Violation("job_id", f"no job '{job_id}' is registered on this planner (call RegisterJob first)")],
        reason="UNKNOWN_JOB",
    )


def _raise_if(violations: list[Violation]) -> None:
    if violations:
        raise invalid(violations)


def _spec_violation(exc: SpecError, default_field: str) -> Violation:
    v = work.split_violation(str(exc), default_field)
    return Violation(v.field, v.description)


def _finite(x: float) -> bool:
    return math.isfinite(x)


# ---- RegisterJob ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRequest:
    spec: work.JobSpec
    budget_ms: float


def _parallel_field(message: str) -> str:
    for name in ("tp", "pp"):
        if message.startswith(f"{name} ("):
            return f"parallel.{name}"
    return "parallel"


def check_job_spec(
    model_msg: pb.ModelSpec | None,
    parallel_msg: pb.ParallelSpec | None,
    hardware_msg: pb.HardwareSpec | None,
    limits: BatchLimits,
    *,
    prefix: str = "",
) -> tuple[ModelSpec, ParallelSpec, HardwareSpec]:
    """Decode and cross-check the three spec messages, collecting every violation before raising."""
    violations: list[Violation] = []
    model = parallel = hardware = None
    if model_msg is None:
        violations.append(Violation(f"{prefix}model", "missing"))
    else:
        try:
            model = model_from_proto(model_msg, path=f"{prefix}model")
        except SpecError as exc:
            violations.append(_spec_violation(exc, f"{prefix}model"))
    if parallel_msg is None:
        violations.append(Violation(f"{prefix}parallel", "missing"))
    else:
        try:
            parallel = parallel_from_proto(parallel_msg, path=f"{prefix}parallel")
        except SpecError as exc:
            violations.append(_spec_violation(exc, f"{prefix}parallel"))
    if hardware_msg is None:
        violations.append(Violation(f"{prefix}hardware", "missing"))
    else:
        try:
            hardware = hardware_from_proto(hardware_msg, path=f"{prefix}hardware")
        except SpecError as exc:
            violations.append(_spec_violation(exc, f"{prefix}hardware"))
    if parallel is not None:
        for name, cap in (("pp", MAX_PP), ("tp", MAX_TP), ("dp", MAX_DP)):
            value = getattr(parallel, name)
            if value > cap:
                violations.append(Violation(f"{prefix}parallel.{name}", f"{value} exceeds the limit of {cap}"))
        if parallel.microbatches > limits.max_microbatches:
            violations.append(
                Violation(
                    f"{prefix}parallel.microbatches",
                    f"{parallel.microbatches} exceeds the limit of {limits.max_microbatches}",
                )
            )
    if model is not None and parallel is not None:
        try:
            parallel.check_model(model)
        except SpecError as exc:
            violations.append(Violation(prefix + _parallel_field(str(exc)), str(exc)))
    _raise_if(violations)
    assert model is not None and parallel is not None and hardware is not None
    return model, parallel, hardware


_PASSES = {pb.PASS_FORWARD: Pass.F, pb.PASS_BACKWARD: Pass.B}


def check_calibration(model: ModelSpec, msg: pb.CalibrationProfile) -> tuple[work.LayerTiming, ...]:
    violations: list[Violation] = []
    rows: list[work.LayerTiming] = []
    if len(msg.timings) > MAX_CALIBRATION_ROWS:
        _raise_if(
            [Violation("calibration.timings", f"{len(msg.timings)} rows exceed the limit of {MAX_CALIBRATION_ROWS}")]
        )
    names = {m.name for m in model.modules}
    for i, t in enumerate(msg.timings):
        where = f"calibration.timings[{i}]"
        ok = True
        if t.module not in names:
            violations.append(Violation(f"{where}.module", f"no module '{t.module}' in the model ({sorted(names)})"))
            ok = False
        if not 0 < t.tokens <= MAX_CALIBRATION_TOKENS:
            violations.append(Violation(f"{where}.tokens", f"must be in 1..{MAX_CALIBRATION_TOKENS}, got {t.tokens}"))
            ok = False
        if t.pass_kind not in _PASSES:
            violations.append(
                Violation(f"{where}.pass_kind", "must be PASS_FORWARD or PASS_BACKWARD (profiles time full passes)")
            )
            ok = False
        if not (_finite(t.measured_ms) and t.measured_ms > 0):
            violations.append(Violation(f"{where}.measured_ms", f"must be positive, got {t.measured_ms}"))
            ok = False
        if ok:
            rows.append(work.LayerTiming(t.module, int(t.tokens), _PASSES[t.pass_kind], float(t.measured_ms)))
    _raise_if(violations)
    return tuple(rows)


def check_budget(value: float, field: str, max_budget_ms: float) -> None:
    if not (_finite(value) and 0 < value <= max_budget_ms):
        _raise_if([Violation(field, f"must be in (0, {max_budget_ms:g}] ms, got {value}")])


def check_register(
    req: pb.RegisterJobRequest,
    *,
    limits: BatchLimits,
    default_budget_ms: float,
    max_budget_ms: float,
    compare_baselines: tuple[str, ...],
) -> JobRequest:
    model, parallel, hardware = check_job_spec(
        req.model if req.HasField("model") else None,
        req.parallel if req.HasField("parallel") else None,
        req.hardware if req.HasField("hardware") else None,
        limits,
    )
    calibration = check_calibration(model, req.calibration) if req.HasField("calibration") else ()
    budget = default_budget_ms
    if req.HasField("planning_budget_ms"):
        check_budget(req.planning_budget_ms, "planning_budget_ms", max_budget_ms)
        budget = req.planning_budget_ms
    spec = work.JobSpec(
        model=model,
        parallel=parallel,
        hardware=hardware,
        calibration=calibration,
        compare_baselines=compare_baselines,
        offload=req.activation_offloading,
    )
    return JobRequest(spec=spec, budget_ms=budget)


# ---- batches -------------------------------------------------------------------------------------------------


def check_rank(rank: int, parallel: ParallelSpec, field: str = "rank") -> None:
    if not 0 <= rank < parallel.pp:
        _raise_if([Violation(field, f"must be a pipeline rank in 0..{parallel.pp - 1}, got {rank}")])


def check_message_size(msg: Any, max_bytes: int, field: str | Callable[[Any], str]) -> None:
    """`field` names the violation: a name, or a function of `msg` that finds it (only run for a violation)."""
    size = msg.ByteSize()
    if size > max_bytes:
        raise message_too_large(size, max_bytes, field if isinstance(field, str) else field(msg))


def message_too_large(size: int, max_bytes: int, field: str) -> RequestError:
    return invalid(
        [Violation(field, f"the message is {size} bytes; the limit is {max_bytes} bytes")], reason="MESSAGE_TOO_LARGE"
    )


def check_batch(batch: pb.BatchMetadata, parallel: ParallelSpec, limits: BatchLimits, *, field: str = "batch") -> None:
    """The structural checks that need no decoding (counts, ranges); the worker checks every item."""
    violations: list[Violation] = []
    if batch.iteration < 0:
        violations.append(Violation(f"{field}.iteration", f"must not be negative, got {batch.iteration}"))
    if not 0 <= batch.dp_replica < parallel.dp:
        violations.append(
            Violation(
                f"{field}.dp_replica",
                f"must be a data-parallel replica in 0..{parallel.dp - 1}, got {batch.dp_replica}",
            )
        )
    n = len(batch.microbatches)
    if n == 0:
        violations.append(Violation(f"{field}.microbatches", "a batch needs at least one microbatch"))
    elif n > limits.max_microbatches:
        violations.append(Violation(f"{field}.microbatches", f"{n} exceeds the limit of {limits.max_microbatches}"))
    else:
        for i, mb in enumerate(batch.microbatches):
            docs = len(mb.documents)
            if docs == 0:
                violations.append(
                    Violation(f"{field}.microbatches[{i}].documents", "a microbatch needs at least one document")
                )
            elif docs > limits.max_documents_per_microbatch:
                violations.append(
                    Violation(
                        f"{field}.microbatches[{i}].documents",
                        f"{docs} exceeds the limit of {limits.max_documents_per_microbatch}",
                    )
                )
    _raise_if(violations[:20])


# ---- ReportTimings -------------------------------------------------------------------------------------------


def check_timings(req: pb.ReportTimingsRequest, parallel: ParallelSpec) -> float:
    """Check a timing report; returns the measured iteration time in ms."""
    violations: list[Violation] = []
    if req.iteration < 0:
        violations.append(Violation("iteration", f"must not be negative, got {req.iteration}"))
    if not 0 <= req.rank < parallel.pp:
        violations.append(Violation("rank", f"must be a pipeline rank in 0..{parallel.pp - 1}, got {req.rank}"))
    starts, ends = req.measured_start_ms, req.measured_end_ms
    if len(starts) != len(ends):
        violations.append(
            Violation("measured_end_ms", f"needs one entry per measured_start_ms ({len(starts)}), got {len(ends)}")
        )
    else:
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
            if not (_finite(s) and s >= 0):
                violations.append(Violation(f"measured_start_ms[{i}]", f"must be finite and >= 0, got {s}"))
            if not (_finite(e) and e >= s):
                violations.append(Violation(f"measured_end_ms[{i}]", f"must be finite and >= its start, got {e}"))
            if len(violations) >= 20:
                break
    measured = req.measured_iteration_ms
    if not (_finite(measured) and measured >= 0):
        violations.append(Violation("measured_iteration_ms", f"must be finite and >= 0, got {measured}"))
    _raise_if(violations)
    if measured == 0 and len(starts) > 0:
        measured = max(ends) - min(starts)
    if measured <= 0:
        _raise_if(
            [Violation("measured_iteration_ms", "give the iteration time, or the measured [start, end) of the actions")]
        )
    return float(measured)

"""The trainer's gRPC client of the planner service: typed calls with deadlines, bounded retries and reconnects.

Every call converts between our dataclasses and the v1 messages through `pipeweaver.wire`, and every gRPC failure
becomes one of `pipeweaver.errors`' types (`PlannerUnavailable`, `PlanRejected`, `PlanTimeout`), so a trainer
catches by category and falls back instead of stopping.

Fork safety (gRPC Python does not survive `fork`): the channel is created lazily, on the first call, in the
process that makes it, and is never used in another process. Create the client, or at least make its first
call, after the DataLoader workers exist (`PlanPrefetcher` does: it starts iterating the user's batches first).
A forked child that touches a client whose channel its parent opened gets `PlannerUnavailable` instead of a hang;
pickling a client (spawned workers) carries its settings, never its channel.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from pipeweaver.client.profiler import LayerTiming
from pipeweaver.errors import (
    InvalidPlan,
    PipeWeaverError,
    PlannerUnavailable,
    PlanRejected,
    PlanTimeout,
)
from pipeweaver.plan.ir import Pass, Placement, Plan, PlanHeader, RankPlan
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import ModelSpec
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.v1 import planner_pb2_grpc
from pipeweaver.wire import (
    batch_to_proto,
    hardware_to_proto,
    header_from_proto,
    model_to_proto,
    parallel_to_proto,
    placement_from_proto,
    rank_plan_from_proto,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "JobRegistration",
    "PlanReply",
    "PlanStream",
    "PlannerClient",
    "RetryPolicy",
    "RpcFailure",
    "SimulationResult",
    "TimingReport",
    "assemble_plan_replies",
    "rpc_failure",
]

DEFAULT_ADDRESS = "127.0.0.1:50051"
"""The sidecar's address on the trainer's own pod (`pipeweaver serve`'s default)."""
MAX_MESSAGE_BYTES = 64 << 20
"""Largest message the client sends or receives (a plan of a big job is a few MiB)."""

_PASS_TO_PROTO = {Pass.F: pb.PASS_FORWARD, Pass.B: pb.PASS_BACKWARD}


def _timing_to_proto(t: LayerTiming) -> Any:
    return pb.LayerTiming(
        module=t.module, tokens=t.tokens, pass_kind=_PASS_TO_PROTO[t.pass_], measured_ms=t.measured_ms
    )


_FORKED_CHANNELS: list[grpc.Channel] = []
"""Channels a forked child inherited and dropped: kept referenced so their finalizers never run in the child."""

_REJECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


# ---- data the calls exchange -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobRegistration:
    """What `RegisterJob` fixed for the whole run, plus the request that produced it (to re-register after a
    planner restart and to build fallback plans locally)."""

    job_id: str
    placement: Placement
    sub_microbatch_size: Mapping[str, int]
    """B_i: instances per sub-microbatch, per module."""
    segments: Mapping[str, int]
    """K_i: segments each module's layers are cut into."""
    static_memory_bytes: tuple[float, ...]
    """Weights, gradients and optimizer states per pipeline rank."""
    model: ModelSpec
    parallel: ParallelSpec
    hardware: HardwareSpec
    profile: tuple[LayerTiming, ...] = ()
    planning_budget_ms: float | None = None
    activation_offloading: bool = False

    @property
    def pp(self) -> int:
        return self.placement.pp

    def fallback_plan(self, batch: BatchMetadata) -> Plan:
        """The static fallback plan for `batch` on this job's placement, built locally (pure Python, no planner).

        The same function the service runs for its own fallbacks, with the same tensor dtype.
        """
        from pipeweaver.search.baselines.registry import tensors_dtype_for
        from pipeweaver.search.fallback import build_fallback_plan

        return build_fallback_plan(
            self.model,
            self.placement,
            dict(self.sub_microbatch_size),
            batch,
            job_id=self.job_id,
            dtype=tensors_dtype_for(self.hardware),
        )


class PlanReply(NamedTuple):
    """One rank's answer: the header every rank shares, this rank's actions, and whether it is the service's
    fallback (the search ran out of time or failed)."""

    header: PlanHeader
    rank_plan: RankPlan
    fallback: bool
    wire_digest: bytes = b""
    """blake2b of the reply's serialized header and rank plan (deterministic serialization); empty when unknown."""


@dataclass(frozen=True, slots=True)
class TimingReport:
    iteration_error: float
    """|predicted - measured| / measured of the reported iteration (NaN when no prediction is known)."""
    mean_error: float
    """The same ratio averaged over the job's recent reports."""


@dataclass(frozen=True, slots=True)
class SimulationResult:
    makespan_ms: float
    bubble_fraction: float
    busy_ms: tuple[float, ...]
    peak_memory_bytes: tuple[float, ...]


# ---- errors ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RpcFailure:
    """The gRPC status behind a typed error: code, `ErrorInfo` reason, `BadRequest` field violations, `RetryInfo`."""

    method: str
    code: str
    message: str
    reason: str = ""
    violations: tuple[tuple[str, str], ...] = ()
    retry_after_s: float | None = None

    def describe(self) -> str:
        text = f"{self.method}: {self.code}"
        if self.reason and self.reason != self.code:
            text += f" ({self.reason})"
        text += f": {self.message}"
        if self.violations:
            text += "; field violations: " + "; ".join(f"{f}: {d}" for f, d in self.violations)
        return text


class _Failed(Exception):
    """Carries the parsed status as the `__cause__` of a typed error (the typed classes have no fields)."""

    def __init__(self, failure: RpcFailure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


def rpc_failure(exc: BaseException) -> RpcFailure | None:
    """The gRPC status details behind an error this client raised (None for errors without one)."""
    cause = exc.__cause__
    return cause.failure if isinstance(cause, _Failed) else None


def _parse(err: grpc.RpcError, method: str) -> RpcFailure:
    call = cast(grpc.Call, err)
    try:
        code = call.code()
        message = call.details() or ""
    except Exception:  # a RpcError that is not a Call (never from grpc's own stubs): keep its text
        return RpcFailure(method, "UNKNOWN", str(err))
    reason = ""
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(call)
    except Exception:  # details are a nicety: a malformed trailer must not hide the status itself
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                detail.Unpack(br)
                violations += [(v.field, v.description) for v in br.field_violations]
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = str(info.reason)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                detail.Unpack(ri)
                retry_after = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    name = code.name if code is not None else "UNKNOWN"
    return RpcFailure(method, name, message, reason, tuple(violations), retry_after)


def _typed(failure: RpcFailure) -> PipeWeaverError:
    """UNAVAILABLE (and RESOURCE_EXHAUSTED, INTERNAL, ... : the service cannot serve now) -> PlannerUnavailable;
    INVALID_ARGUMENT / FAILED_PRECONDITION / OUT_OF_RANGE -> PlanRejected; DEADLINE_EXCEEDED -> PlanTimeout."""
    text = failure.describe()
    code = getattr(grpc.StatusCode, failure.code, None)
    if code in _REJECTED:
        return PlanRejected(text)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return PlanTimeout(text)
    return PlannerUnavailable(text)


def _raise_typed(err: grpc.RpcError, method: str) -> PipeWeaverError:
    failure = _parse(err, method)
    exc = _typed(failure)
    exc.__cause__ = _Failed(failure)
    return exc


# ---- retries -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE and RESOURCE_EXHAUSTED, bounded in attempts and by each call's deadline.

    The channel's own reconnect backoff uses the same bounds, so a restarted sidecar is found within
    `max_backoff_s`.
    """

    attempts: int = 5
    """Tries per call, the first included (1: never retry)."""
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    """Each delay is scaled by a random factor in [1 - jitter, 1 + jitter] (ranks do not retry in lockstep)."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"RetryPolicy needs 0 < initial_backoff_s ({self.initial_backoff_s}) <= max_backoff_s "
                f"({self.max_backoff_s})"
            )
        if self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(
                f"RetryPolicy needs multiplier >= 1 and 0 <= jitter < 1, got {self.multiplier} and {self.jitter}"
            )

    def backoff_s(self, failures: int, retry_after_s: float | None = None) -> float:
        """Delay after `failures` consecutive failures (1 = the first), at least the server's `RetryInfo`."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(failures - 1, 0))
        delay = base * (1 + self.jitter * (2 * random.random() - 1))
        return max(delay, retry_after_s or 0.0)


# ---- assembling a whole plan --------------------------------------------------------------------------------------


def assemble_plan_replies(replies: Sequence[PlanReply]) -> tuple[Plan, bool]:
    """(the whole `Plan`, fallback flag) from every pipeline rank's reply for one iteration.

    The replies must share one header and fallback flag and hold ranks 0..pp-1 once each, else `InvalidPlan`
    (the ranks would run different plans).
    """
    if not replies:
        raise InvalidPlan("no plan replies to assemble")
    header, fallback = replies[0].header, replies[0].fallback
    pp = header.placement.pp
    by_rank: dict[int, RankPlan] = {}
    digests: dict[int, bytes] = {}
    for r in replies:
        if r.header != header or r.fallback != fallback:
            raise InvalidPlan(
                f"iteration {header.iteration}: rank {r.rank_plan.rank}'s reply has another header than rank "
                f"{replies[0].rank_plan.rank}'s ({r.header.schedule}/{r.header.source} vs "
                f"{header.schedule}/{header.source}); the ranks would run different plans"
            )
        by_rank[r.rank_plan.rank] = r.rank_plan
        digests[r.rank_plan.rank] = r.wire_digest
    if sorted(by_rank) != list(range(pp)):
        raise InvalidPlan(f"iteration {header.iteration}: replies for ranks {sorted(by_rank)}, the plan has pp={pp}")
    wire_digest: int | None = None
    if all(digests.values()):
        # Every rank assembles the same replies, so every rank gets the same digest: cheap to compare in the vote.
        h = hashlib.blake2b(digest_size=8)
        for rank in range(pp):
            h.update(digests[rank])
        wire_digest = int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)
    return Plan(header=header, ranks=tuple(by_rank[r] for r in range(pp)), wire_digest=wire_digest), fallback


def _reply(msg: Any, path: str, headers: dict[bytes, PlanHeader] | None = None) -> PlanReply:
    """Decode one answer. `headers` memoises decoded headers by their bytes: every rank's answer for an iteration
    carries the same header, and decoding it once per iteration instead of once per rank saves Python time."""
    header: PlanHeader | None = None
    key = b""
    if headers is not None:
        key = msg.header.SerializeToString(deterministic=True)
        header = headers.get(key)
    if header is None:
        header = header_from_proto(msg.header, path=f"{path}.header")
        if headers is not None:
            if len(headers) >= 8:
                headers.clear()
            headers[key] = header
    h = hashlib.blake2b(key or msg.header.SerializeToString(deterministic=True), digest_size=16)
    h.update(msg.rank_plan.SerializeToString(deterministic=True))  # C serialization (bench_plan_check.py)
    h.update(b"\x01" if msg.fallback else b"\x00")
    return PlanReply(
        header=header,
        rank_plan=rank_plan_from_proto(msg.rank_plan, path=f"{path}.rank_plan"),
        fallback=bool(msg.fallback),
        wire_digest=h.digest(),
    )


def _timestamp(unix_s: float) -> Timestamp:
    ts = Timestamp()
    seconds = int(unix_s)
    ts.seconds, ts.nanos = seconds, min(int((unix_s - seconds) * 1e9), 999_999_999)
    return ts


# ---- the client --------------------------------------------------------------------------------------------------


class PlannerClient:
    """Typed, synchronous client of `pipeweaver.v1.PlannerService`.

    Unary calls retry UNAVAILABLE / RESOURCE_EXHAUSTED with `retry`'s exponential backoff within their deadline;
    `stream()` opens a `PlanStream` for one-iteration-ahead planning. Thread-safe. The channel opens lazily on
    the first call (see the module docstring on fork safety); `close()` or a `with` block closes it.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        """Deadline of calls that are given none (registration, reports, simulations)."""
        self.retry = retry or RetryPolicy()
        self._credentials = credentials
        self._options = tuple(options)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._pid: int | None = None
        self._closed = False

    # ---- channel ----
    def __getstate__(self) -> dict[str, Any]:
        if self._credentials is not None:
            raise TypeError("a PlannerClient with TLS credentials cannot be pickled; create one in the new process")
        return {"address": self.address, "timeout_s": self.timeout_s, "retry": self.retry, "options": self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["address"], timeout_s=state["timeout_s"], retry=state["retry"], options=state["options"]
        )

    @property
    def connected(self) -> bool:
        """Whether this process has opened the channel (False until the first call)."""
        return self._channel is not None and self._pid == os.getpid()

    def _channel_options(self) -> list[tuple[str, Any]]:
        r = self.retry
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", int(r.initial_backoff_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(r.initial_backoff_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(r.max_backoff_s * 1000)),
        ]
        names = {k for k, _ in self._options}
        return [o for o in opts if o[0] not in names] + list(self._options)

    def stub(self) -> Any:
        """The generated `PlannerServiceStub` on this process's channel (opened here on first use)."""
        with self._lock:
            if self._closed:
                raise PlannerUnavailable(f"the planner client for {self.address} is closed")
            if self._channel is not None and self._pid != os.getpid():
                # A forked child: the parent's gRPC threads do not exist here; touching the channel (even to close
                # it) can hang. Leave it alone and say what to do instead.
                raise PlannerUnavailable(
                    f"this PlannerClient opened its channel in process {self._pid}, and process {os.getpid()} is a "
                    "fork of it; gRPC channels do not survive fork. Create the client (or make its first call) "
                    "after the DataLoader workers start, or use a spawn/forkserver multiprocessing context"
                )
            if self._channel is None:
                if self._credentials is not None:
                    ch = grpc.secure_channel(self.address, self._credentials, options=self._channel_options())
                else:
                    ch = grpc.insecure_channel(self.address, options=self._channel_options())
                self._channel, self._pid = ch, os.getpid()
                self._stub = planner_pb2_grpc.PlannerServiceStub(ch)
            return self._stub

    def close(self) -> None:
        """Close the channel (in the process that opened it). Open streams end."""
        with self._lock:
            self._closed = True
            ch, self._channel, self._stub = self._channel, None, None
            mine = self._pid == os.getpid()
        if ch is not None and mine:
            ch.close()
        elif ch is not None:
            _FORKED_CHANNELS.append(ch)  # a fork's copy: never closed nor collected here (its cleanup can hang)

    def __enter__(self) -> PlannerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ----
    def _call(self, method: str, request: Any, timeout_s: float | None, retry: bool = True) -> Any:
        budget = self.timeout_s if timeout_s is None else timeout_s
        if budget <= 0:
            raise PlanTimeout(f"{method}: the deadline had passed before the call ({budget:.3f} s)")
        deadline = time.monotonic() + budget
        failures = 0
        while True:
            fn = getattr(self.stub(), method)
            try:
                return fn(request, timeout=max(deadline - time.monotonic(), 1e-3))
            except grpc.RpcError as err:
                exc = _raise_typed(err, method)
                failure = rpc_failure(exc)
                assert failure is not None
                failures += 1
                code = getattr(grpc.StatusCode, failure.code, None)
                if not retry or code not in _RETRYABLE or failures >= self.retry.attempts:
                    raise exc from exc.__cause__
                delay = self.retry.backoff_s(failures, failure.retry_after_s)
                if time.monotonic() + delay >= deadline:
                    raise exc from exc.__cause__
                time.sleep(delay)

    def register_job(
        self,
        model: ModelSpec,
        parallel: ParallelSpec,
        hardware: HardwareSpec,
        profile: Sequence[LayerTiming] | None = None,
        *,
        planning_budget_ms: float | None = None,
        activation_offloading: bool = False,
        timeout_s: float | None = None,
    ) -> JobRegistration:
        """Register a job (idempotent: the same spec gets the same id and placement from every rank and after a
        planner restart). `profile`: measured layer times (`profiler.profile_layers`) to calibrate SEMU;
        every rank must send the same rows, or they register different jobs. `activation_offloading`: the plans
        may copy activations to pinned host memory and back (the executor applies them: `client.offload`)."""
        rows = tuple(profile or ())
        request = pb.RegisterJobRequest(
            model=model_to_proto(model),
            parallel=parallel_to_proto(parallel),
            hardware=hardware_to_proto(hardware),
        )
        if rows:
            request.calibration.CopyFrom(pb.CalibrationProfile(timings=[_timing_to_proto(t) for t in rows]))
        if planning_budget_ms is not None:
            request.planning_budget_ms = planning_budget_ms
        if activation_offloading:
            request.activation_offloading = True
        resp = self._call("RegisterJob", request, timeout_s)
        return JobRegistration(
            job_id=resp.job_id,
            placement=placement_from_proto(resp.placement),
            sub_microbatch_size={s.module: int(s.sub_microbatch_size) for s in resp.module_splits},
            segments={s.module: int(s.segments) for s in resp.module_splits},
            static_memory_bytes=tuple(resp.static_memory_bytes),
            model=model,
            parallel=parallel,
            hardware=hardware,
            profile=rows,
            planning_budget_ms=planning_budget_ms,
            activation_offloading=activation_offloading,
        )

    def reregister(self, job: JobRegistration, *, timeout_s: float | None = None) -> JobRegistration:
        """Register `job`'s spec again (after a planner restart forgot it)."""
        return self.register_job(
            job.model,
            job.parallel,
            job.hardware,
            job.profile,
            planning_budget_ms=job.planning_budget_ms,
            activation_offloading=job.activation_offloading,
            timeout_s=timeout_s,
        )

    def get_plan(
        self,
        job_id: str,
        rank: int,
        batch: BatchMetadata,
        deadline_s: float | None = None,
        *,
        budget_ms: float | None = None,
    ) -> PlanReply:
        """This rank's plan for `batch`, within `deadline_s` seconds (default: the client's `timeout_s`).

        Past the deadline the call fails with `PlanTimeout`; the service itself answers with its fallback plan
        (``fallback=True``) when the search cannot finish in time.
        """
        request = self._get_plan_request(job_id, rank, batch_to_proto(batch), budget_ms)
        return _reply(self._call("GetPlan", request, deadline_s), "GetPlan")

    @staticmethod
    def _get_plan_request(job_id: str, rank: int, batch: Any, budget_ms: float | None) -> Any:
        request = pb.GetPlanRequest(job_id=job_id, rank=rank, batch=batch)
        if budget_ms is not None:
            request.budget_ms = budget_ms
        return request

    def get_plans(
        self,
        job_id: str,
        ranks: Sequence[int],
        batch: BatchMetadata,
        deadline_s: float | None = None,
        *,
        budget_ms: float | None = None,
    ) -> list[PlanReply]:
        """Several ranks' plans for one batch, asked concurrently (the service searches once for all of them)."""
        msg = batch_to_proto(batch)
        results: dict[int, PlanReply] = {}
        errors: list[PipeWeaverError] = []

        def one(rank: int) -> None:
            try:
                req = self._get_plan_request(job_id, rank, msg, budget_ms)
                results[rank] = _reply(self._call("GetPlan", req, deadline_s), "GetPlan")
            except PipeWeaverError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [results[r] for r in ranks]

    def get_full_plan(
        self, job: JobRegistration, batch: BatchMetadata, deadline_s: float | None = None
    ) -> tuple[Plan, bool]:
        """(the whole plan, fallback flag) for `batch`: every pipeline rank's reply, assembled and cross-checked."""
        return assemble_plan_replies(self.get_plans(job.job_id, range(job.pp), batch, deadline_s))

    def report_timings(
        self,
        job_id: str,
        iteration: int,
        rank: int,
        measured_iteration_ms: float,
        measured_ms: Sequence[tuple[float, float]] = (),
        *,
        timeout_s: float | None = None,
    ) -> TimingReport:
        """Report a measured iteration (and optionally each action's [start, end) in ms since it started, one per
        action of the rank plan served for it) so the service can refit its predictions."""
        request = pb.ReportTimingsRequest(
            job_id=job_id,
            iteration=iteration,
            rank=rank,
            measured_start_ms=[s for s, _ in measured_ms],
            measured_end_ms=[e for _, e in measured_ms],
            measured_iteration_ms=measured_iteration_ms,
        )
        resp = self._call("ReportTimings", request, timeout_s)
        return TimingReport(iteration_error=float(resp.iteration_error), mean_error=float(resp.mean_error))

    def simulate(
        self,
        batch: BatchMetadata,
        schedule: str = "pipeweaver",
        *,
        job_id: str | None = None,
        model: ModelSpec | None = None,
        parallel: ParallelSpec | None = None,
        hardware: HardwareSpec | None = None,
        timeout_s: float | None = None,
    ) -> SimulationResult:
        """What-if: SEMU's prediction of `schedule` (a baseline name, ``pipeweaver`` or ``fallback``) on `batch`,
        for a registered job (`job_id`) or one described inline (`model`, `parallel`, `hardware`)."""
        request = pb.SimulateRequest(batch=batch_to_proto(batch), schedule=schedule)
        if job_id is not None:
            request.job_id = job_id
        elif model is not None and parallel is not None and hardware is not None:
            request.spec.CopyFrom(
                pb.JobSpec(
                    model=model_to_proto(model),
                    parallel=parallel_to_proto(parallel),
                    hardware=hardware_to_proto(hardware),
                )
            )
        else:
            raise ValueError("simulate needs job_id, or model, parallel and hardware")
        resp = self._call("Simulate", request, timeout_s)
        return SimulationResult(
            makespan_ms=float(resp.makespan_ms),
            bubble_fraction=float(resp.bubble_fraction),
            busy_ms=tuple(resp.busy_ms),
            peak_memory_bytes=tuple(resp.peak_memory_bytes),
        )

    def stream(self, job_id: str) -> PlanStream:
        """A `PlanStream` for `job_id` (opened on its first `send`)."""
        return PlanStream(self, job_id)


# ---- streaming -----------------------------------------------------------------------------------------------------

_Key = tuple[int, int]
"""(iteration, rank)."""


@dataclass(slots=True)
class _Generation:
    """One StreamPlans call: its request queue and the keys it still owes an answer for."""

    requests: queue.SimpleQueue[Any | None]
    call: Any = None
    pending: set[_Key] = field(default_factory=set)
    done: bool = False


class PlanStream:
    """One-iteration-ahead planning over `StreamPlans`: `send` an upcoming batch, `result` its plan later.

    Answers arrive in any order and are kept by (iteration, rank). When the stream fails (planner stopped,
    restarted, or a refused request), every request it owed fails with the typed error, and the next `send`
    reopens it, but not before the retry policy's backoff since the last failure (so a dead planner costs a
    trainer nothing but an immediate `PlannerUnavailable`). A reader thread per open stream receives answers.
    """

    def __init__(self, client: PlannerClient, job_id: str) -> None:
        self.client = client
        self.job_id = job_id
        self._cond = threading.Condition()
        self._gen: _Generation | None = None
        self._replies: dict[_Key, PlanReply] = {}
        self._errors: dict[_Key, PipeWeaverError] = {}
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: PipeWeaverError | None = None
        self._closed = False

    @property
    def last_error(self) -> PipeWeaverError | None:
        """The error that ended the most recent stream (None when it has not failed)."""
        return self._last_error

    def _open(self) -> _Generation:
        requests: queue.SimpleQueue[Any | None] = queue.SimpleQueue()

        def feed() -> Iterator[Any]:
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        gen = _Generation(requests)
        gen.call = self.client.stub().StreamPlans(feed())
        threading.Thread(target=self._read, args=(gen,), name="pipeweaver-plan-stream", daemon=True).start()
        return gen

    def _read(self, gen: _Generation) -> None:
        error: PipeWeaverError | None = None
        headers: dict[bytes, PlanHeader] = {}
        try:
            for msg in gen.call:
                try:
                    reply = _reply(msg, "StreamPlans", headers)
                except PipeWeaverError as exc:  # a reply that does not decode: that iteration has no plan
                    key = (int(msg.header.iteration), int(msg.rank_plan.rank))
                    with self._cond:
                        gen.pending.discard(key)
                        self._errors[key] = exc
                        self._cond.notify_all()
                    continue
                key = (reply.header.iteration, reply.rank_plan.rank)
                with self._cond:
                    gen.pending.discard(key)
                    self._replies[key] = reply
                    self._cond.notify_all()
        except grpc.RpcError as err:
            error = _raise_typed(err, "StreamPlans")
        except Exception as exc:  # never let the reader die silently: waiters must learn the stream is gone
            error = PlannerUnavailable(f"StreamPlans: the stream failed: {type(exc).__name__}: {exc}")
        gen.requests.put(None)  # release gRPC's request-consumer thread, blocked on the queue of a dead call
        with self._cond:
            gen.done = True
            if error is None and gen.pending:
                error = PlannerUnavailable("StreamPlans: the planner ended the stream before answering every request")
            if error is not None:
                cancelled = isinstance(error, PlannerUnavailable) and self._closed
                if not cancelled:
                    self._failures += 1
                    self._retry_at = time.monotonic() + self.client.retry.backoff_s(self._failures)
                    self._last_error = error
                for key in gen.pending:
                    self._errors[key] = error
            gen.pending.clear()
            if self._gen is gen:
                self._gen = None
            self._cond.notify_all()

    def send(
        self,
        ranks: Sequence[int],
        batch: BatchMetadata,
        deadline_unix_s: float | None,
        *,
        predicted_timings: bool = False,
    ) -> None:
        """Ask for `ranks`' plans of `batch` (keyed by `batch.iteration`), needed by `deadline_unix_s` (wall clock).
        `predicted_timings`: the plans carry each action's predicted start and end (`RankPlan.predicted_ms`,
        SEMU's timeline), about a third of an answer's bytes; without, `predicted_ms` is empty.

        Raises `PlannerUnavailable` at once while the stream is backing off after a failure.
        """
        msg = batch_to_proto(batch)
        deadline = _timestamp(deadline_unix_s) if deadline_unix_s is not None else None
        with self._cond:
            if self._closed:
                raise PlannerUnavailable("the plan stream is closed")
            if self._gen is None:
                wait = self._retry_at - time.monotonic()
                if wait > 0:
                    raise PlannerUnavailable(
                        f"StreamPlans: reconnecting in {wait:.2f} s after: {self._last_error}"
                    ) from self._last_error
                self._gen = self._open()
            gen = self._gen
            for rank in ranks:
                key = (batch.iteration, rank)
                self._replies.pop(key, None)
                self._errors.pop(key, None)
                gen.pending.add(key)
                req = pb.StreamPlansRequest(
                    job_id=self.job_id, rank=rank, batch=msg, predicted_timings=predicted_timings
                )
                if deadline is not None:
                    req.deadline.CopyFrom(deadline)
                gen.requests.put(req)

    def mark_healthy(self) -> None:
        """Reset the backoff (a whole iteration's plans arrived)."""
        with self._cond:
            self._failures = 0

    def result(self, iteration: int, rank: int, timeout_s: float) -> PlanReply:
        """The answer for (iteration, rank), waiting at most `timeout_s`: `PlanTimeout` past it, or the typed error
        of the stream that failed to answer."""
        key = (iteration, rank)
        until = time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            while True:
                if key in self._replies:
                    return self._replies.pop(key)
                if key in self._errors:
                    raise self._errors.pop(key)
                gen = self._gen
                if gen is None or key not in gen.pending:
                    raise PlannerUnavailable(f"StreamPlans: no request pending for iteration {iteration}, rank {rank}")
                left = until - time.monotonic()
                if left <= 0:
                    raise PlanTimeout(
                        f"StreamPlans: no plan for iteration {iteration}, rank {rank} within {timeout_s:.3f} s"
                    )
                self._cond.wait(left)

    def has_results(self, iteration: int, ranks: Sequence[int]) -> bool:
        """Whether `result` would answer at once for every one of `ranks` of `iteration` (a plan or an error)."""
        with self._cond:
            return all((iteration, r) in self._replies or (iteration, r) in self._errors for r in ranks)

    def forget_before(self, iteration: int) -> None:
        """Drop answers and errors of iterations before `iteration` (late answers nobody will read)."""
        with self._cond:
            for store in (self._replies, self._errors):
                for key in [k for k in store if k[0] < iteration]:
                    del store[key]
            if self._gen is not None:
                self._gen.pending = {k for k in self._gen.pending if k[0] >= iteration}

    def close(self) -> None:
        """End the stream now (pending requests fail with `PlannerUnavailable`)."""
        with self._cond:
            self._closed = True
            gen = self._gen
        if gen is not None:
            gen.requests.put(None)
            if gen.call is not None:
                gen.call.cancel()

"""Plans one iteration ahead: wraps the trainer's batches and hands each iteration its plan, or a fallback.

While iteration k trains, iteration k+1's batch metadata is already with the planner; when k+1 starts its plan is
usually waiting. If it is not there by its deadline, or the planner is down, the iteration gets the static
fallback plan for the job's placement, built locally (`JobRegistration.fallback_plan`, pure Python), and the
prefetcher counts it: training never stops because of the planner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Generic, Literal, Protocol, TypeVar

from pipeweaver.client.planner_client import (
    JobRegistration,
    PlannerClient,
    PlanReply,
    PlanStream,
    TimingReport,
    assemble_plan_replies,
    rpc_failure,
)
from pipeweaver.errors import InvalidPlan, PipeWeaverError, PlannerUnavailable, PlanRejected, PlanTimeout
from pipeweaver.plan.ir import Plan
from pipeweaver.spec.batch import BatchMetadata

__all__ = ["PlanPrefetcher", "PlanPreparer", "PlannedBatch", "PrefetchStats", "batch_metadata"]

log = logging.getLogger("pipeweaver.client")

T = TypeVar("T")

PlanOrigin = Literal["planner", "fallback"]
FallbackReason = Literal["deadline", "unavailable", "rejected", "invalid", "unregistered", "placement"]
"""Why an iteration ran the local fallback: no plan by its deadline; the planner unreachable (or backing off);
the planner refused the request; the replies did not make one valid plan; the job is being registered again
after a planner restart; the planner's placement differs from the one the trainer was built for."""


class PlanPreparer(Protocol):
    """What `PlanPrefetcher.attach` wires: `PipelineExecutor` (kept as a protocol: this module imports no torch)."""

    idle_hook: Callable[[], object] | None

    def prepare(self, plan: Plan, batch: BatchMetadata) -> None: ...


def batch_metadata(item: object) -> BatchMetadata:
    """The default metadata function: the item itself when it is `BatchMetadata` (the reference datasets'
    synthetic batches are), else its ``metadata`` attribute."""
    if isinstance(item, BatchMetadata):
        return item
    meta = getattr(item, "metadata", None)
    if isinstance(meta, BatchMetadata):
        return meta
    raise TypeError(
        f"PlanPrefetcher cannot get batch metadata from a {type(item).__name__}; pass metadata=fn, a function "
        "from your batch to its BatchMetadata (token counts per document and media item)"
    )


@dataclass(frozen=True, slots=True)
class PlannedBatch(Generic[T]):
    """One iteration: the user's batch, its metadata and the plan to run it with."""

    batch: T
    metadata: BatchMetadata
    plan: Plan
    """The whole plan (every rank's actions), ready for `PipelineExecutor.run_with_fallback`."""
    origin: PlanOrigin
    """planner: the service's plan (searched, cached or its own fallback); fallback: built here. The executor
    still proves a planner's plan before running it (`run_with_fallback` falls back if any rank refuses it)."""
    served_fallback: bool = False
    """The service answered with its fallback plan (its search could not finish by the deadline)."""
    fallback_reason: FallbackReason | None = None
    wait_ms: float = 0.0
    """Time this iteration waited for its plan (0 when it was already there)."""
    fallback_ms: float = 0.0
    """Time spent building the local fallback plan."""


@dataclass(slots=True)
class PrefetchStats:
    iterations: int = 0
    planned: int = 0
    """Iterations that ran the service's plan (searched or cached)."""
    served_fallbacks: int = 0
    """Iterations that ran the service's own fallback plan."""
    local_fallbacks: Counter[str] = field(default_factory=Counter)
    """Iterations that ran the locally built fallback, by reason."""
    max_wait_ms: float = 0.0
    total_wait_ms: float = 0.0
    reports_failed: int = 0

    @property
    def fallbacks(self) -> int:
        """Iterations that did not run a searched plan (service fallbacks and local ones)."""
        return self.served_fallbacks + sum(self.local_fallbacks.values())


class PlanPrefetcher(Generic[T]):
    """Iterate `batches` with each iteration's plan: ``for item in PlanPrefetcher(client, job, loader): ...``.

    Every iteration, the next batch's metadata (``metadata(batch)``; default `batch_metadata`) goes to the planner
    while the current one trains. The plan must arrive by its deadline: ``deadline_s`` after it was sent when
    given, else 0.9 x the recent iteration time (an exponential average), so a punctual plan never delays the
    next iteration; the first iteration, which has nothing to overlap with, waits up to ``first_deadline_s``.
    ``lookahead`` (default 1) sends metadata that many iterations ahead, with the deadline scaled to match: for
    iterations shorter than a search plus its overhead (the deadline reserve the service learns), 2 gives the
    planner two iterations of time at the cost of reading the loader one batch further ahead.
    An answer still in flight gets ``grace_s`` more. After that, or at once when the planner is unreachable, the
    iteration gets the local fallback. So the planner adds at most ``deadline + grace_s + the fallback's own
    time`` to an iteration, and nothing once it is down (reconnects back off, see `RetryPolicy`).
    ``predicted_timings`` asks for each action's predicted start and end with every plan (SEMU's timeline, to
    draw or trace it); off by default, which saves about a third of every answer.

    **Why every rank asks for every rank's actions.** The service gives each rank only its own `RankPlan`, but
    `PipelineExecutor.check` (inside `run_with_fallback`) validates the *whole* plan: the dry run that proves
    matched, deadlock-free transfers needs every rank's action order, and a rank's order cannot be rebuilt from
    the header and its own list. So each rank requests the plans of all pipeline ranks for the iteration (the
    service searches once per iteration and answers every request from that one plan), checks the replies
    share one header and assembles the full `Plan`. Every rank then proves the plan alone, with no trust in its
    peers and no extra collective; `run_with_fallback`'s vote still makes the final choice unanimous. The cost is
    pp replies per rank per iteration over the loopback sidecar, decoded in the stream's reader thread while the
    iteration before trains: about 20 KiB for tiny-vlm; 1.3 MiB and about 0.3 s of Python for vlm-l (pp 8, 64
    microbatches, 37k actions), less than the executor's own validation of that plan. A service answer carrying
    the whole plan once (a v1 addition) would remove the pp-fold transfer if that ever matters.

    **Checking plans before their iteration.** After ``prefetcher.attach(executor)`` (``prepare=executor.prepare``
    and the executor's ``idle_hook = prefetcher.prepare_arrived``), plans that arrived early are assembled and
    checked while the device finishes the iteration before (the host waits for it there anyway), so the next
    iteration starts at once instead of validating a plan with the device idle.

    Fork safety: the user's iterable is started (DataLoader workers fork) before the prefetcher opens its stream,
    so the gRPC channel never exists in a forked worker. `rank` is this trainer's pipeline rank (for `report`).
    """

    def __init__(
        self,
        client: PlannerClient,
        job: JobRegistration,
        batches: Iterable[T],
        *,
        metadata: Callable[[T], BatchMetadata] | None = None,
        rank: int = 0,
        deadline_s: float | None = None,
        first_deadline_s: float = 10.0,
        grace_s: float = 0.05,
        min_deadline_s: float = 0.02,
        report_timeout_s: float = 0.5,
        lookahead: int = 1,
        prepare: Callable[[Plan, BatchMetadata], object] | None = None,
        predicted_timings: bool = False,
    ) -> None:
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
            raise ValueError(f"PlanPrefetcher.lookahead must be an integer >= 1, got {lookahead!r}")
        for name, value in (("first_deadline_s", first_deadline_s), ("min_deadline_s", min_deadline_s)):
            if not value > 0:
                raise ValueError(f"PlanPrefetcher.{name} must be positive, got {value}")
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError(f"PlanPrefetcher.deadline_s must be positive (or None: adaptive), got {deadline_s}")
        if grace_s < 0:
            raise ValueError(f"PlanPrefetcher.grace_s must not be negative, got {grace_s}")
        if not 0 <= rank < job.pp:
            raise ValueError(f"PlanPrefetcher.rank must be a pipeline rank in 0..{job.pp - 1}, got {rank}")
        self.client = client
        self.job = job
        self.rank = rank
        self._batches = batches
        self._metadata: Callable[[T], BatchMetadata] = metadata or batch_metadata
        self.deadline_s = deadline_s
        self.first_deadline_s = first_deadline_s
        self.grace_s = grace_s
        self.min_deadline_s = min_deadline_s
        self.report_timeout_s = report_timeout_s
        self.lookahead = lookahead
        self.predicted_timings = predicted_timings
        """Ask for each action's predicted times with every plan (SEMU's timeline, for traces and pictures)."""
        self.stats = PrefetchStats()
        self._ranks: Sequence[int] = range(job.pp)
        self._stream: PlanStream | None = None
        self._deadline: dict[int, float] = {}
        self._skipped: dict[int, FallbackReason] = {}
        self._step_ema_s: float | None = None
        self._last_iteration: int | None = None
        self._started = False
        self._blocked: FallbackReason | None = None
        """Set while the job is being registered again, or for good when the placement changed."""
        self._reregistering: threading.Thread | None = None
        self._fallback_memo: tuple[BatchMetadata, Plan] | None = None
        self._degraded = False
        self.prepare = prepare
        """Called by `prepare_arrived` with each plan that came early and its batch (`PipelineExecutor.prepare`)."""
        self._requested: dict[int, BatchMetadata] = {}
        """Iterations whose plans were asked for and not handed out yet."""
        self._collected: dict[int, tuple[Plan, bool] | FallbackReason] = {}
        """Outcomes `prepare_arrived` collected ahead of their iteration."""

    # ---- the plan a rank can always build ----
    def fallback_plan(self, batch: BatchMetadata) -> Plan:
        """The local fallback plan for `batch` (pass it to `run_with_fallback`); memoised for the last batch."""
        memo = self._fallback_memo
        if memo is not None and (memo[0] is batch or memo[0] == batch):
            return memo[1]
        plan = self.job.fallback_plan(batch)
        self._fallback_memo = (batch, plan)
        return plan

    # ---- iteration ----
    def __iter__(self) -> Iterator[PlannedBatch[T]]:
        if self._started:
            raise RuntimeError("a PlanPrefetcher can be iterated once; create another for another pass")
        self._started = True
        source = iter(self._batches)  # DataLoader workers fork here, before this process opens a gRPC channel
        window: deque[tuple[T, BatchMetadata]] = deque()
        try:
            for first in islice(source, self.lookahead):  # nothing to overlap with yet: the first deadline
                meta = self._meta(first)
                self._request(meta, self.first_deadline_s)
                window.append((first, meta))
            while window:
                cur, cur_meta = window.popleft()
                pending = list(islice(source, 1))  # the batch `lookahead` iterations on: its metadata goes out now
                nxt_meta = self._meta(pending[0]) if pending else None
                item = self._resolve(cur, cur_meta)
                if nxt_meta is not None:
                    self._request(nxt_meta, self._next_deadline_s())
                    window.append((pending[0], nxt_meta))
                handed = time.monotonic()
                yield item
                self._observe_step(time.monotonic() - handed)
        finally:
            self.close()

    def _meta(self, item: T) -> BatchMetadata:
        meta = self._metadata(item)
        if self._last_iteration is not None and meta.iteration <= self._last_iteration:
            raise ValueError(
                f"batch metadata iterations must increase (the planner keys plans by them): got {meta.iteration} "
                f"after {self._last_iteration}"
            )
        self._last_iteration = meta.iteration
        return meta

    def _next_deadline_s(self) -> float:
        if self.deadline_s is not None:
            return self.deadline_s
        if self._step_ema_s is None:
            return self.first_deadline_s
        # Sent `lookahead` iterations before it is needed.
        return max(self.min_deadline_s, 0.9 * self.lookahead * self._step_ema_s)

    def _observe_step(self, seconds: float) -> None:
        ema = self._step_ema_s
        self._step_ema_s = seconds if ema is None else 0.5 * ema + 0.5 * seconds

    def _request(self, meta: BatchMetadata, timeout_s: float) -> None:
        it = meta.iteration
        self._deadline[it] = time.monotonic() + timeout_s
        self._requested[it] = meta
        if self._blocked is not None:
            self._skipped[it] = self._blocked
            return
        try:
            if self._stream is None:
                self._stream = self.client.stream(self.job.job_id)
            self._stream.send(self._ranks, meta, time.time() + timeout_s, predicted_timings=self.predicted_timings)
        except PipeWeaverError as exc:
            self._skipped[it] = self._reason(exc)

    def _reason(self, exc: PipeWeaverError) -> FallbackReason:
        if isinstance(exc, PlanTimeout):
            return "deadline"
        if isinstance(exc, PlanRejected):
            failure = rpc_failure(exc)
            if failure is not None and failure.reason == "UNKNOWN_JOB":
                self._reregister()
                return "unregistered"
            return "rejected"
        if isinstance(exc, PlannerUnavailable):
            return "unavailable"
        return "invalid"

    def _collect(self, it: int) -> tuple[Plan, bool] | FallbackReason:
        stream = self._stream
        if it in self._skipped:
            return self._skipped.pop(it)
        if stream is None:
            return "unavailable"
        until = self._deadline.pop(it, time.monotonic()) + self.grace_s
        replies: list[PlanReply] = []
        try:
            for r in self._ranks:
                replies.append(stream.result(it, r, until - time.monotonic()))
            plan, served_fallback = assemble_plan_replies(replies)
        except InvalidPlan as exc:
            self._degrade(it, "invalid", exc)
            return "invalid"
        except PipeWeaverError as exc:
            reason = self._reason(exc)
            self._degrade(it, reason, exc)
            return reason
        stream.mark_healthy()
        if self._degraded:
            log.info("iteration %d: plans from the planner again", it)
            self._degraded = False
        if plan.header.placement != self.job.placement:
            log.error(
                "iteration %d: the planner's placement differs from the registered one; running fallback plans "
                "until the trainer restarts",
                it,
            )
            self._blocked = "placement"
            return "placement"
        return plan, served_fallback

    def _degrade(self, it: int, reason: FallbackReason, exc: PipeWeaverError) -> None:
        """Log the first fallback of a run of them as a warning, the rest at debug level."""
        level = logging.DEBUG if self._degraded else logging.WARNING
        log.log(level, "iteration %d: local fallback plan (%s): %s", it, reason, str(exc).splitlines()[0])
        self._degraded = True

    def attach(self, executor: PlanPreparer) -> None:
        """Check plans ahead on `executor`: ``prepare=executor.prepare`` and ``executor.idle_hook =
        self.prepare_arrived`` (see the class docstring)."""
        self.prepare = executor.prepare
        executor.idle_hook = self.prepare_arrived

    def prepare_arrived(self) -> int:
        """Collect the plans of requested iterations whose replies are all here and pass each to `prepare`, without
        waiting; returns how many were prepared. Call it where the host would idle anyway: the executor's
        `idle_hook` (its iteration queued, the device still busy). The plan then reaches its iteration checked, and
        that iteration starts without the check (tens of ms of host time for a large plan) on its critical path."""
        stream = self._stream
        if stream is None or self.prepare is None:
            return 0
        done = 0
        for it in sorted(self._requested):
            if it in self._collected or it in self._skipped or not stream.has_results(it, self._ranks):
                continue
            got = self._collect(it)
            self._collected[it] = got
            if isinstance(got, tuple):
                try:
                    self.prepare(got[0], self._requested[it])
                except PipeWeaverError as exc:  # the executor refuses it again when it comes, and falls back
                    log.debug("iteration %d: the plan failed its early check: %s", it, exc)
                done += 1
        return done

    def _resolve(self, batch: T, meta: BatchMetadata) -> PlannedBatch[T]:
        start = time.monotonic()
        self._requested.pop(meta.iteration, None)
        early = self._collected.pop(meta.iteration, None)
        got = early if early is not None else self._collect(meta.iteration)
        waited = (time.monotonic() - start) * 1e3
        if self._stream is not None:
            self._stream.forget_before(meta.iteration + 1)
        s = self.stats
        s.iterations += 1
        s.total_wait_ms += waited
        s.max_wait_ms = max(s.max_wait_ms, waited)
        if isinstance(got, tuple):
            plan, served_fallback = got
            if served_fallback:
                s.served_fallbacks += 1
            else:
                s.planned += 1
            return PlannedBatch(batch, meta, plan, "planner", served_fallback=served_fallback, wait_ms=waited)
        built = time.monotonic()
        plan = self.fallback_plan(meta)
        s.local_fallbacks[got] += 1
        return PlannedBatch(
            batch,
            meta,
            plan,
            "fallback",
            fallback_reason=got,
            wait_ms=waited,
            fallback_ms=(time.monotonic() - built) * 1e3,
        )

    # ---- re-registration after a planner restart ----
    def _reregister(self) -> None:
        if self._blocked is not None or (self._reregistering is not None and self._reregistering.is_alive()):
            return
        self._blocked = "unregistered"

        def run() -> None:
            try:
                job = self.client.reregister(self.job)
            except PipeWeaverError as exc:
                log.warning("registering the job again failed (%s); retrying on the next refusal", exc)
                self._blocked = None
                return
            if job.job_id != self.job.job_id or job.placement != self.job.placement:
                log.error("the planner registered the job with another placement; running fallback plans")
                self._blocked = "placement"
                return
            self._blocked = None

        self._reregistering = threading.Thread(target=run, name="pipeweaver-reregister", daemon=True)
        self._reregistering.start()

    # ---- feedback ----
    def report(
        self, iteration: int, measured_iteration_ms: float, measured_ms: Sequence[tuple[float, float]] = ()
    ) -> TimingReport | None:
        """Send a measured iteration to the planner (its online refit); None when that failed (counted, never
        raised: feedback must not stop training)."""
        try:
            return self.client.report_timings(
                self.job.job_id,
                iteration,
                self.rank,
                measured_iteration_ms,
                measured_ms,
                timeout_s=self.report_timeout_s,
            )
        except PipeWeaverError as exc:
            self.stats.reports_failed += 1
            log.debug("ReportTimings for iteration %d failed: %s", iteration, exc)
            return None

    def close(self) -> None:
        """End the plan stream (the client stays open)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

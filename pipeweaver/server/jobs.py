"""Registered jobs and their plan state: ids, the plan window, the plan cache and the online refit.

- A job id is a hash of what the job is (model, parallelism, hardware, calibration, budget), so registering the
  same spec again, from every rank or after a trainer restart, returns the same id and partition.
- The plan window holds one `PlanEntry` per (data-parallel replica, iteration): the first rank's request starts
  the planning, every other rank's request for that iteration attaches to it, and all of them get the plan the
  entry resolves to, once. That is what keeps the ranks of a pipeline on the same plan.
- The plan cache maps a batch's signature to the searched plan for it (temporal reuse across iterations).
- The known contents map microbatches as received (bytes) to their digest, so that a batch sent again (by the
  other ranks of its pipeline, an equal replica, a later iteration) skips the parse, checks and digest.

No grpc and no processes here: plain asyncio state, driven by `planning.Planning`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeweaver import wire
from pipeweaver.plan.ir import Compute, Pass
from pipeweaver.server import delivery_trace, rawproto, work
from pipeweaver.v1 import planner_pb2 as pb

REFIT_ALPHA = 0.3
"""Weight of the newest iteration in the job's measured / predicted ratio (an exponential moving average)."""
REFIT_RATIO_RANGE = (0.01, 100.0)
"""Ratios outside this range are clipped: a report that far off is a broken clock, not a cost model."""
STAGE_SCALE_STEP = 1.05
"""Per-stage refit factors are published in whole powers of this (5% steps): a worker builds a planner on new
costs only when a factor moves a step, not after every report."""
STAGE_SCALE_RANGE = (0.2, 5.0)
"""Bounds of a per-stage refit factor: beyond them the measurement, not the cost model, is suspect."""
RECENT_ERRORS = 50
TIMING_WINDOW = 16
"""Recent worker timings kept per job; the estimates below are their maximum (a deadline is no place for means)."""
OVERHEAD_PRIOR_MS = 250.0
"""Worker time beyond the search budget assumed before a job's first search (large models take more)."""
FALLBACK_PRIOR_MS = 100.0
RESERVE_FALLBACKS_BEFORE_DECAY = 3
KNOWN_CONTENTS = 1024
KNOWN_CONTENTS_BYTES = 16 << 20
"""Checked batch contents remembered per job (least recently used forgotten past either limit)."""


class JobClosed(Exception):
    """The job was forgotten (registry full) while a plan for it was pending."""


def job_id_for(spec: work.JobSpec, budget_ms: float) -> str:
    """A stable id from what the job is: identical registrations (every rank's, a restart's) get the same id."""
    identity = repr((spec.model, spec.parallel, spec.hardware, spec.calibration, float(budget_ms), spec.offload))
    return "job-" + hashlib.sha256(identity.encode()).hexdigest()[:16]


def batch_digest(batch: pb.BatchMetadata) -> bytes:
    """A digest of the batch's microbatches: equal exactly when `BatchMetadata.signature()` is equal.

    The microbatches hold exactly the fields `signature()` reads (per document: text tokens; per media item:
    modality, tokens, merged tokens). The identity fields (iteration, replica) are cleared for the hash and put
    back, and unknown fields are dropped (the service forwards none), so the serialization is canonical. One C
    serialization of the request's own message: copying it first, or building the dataclasses, would cost
    0.5-20 ms of Python per request on the event loop.
    """
    iteration, replica = batch.iteration, batch.dp_replica
    batch.ClearField("iteration")
    batch.ClearField("dp_replica")
    batch.DiscardUnknownFields()
    try:
        return hashlib.blake2b(batch.SerializeToString(deterministic=True), digest_size=16).digest()
    finally:
        batch.iteration, batch.dp_replica = iteration, replica


@dataclass(frozen=True, slots=True)
class Batch:
    """A checked batch as planning needs it."""

    iteration: int
    replica: int
    digest: bytes
    """`batch_digest` of the batch: equal exactly when the microbatches' contents are."""
    data: bytes
    """The serialized `pb.BatchMetadata` (what the workers decode)."""

    @classmethod
    def of(cls, batch: pb.BatchMetadata, data: bytes | None = None) -> Batch:
        """`data`: `batch` as it was serialized, if at hand (else serialized here)."""
        return cls(
            batch.iteration, batch.dp_replica, batch_digest(batch), batch.SerializeToString() if data is None else data
        )


_SOURCES = {"search": pb.PLAN_SOURCE_SEARCH, "cache": pb.PLAN_SOURCE_CACHE, "fallback": pb.PLAN_SOURCE_FALLBACK}


class SharedPlan:
    """A plan as the service hands it out: never mutated, shared by every iteration and replica it serves.

    It stays in the parts the worker serialized (`work.EncodedPlan`). A rank's answer is the header's bytes, that
    rank's `RankPlan` bytes (`StreamPlansResponse` and `GetPlanResponse` number them 1 and 2, as `Plan` does) and a
    few bytes that set the identity (protobuf merges concatenated messages field by field, later scalars winning):
    no parse and no serialization on the event loop, however many ranks, replicas and iterations it serves.
    """

    __slots__ = ("_header", "_parsed", "_rank_heads", "encoded")

    def __init__(self, encoded: work.EncodedPlan) -> None:
        self.encoded = encoded
        self._header = rawproto.field(1, encoded.header)
        self._parsed: pb.Plan | None = None
        # Each rank's RankPlan field head, without and with the predicted times (written once, not per answer).
        self._rank_heads = [
            (rawproto.field_head(2, len(lean)), rawproto.field_head(2, len(lean) + len(times)))
            for lean, times in zip(encoded.lean, encoded.timings, strict=True)
        ]

    @classmethod
    def of(cls, plan: pb.Plan) -> SharedPlan:
        return cls(work.EncodedPlan.of(plan))

    @property
    def plan(self) -> Any:
        """The `pb.Plan` with every rank's actions, parsed on first use (nothing on the serving path uses it)."""
        if self._parsed is None:
            self._parsed = pb.Plan.FromString(self.encoded.serialized())
        return self._parsed

    def action_count(self, rank: int) -> int:
        actions = self.encoded.actions
        if not 0 <= rank < len(actions):
            raise KeyError(f"the plan has no rank {rank}")
        return actions[rank]

    def answer(self, rank: int, identity: bytes, *, timings: bool = True) -> bytes:
        """This rank's serialized `StreamPlansResponse` / `GetPlanResponse`, with `identity` appended; `timings`:
        its `RankPlan` carries the predicted action times."""
        lean = self.encoded.lean
        if not 0 <= rank < len(lean):
            raise KeyError(f"the plan has no rank {rank}")
        if timings:
            return b"".join((self._header, self._rank_heads[rank][1], lean[rank], self.encoded.timings[rank], identity))
        return b"".join((self._header, self._rank_heads[rank][0], lean[rank], identity))


@dataclass(frozen=True, slots=True)
class Served:
    """The plan an entry resolved to (shared by every rank of the pipeline)."""

    shared: SharedPlan
    source: str
    """search, cache or fallback."""
    iteration: int
    replica: int
    raw_predicted_ms: float = 0.0
    """Predicted makespan before the online refit's scale (0: not predicted, as for fallback plans)."""
    search_ms: float = 0.0
    """Worker time spent searching this plan (0 for cache hits and fallbacks)."""
    _identity: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def plan(self) -> Any:
        """The `pb.Plan` with every rank's actions; its header's identity fields are those of the iteration it
        was planned for, which for a reused plan is another iteration (see `response_bytes`)."""
        return self.shared.plan

    @property
    def fallback(self) -> bool:
        return self.source == "fallback"

    @property
    def predicted_ms(self) -> float:
        return self.shared.encoded.predicted_ms

    def action_count(self, rank: int) -> int:
        return self.shared.action_count(rank)

    def reissued(self, entry: PlanEntry, *, waited: bool = False) -> Served:
        """The same plan for another iteration or replica, as a cache hit; `waited`: the entry waited for this
        plan's search (it was in flight), which its answer's search_ms then reports."""
        search_ms = self.search_ms if waited else 0.0
        return Served(self.shared, "cache", entry.iteration, entry.replica, self.raw_predicted_ms, search_ms)

    def response_bytes(self, rank: int, *, timings: bool = True) -> bytes:
        """This rank's serialized `StreamPlansResponse` / `GetPlanResponse` (the two share field numbers);
        `timings`: with the rank's predicted action times (GetPlan always; a stream when its request asks)."""
        return self.shared.answer(rank, self.identity, timings=timings)

    @property
    def identity(self) -> bytes:
        """The bytes that make the shared plan this entry's: appended to every rank's answer."""
        identity: bytes | None = self._identity
        if identity is None:  # built on first use, then shared by the pipeline's ranks
            # The header's identity is written out in full, zeros included: it must override the shared header's.
            header = (
                rawproto.varint_field(2, self.iteration)
                + rawproto.varint_field(7, _SOURCES[self.source])
                + rawproto.varint_field(8, self.replica)
            )
            identity = rawproto.field(1, header)
            if self.fallback:
                identity += rawproto.varint_field(3, 1)
            if self.search_ms:
                identity += rawproto.double_field(4, self.search_ms)
            object.__setattr__(self, "_identity", identity)  # frozen: a cache, not a change of value
        return identity


class PlanEntry:
    """One (job, replica, iteration): resolved exactly once, to a searched, cached or fallback plan."""

    def __init__(self, replica: int, iteration: int, digest: bytes, batch: bytes) -> None:
        self.replica = replica
        self.iteration = iteration
        self.digest = digest
        self.batch = batch
        """The batch as serialized by the first request (what the workers decode)."""
        self.final: asyncio.Future[Served] = asyncio.get_running_loop().create_future()
        self.waiters = 0
        """Requests waiting for the plan (not those answered at once)."""
        self.deadlines: list[float] = []
        """The waiting requests' deadlines (monotonic clock): the earliest decides when the fallback starts."""
        self.fallback_timer: asyncio.TimerHandle | None = None
        self.search: asyncio.Future[None] | None = None
        """The search that resolves this entry: a task waiting for a worker, or the following of another
        replica's search of the same batch (`Planning._follow`)."""
        self.fallback: asyncio.Task[None] | None = None

    def resolve(self, served: Served) -> bool:
        """Fix the plan for every rank; False when it was already fixed (first resolution wins)."""
        if self.final.done():
            return False
        if delivery_trace.events is not None:
            delivery_trace.events.append(
                ("resolve", self.replica, self.iteration, time.perf_counter(), served.source, *delivery_trace.sched())
            )
        self.final.set_result(served)
        self.disarm()
        return True

    def fail(self, error: BaseException) -> None:
        if not self.final.done():
            self.final.set_exception(error)
            # Every waiter sees the error; nobody may be left holding an unretrieved exception.
            self.final.exception()
            self.disarm()

    def disarm(self) -> None:
        if self.fallback_timer is not None:
            self.fallback_timer.cancel()
            self.fallback_timer = None

    def served(self) -> Served | None:
        if self.final.done() and not self.final.cancelled() and self.final.exception() is None:
            return self.final.result()
        return None

    def cancel_tasks(self) -> None:
        for task in (self.search, self.fallback):
            if task is not None and not task.done():
                task.cancel()


@dataclass(frozen=True, slots=True)
class CachedPlan:
    shared: SharedPlan
    raw_predicted_ms: float


class JobState:
    """Everything the service keeps about one registered job."""

    def __init__(
        self, job: work.Job, response: Any, *, budget_ms: float, plan_window: int, plan_cache_size: int
    ) -> None:
        self.job = job
        self.response = response
        """The `pb.RegisterJobResponse` every registration of this job gets."""
        self.budget_ms = budget_ms
        self._plan_window = plan_window
        self._plan_cache_size = plan_cache_size
        self._windows: dict[int, OrderedDict[int, PlanEntry]] = {}
        self._cache: OrderedDict[bytes, CachedPlan] = OrderedDict()
        self._fallback_builds: OrderedDict[bytes, asyncio.Future[SharedPlan]] = OrderedDict()
        """Fallback plans by batch digest, being built or built: a fallback depends on the batch's shapes only,
        so replicas with equal batches share one build instead of queueing one each on the control lane."""
        self._known: OrderedDict[bytes, bytes] = OrderedDict()
        self._known_bytes = 0
        self._searching: dict[bytes, PlanEntry] = {}
        """Entries whose search is running, by batch digest: an equal batch (another replica, a repeated
        iteration) waits for that search instead of starting its own."""
        self._overheads: deque[float] = deque(maxlen=TIMING_WINDOW)
        self._cold_overhead: float | None = None
        self._fallbacks: deque[float] = deque(maxlen=TIMING_WINDOW)
        self._reserve_fallbacks = 0
        self.time_scale = 1.0
        """Online refit: EWMA of measured / predicted makespan, applied to later predictions."""
        self._stage_log_scale: dict[tuple[str, str], float] = {}
        """Per (module, pass F/B): EWMA of log(measured / predicted stage time) folded into the planner's costs."""
        self._stage_folded: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._errors: deque[float] = deque(maxlen=RECENT_ERRORS)
        self._folded: OrderedDict[int, None] = OrderedDict()
        self.warming: asyncio.Task[None] | None = None
        """The latest warm-up of the workers for this job (`Planning._warm_job`), running or done: held here so
        that the event loop's weak reference is not the task's only one."""

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def pp(self) -> int:
        return self.job.spec.parallel.pp

    # ---- the plan window ----
    def entry(self, replica: int, iteration: int) -> PlanEntry | None:
        window = self._windows.get(replica)
        return window.get(iteration) if window is not None else None

    def add_entry(self, entry: PlanEntry) -> None:
        window = self._windows.setdefault(entry.replica, OrderedDict())
        window[entry.iteration] = entry
        while len(window) > self._plan_window:
            # The oldest iteration: every rank of a pipeline moves in lockstep, so none still needs it.
            window.popitem(last=False)

    def drop(self, entry: PlanEntry) -> None:
        """Forget `entry` (failed or abandoned) so the next request for its iteration plans afresh."""
        window = self._windows.get(entry.replica)
        if window is not None and window.get(entry.iteration) is entry:
            del window[entry.iteration]

    def served_for(self, iteration: int) -> list[Served]:
        out = []
        for window in self._windows.values():
            entry = window.get(iteration)
            served = entry.served() if entry is not None else None
            if served is not None:
                out.append(served)
        return out

    # ---- checked batch contents ----
    def known_contents(self, microbatches: bytes) -> bytes | None:
        """The digest of a batch whose microbatches are these bytes, if a batch with them passed this job's checks
        (`validation.check_batch`'s microbatch checks; the identity fields are the caller's to check)."""
        digest = self._known.get(microbatches)
        if digest is not None:
            self._known.move_to_end(microbatches)
        return digest

    def remember_contents(self, microbatches: bytes, digest: bytes) -> None:
        if microbatches in self._known or len(microbatches) > KNOWN_CONTENTS_BYTES:
            return
        self._known[microbatches] = digest
        self._known_bytes += len(microbatches)
        while len(self._known) > KNOWN_CONTENTS or self._known_bytes > KNOWN_CONTENTS_BYTES:
            old, _ = self._known.popitem(last=False)
            self._known_bytes -= len(old)

    # ---- the plan cache ----
    def cached(self, digest: bytes) -> CachedPlan | None:
        hit = self._cache.get(digest)
        if hit is not None:
            self._cache.move_to_end(digest)
        return hit

    def remember(self, digest: bytes, shared: SharedPlan, raw_predicted_ms: float) -> None:
        if self._plan_cache_size == 0:
            return
        self._cache[digest] = CachedPlan(shared, raw_predicted_ms)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._plan_cache_size:
            self._cache.popitem(last=False)

    def fallback_build(self, digest: bytes) -> asyncio.Future[SharedPlan] | None:
        """The fallback plan for `digest`, built or being built (None: start one, see `add_fallback_build`)."""
        build = self._fallback_builds.get(digest)
        if build is None or (build.done() and (build.cancelled() or build.exception() is not None)):
            return None
        self._fallback_builds.move_to_end(digest)
        return build

    def add_fallback_build(self, digest: bytes, build: asyncio.Future[SharedPlan]) -> None:
        self._fallback_builds[digest] = build
        while len(self._fallback_builds) > max(self._plan_window, 4):
            self._fallback_builds.popitem(last=False)

    def searching(self, digest: bytes) -> PlanEntry | None:
        entry = self._searching.get(digest)
        return entry if entry is not None and not entry.final.done() else None

    def start_searching(self, entry: PlanEntry) -> None:
        self._searching[entry.digest] = entry

    def stop_searching(self, entry: PlanEntry) -> None:
        if self._searching.get(entry.digest) is entry:
            del self._searching[entry.digest]

    @property
    def caching(self) -> bool:
        return self._plan_cache_size > 0

    # ---- timing estimates ----
    @property
    def overhead_ms(self) -> float:
        """Worker time beyond the search budget (decode, memory pass, baselines, encode), kept free before a
        deadline: the largest of the job's recent searches."""
        if self._overheads:
            return max(self._overheads)
        return self._cold_overhead if self._cold_overhead is not None else OVERHEAD_PRIOR_MS

    @property
    def fallback_ms(self) -> float:
        """Wall time of a fallback plan, reserved before a deadline: the largest of the job's recent ones."""
        return max(self._fallbacks, default=FALLBACK_PRIOR_MS)

    def record_overhead(self, worker_ms: float, budget_ms: float, *, first_search: bool = False) -> None:
        """One search's worker time beyond its budget. A worker's first search for the job (cold caches: on 4
        H100s the first one cost seconds more than the rest and its reserve turned the next three iterations into
        fallbacks) stands in only until a warm search has been measured."""
        overhead = max(worker_ms - budget_ms, 0.0)
        if first_search:
            self._cold_overhead = overhead
        else:
            self._overheads.append(overhead)
        self._reserve_fallbacks = 0

    def note_reserve_fallback(self) -> None:
        """An iteration fell back because the reserve left no time to search. Searches are what refresh the
        estimates, so a reserve inflated by one slow outlier (a cold start, a busy machine) would otherwise keep
        every later iteration on fallbacks for good: after a few such iterations in a row, forget the largest
        estimate of the search's overhead and let the next iteration try a search again. The fallback's estimate
        loses its largest sample only when that is an outlier (more than twice the median of the others, or alone):
        fallbacks refresh it every time they are built, and forgetting typical ones starts the next fallbacks too
        late for their deadlines (at 500 ms iterations of vlm-s on 2 cores, the decayed estimate was one of the
        three reasons a quarter of the fallbacks came late: docs/benchmarks.md)."""
        self._reserve_fallbacks += 1
        if self._reserve_fallbacks >= RESERVE_FALLBACKS_BEFORE_DECAY:
            self._reserve_fallbacks = 0
            self._cold_overhead = None
            if self._overheads:
                self._overheads.remove(max(self._overheads))
            if self._fallbacks:
                top = max(self._fallbacks)
                others = sorted(self._fallbacks)[:-1]
                if not others or top > 2.0 * others[len(others) // 2]:
                    self._fallbacks.remove(top)

    def record_fallback(self, wall_ms: float) -> None:
        self._fallbacks.append(wall_ms)

    # ---- online refit ----
    def fold_report(self, iteration: int, measured_ms: float) -> tuple[float, float, bool]:
        """Compare a measured iteration with the plan served for it; refit once per iteration.

        Returns (iteration error, mean recent error, whether this report updated the refit). The error is NaN
        when no predicted plan for the iteration is known (a fallback plan, or one out of the window).
        """
        served = [s for s in self.served_for(iteration) if s.predicted_ms > 0]
        if not served:
            return math.nan, self.mean_error(), False
        # Without a replica in the report, replicas' plans for the iteration are averaged (usually one).
        predicted = sum(s.predicted_ms for s in served) / len(served)
        error = abs(predicted - measured_ms) / measured_ms
        if iteration in self._folded:
            return error, self.mean_error(), False
        self._folded[iteration] = None
        while len(self._folded) > 4 * self._plan_window:
            self._folded.popitem(last=False)
        raws = [s.raw_predicted_ms for s in served if s.raw_predicted_ms > 0]
        if raws:
            lo, hi = REFIT_RATIO_RANGE
            ratio = min(max(measured_ms / (sum(raws) / len(raws)), lo), hi)
            self.time_scale = (1 - REFIT_ALPHA) * self.time_scale + REFIT_ALPHA * ratio
        self._errors.append(error)
        return error, self.mean_error(), True

    @property
    def stage_scales(self) -> work.StageScales:
        """The per-stage refit as the workers take it: factors rounded to whole `STAGE_SCALE_STEP`s, 1.0 left out."""
        out = []
        for (module, pass_), log_scale in sorted(self._stage_log_scale.items()):
            steps = round(log_scale / math.log(STAGE_SCALE_STEP))
            if steps:
                out.append((module, pass_, STAGE_SCALE_STEP**steps))
        return tuple(out)

    def fold_stage_timings(self, iteration: int, rank: int, starts: Any, ends: Any) -> int:
        """Refit the per-(module, pass) factors from one rank's measured action times for `iteration`.

        Per key, the sum of its computes' measured durations over the sum of their predicted durations (the served
        plan's `predicted_*_ms`, with the current factors; the time scale taken out) is compared with the same
        ratio over all the rank's computes, and the factor moves by an EWMA step in log space towards that
        relative ratio. Relative, because the level (everything 1.5x slower) is the makespan refit's
        (`time_scale`): two loops correcting the same level would overshoot (one demo run with absolute per-stage
        ratios over-predicted by 14% on average; a single noisy run on a loaded machine). What decides between
        plans is how stage kinds compare, which is what the factors learn (on 4 H200s a decoder forward ran
        1.6-1.9x its prediction while ViT stages were within 15%, docs/gpu.md section 6). Computes of a pipeline
        that is not one module (mixed chunks) are skipped, as are fallback plans (no predictions). Returns the
        number of keys updated (0: nothing to learn, or this (iteration, rank) was folded already)."""
        served = [s for s in self.served_for(iteration) if s.predicted_ms > 0 and s.action_count(rank) == len(starts)]
        if not served or (iteration, rank) in self._stage_folded:
            return 0
        self._stage_folded[(iteration, rank)] = None
        while len(self._stage_folded) > 4 * self._plan_window * self.job.spec.parallel.pp:
            self._stage_folded.popitem(last=False)
        shared = served[0]
        rank_plan = wire.rank_plan_from_proto(pb.RankPlan.FromString(shared.shared.encoded.rank_plan(rank)))
        if len(rank_plan.predicted_ms) != len(starts):
            return 0
        # The plan's times carry the makespan refit of the moment it was served; take it out.
        scale = shared.predicted_ms / shared.raw_predicted_ms if shared.raw_predicted_ms > 0 else 1.0
        modules = set(self.job.spec.model.module_names)
        measured: dict[tuple[str, str], float] = {}
        predicted: dict[tuple[str, str], float] = {}
        busy = 0.0
        for i, action in enumerate(rank_plan.actions):
            if not isinstance(action, Compute):
                continue
            stage = action.stage
            if stage.pipeline not in modules:
                continue
            key = (stage.pipeline, "F" if stage.pass_ is Pass.F else "B")
            p_start, p_end = rank_plan.predicted_ms[i]
            want = (p_end - p_start) / scale
            got = float(ends[i]) - float(starts[i])
            busy += max(got, 0.0)
            if want > 0 and got > 0:
                measured[key] = measured.get(key, 0.0) + got
                predicted[key] = predicted.get(key, 0.0) + want
        span = max(map(float, ends), default=0.0) - min(map(float, starts), default=0.0)
        if busy > 1.05 * span:
            return 0  # a rank's computes run one after another: these are not per-action times
        if len(measured) < 2:
            return 0  # one kind of stage: nothing relative to learn
        lo, hi = (math.log(x) for x in STAGE_SCALE_RANGE)
        level = math.log(sum(measured.values()) / sum(predicted.values()))
        for key, got in measured.items():
            # The ratio corrects the factor the plan was predicted with, which is the current one unless the refit
            # moved since (plans are made an iteration or two ahead: a small lag, no bias at a fixed point).
            step = min(max(math.log(got / predicted[key]) - level, lo), hi)
            old = self._stage_log_scale.get(key, 0.0)
            self._stage_log_scale[key] = min(max(old + REFIT_ALPHA * step, lo), hi)
        return len(measured)

    def close(self) -> None:
        """Stop planning for this job (it was forgotten or the server is stopping)."""
        for window in self._windows.values():
            for entry in window.values():
                entry.cancel_tasks()
                entry.fail(JobClosed(self.job_id))
        self._windows.clear()

    def mean_error(self) -> float:
        return sum(self._errors) / len(self._errors) if self._errors else math.nan


class JobRegistry:
    """Jobs by id (least recently used forgotten past `max_jobs`); concurrent identical registrations share one
    partitioner run."""

    def __init__(self, max_jobs: int, *, on_change: Callable[[int], None] | None = None) -> None:
        self._max_jobs = max_jobs
        self._jobs: OrderedDict[str, JobState] = OrderedDict()
        self._pending: dict[str, asyncio.Task[JobState]] = {}
        self._on_change = on_change

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> JobState | None:
        job = self._jobs.get(job_id)
        if job is not None:
            self._jobs.move_to_end(job_id)
        return job

    def recent(self, n: int) -> list[JobState]:
        """The `n` most recently used jobs, newest first."""
        return list(reversed(self._jobs.values()))[:n]

    async def register(self, job_id: str, create: Callable[[], Awaitable[JobState]]) -> JobState:
        """The job `job_id`, created by `create()` unless it exists or is being created.

        The creation runs as its own task: a registering client that goes away does not cancel it for the
        other ranks registering the same job.
        """
        existing = self.get(job_id)
        if existing is not None:
            return existing
        pending = self._pending.get(job_id)
        if pending is None:
            pending = asyncio.ensure_future(self._create(job_id, create))
            pending.add_done_callback(mark_retrieved)
            self._pending[job_id] = pending
        return await asyncio.shield(pending)

    async def _create(self, job_id: str, create: Callable[[], Awaitable[JobState]]) -> JobState:
        try:
            job = await create()
        finally:
            del self._pending[job_id]
        self._jobs[job_id] = job
        while len(self._jobs) > self._max_jobs:
            _, old = self._jobs.popitem(last=False)
            old.close()
        if self._on_change is not None:
            self._on_change(len(self._jobs))
        return job

    def close(self) -> None:
        for job in self._jobs.values():
            job.close()


def mark_retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a background task's outcome as seen (its waiters, if any, got it already)."""
    if not task.cancelled():
        task.exception()

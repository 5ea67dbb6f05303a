"""How a request becomes a plan: registration, the per-iteration search or fallback, deadlines, the refit.

One search per (job, replica, iteration) however many ranks ask (`jobs.PlanEntry`); a repeated batch signature
is answered from the job's plan cache. With a deadline, the search gets the budget that still leaves time for
the worker's overhead and a fallback; if no plan is there when only the fallback's time is left, the fallback is
built on the control lane and becomes *the* plan of that iteration for every rank. A search worker that dies
makes its iterations' plans fallbacks too. All CPU work happens in the pool; this module only awaits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from pipeweaver.search.baselines.registry import BASELINES
from pipeweaver.server import delivery_trace, idle_gc, work
from pipeweaver.server.config import ServerConfig
from pipeweaver.server.jobs import (
    Batch,
    JobClosed,
    JobRegistry,
    JobState,
    PlanEntry,
    Served,
    SharedPlan,
    job_id_for,
    mark_retrieved,
)
from pipeweaver.server.metrics import Metrics
from pipeweaver.server.pool import PoolClosed, QueueFull, WorkerCrashed, WorkerPool
from pipeweaver.server.validation import (
    JobRequest,
    RequestError,
    Violation,
    check_batch,
    check_job_spec,
    check_timings,
    from_rejected,
    internal_error,
    invalid,
    unknown_job,
)
from pipeweaver.v1 import planner_pb2 as pb

log = logging.getLogger("pipeweaver.server")

SLACK_MS = 10.0
"""Event loop, IPC and serialization time kept free before a deadline."""
PREBUILD_BELOW = 0.5
"""A search whose deadline leaves it less than this fraction of its budget has its fallback built at once."""
SIMULATE_SCHEDULES = ("pipeweaver", "fallback")
WARM_JOB_BUDGET_MS = 500.0
"""Most search budget a worker's warm-up for a new job uses (the job's own budget when smaller)."""
WARM_JOB_HOLD_S = 0.3
"""Each warm-up task holds its worker this long, so that a lane's N tasks reach its N different workers."""
REWARM_JOBS = 4
"""Jobs a replacement pool (after a worker died) is warmed for: the most recently used ones."""


def shutting_down() -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, "the planner is shutting down; reconnect", reason="SHUTTING_DOWN")


def queue_full(exc: QueueFull) -> RequestError:
    return RequestError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{exc}; retry later or plan with a client-side fallback",
        reason="QUEUE_FULL",
        retry_after_s=0.5,
    )


@dataclass(frozen=True, slots=True)
class EarlySearch:
    """A search submitted before its request was checked (`Planning.start_early`)."""

    outcome: asyncio.Future[Any]


class Abandoned(Exception):
    """Everyone who asked for an entry went away before it was planned (its followers plan it themselves)."""


class Planning:
    def __init__(self, config: ServerConfig, pool: WorkerPool, metrics: Metrics) -> None:
        self.config = config
        self.pool = pool
        self.m = metrics
        self.registry = JobRegistry(config.max_jobs, on_change=metrics.jobs.set)

    def job(self, job_id: str) -> JobState:
        if not job_id:
            raise invalid([Violation("job_id", "missing; use the id RegisterJob returned")])
        job = self.registry.get(job_id)
        if job is None:
            raise unknown_job(job_id)
        return job

    # ---- RegisterJob ----
    async def register(self, req: JobRequest) -> JobState:
        job_id = job_id_for(req.spec, req.budget_ms)

        async def create() -> JobState:
            outcome = await self._run(self.pool.control, work.register_job, work.Job(job_id, req.spec), "register")
            if isinstance(outcome, work.Rejected):
                raise from_rejected(outcome)
            part = outcome.partition
            response = pb.RegisterJobResponse(
                job_id=job_id,
                placement=pb.Placement.FromString(outcome.placement),
                module_splits=[
                    pb.ModuleSplit(
                        module=m.name,
                        sub_microbatch_size=part.sub_microbatch_size[m.name],
                        segments=part.segments[m.name],
                    )
                    for m in req.spec.model.modules
                ],
                static_memory_bytes=part.static_memory_bytes,
            )
            log.info("registered %s (%s, pp %d)", job_id, req.spec.model.name, req.spec.parallel.pp)
            state = JobState(
                work.Job(job_id, req.spec, part),
                response,
                budget_ms=req.budget_ms,
                plan_window=self.config.plan_window,
                plan_cache_size=self.config.plan_cache_size,
            )
            state.warming = asyncio.get_running_loop().create_task(self._warm_job(state))
            return state

        return await self.registry.register(job_id, create)

    def rewarm(self, lane: str) -> None:
        """A lane's pool was replaced (a worker died): warm its new workers for the most recently used jobs, so
        that their next searches are not cold either."""
        for job in self.registry.recent(REWARM_JOBS):
            job.warming = asyncio.get_running_loop().create_task(self._warm_job(job, lanes=(lane,)))

    async def _warm_job(self, job: JobState, lanes: tuple[str, ...] = ("search", "control")) -> None:
        """Warm the workers of `lanes` for `job`, in the background (RegisterJob has answered, or a lane's pool was
        replaced): each search worker builds the job's planner and searches one heavy batch, each control worker
        builds its fallback. A request arriving meanwhile queues behind the warm-up (about one search).

        The warm plans' times are *not* deadline-reserve samples: they are each worker's first, cold, plan for
        the job (2.6 s for a 300 ms search on the 4-GPU VLM run, run 16) and, kept as warm overheads, they sent
        the next nine iterations to fallbacks while the reserve decayed one sample at a time. The reserve learns
        from the real searches, which now start warm."""
        t0 = time.monotonic()
        budget_ms = min(job.budget_ms, WARM_JOB_BUDGET_MS)
        search = self.pool.search
        tasks = []
        if "search" in lanes:
            tasks += [
                search.submit(work.warm_job, work.WarmJobTask(job.job, "search", budget_ms, WARM_JOB_HOLD_S))
                for _ in range(search.workers)
            ]
        if "control" in lanes:
            control = self.pool.control
            hold_s = WARM_JOB_HOLD_S if control.workers > 1 else 0.0  # held: one task per worker, as above
            tasks += [
                control.submit(work.warm_job, work.WarmJobTask(job.job, "fallback", 0.0, hold_s))
                for _ in range(control.workers)
            ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        pids: dict[str, set[int]] = {"search": set(), "control": set()}
        for r in results:
            if isinstance(r, work.WarmJobOutcome):
                lane = "search" if r.mode == "search" else "control"
                self.m.worker_task_seconds.labels(lane=lane, task="warm_job").observe(r.worker_ms / 1e3)
                pids[lane].add(r.pid)
            elif isinstance(r, work.Rejected):
                log.warning("warming %s: %s", job.job_id, r.message)
            elif isinstance(r, (PoolClosed, asyncio.CancelledError)):
                return
            else:
                log.warning("warming %s failed: %s: %s", job.job_id, type(r).__name__, r)
        seconds = time.monotonic() - t0
        self.m.job_warmup_seconds.observe(seconds)
        log.info(
            "warmed %s on %d of %d search workers and %d of %d control workers (lanes: %s) in %.1f s",
            job.job_id,
            len(pids["search"]),
            search.workers if "search" in lanes else 0,
            len(pids["control"]),
            self.pool.control.workers if "control" in lanes else 0,
            ", ".join(lanes),
            seconds,
        )

    async def _run(self, lane: Any, fn: Any, arg: Any, what: str) -> Any:
        """Run a control task, mapping pool failures to statuses (registration, simulation)."""
        try:
            return await lane.run(fn, arg)
        except QueueFull as exc:
            raise queue_full(exc) from None
        except WorkerCrashed:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, f"the worker running this {what} died; retry", reason="WORKER_CRASHED"
            ) from None
        except PoolClosed:
            raise shutting_down() from None

    # ---- GetPlan / StreamPlans ----
    async def plan(self, job: JobState, batch: Batch, *, budget_ms: float, deadline: float | None) -> Served:
        """The plan of `batch` for every rank of its pipeline; `deadline` is on the `time.monotonic` clock."""
        entry = self.attach(job, batch, budget_ms=budget_ms, deadline=deadline)
        return await self.wait(job, entry, deadline)

    def attach(
        self,
        job: JobState,
        batch: Batch,
        *,
        budget_ms: float,
        deadline: float | None,
        early: EarlySearch | None = None,
    ) -> PlanEntry:
        """The entry of the batch's (replica, iteration), started if it is the first request for it. Its plan is
        `entry.served()` when already there (a cache hit, a rank after the first), else `await wait(...)`.
        `early`: the search `start_early` submitted for this batch; used if the entry needs a search, else
        cancelled."""
        entry = job.entry(batch.replica, batch.iteration)
        if entry is None:
            entry = PlanEntry(batch.replica, batch.iteration, batch.digest, batch.data)
            job.add_entry(entry)
            self._start(job, entry, budget_ms, deadline, early)
            return entry
        if early is not None:
            self.cancel_early(early)
        if entry.digest != batch.digest:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"batch: differs from the batch already sent for iteration {batch.iteration} of replica "
                f"{batch.replica}; every rank of a pipeline must send the same metadata",
                [Violation("batch", "differs from another rank's batch for the same iteration and replica")],
                reason="BATCH_CONFLICT",
            )
        self.m.deduplicated.inc()
        return entry

    async def wait(self, job: JobState, entry: PlanEntry, deadline: float | None) -> Served:
        """The plan `entry` resolves to, for a request that waits for it (`watch`)."""
        self.watch(job, entry, deadline)
        try:
            return await asyncio.shield(entry.final)
        except JobClosed:
            raise unknown_job(job.job_id) from None
        finally:
            self.unwatch(job, entry, deadline)

    def watch(self, job: JobState, entry: PlanEntry, deadline: float | None) -> None:
        """One more request waits for `entry`'s plan (`entry.final`) until `unwatch`. With a deadline, the fallback
        starts once only its time is left before the earliest deadline among the waiting requests."""
        entry.waiters += 1
        idle_gc.waiting(+1)
        if deadline is not None:
            entry.deadlines.append(deadline)
            self._arm_fallback(job, entry)

    def unwatch(self, job: JobState, entry: PlanEntry, deadline: float | None) -> None:
        """A request stops waiting for `entry` (it has its answer, or it went away)."""
        entry.waiters -= 1
        idle_gc.waiting(-1)
        if deadline is not None:
            entry.deadlines.remove(deadline)
            self._arm_fallback(job, entry)
        if entry.waiters == 0 and not entry.final.done():
            # Everyone who asked went away (a cancelled stream, an expired call): stop planning it, and wake
            # the entries waiting for its search so that one of them searches instead.
            entry.cancel_tasks()
            job.stop_searching(entry)
            entry.fail(Abandoned())
            job.drop(entry)

    def _arm_fallback(self, job: JobState, entry: PlanEntry) -> None:
        entry.disarm()
        if entry.final.done() or not entry.deadlines:
            return
        left_s = min(entry.deadlines) - time.monotonic() - (job.fallback_ms + SLACK_MS) / 1e3
        if left_s <= 0:
            self._start_fallback(job, entry, "deadline")
        else:
            entry.fallback_timer = asyncio.get_running_loop().call_later(
                left_s, self._start_fallback, job, entry, "deadline"
            )

    def start_early(
        self, job: JobState, replica: int, iteration: int, batch: bytes, *, budget_ms: float, deadline: float | None
    ) -> EarlySearch | None:
        """Submit the search of a batch whose contents the job has not seen, as soon as its identity is read:
        before the request's checks and digest, which cost the first request of an iteration 0.4-1.5 ms of the
        event loop while every rank's answer waited for the search to start (`benchmarks/delivery_breakdown.py`:
        first take -> submit). `attach` then uses it, or cancels it when the digest finds a cached or in-flight
        plan after all (bytes not seen before rarely hold contents seen before); the caller cancels it if the
        checks fail. None when the search would not start as requested (a clipped budget): `attach` decides."""
        task = self._search_task(job, batch, budget_ms, deadline)
        if task.search_budget_ms() < PREBUILD_BELOW * budget_ms:
            return None
        if delivery_trace.events is not None:
            delivery_trace.events.append(("submit", replica, iteration, time.perf_counter()))
        outcome = self.pool.search.submit(work.plan_batch, task)
        outcome.add_done_callback(mark_retrieved)
        return EarlySearch(outcome)

    def cancel_early(self, early: EarlySearch) -> None:
        """An early search nobody needs: dropped from the queue, or left to end at its budget if already running
        (its result is dropped)."""
        early.outcome.cancel()
        self.m.early_searches.labels(result="cancelled").inc()

    def _search_task(self, job: JobState, batch: bytes, budget_ms: float, deadline: float | None) -> work.PlanTask:
        return work.PlanTask(
            job.job,
            batch,
            "search",
            budget_ms,
            limits=self.config.limits,
            time_scale=job.time_scale,
            stage_scales=job.stage_scales,
            deadline=deadline,
            reserve_ms=job.overhead_ms + job.fallback_ms + SLACK_MS,
        )

    def _start(
        self,
        job: JobState,
        entry: PlanEntry,
        budget_ms: float,
        deadline: float | None,
        early: EarlySearch | None = None,
    ) -> None:
        if job.caching:
            hit = job.cached(entry.digest)
            if hit is not None:
                if early is not None:
                    self.cancel_early(early)
                self.m.plan_cache.labels(result="hit").inc()
                entry.resolve(Served(hit.shared, "cache", entry.iteration, entry.replica, hit.raw_predicted_ms))
                self.m.plans.labels(source="cache").inc()
                return
            leader = job.searching(entry.digest)
            if leader is not None:
                if early is not None:
                    self.cancel_early(early)
                # The same batch is being searched for another replica or iteration (data-parallel replicas
                # often see equal shapes): share that search rather than queue a second one behind it.
                self.m.plan_cache.labels(result="in_flight").inc()
                entry.search = self._follow(job, entry, leader, budget_ms, deadline)
                return
            self.m.plan_cache.labels(result="miss").inc()
        if early is not None:
            if job.caching:
                job.start_searching(entry)
            self.m.early_searches.labels(result="used").inc()
            self._await_search(job, entry, early.outcome)
            return
        task = self._search_task(job, entry.batch, budget_ms, deadline)
        if task.search_budget_ms() < work.MIN_SEARCH_BUDGET_MS:
            if task.deadline is not None and task.deadline - time.monotonic() > work.MIN_SEARCH_BUDGET_MS / 1e3:
                job.note_reserve_fallback()  # time was there, the reserve took it
            self._start_fallback(job, entry, "deadline")
            return
        if job.caching:
            job.start_searching(entry)
        if task.deadline is not None and task.search_budget_ms() < PREBUILD_BELOW * budget_ms:
            # The deadline leaves the search less than half its budget: the fallback is likely to be needed, and
            # built only once its reserve is all that is left it comes late whenever the control lane or the
            # event loop is busy (500 ms iterations of vlm-s: 85% on time without this, 98% with it). Not for
            # every clipped search: the extra build costs CPU that a mildly clipped search usually did not need.
            self._prebuild_fallback(job, entry, task.deadline)
        # Submitted now: the worker starts while the rest of a burst of requests is being read.
        if delivery_trace.events is not None:
            delivery_trace.events.append(("submit", entry.replica, entry.iteration, time.perf_counter()))
        outcome = self.pool.search.submit(work.plan_batch, task)
        outcome.add_done_callback(mark_retrieved)
        self._await_search(job, entry, outcome)

    def _await_search(self, job: JobState, entry: PlanEntry, outcome: asyncio.Future[Any]) -> None:
        entry.search = asyncio.create_task(self._search(job, entry, outcome))
        entry.search.add_done_callback(lambda _: outcome.cancel())  # the search is over, or abandoned

    def _follow(
        self, job: JobState, entry: PlanEntry, leader: PlanEntry, budget_ms: float, deadline: float | None
    ) -> asyncio.Future[None]:
        """Serve `entry` the plan `leader`'s search finds; if it finds none (fallback, failure, abandoned), plan
        `entry` on its own with whatever time its deadline leaves. Returns the following as a future: done once
        the leader resolved, and cancelling it stops following.

        A callback on the leader's plan, not a task: the replicas that share a search (15 of 16 in a data-parallel
        job whose replicas see equal shapes) resolve in the same event-loop pass as the leader, so their answers
        go out with the leader's; a task each resolved them a pass later, after a wake-up per replica."""
        following: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def resolved(final: asyncio.Future[Served]) -> None:
            if following.done():  # stopped following (the entry was abandoned or fell back)
                return
            following.set_result(None)
            served = None if final.cancelled() or final.exception() is not None else final.result()
            try:
                if served is not None and not served.fallback:
                    if entry.resolve(served.reissued(entry, waited=True)):
                        self.m.plans.labels(source="cache").inc()
                elif not entry.final.done():
                    self._start(job, entry, budget_ms, deadline)
            except Exception as exc:  # in a callback: nobody else would see it, and the entry would never resolve
                log.exception("unexpected error following another replica's search")
                entry.fail(internal_error(exc))
                job.drop(entry)

        def stopped(f: asyncio.Future[None]) -> None:
            if f.cancelled():
                leader.final.remove_done_callback(resolved)

        leader.final.add_done_callback(resolved)
        following.add_done_callback(stopped)
        return following

    async def _search(self, job: JobState, entry: PlanEntry, running: asyncio.Future[Any]) -> None:
        try:
            await self._search_once(job, entry, running)
        finally:
            job.stop_searching(entry)

    async def _search_once(self, job: JobState, entry: PlanEntry, running: asyncio.Future[Any]) -> None:
        """Wait for the search in a worker; the worker clips the budget to the deadline when the task starts."""
        try:
            outcome = await running
        except QueueFull as exc:
            entry.fail(queue_full(exc))
            job.drop(entry)
            return
        except WorkerCrashed:
            self._start_fallback(job, entry, "worker_crash")
            return
        except PoolClosed:
            entry.fail(shutting_down())
            job.drop(entry)
            return
        except Exception:
            log.exception("search failed for %s iteration %d; falling back", job.job_id, entry.iteration)
            self._start_fallback(job, entry, "error")
            return
        if isinstance(outcome, work.Rejected):
            entry.fail(from_rejected(outcome))
            job.drop(entry)
            return
        if isinstance(outcome, work.Expired):  # it waited for a worker past the point a search could fit
            self._start_fallback(job, entry, "deadline")
            return
        if delivery_trace.events is not None:
            delivery_trace.events.append(
                (
                    "searched",
                    entry.replica,
                    entry.iteration,
                    time.perf_counter(),
                    outcome.worker_ms,
                    *outcome.worker_span,
                )
            )
        shared = SharedPlan(outcome.plan)
        job.record_overhead(outcome.worker_ms - outcome.setup_ms, outcome.budget_ms, first_search=outcome.first_search)
        job.remember(entry.digest, shared, outcome.raw_predicted_ms)
        self._observe_search(outcome)
        # The answer reports the worker's whole time on the plan (search, SEMU checks, encoding): what the client
        # sees beyond it is the service's own delivery overhead (queueing, IPC, the event loop, serialization).
        served = Served(shared, "search", entry.iteration, entry.replica, outcome.raw_predicted_ms, outcome.worker_ms)
        if entry.resolve(served):
            self.m.plans.labels(source="search").inc()

    def _observe_search(self, outcome: work.PlanOutcome) -> None:
        m = self.m
        m.worker_task_seconds.labels(lane="search", task="search").observe(outcome.worker_ms / 1e3)
        m.search_seconds.observe(outcome.search_ms / 1e3)
        m.bubble.observe(outcome.bubble_fraction)
        m.semu_cache_hit.observe(outcome.cache_hit_rate)
        if outcome.predicted_ms > 0:
            for name, ms in outcome.baseline_ms.items():
                m.speedup.labels(baseline=name).observe(ms / outcome.predicted_ms)

    def _start_fallback(self, job: JobState, entry: PlanEntry, reason: str) -> None:
        if entry.final.done() or entry.fallback is not None:
            return
        entry.fallback = asyncio.create_task(self._fallback(job, entry, reason))

    def _prebuild_fallback(self, job: JobState, entry: PlanEntry, deadline: float | None) -> asyncio.Future[SharedPlan]:
        """`entry`'s fallback build, started now unless one for its batch is under way or done."""
        build = job.fallback_build(entry.digest)
        if build is None:
            due = deadline - SLACK_MS / 1e3 if deadline is not None else None  # ready before it, not at it
            build = asyncio.ensure_future(self._build_fallback(job, entry.batch, due))
            build.add_done_callback(mark_retrieved)
            job.add_fallback_build(entry.digest, build)
        return build

    async def _fallback(self, job: JobState, entry: PlanEntry, reason: str) -> None:
        build = self._prebuild_fallback(job, entry, min(entry.deadlines) if entry.deadlines else None)
        try:
            shared = await asyncio.shield(build)
        except RequestError as error:
            search_pending = entry.search is not None and not entry.search.done()
            if not search_pending:  # else the search may still deliver
                entry.fail(error)
                job.drop(entry)
            return
        if entry.resolve(Served(shared, "fallback", entry.iteration, entry.replica)):
            self.m.plans.labels(source="fallback").inc()
            self.m.fallbacks.labels(reason=reason).inc()
            if entry.search is not None and not entry.search.done():
                entry.search.cancel()  # free its queue slot; this iteration's plan is fixed now

    async def _build_fallback(self, job: JobState, batch: bytes, deadline: float | None = None) -> SharedPlan:
        """The fallback plan of `batch` (the job's placement, a static schedule), built on the control lane; near
        `deadline` without the looser tries (`Planner.fallback_plan`)."""
        task = work.PlanTask(
            job.job, batch, "fallback", 0.0, limits=self.config.limits, stage_scales=job.stage_scales, deadline=deadline
        )
        t0 = time.monotonic()
        try:
            outcome = await self.pool.control.run(work.plan_batch, task)
        except QueueFull as exc:
            raise queue_full(exc) from None
        except (WorkerCrashed, PoolClosed) as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no plan: {exc}", reason="NO_PLAN") from None
        except Exception as exc:
            log.exception("fallback failed for %s", job.job_id)
            raise RequestError(
                grpc.StatusCode.INTERNAL, f"no plan: the fallback failed: {exc}", reason="NO_PLAN"
            ) from None
        if isinstance(outcome, work.Rejected):
            raise from_rejected(outcome)
        if not isinstance(outcome, work.PlanOutcome):
            raise RequestError(grpc.StatusCode.INTERNAL, "no plan", reason="NO_PLAN")
        # The reserve before a deadline is what a fallback takes from its start to its plan being here: the
        # control lane's queue and the transfer back count, not only the worker's time.
        job.record_fallback(max(outcome.worker_ms, (time.monotonic() - t0) * 1e3))
        self.m.worker_task_seconds.labels(lane="control", task="fallback").observe(outcome.worker_ms / 1e3)
        return SharedPlan(outcome.plan)

    # ---- ReportTimings ----
    def report(self, job: JobState, req: Any) -> Any:
        measured = check_timings(req, job.job.spec.parallel)
        served = job.served_for(req.iteration)
        n = len(req.measured_start_ms)
        if served and n:
            counts = sorted({s.action_count(req.rank) for s in served})
            if n not in counts:
                raise invalid(
                    [
                        Violation(
                            "measured_start_ms",
                            f"{n} entries, but the plan served for iteration {req.iteration} on rank {req.rank} "
                            f"has {' or '.join(map(str, counts))} actions",
                        )
                    ]
                )
        error, mean, folded = job.fold_report(req.iteration, measured)
        if folded:
            self.m.prediction_error.observe(error)
        if n and self.config.stage_refit:
            job.fold_stage_timings(req.iteration, req.rank, req.measured_start_ms, req.measured_end_ms)
        return pb.ReportTimingsResponse(iteration_error=error, mean_error=mean)

    # ---- Simulate ----
    async def simulate(self, req: Any) -> Any:
        which = req.WhichOneof("job")
        scales: work.StageScales = ()
        if which == "job_id":
            state = self.job(req.job_id)
            job, scales = state.job, state.stage_scales
        elif which == "spec":
            spec = req.spec
            model, parallel, hardware = check_job_spec(
                spec.model if spec.HasField("model") else None,
                spec.parallel if spec.HasField("parallel") else None,
                spec.hardware if spec.HasField("hardware") else None,
                self.config.limits,
                prefix="spec.",
            )
            job_spec = work.JobSpec(model=model, parallel=parallel, hardware=hardware)
            job = work.Job("sim-" + job_id_for(job_spec, 0.0).removeprefix("job-"), job_spec)
        else:
            raise invalid([Violation("job", "set job_id (a registered job) or spec (an inline one)")])
        schedule = req.schedule.replace("_", "-") if req.schedule not in SIMULATE_SCHEDULES else req.schedule
        if schedule not in BASELINES and schedule not in SIMULATE_SCHEDULES:
            choices = ", ".join([*SIMULATE_SCHEDULES, *sorted(BASELINES)])
            raise invalid([Violation("schedule", f"unknown schedule {req.schedule!r}; choose one of {choices}")])
        if not req.HasField("batch"):
            raise invalid([Violation("batch", "missing")])
        check_batch(req.batch, job.spec.parallel, self.config.limits)
        task = work.SimulateTask(
            job,
            req.batch.SerializeToString(),
            schedule,
            limits=self.config.limits,
            budget_ms=self.config.budget_ms,
            stage_scales=scales,
        )
        lane = self.pool.search if schedule == "pipeweaver" else self.pool.control
        outcome = await self._run(lane, work.simulate, task, "simulation")
        if isinstance(outcome, work.Rejected):
            raise from_rejected(outcome)
        return pb.SimulateResponse(
            makespan_ms=outcome.makespan_ms,
            bubble_fraction=outcome.bubble_fraction,
            busy_ms=outcome.busy_ms,
            peak_memory_bytes=outcome.peak_memory_bytes,
        )

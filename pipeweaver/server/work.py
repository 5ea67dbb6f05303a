"""What the worker processes run: partition a job, search or fall back for one batch, simulate a schedule.

Never imports grpc (workers are spawned next to a gRPC server; see pool.py). Tasks and results are plain
picklable dataclasses; batches and plans cross the process boundary as serialized protobuf bytes, so the main
process never builds Python objects for them. Each worker keeps one `Planner` per job (it holds SEMU's cost
cache), rebuilt from the registered B_i/K_i so every worker, and every replacement worker, uses the placement
the job registered with.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from pipeweaver.errors import DoesNotFit, SpecError
from pipeweaver.plan.ir import Pass, Placement, Plan
from pipeweaver.server import heap, rawproto
from pipeweaver.spec.batch import BatchLimits, BatchMetadata, validate_batch
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import LayerKind, ModelSpec
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.wire import action_count, batch_from_proto, placement_to_proto, plan_to_proto

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeweaver.search.planner import Planner
    from pipeweaver.simulator.costmodel import EfficiencyFactors

Mode = Literal["search", "fallback"]
StageScales = tuple[tuple[str, str, float], ...]
"""(module, pass ``F``/``B``, factor) entries of a job's per-stage refit (1.0 entries may be left out)."""

PLANNERS_PER_WORKER = 16
"""Jobs whose `Planner` a worker keeps (least recently used dropped)."""
WORKER_GC_THRESHOLDS = (100_000, 20, 100)
MIN_SEARCH_BUDGET_MS = 5.0
"""Below this a search is not worth starting: the caller builds the fallback instead."""
DIT_CALIBRATION_CONTEXT_TOKENS = 64
"""Caption length assumed for DiT calibration rows (the proto's LayerTiming carries no context length)."""


# ---- tasks and results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerTiming:
    """One calibration row: a block of `module` on `tokens` tokens (one image/clip/document), tp = 1."""

    module: str
    tokens: int
    pass_: Pass
    measured_ms: float


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a job is: its specs plus the calibration rows and the baselines it is compared against."""

    model: ModelSpec
    parallel: ParallelSpec
    hardware: HardwareSpec
    calibration: tuple[LayerTiming, ...] = ()
    compare_baselines: tuple[str, ...] = ()
    offload: bool = False
    """The plans may offload activations to host memory (`SearchConfig.offload`)."""


@dataclass(frozen=True, slots=True)
class Partition:
    """The registered partition: what every worker rebuilds its `Planner` with."""

    placement: Placement
    sub_microbatch_size: dict[str, int]
    segments: dict[str, int]
    static_memory_bytes: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Job:
    """A registered job as every task carries it to a worker.

    Pickled once per `Job` object, and unpickled once per worker: every search task carries its job, and pickling
    the specs' dataclasses cost 70-110 us of the event loop per submitted search (in the first request of an
    iteration, before its search could start), unpickling as much again in the worker before the search began."""

    job_id: str
    spec: JobSpec
    partition: Partition | None = None
    """None only for the registration task itself."""
    _pickled: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __reduce__(self) -> tuple[Callable[[bytes], Job], tuple[bytes]]:
        pickled = self._pickled
        if pickled is None:
            pickled = pickle.dumps((self.job_id, self.spec, self.partition), protocol=pickle.HIGHEST_PROTOCOL)
            object.__setattr__(self, "_pickled", pickled)  # frozen: a cache, not a change of value
        return _job_from_pickle, (pickled,)


_unpickled_jobs: OrderedDict[bytes, Job] = OrderedDict()
"""A worker's jobs by their pickled bytes (the same job arrives with every task): the most recent few."""


def _job_from_pickle(pickled: bytes) -> Job:
    job = _unpickled_jobs.get(pickled)
    if job is None:
        job = Job(*pickle.loads(pickled))
        object.__setattr__(job, "_pickled", pickled)
        _unpickled_jobs[pickled] = job
        while len(_unpickled_jobs) > PLANNERS_PER_WORKER:
            _unpickled_jobs.popitem(last=False)
    else:
        _unpickled_jobs.move_to_end(pickled)
    return job


@dataclass(frozen=True, slots=True)
class Violation:
    field: str
    description: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The request cannot be served as sent; `precondition` selects FAILED_PRECONDITION over INVALID_ARGUMENT."""

    message: str
    violations: tuple[Violation, ...]
    precondition: bool = False


@dataclass(frozen=True, slots=True)
class Registered:
    partition: Partition
    placement: bytes
    """The placement as a serialized `pb.Placement`."""


@dataclass(frozen=True, slots=True)
class PlanTask:
    job: Job
    batch: bytes
    """A serialized `pb.BatchMetadata`."""
    mode: Mode
    budget_ms: float
    limits: BatchLimits = field(default_factory=BatchLimits)
    time_scale: float = 1.0
    """Online refit of the job (measured / predicted makespan): applied to every predicted time of the plan."""
    stage_scales: StageScales = ()
    """Online refit per (module, pass) from measured stage times (`jobs.JobState.fold_stage_timings`): the cost
    model's factors on those stages' times (`CostModel.stage_scales`)."""
    deadline: float | None = None
    """When the plan is needed, on the `time.monotonic` clock (one clock for every process of a host)."""
    reserve_ms: float = 0.0
    """Time to keep free before `deadline` (the worker's overhead beyond the search, the fallback, slack)."""

    def search_budget_ms(self) -> float:
        """The budget the search may still use now: the requested one, clipped to what the deadline leaves."""
        if self.deadline is None:
            return self.budget_ms
        left_ms = (self.deadline - time.monotonic()) * 1e3 - self.reserve_ms
        return min(self.budget_ms, left_ms)


@dataclass(frozen=True, slots=True)
class Expired:
    """The task waited so long that no search fits before its deadline any more."""


@dataclass(frozen=True, slots=True)
class EncodedPlan:
    """A `pb.Plan` serialized in parts: the header, and each rank's `RankPlan`. The service answers a rank with
    the header's bytes and that rank's (`jobs.SharedPlan`), so the main process never parses or re-serializes a
    plan on its way out (a vlm-s plan is ~350 KB: 2.7 ms to parse, 5.6 ms to re-serialize per rank)."""

    header: bytes
    lean: tuple[bytes, ...]
    """Serialized `pb.RankPlan` of rank 0, 1, ... without the predicted action times (fields 3 and 4)."""
    timings: tuple[bytes, ...]
    """Each rank's predicted action times alone (a `pb.RankPlan` with only fields 3 and 4): appended to `lean`
    they make the whole `RankPlan` (its packed actions, field 5, then come before fields 3 and 4: not the order
    protobuf writes, one every parser reads). Streamed answers leave them out unless a request asks (8 bytes per
    action and end: 35 KB for a vlm-s rank whose packed actions take 22 KB)."""
    actions: tuple[int, ...]
    """Actions per rank (what a timing report is checked against)."""
    predicted_ms: float
    """The header's predicted makespan (0: not predicted)."""

    @classmethod
    def of(cls, plan: pb.Plan) -> EncodedPlan:
        ranks = sorted(plan.ranks, key=lambda rp: rp.rank)
        if [rp.rank for rp in ranks] != list(range(len(ranks))):
            raise ValueError(f"a plan's ranks are 0..{len(ranks) - 1}, got {[rp.rank for rp in ranks]}")
        times = [
            pb.RankPlan(predicted_start_ms=rp.predicted_start_ms, predicted_end_ms=rp.predicted_end_ms) for rp in ranks
        ]
        lean = []
        for rp in ranks:
            bare = pb.RankPlan()
            bare.CopyFrom(rp)
            bare.ClearField("predicted_start_ms")
            bare.ClearField("predicted_end_ms")
            lean.append(bare.SerializeToString())
        return cls(
            header=plan.header.SerializeToString(),
            lean=tuple(lean),
            timings=tuple(t.SerializeToString() for t in times),
            actions=tuple(action_count(rp) for rp in ranks),
            predicted_ms=float(plan.header.predicted_makespan_ms),
        )

    def rank_plan(self, rank: int) -> bytes:
        """Serialized `pb.RankPlan` of `rank`, predicted action times included."""
        return self.lean[rank] + self.timings[rank]

    def serialized(self) -> bytes:
        """The whole `pb.Plan` (header: field 1, ranks: field 2)."""
        return rawproto.field(1, self.header) + b"".join(
            rawproto.field(2, self.rank_plan(r)) for r in range(len(self.lean))
        )


@dataclass(frozen=True, slots=True)
class PlanOutcome:
    plan: EncodedPlan
    mode: Mode
    predicted_ms: float = 0.0
    """Predicted makespan, after `time_scale`; 0 for fallback plans (not simulated)."""
    raw_predicted_ms: float = 0.0
    """Predicted makespan before `time_scale` (what the online refit compares with)."""
    lower_bound_ms: float = 0.0
    baseline_ms: dict[str, float] = field(default_factory=dict)
    budget_ms: float = 0.0
    """The search budget the task ran with (after the deadline's clipping)."""
    search_ms: float = 0.0
    evaluations: int = 0
    cache_hit_rate: float = 0.0
    bubble_fraction: float = 0.0
    worker_ms: float = 0.0
    """Wall time of the whole task in the worker (decode, search, baselines, encode)."""
    setup_ms: float = 0.0
    """Part of `worker_ms` spent once per job and worker (building the job's planner): not a per-plan cost."""
    first_search: bool = False
    """This worker's first search for the job: its caches (SEMU's layer costs, compiled specialisations) start
    empty, so its overhead says little about the next searches'."""
    worker_span: tuple[float, float] = (0.0, 0.0)
    """When the task began and ended in the worker, on `time.perf_counter` (CLOCK_MONOTONIC, one clock for every
    process of a host): where the service's delivery trace places the hand-over to and from the worker."""


@dataclass(frozen=True, slots=True)
class SimulateTask:
    job: Job
    batch: bytes
    schedule: str
    limits: BatchLimits = field(default_factory=BatchLimits)
    budget_ms: float = 500.0
    stage_scales: StageScales = ()


@dataclass(frozen=True, slots=True)
class SimulateOutcome:
    makespan_ms: float
    bubble_fraction: float
    busy_ms: tuple[float, ...]
    peak_memory_bytes: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class WarmReport:
    pid: int
    seconds: float


@dataclass(frozen=True, slots=True)
class WarmJobTask:
    """Get one worker ready for a newly registered job (`warm_job`)."""

    job: Job
    mode: Mode
    """``search``: a search worker (the job's planner, then one search); ``fallback``: the control worker."""
    budget_ms: float
    hold_s: float
    """Hold the worker this long after the warm-up, so N concurrent tasks reach N different workers."""


@dataclass(frozen=True, slots=True)
class WarmJobOutcome:
    pid: int
    mode: Mode
    worker_ms: float
    """The warm plan's wall time in the worker (planner built beforehand, hold excluded). It is this worker's
    first, cold, plan for the job: reported, never a deadline-reserve sample."""
    setup_ms: float
    """Building the job's planner in this worker."""


# ---- worker process state ------------------------------------------------------------------------------------

_planners: OrderedDict[str, Planner] = OrderedDict()
_searched: set[str] = set()
"""Jobs this worker has searched for (`PlanOutcome.first_search`)."""
_held: list[object] = []
"""What the last task built and no longer needs, kept until its result has been sent (`release_held`)."""


def release_held() -> None:
    """Free what the last task held back (the pool calls it once the task's result is sent). A vlm-s search's
    result, with its timelines and memory arrays, took 2-2.6 ms to free (2-core machine): freed as the task
    returned, that time came before the plan reached the service."""
    _held.clear()


def init_worker(nice: int = 0) -> None:
    """Pool initializer: leave Ctrl-C and SIGTERM to the server, which shuts the pool down in order; keep the C
    heap's pages (`heap.keep_heap_pages`: each result is pickled into a fresh ~330 KB buffer); lower this
    worker's scheduling priority by `nice` (`ServerConfig.search_nice`)."""
    if nice:
        os.nice(nice)  # raising one's own nice value needs no privilege
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    heap.keep_heap_pages()


def warm_up(hold_s: float) -> WarmReport:
    """Import the planner and plan one tiny batch (numba compiles or loads its cache), then hold the worker for
    `hold_s` so that N warm-up tasks land on N different workers."""
    t0 = time.perf_counter()
    from pipeweaver.datagen import sample_batch
    from pipeweaver.presets import tiny_vlm
    from pipeweaver.search.planner import Planner, SearchConfig, warm_kernels

    # Every kernel, including those a tiny plan never reaches (the memory program's, which run only when a rank's
    # memory binds): compiled here, before SERVING, not in a job's first searches (with an empty numba cache a
    # vlm-s job's warm-up took 8.2 s instead of 1.8 s on the 2-core machine, and its first iterations' plans
    # came late: `benchmarks/bench_service.py --iterations 4 --floor-iterations 0 --server-log LOG`).
    warm_kernels()
    w = tiny_vlm(pp=2)
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=20.0, compare_baselines=()))
    batch = sample_batch(w, seed=0, iteration=0)
    planner.plan(batch, job_id="warm-up", budget_ms=20.0)
    planner.fallback_plan(batch, job_id="warm-up")
    # What exists now (modules, numba dispatchers, the warm-up's caches) lives as long as the worker: keep it out
    # of the collector's full passes, and collect young objects less often. A plan allocates ~10^5 objects, and
    # with the default thresholds full collections ran inside searches (vlm-s plans with every baseline took
    # 1.2-1.7 s with the collector as it was, 0.74-0.98 s without it, on this 2-core machine).
    gc.collect()
    gc.freeze()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)
    elapsed = time.perf_counter() - t0
    time.sleep(hold_s)
    return WarmReport(pid=os.getpid(), seconds=elapsed)


# ---- tasks ---------------------------------------------------------------------------------------------------


def warm_job(task: WarmJobTask) -> WarmJobOutcome | Rejected:
    """Build the job's planner in this worker and plan one heavy batch of its kind, so that the job's first real
    searches do not pay for a cold worker (its planner, SEMU's layer costs, the specialisations of its shapes).

    Without this, every search worker's first search for a job was cold: on the 4-GPU T2V runs the first plans
    took seconds more than the later ones, and the deadline reserve learnt from them turned the next two to four
    iterations into fallbacks. The batch is the heaviest phase of the dynamic trace for the dataset kind the
    job's modules imply (`datagen.representative_batch`)."""
    from pipeweaver.datagen import representative_batch

    t_setup = time.perf_counter()
    try:
        planner = _planner(task.job)
    except DoesNotFit as exc:
        return Rejected(str(exc), (Violation("parallel", str(exc)),), precondition=True)
    setup_ms = (time.perf_counter() - t_setup) * 1e3
    spec = task.job.spec
    batch = representative_batch(spec.model, spec.parallel, spec.hardware, seed=0)
    t0 = time.perf_counter()
    if batch is not None:
        if task.mode == "search":
            planner.plan(batch, job_id=task.job.job_id, budget_ms=task.budget_ms)
            _searched.add(task.job.job_id)
        else:
            planner.fallback_plan(batch, job_id=task.job.job_id)
    worker_ms = (time.perf_counter() - t0) * 1e3
    time.sleep(task.hold_s)
    return WarmJobOutcome(pid=os.getpid(), mode=task.mode, worker_ms=worker_ms, setup_ms=setup_ms)


def register_job(job: Job) -> Registered | Rejected:
    """Run the offline partitioner for `job` (B_i, K_i, placement, static memory) and keep its `Planner`."""
    try:
        planner = _build_planner(job)
    except DoesNotFit as exc:
        return Rejected(str(exc), (Violation("parallel", str(exc)),), precondition=True)
    except SpecError as exc:
        return Rejected(str(exc), (split_violation(str(exc), "model"),))
    except ValueError as exc:  # the partitioner cannot cut a module into pp * K chunks
        return Rejected(str(exc), (Violation("parallel.pp", str(exc)),))
    part = planner.partition
    partition = Partition(
        placement=part.placement,
        sub_microbatch_size=dict(part.sub_microbatch_size),
        segments=dict(part.segments),
        static_memory_bytes=tuple(float(x) for x in part.static_memory_bytes),
    )
    _remember(job.job_id, planner)
    return Registered(partition=partition, placement=placement_to_proto(part.placement).SerializeToString())


def plan_batch(task: PlanTask) -> PlanOutcome | Rejected | Expired:
    """Search (within `task.search_budget_ms()`) or build the fallback plan for one batch of a registered job."""
    t0 = time.perf_counter()
    budget_ms = task.search_budget_ms()
    if task.mode == "search" and budget_ms < MIN_SEARCH_BUDGET_MS:
        return Expired()
    decoded = _decode_batch(task.job, task.batch, task.limits)
    if isinstance(decoded, Rejected):
        return decoded
    t_setup = time.perf_counter()
    cold = task.job.job_id not in _planners
    planner = _planner(task.job, task.stage_scales)
    setup_ms = (time.perf_counter() - t_setup) * 1e3 if cold else 0.0
    if task.mode == "fallback":
        plan = planner.fallback_plan(decoded, job_id=task.job.job_id, deadline=task.deadline)
        _held.extend((decoded, plan))
        encoded = EncodedPlan.of(plan_to_proto(plan, packed=True))
        t1 = time.perf_counter()
        return PlanOutcome(plan=encoded, mode="fallback", worker_ms=(t1 - t0) * 1e3, worker_span=(t0, t1))
    first_search = task.job.job_id not in _searched
    _searched.add(task.job.job_id)
    result = planner.plan(decoded, job_id=task.job.job_id, budget_ms=task.search_budget_ms())
    plan = _scaled(result.plan, task.time_scale)
    _held.extend((decoded, result, plan))
    encoded = EncodedPlan.of(plan_to_proto(plan, packed=True))
    t1 = time.perf_counter()
    return PlanOutcome(
        plan=encoded,
        mode="search",
        predicted_ms=result.predicted_ms * task.time_scale,
        raw_predicted_ms=result.predicted_ms,
        lower_bound_ms=result.lower_bound_ms * task.time_scale,
        baseline_ms={k: v * task.time_scale for k, v in result.baseline_ms.items()},
        budget_ms=budget_ms,
        search_ms=result.search_ms,
        evaluations=result.evaluations,
        cache_hit_rate=result.cache_hit_rate,
        bubble_fraction=result.bubble_fraction,
        worker_ms=(t1 - t0) * 1e3,
        setup_ms=setup_ms,
        first_search=first_search,
        worker_span=(t0, t1),
    )


def simulate(task: SimulateTask) -> SimulateOutcome | Rejected:
    """SEMU's prediction for `task.schedule` (a baseline, ``pipeweaver`` or ``fallback``) on one batch."""
    try:
        planner = _planner(task.job, task.stage_scales)
    except DoesNotFit as exc:
        return Rejected(str(exc), (Violation("spec.parallel", str(exc)),), precondition=True)
    except (SpecError, ValueError) as exc:
        return Rejected(str(exc), (split_violation(str(exc), "spec"),))
    decoded = _decode_batch(task.job, task.batch, task.limits)
    if isinstance(decoded, Rejected):
        return decoded
    spec = task.job.spec
    if task.schedule == "pipeweaver":
        plan = planner.plan(decoded, job_id=task.job.job_id, budget_ms=task.budget_ms).plan
    elif task.schedule == "fallback":
        plan = planner.fallback_plan(decoded, job_id=task.job.job_id)
    else:
        from pipeweaver.search.baselines import build_baseline_plan

        try:
            plan = build_baseline_plan(
                task.schedule, model=spec.model, parallel=spec.parallel, batch=decoded, hardware=spec.hardware
            )
        except ValueError as exc:
            return Rejected(str(exc), (Violation("schedule", str(exc)),))
    sim = planner.simulate_plan(plan, decoded, plan.recompute_map())
    return SimulateOutcome(
        makespan_ms=float(sim.makespan_ms),
        bubble_fraction=float(sim.bubble_fraction),
        busy_ms=tuple(float(x) for x in sim.busy_ms),
        peak_memory_bytes=tuple(float(x) for x in sim.peak_memory_bytes),
    )


# ---- helpers -------------------------------------------------------------------------------------------------


def split_violation(message: str, default_field: str) -> Violation:
    """Split a `SpecError` message ``path: description`` into a field violation (no path: `default_field`)."""
    head, sep, tail = message.partition(": ")
    if sep and head and " " not in head and "'" not in head:
        return Violation(head, tail)
    return Violation(default_field, message)


def _decode_batch(job: Job, data: bytes, limits: BatchLimits) -> BatchMetadata | Rejected:
    msg = pb.BatchMetadata.FromString(data)
    try:
        batch = batch_from_proto(msg)
    except SpecError as exc:
        return Rejected(str(exc), (split_violation(str(exc), "batch"),))
    try:
        validate_batch(job.spec.model, job.spec.parallel, batch, limits)
    except SpecError as exc:
        v = split_violation(str(exc), "")
        path = f"batch.{v.field}" if v.field else "batch"
        return Rejected(f"{path}: {v.description}", (Violation(path, v.description),))
    return batch


def _factors(job: Job) -> EfficiencyFactors | None:
    if not job.spec.calibration:
        return None
    from pipeweaver.simulator.calibration import LayerDims, LayerProfile, fit_layer_factors

    model = job.spec.model
    rows = []
    for t in job.spec.calibration:
        module = model.module(t.module)
        context = DIT_CALIBRATION_CONTEXT_TOKENS if module.kind is LayerKind.DIT_BLOCK else 0
        rows.append(
            LayerProfile(
                kind=module.kind,
                dims=LayerDims.of(module),
                tokens=t.tokens,
                spans=(t.tokens,),
                context_tokens=context,
                pass_=t.pass_,
                measured_ms=t.measured_ms,
            )
        )
    return fit_layer_factors(rows, job.spec.hardware)


def _build_planner(job: Job, stage_scales: StageScales = ()) -> Planner:
    from pipeweaver.search.planner import Planner, SearchConfig

    spec = job.spec
    part = job.partition
    return Planner(
        spec.model,
        spec.parallel,
        spec.hardware,
        factors=_factors(job),
        config=SearchConfig(compare_baselines=spec.compare_baselines, offload=spec.offload),
        sizes=part.sub_microbatch_size if part is not None else None,
        segments=part.segments if part is not None else None,
        stage_scales={(module, pass_): scale for module, pass_, scale in stage_scales},
    )


def _remember(job_id: str, planner: Planner) -> None:
    _planners[job_id] = planner
    _planners.move_to_end(job_id)
    while len(_planners) > PLANNERS_PER_WORKER:
        _planners.popitem(last=False)


def _planner(job: Job, stage_scales: StageScales = ()) -> Planner:
    planner = _planners.get(job.job_id)
    wanted = {(module, pass_): scale for module, pass_, scale in stage_scales if scale != 1.0}
    if planner is not None and planner.cost.stage_scales != wanted:
        # The job's refit moved (by a quantum, see `jobs.STAGE_SCALE_STEP`): new stage costs, same partition; the
        # layer-cost cache stays warm (rebuilding the planner here made searches miss their deadlines in the demo).
        planner.set_stage_scales(wanted)
    if planner is None:
        planner = _build_planner(job, stage_scales)
        if job.partition is not None and planner.partition.placement != job.partition.placement:
            # Every rank must run the placement the job registered with; a planner that partitions differently
            # (a changed cost model, say) must not serve this job.
            raise RuntimeError(
                f"job {job.job_id}: this worker's partitioner produced a different placement from the "
                "registered one; re-register the job"
            )
    _remember(job.job_id, planner)
    return planner


def _scaled(plan: Plan, scale: float) -> Plan:
    if scale == 1.0:
        return plan
    h = plan.header
    header = replace(
        h,
        predicted_makespan_ms=h.predicted_makespan_ms * scale,
        lower_bound_ms=h.lower_bound_ms * scale,
        baseline_makespans_ms=tuple((name, ms * scale) for name, ms in h.baseline_makespans_ms),
    )
    ranks = tuple(
        replace(rp, predicted_ms=tuple((s * scale, e * scale) for s, e in rp.predicted_ms)) for rp in plan.ranks
    )
    return replace(plan, header=header, ranks=ranks)

"""`pipeweaver demo`: the whole system on one machine, planned batches against 1F1B on the same batches.

The real planner service runs as a separate process on a loopback port; gloo trainer ranks of tiny-vlm (one per
core up to 4, one torch thread each, so ranks really run in parallel) train on the dynamic trace with plans one
iteration ahead (`PlanPrefetcher`), then train the same batches from the same initial weights with Megatron's 1F1B
on its own placement. Afterwards the parameters of the two runs must agree (same mathematics, another schedule).

Fairness notes. The 1F1B run uses the `1f1b` baseline's placement (a mixed placement: ViT and LM layers spread
over every rank), built here from the same per-layer seeds; parameter names are global (``llm.blocks.3.q.weight``)
so the runs compare name by name, whatever rank held a layer. The planner shares the cores with the trainers (a
CPU demo has no idle host cores, unlike a GPU node), so it runs at a lower scheduling priority (``nice``) and
plans with the cores' leftover time; its plan waits count in the planned run's times.
"""

from __future__ import annotations

import faulthandler
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeweaver.cores import usable_cores

if TYPE_CHECKING:
    from pipeweaver.client.profiler import LayerTiming

__all__ = ["DemoConfig", "DemoError", "IterationRecord", "default_ranks", "format_report", "run_demo"]

WORKLOAD = "tiny-vlm"
BASELINE = "1f1b"
SERVER_START_TIMEOUT_S = 240.0
"""A first start on a fresh machine compiles the planner's numba kernels (about 10 s on 2 cores)."""
PARAM_RTOL = 1e-4
PARAM_ATOL = 1e-5
"""Float32 tolerance between the two runs' parameters: the schedules sum gradients in different orders."""


class DemoError(Exception):
    """The demo could not run (the planner did not start, a rank failed or timed out)."""


def default_ranks() -> int:
    """Pipeline size: one rank per usable core, up to 4 (at least 2, so there is a pipeline)."""
    return max(2, min(4, usable_cores()))


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoConfig:
    iterations: int = 20
    """Training iterations of each run (the dynamic trace's first `iterations` batches)."""
    ranks: int = field(default_factory=default_ranks)
    """Pipeline ranks (gloo processes) = pp of tiny-vlm."""
    out_dir: Path = Path("out/demo")
    """Where the timeline picture goes."""
    seed: int = 0
    """Data and initialisation seed."""
    planning_budget_ms: float = 100.0
    """Search budget per batch (the planner clips it to each plan's deadline). tiny-vlm iterations take about half a
    second on 2 cores; with 300 ms the planner, sharing the cores with the trainers, missed most deadlines."""
    lr: float = 0.05
    """SGD learning rate of both runs."""
    calibrate: bool = True
    """Profile the tiny model's layers first and register the job with them (SEMU calibrated to this CPU)."""
    planner_nice: int = 10
    """Scheduling priority of the planner process (it shares the cores with the trainers)."""
    rank_timeout_s: float = 300.0
    """Kill the ranks (and fail) if they have not finished by then."""

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if not 1 <= self.ranks <= 8:
            raise ValueError(f"ranks must be in 1..8 (tiny-vlm has 8 layers per module), got {self.ranks}")
        if not self.planning_budget_ms > 0:
            raise ValueError(f"planning_budget_ms must be positive, got {self.planning_budget_ms}")


@dataclass(frozen=True, slots=True)
class IterationRecord:
    iteration: int
    planned_ms: float
    """PipeWeaver run: slowest rank's step, from the iteration's barrier to the end of its optimizer step (plan
    wait and validation included)."""
    baseline_ms: float
    """1F1B run: the same."""
    planned_makespan_ms: float
    """PipeWeaver run: first action start to last action end across ranks (what SEMU predicts)."""
    baseline_makespan_ms: float
    predicted_ms: float
    """SEMU's makespan of the plan that ran (NaN for fallback plans, which carry no prediction)."""
    predicted_baseline_ms: float
    """SEMU's 1F1B makespan on the same batch, from the plan's header (NaN when absent)."""
    source: str
    """search, cache, fallback (the planner's), or local-fallback (reason): what the ranks ran."""
    wait_ms: float
    """Time rank 0 waited for the plan."""
    loss: float
    baseline_loss: float

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.planned_ms if self.planned_ms > 0 else math.nan

    @property
    def prediction_error(self) -> float:
        """(predicted - measured) / measured makespan of the planned run."""
        return (self.predicted_ms - self.planned_makespan_ms) / self.planned_makespan_ms

    @property
    def baseline_prediction_error(self) -> float:
        return (self.predicted_baseline_ms - self.baseline_makespan_ms) / self.baseline_makespan_ms


# ---- the planner process -----------------------------------------------------------------------------------------


@dataclass
class _Planner:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def _start_planner(work: Path, cfg: DemoConfig) -> _Planner:
    ready = work / "planner-ready.json"
    log_path = work / "planner.log"
    boot = "import os, sys; os.nice(int(sys.argv[1])); from pipeweaver.cli import main; sys.exit(main(sys.argv[2:]))"
    cmd = [
        sys.executable, "-c", boot, str(cfg.planner_nice), "serve",
        "--port", "0", "--metrics-port", "0", "--workers", "1", "--ready-file", str(ready), "--log-level", "WARNING",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEWEAVER_")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            raise DemoError(f"the planner exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            raise DemoError(f"the planner did not start in {SERVER_START_TIMEOUT_S:.0f} s; see {log_path}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return _Planner(proc, f"127.0.0.1:{info['port']}", log_path)


# ---- one trainer rank (a spawned process) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RankArgs:
    rank: int
    cfg: DemoConfig
    address: str
    profile: tuple[LayerTiming, ...]
    init_file: str
    result_file: str


@dataclass(slots=True)
class _Step:
    """What one iteration of one run measured, reduced over ranks."""

    step_ms: float
    makespan_ms: float
    loss: float


def _reduced_step(step_s: float, first: float, last: float, loss: float) -> _Step:
    import torch
    import torch.distributed as dist

    hi = torch.tensor([step_s, last, -first], dtype=torch.float64)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    total = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(total)
    return _Step(step_ms=float(hi[0]) * 1e3, makespan_ms=(float(hi[1]) + float(hi[2])) * 1e3, loss=float(total[0]))


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _params(ex: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in ex.named_parameters()}


def _rank_main(a: _RankArgs) -> None:
    import torch
    import torch.distributed as dist

    from pipeweaver import presets
    from pipeweaver.client.planner_client import PlannerClient
    from pipeweaver.client.prefetch import PlanPrefetcher
    from pipeweaver.client.profiler import TimedExecutor
    from pipeweaver.datagen import dynamic_trace
    from pipeweaver.plan.ir import Plan
    from pipeweaver.search.baselines import build_baseline_plan
    from pipeweaver.search.baselines.registry import baseline_placement
    from pipeweaver.spec.batch import BatchMetadata
    from pipeweaver.spec.model import Modality

    torch.set_num_threads(1)
    cfg, rank, pp = a.cfg, a.rank, a.cfg.ranks
    dist.init_process_group(
        "gloo", init_method=f"file://{a.init_file}", rank=rank, world_size=pp, timeout=timedelta(seconds=300)
    )
    w = presets.tiny_vlm(pp=pp)
    batches = list(dynamic_trace(w, seed=cfg.seed, iterations=cfg.iterations))

    def say(msg: str) -> None:
        if rank == 0:
            print(f"demo: {msg}", file=sys.stderr, flush=True)

    # ---- the planned run ----
    client = PlannerClient(a.address, timeout_s=120.0)
    job = client.register_job(w.model, w.parallel, w.hardware, a.profile, planning_budget_ms=cfg.planning_budget_ms)
    ex = TimedExecutor(w.model, job.placement, rank, init_seed=cfg.seed, data_seed=cfg.seed)
    ex.warm_up()
    opt = torch.optim.SGD(list(ex.parameters()), lr=cfg.lr)
    # The report draws SEMU's timeline of a planned iteration beside the measured one: ask for the predicted times.
    prefetcher = PlanPrefetcher(client, job, batches, rank=rank, grace_s=0.3, predicted_timings=True)
    prefetcher.attach(ex)  # plans that arrived are checked while the previous iteration finishes
    say(f"PipeWeaver run: {cfg.iterations} iterations on {pp} ranks (job {job.job_id})")
    planned: list[dict[str, Any]] = []
    shown: dict[str, Any] | None = None
    items = iter(prefetcher)
    for k in range(cfg.iterations):
        dist.barrier()
        t0 = time.monotonic()
        item = next(items)
        stats = ex.run_with_fallback(item.plan, item.metadata, prefetcher.fallback_plan, optimizer=opt)
        step_s = time.monotonic() - t0
        times = ex.action_times
        first, last = (times[0][0], times[-1][1]) if times else (t0, t0)
        red = _reduced_step(step_s, first, last, stats.loss)
        ran: Plan = ex.last_plan or item.plan
        if item.origin == "fallback":
            source = f"local-fallback ({item.fallback_reason})"
        elif stats.fallback_reason:
            source = "local-fallback (ranks disagreed)"
        else:
            source = stats.source.value
        h = ran.header
        pred = h.predicted_makespan_ms if h.predicted_makespan_ms > 0 else math.nan
        base_pred = dict(h.baseline_makespans_ms).get(BASELINE, math.nan)
        planned.append(
            {"step": red, "predicted": pred, "predicted_baseline": base_pred, "source": source, "wait": item.wait_ms}
        )
        if item.origin == "planner" and not stats.fallback_reason:
            # Every rank reports its own actions' times (the service refits its per-stage costs from them); the
            # iteration's makespan refit counts the iteration once.
            prefetcher.report(item.metadata.iteration, red.makespan_ms, ex.relative_ms())
        # The picture shows the iteration with a prediction and the most image patches (the latest on ties); every
        # rank ran the same plan on the same batch, so every rank picks the same iteration.
        patches = sum(m.tokens for mb in item.metadata.microbatches for m in mb.media(Modality.IMAGE))
        score = (not math.isnan(pred), patches, k)
        if shown is None or score > shown["score"]:
            shown = {"k": k, "plan": ran, "score": score, "times": list(times)}
    for _ in items:  # let the prefetcher finish (it closes its stream)
        pass
    params_planned = _params(ex)
    fallback_stats = prefetcher.stats
    client.close()
    del ex, opt

    # ---- the 1F1B run: same batches, same initial weights, the baseline's own placement ----
    say(f"1F1B run: the same {cfg.iterations} batches from the same initial weights")
    placement = baseline_placement(BASELINE, model=w.model, parallel=w.parallel)
    base_ex = TimedExecutor(w.model, placement, rank, init_seed=cfg.seed, data_seed=cfg.seed)
    base_ex.warm_up()
    base_opt = torch.optim.SGD(list(base_ex.parameters()), lr=cfg.lr)

    def baseline_plan(b: BatchMetadata) -> Plan:
        return build_baseline_plan(BASELINE, model=w.model, parallel=w.parallel, batch=b, tensors_dtype="float32")

    baseline: list[_Step] = []
    base_times: list[tuple[float, float]] = []
    base_plan: Plan | None = None
    for k, batch in enumerate(batches):
        plan = baseline_plan(batch)
        dist.barrier()
        t0 = time.monotonic()
        stats = base_ex.run_with_fallback(plan, batch, baseline_plan, optimizer=base_opt)
        step_s = time.monotonic() - t0
        times = base_ex.action_times
        first, last = (times[0][0], times[-1][1]) if times else (t0, t0)
        baseline.append(_reduced_step(step_s, first, last, stats.loss))
        if shown is not None and k == shown["k"]:
            base_times, base_plan = list(times), plan
    params_baseline = _params(base_ex)

    # ---- gather on rank 0: parameters, the picture's action times ----
    all_planned = _gather(params_planned)
    all_baseline = _gather(params_baseline)
    shown_times = _gather(shown["times"] if shown is not None else [])
    shown_base_times = _gather(base_times)
    dist.destroy_process_group()
    if rank != 0:
        return

    merged_p: dict[str, Any] = {k: v for d in all_planned for k, v in d.items()}
    merged_b: dict[str, Any] = {k: v for d in all_baseline for k, v in d.items()}
    missing = sorted(set(merged_p) ^ set(merged_b))
    worst_abs = 0.0
    worst_name = ""
    close = not missing
    for name, p in merged_p.items():
        if name not in merged_b:
            continue
        q = merged_b[name]
        diff = float((p - q).abs().max()) if p.numel() else 0.0
        if diff > worst_abs:
            worst_abs, worst_name = diff, name
        close = close and bool(torch.allclose(p, q, rtol=PARAM_RTOL, atol=PARAM_ATOL))
    picture = ""
    if shown is not None and base_plan is not None:
        picture = _draw(cfg, shown, shown_times, base_plan, shown_base_times)
    records = [
        IterationRecord(
            iteration=k,
            planned_ms=p["step"].step_ms,
            baseline_ms=b.step_ms,
            planned_makespan_ms=p["step"].makespan_ms,
            baseline_makespan_ms=b.makespan_ms,
            predicted_ms=p["predicted"],
            predicted_baseline_ms=p["predicted_baseline"],
            source=p["source"],
            wait_ms=p["wait"],
            loss=p["step"].loss,
            baseline_loss=b.loss,
        )
        for k, (p, b) in enumerate(zip(planned, baseline, strict=True))
    ]
    result = {
        "workload": WORKLOAD,
        "ranks": pp,
        "iterations": cfg.iterations,
        "job_id": job.job_id,
        "calibration_rows": len(a.profile),
        "records": [asdict(r) for r in records],
        "prefetch": {
            "planned": fallback_stats.planned,
            "served_fallbacks": fallback_stats.served_fallbacks,
            "local_fallbacks": dict(fallback_stats.local_fallbacks),
            "max_wait_ms": fallback_stats.max_wait_ms,
            "reports_failed": fallback_stats.reports_failed,
        },
        "parameters": {
            "count": len(merged_p),
            "missing": missing,
            "max_abs_diff": worst_abs,
            "worst": worst_name,
            "rtol": PARAM_RTOL,
            "atol": PARAM_ATOL,
            "equal": close,
        },
        "timeline": picture,
    }
    Path(a.result_file).write_text(json.dumps(result, indent=1, default=float))


def _draw(
    cfg: DemoConfig,
    shown: dict[str, Any],
    times: Sequence[Sequence[tuple[float, float]]],
    base_plan: Any,
    base_times: Sequence[Sequence[tuple[float, float]]],
) -> str:
    """The picture: the planned iteration as measured and as SEMU predicted it, and 1F1B on the same batch."""
    try:
        from pipeweaver.viz import Timeline, write_timeline_png
    except ImportError:  # pragma: no cover - matplotlib is an optional extra
        return ""

    def relative(per_rank: Sequence[Sequence[tuple[float, float]]]) -> list[list[tuple[float, float]]]:
        origin = min((s for rank in per_rank for s, _ in rank), default=0.0)
        return [[((s - origin) * 1e3, (e - origin) * 1e3) for s, e in rank] for rank in per_rank]

    plan = shown["plan"]
    k = shown["k"]
    panels = [Timeline(f"PipeWeaver plan ({plan.header.source}), iteration {k}, measured", plan, relative(times))]
    if all(rp.predicted_ms for rp in plan.ranks):
        panels.append(Timeline("the same plan, SEMU's prediction", plan, [rp.predicted_ms for rp in plan.ranks]))
    panels.append(Timeline(f"1F1B, iteration {k}, measured", base_plan, relative(base_times)))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        path = write_timeline_png(panels, cfg.out_dir / f"timeline-iteration-{k}.png")
    except ImportError:  # pragma: no cover
        return ""
    return str(path)


def _rank_entry(a: _RankArgs) -> None:
    # A native abort (SIGABRT, SIGSEGV) prints every thread's Python stack before the process dies, so a failed
    # rank says where it was.
    faulthandler.enable(all_threads=True)
    try:
        _rank_main(a)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # The rank's work is done and its results are written: skip the interpreter's teardown, where native threads
    # (gloo's, gRPC's) are torn down in no fixed order. Once, in CI, a rank died with "terminate called without an
    # active exception" (exit -6) and no Python error, most likely there; the driver counts any aborted rank as a
    # failed demo. Were it elsewhere, faulthandler's dump now shows where.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- the driver --------------------------------------------------------------------------------------------------


def _profile(cfg: DemoConfig) -> tuple[LayerTiming, ...]:
    import torch

    from pipeweaver import presets
    from pipeweaver.client.profiler import profile_layers

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainers' setting: one thread per rank
    try:
        w = presets.tiny_vlm(pp=cfg.ranks)
        return tuple(profile_layers(w.model, w.parallel))
    finally:
        torch.set_num_threads(threads)


def _wait_ranks(procs: Sequence[Any], timeout_s: float) -> list[int | None]:
    """Exit codes (None: killed after the timeout). A failed rank gets its peers killed (they would hang)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [p.exitcode for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.05)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join(10)
    return codes


def run_demo(cfg: DemoConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo; the result dict (see `format_report`). Raises `DemoError` if the planner or a rank fails."""
    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="pipeweaver-demo-") as tmp:
        work = Path(tmp)
        profile: tuple[LayerTiming, ...] = ()
        if cfg.calibrate:
            t = time.monotonic()
            profile = _profile(cfg)
            say(f"profiled {len(profile)} layer timings in {time.monotonic() - t:.1f} s (SEMU calibration)")
        t = time.monotonic()
        planner = _start_planner(work, cfg)
        say(f"planner serving on {planner.address} (started in {time.monotonic() - t:.1f} s)")
        try:
            ctx = mp.get_context("spawn")
            result_file = work / "result.json"
            env_threads = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before torch loads
            try:
                procs = [
                    ctx.Process(
                        target=_rank_entry,
                        args=(_RankArgs(r, cfg, planner.address, profile, str(work / "gloo-init"), str(result_file)),),
                        name=f"pipeweaver-demo-rank-{r}",
                    )
                    for r in range(cfg.ranks)
                ]
                for p in procs:
                    p.start()
            finally:
                if env_threads is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = env_threads
            codes = _wait_ranks(procs, cfg.rank_timeout_s)
        finally:
            planner.stop()
        failed = [(r, c) for r, c in enumerate(codes) if c != 0]
        if failed:
            what = ", ".join(f"rank {r} " + ("timed out" if c is None else f"exited {c}") for r, c in failed)
            raise DemoError(f"{what}; the planner's log:\n{planner.log_path.read_text(errors='replace')[-2000:]}")
        if not result_file.exists():
            raise DemoError("rank 0 finished without writing its results")
        result: dict[str, Any] = json.loads(result_file.read_text())
    result["ranks_finished"] = sum(1 for c in codes if c == 0)
    result["summary"] = summarize([IterationRecord(**r) for r in result["records"]])
    return result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(records: Sequence[IterationRecord]) -> dict[str, Any]:
    steady = records[1:] or records
    predicted = [r for r in records if not math.isnan(r.predicted_ms)]
    predicted_base = [r for r in records if not math.isnan(r.predicted_baseline_ms)]
    sources: dict[str, int] = {}
    for r in records:
        sources[r.source] = sources.get(r.source, 0) + 1
    return {
        "planned_ms": sum(r.planned_ms for r in records),
        "baseline_ms": sum(r.baseline_ms for r in records),
        "speedup": sum(r.baseline_ms for r in records) / sum(r.planned_ms for r in records),
        "speedup_after_first": sum(r.baseline_ms for r in steady) / sum(r.planned_ms for r in steady),
        "makespan_speedup": sum(r.baseline_makespan_ms for r in records) / sum(r.planned_makespan_ms for r in records),
        "prediction_error_mean_abs": _mean([abs(r.prediction_error) for r in predicted]),
        "prediction_error_mean": _mean([r.prediction_error for r in predicted]),
        "baseline_prediction_error_mean_abs": _mean([abs(r.baseline_prediction_error) for r in predicted_base]),
        "predicted_iterations": len(predicted),
        "sources": sources,
        "fallbacks": sum(n for s, n in sources.items() if "fallback" in s),
    }


def _pct(x: float) -> str:
    return "    -" if math.isnan(x) else f"{100 * x:+5.0f}%"


def _ms(x: float) -> str:
    return "     -" if math.isnan(x) else f"{x:6.0f}"


def format_report(result: dict[str, Any]) -> Iterator[str]:
    """The lines `pipeweaver demo` prints: one per iteration, then the summary."""
    records = [IterationRecord(**r) for r in result["records"]]
    s = result["summary"]
    rows = result["calibration_rows"]
    semu = f"SEMU calibrated on {rows} layer timings" if rows else "SEMU uncalibrated (cpu preset)"
    yield (
        f"{result['workload']} on {result['ranks']} gloo ranks, {result['iterations']} iterations of the dynamic "
        f"trace; {semu}"
    )
    yield "iter  PipeWeaver ms  1F1B ms  speedup  SEMU ms  err    SEMU 1F1B ms  err    plan"
    for r in records:
        yield (
            f"{r.iteration:4d}  {r.planned_ms:13.0f}  {r.baseline_ms:7.0f}  {r.speedup:6.2f}x  {_ms(r.predicted_ms)}  "
            f"{_pct(r.prediction_error)}  {_ms(r.predicted_baseline_ms):>12}  {_pct(r.baseline_prediction_error)}  "
            f"{r.source}"
        )
    p = result["parameters"]
    yield (
        f"speedup over 1F1B: {s['speedup']:.2f}x (after iteration 0: {s['speedup_after_first']:.2f}x; "
        f"action makespans alone: {s['makespan_speedup']:.2f}x)"
    )
    yield (
        f"SEMU prediction error: {100 * s['prediction_error_mean_abs']:.0f}% mean |error| over "
        f"{s['predicted_iterations']} predicted iterations (mean signed {_pct(s['prediction_error_mean']).strip()}); "
        f"its 1F1B prediction: {100 * s['baseline_prediction_error_mean_abs']:.0f}%"
    )
    pf = result["prefetch"]
    local = sum(pf["local_fallbacks"].values())
    yield (
        f"plans: {', '.join(f'{n} {k}' for k, n in sorted(s['sources'].items()))}; fallbacks: {s['fallbacks']} "
        f"(planner's: {pf['served_fallbacks']}, local: {local}); longest plan wait {pf['max_wait_ms']:.0f} ms"
    )
    yield (
        f"parameters after both runs: {'equal' if p['equal'] else 'DIFFERENT'} within rtol {p['rtol']:g} / atol "
        f"{p['atol']:g} ({p['count']} tensors, largest difference {p['max_abs_diff']:.2e}"
        + (f" in {p['worst']})" if p["worst"] else ")")
    )
    yield (
        "times: slowest rank, barrier to end of step (plan wait, validation and optimizer included); SEMU error: "
        "predicted vs measured makespan (first action to last action across ranks)"
    )
    if result.get("timeline"):
        yield f"timeline: {result['timeline']}"

"""End-to-end comparison on pp GPUs (issue 10): PipeWeaver plans from the real planner service vs torch's and our
static schedules, on the same batches of the dynamic trace, in one run.

    torchrun --nproc-per-node 4 benchmarks/gpu/e2e_compare.py --out $OUT/e2e.json            # 4 GPUs, NCCL, bf16
    .venv/bin/torchrun --nproc-per-node 4 benchmarks/gpu/e2e_compare.py --tiny --iterations 3 --out /tmp/e2e.json

Workload: the scaled VLM of `e2e_workload.py` (ViT 0.3B + LM 1.1B, pp 4, 16 microbatches of up to 4096 tokens;
`--tiny`: same structure, toy sizes, gloo, float32). Batches: `--iterations` of the dynamic trace (seed
`--seed`), preceded by `--warmup` untimed batches taken from later in the trace (other contents, so no plan-cache
hits). Every schedule runs exactly these batches, in this order.

Schedules (`--schedules`, run one after another, each in its own try block, with its own share of the time):
- `pipeweaver`: rank 0 starts `python -m pipeweaver serve` (sidecar, loopback) at the very beginning; every rank
  registers the job (`PlannerClient.register_job`, with the calibration profile below) and iterates a
  `PlanPrefetcher` (iteration k+1's metadata goes out while k trains; every rank asks for every rank's actions and
  proves the plan itself, see prefetch.py), then `run_with_fallback` (one vote: all ranks run the same plan).
  Per iteration: time, where the plan came from (search / cache / the service's fallback / a local fallback and
  why), the plan's predicted makespan (header), the wait for the plan, and the margin: end of iteration k-1 minus
  the moment the last rank's reply of iteration k was decoded on the slowest rank (negative: the plan was late).
- `1f1b`, `interleaved-1f1b`, `optimus-coarse`: our `PipelineExecutor` on the baseline plans
  (`build_baseline_plan`, built outside the timed region).
- `torch-1f1b`, `torch-interleaved-1f1b`: `torch.distributed.pipelining` `Schedule1F1B` /
  `ScheduleInterleaved1F1B` over the same modules (the `1f1b` / `interleaved-1f1b` placement: Megatron's, balanced
  by parameters), every microbatch padded to the run's most images and longest sequence (`e2e_torch_vlm.py`).
Timed region (all schedules): barrier, synchronize, t0, the step, synchronize, t1; the maximum over ranks. It
includes synthesising the inputs from the batch metadata (both sides alike) and, for ours, the plan check.
Throughput counts the real (unpadded) language-model tokens for every schedule, so padding shows up as cost.

SEMU: the calibration profile (`profile_layers` on the device, the executor's own blocks, time-boxed by
`--profile-s`) goes with RegisterJob; the uncalibrated job is registered too. After our schedules ran, rank 0
starts `e2e_semu.py` in the background: SEMU's prediction of every plan that ran, calibrated and not (local
simulator; the Simulate RPC of the service for the baselines as a cross-check), and predicted Chrome traces.
One iteration per `--trace-schedules` is run once more with per-action timing (CUDA events) and written as a
measured Chrome trace beside SEMU's, under the traces directory (default: `<out>` without `.json` + `_traces`).

Robustness: the JSON is rewritten after every schedule; a schedule that raises on every rank is recorded and
skipped; a hang ends in the NCCL watchdog after `--pg-timeout-s` (what ran before stays in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_service import Sidecar, profile_calibration, stamped_client
from e2e_torch_vlm import TORCH_SCHEDULES, VLMShape, build_torch_pipeline
from e2e_workload import PLANNING_HARDWARE, scaled_vlm
from executor_overhead import env_info

from pipeweaver.client.executor import PipelineExecutor
from pipeweaver.datagen import dynamic_batch
from pipeweaver.plan.export import chrome_trace
from pipeweaver.plan.ir import Plan, PlanSource
from pipeweaver.search.baselines import baseline_placement, build_baseline_plan
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.hardware import CPU
from pipeweaver.spec.model import Modality

OURS = ("1f1b", "interleaved-1f1b", "optimus-coarse")
ALL_SCHEDULES = ("1f1b", "pipeweaver", "interleaved-1f1b", "optimus-coarse", "torch-1f1b", "torch-interleaved-1f1b")
FINAL_RESERVE_S = 35.0
"""Kept free at the end of `--total-s`: waiting for SEMU's predictions, the last JSON, shutting down."""


# ---- the run's shared state -----------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    wire: str
    """The dtype plans' transfers carry."""
    rank: int
    world: int
    cpu: Any
    """A gloo group with a long timeout: objects, and waiting while rank 0 does host work."""
    wl: Any
    hardware: Any
    batches: list[BatchMetadata]
    warmup: int
    shape: VLMShape
    out: Path
    traces: Path
    t_start: float
    result: dict[str, Any]
    sidecar: Sidecar | None = None
    profile_rows: list[Any] = field(default_factory=list)
    semu_job: dict[str, Any] = field(default_factory=lambda: {"schedules": {}, "traces": []})
    semu_proc: subprocess.Popen[bytes] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def measured(self) -> list[BatchMetadata]:
        return self.batches[self.warmup :]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def bcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (over the gloo group: may wait long for rank 0)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.cpu)
        return out

    def say(self, **kv: Any) -> None:
        if self.rank == 0:
            print(json.dumps({"t_s": round(time.monotonic() - self.t_start, 1), **kv}, default=str), flush=True)

    def write(self) -> None:
        if self.rank == 0:
            try:  # the summary must never cost the measurements
                self.result["summary"] = summarize(self.result)
            except Exception as e:
                self.result["summary"] = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.result, indent=1, default=_json_default) + "\n")
            tmp.replace(self.out)


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


# ---- our executor, with shared pair communicators and an action timeline ---------------------------------------


class BenchExecutor(PipelineExecutor):
    """`PipelineExecutor` that reuses one set of NCCL pair communicators for every schedule of the run (created and
    warmed once by `pair_groups`), and records each action's start/end when `record` is set: CUDA events on the
    compute stream on a GPU (what the device did, not when Python launched it), `time.monotonic` on a CPU."""

    shared_pairs: ClassVar[dict[tuple[int, int], Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.record = False
        self._marks: list[tuple[Any, Any]] = []
        self._origin: Any = None
        self.last_plan: Plan | None = None
        super().__init__(*args, **kwargs)

    def _create_pair_groups(self, pipelines: Sequence[Sequence[int]]) -> None:
        if not self.shared_pairs:
            super()._create_pair_groups(pipelines)
            BenchExecutor.shared_pairs.update(self._pair_group)
        self._pair_group = dict(self.shared_pairs)

    def run_iteration(self, plan: Plan, batch: BatchMetadata, **kwargs: Any) -> Any:
        self.last_plan = plan  # what ran, also when run_with_fallback chose the fallback
        return super().run_iteration(plan, batch, **kwargs)

    def begin_record(self) -> None:
        self.record, self._marks = True, []
        if self.device.type == "cuda":
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
        else:
            self._origin = time.monotonic()

    def recorded_ms(self) -> list[tuple[float, float]]:
        """(start, end) of every action since `begin_record`, in ms (call after the iteration synchronized)."""
        self.record = False
        if self.device.type == "cuda":
            o = self._origin
            return [(o.elapsed_time(s), o.elapsed_time(e)) for s, e in self._marks]
        return [((s - self._origin) * 1e3, (e - self._origin) * 1e3) for s, e in self._marks]

    def _timed(self, fn: Callable[..., None], *args: Any) -> None:
        if not self.record:
            fn(*args)
            return
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
        else:
            start = time.monotonic()
            fn(*args)
            end = time.monotonic()
        self._marks.append((start, end))

    def _compute(self, it: Any, action: Any) -> None:
        self._timed(super()._compute, it, action)

    def _post(self, it: Any, batch: Any) -> None:
        self._timed(super()._post, it, batch)

    def _wait(self, it: Any, handle: int) -> None:
        self._timed(super()._wait, it, handle)


def pair_groups(run: Run) -> float:
    """Create the directed-pair NCCL communicators once, for every executor of the run, and wake each one up with
    a one-element exchange, pairs in one global order (each rank takes part in its pairs only: no cycle). Without
    this, the first iteration of the first schedule pays for 12 lazy communicator set-ups."""
    if not run.cuda or run.world < 2:
        return 0.0
    t0 = time.monotonic()
    for a in range(run.world):  # PipelineExecutor._create_pair_groups' order (new_group is collective)
        for b in range(run.world):
            if a != b:
                BenchExecutor.shared_pairs[(a, b)] = dist.new_group([a, b])
    for (a, b), group in sorted(BenchExecutor.shared_pairs.items()):
        if run.rank == a:
            dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(1, device=run.device), b, group=group)])[0].wait()
        elif run.rank == b:
            buf = torch.empty(1, device=run.device)
            dist.batch_isend_irecv([dist.P2POp(dist.irecv, buf, a, group=group)])[0].wait()
    run.sync()
    return time.monotonic() - t0


def free_memory(run: Run) -> None:
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()


# ---- timing ---------------------------------------------------------------------------------------------------


@dataclass
class Clock:
    """One schedule's time limit; every decision uses all-reduced numbers, so every rank decides the same."""

    run: Run
    limit_s: float
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0
    last_ms: float = 0.0

    def timed(self, fn: Callable[[], Any]) -> tuple[float, float, Any]:
        """(max ms over ranks, this rank's end on the monotonic clock, fn's result)."""
        run = self.run
        dist.barrier()
        run.sync()
        t0 = time.perf_counter()
        out = fn()
        run.sync()
        t1 = time.perf_counter()
        end = time.monotonic()
        x = torch.tensor([(t1 - t0) * 1e3, end - self.started], dtype=torch.float64, device=run.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        self.last_ms, self.elapsed_s = float(x[0]), float(x[1])
        return self.last_ms, end, out

    def warmup_over(self) -> bool:
        """Stop warming up once half the schedule's time is gone (one warm-up iteration always runs)."""
        return self.elapsed_s > 0.5 * self.limit_s

    def out_of_time(self, done: int) -> bool:
        """Stop measuring when the next iteration would not fit (one measured iteration always runs)."""
        return done >= 1 and self.elapsed_s + 1.2 * self.last_ms / 1e3 > self.limit_s


def reduce_sum(run: Run, value: float) -> float:
    x = torch.tensor([value], dtype=torch.float64, device=run.device)
    dist.all_reduce(x)
    return float(x)


def reset_memory_stats(run: Run) -> None:
    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
        torch.cuda.reset_accumulated_memory_stats(run.device)


def memory_stats(run: Run) -> dict[str, Any]:
    """Peak allocated GiB and allocator retries (cudaMalloc failures answered by freeing the cache and trying
    again: a sign of memory pressure that costs synchronizations) since `reset_memory_stats`, per rank."""
    if not run.cuda:
        return {}
    stats = torch.cuda.memory_stats(run.device)
    mine = [
        torch.cuda.max_memory_allocated(run.device) / 2**30,
        float(stats.get("num_alloc_retries", 0)),
        float(stats.get("num_ooms", 0)),
    ]
    every = run.gather(mine)
    return {
        "peak_gib_per_rank": [round(m[0], 2) for m in every],
        "alloc_retries_per_rank": [int(m[1]) for m in every],
        "ooms_per_rank": [int(m[2]) for m in every],
    }


def write_measured_trace(run: Run, name: str, k: int, plan: Plan, ex: BenchExecutor, clock: Clock) -> None:
    """Run iteration k's plan once more with per-action timing; rank 0 writes it as a Chrome trace."""
    batch = run.measured[k]

    def recorded() -> Any:
        ex.begin_record()  # after the barrier and the synchronize: every rank's origin is the same instant
        return ex.run_iteration(plan, batch)

    ms, _, _ = clock.timed(recorded)
    windows = run.gather(ex.recorded_ms())
    if run.rank == 0:
        path = trace_path(run, name, k)
        write_trace(path, relabel(chrome_trace(plan, windows), 0, "measured"))
        run.result["traces"].append(
            {"schedule": name, "iteration": k, "file": str(path), "measured_ms": ms, "processes": ["measured"]}
        )
        run.semu_job["traces"].append({"schedule": name, "iteration": run.warmup + k})


def trace_path(run: Run, name: str, k: int) -> Path:
    """One gzipped Chrome trace per schedule (ui.perfetto.dev opens it): the measured iteration, then SEMU's."""
    run.traces.mkdir(parents=True, exist_ok=True)
    return run.traces / f"{name}_it{k}.trace.json.gz"


def write_trace(path: Path, trace: dict[str, Any]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(trace, f)


def relabel(trace: dict[str, Any], offset: int, label: str) -> dict[str, Any]:
    """Move a trace's ranks to processes offset..offset+pp-1 named "<label> rank r", so that several timelines of
    one plan (measured, SEMU calibrated, SEMU uncalibrated) sit in one file, one above the other."""
    for e in trace["traceEvents"]:
        e["pid"] += offset
        if e.get("name") == "process_name":
            e["args"]["name"] = f"{label} {e['args']['name']}"
        elif e.get("name") == "process_sort_index":
            e["args"]["sort_index"] = e["pid"]
    trace.setdefault("otherData", {})[f"{label}_makespan_ms"] = max(
        (e["ts"] + e.get("dur", 0)) / 1e3 for e in trace["traceEvents"] if "ts" in e
    )
    return trace


def trace_index(run: Run, done: int) -> int:
    return min(run.args.trace_iteration, done - 1)


# ---- the schedules --------------------------------------------------------------------------------------------


def run_ours(run: Run, name: str, clock: Clock) -> dict[str, Any]:
    """Our executor on a baseline's plans."""
    wl = run.wl
    placement = baseline_placement(name, model=wl.model, parallel=wl.parallel)
    ex = BenchExecutor(wl.model, placement, run.rank, device=run.device, dtype=run.dtype)
    ex.warm_up()

    def plan_for(b: BatchMetadata) -> Plan:
        return build_baseline_plan(name, model=wl.model, parallel=wl.parallel, batch=b, tensors_dtype=run.wire)

    rows: list[dict[str, Any]] = []
    plans: dict[int, Plan] = {}
    for w, batch in enumerate(run.batches[: run.warmup]):
        if w and clock.warmup_over():
            break
        plan = plan_for(batch)
        ms, _, _ = clock.timed(lambda p=plan, b=batch: ex.run_iteration(p, b))
        run.say(schedule=name, warmup=w, ms=round(ms, 1))
    for k, batch in enumerate(run.measured):
        if clock.out_of_time(k):
            break
        t0 = time.perf_counter()
        plans[k] = plan = plan_for(batch)
        build_ms = (time.perf_counter() - t0) * 1e3
        ms, _, stats = clock.timed(lambda p=plan, b=batch: ex.run_iteration(p, b))
        rows.append({"i": k, "ms": round(ms, 3), "loss": reduce_sum(run, stats.loss), "plan_build_ms": build_ms})
        run.say(schedule=name, iteration=k, ms=round(ms, 1), loss=round(rows[-1]["loss"], 5))
    if name in run.args.trace_schedules.split(",") and rows:
        k = trace_index(run, len(rows))
        write_measured_trace(run, name, k, plans[k], ex, clock)
    run.semu_job["schedules"][name] = {"iterations": [run.warmup + r["i"] for r in rows], "plans": None}
    return {"rows": rows, "chunks": len(placement.chunks)}


def register_jobs(run: Run) -> tuple[Any, Any, dict[str, Any]]:
    """Rank 0 waits for the sidecar; every rank registers the calibrated job (idempotent: one job id)."""
    a = run.args
    info: dict[str, Any] = {}
    if run.rank == 0:
        assert run.sidecar is not None
        try:
            info["address"] = run.sidecar.wait_ready()
        except RuntimeError as e:
            info["error"] = str(e)
        info["ready_s"] = run.sidecar.ready_s
    info = run.bcast(info)
    if "error" in info:
        raise RuntimeError(info["error"])
    client = stamped_client(info["address"])
    job = client.register_job(
        run.wl.model, run.wl.parallel, run.hardware, run.profile_rows, planning_budget_ms=a.budget_ms, timeout_s=120
    )
    info |= {
        "job_calibrated": job.job_id,
        "calibration_rows": len(run.profile_rows),
        "placement": [[c.pipeline, c.index, c.rank, [str(r) for r in c.layers]] for c in job.placement.chunks],
        "sub_microbatch_size": dict(job.sub_microbatch_size),
        "segments": dict(job.segments),
        "static_memory_gib": [x / 2**30 for x in job.static_memory_bytes],
    }
    if run.rank == 0:  # for SEMU's uncalibrated cross-check (Simulate RPC); nobody trains on it
        try:
            bare = client.register_job(run.wl.model, run.wl.parallel, run.hardware, None, timeout_s=120)
            info["job_uncalibrated"] = bare.job_id
        except Exception as e:
            info["job_uncalibrated_error"] = repr(e)
    return client, job, info


def run_pipeweaver(run: Run, name: str, clock: Clock) -> dict[str, Any]:
    from pipeweaver.client.prefetch import PlanPrefetcher

    a = run.args
    client, job, info = register_jobs(run)
    ex = BenchExecutor(run.wl.model, job.placement, run.rank, device=run.device, dtype=run.dtype)
    ex.warm_up()
    prefetcher = PlanPrefetcher(client, job, run.batches, rank=run.rank, first_deadline_s=a.first_deadline_s)
    items: Iterator[Any] = iter(prefetcher)
    mine: list[dict[str, Any]] = []
    """This rank's view of each iteration (warm-up included): origin, wait, end time."""
    rows: list[dict[str, Any]] = []
    kept: dict[int, Plan] = {}
    k_trace = min(a.trace_iteration, len(run.measured) - 1)
    try:
        for n, item in enumerate(items):
            k = n - run.warmup
            # Warm-up always runs whole here: skipping an item would teach the prefetcher a tiny step time and
            # with it a deadline no plan can meet.
            if k >= 0 and clock.out_of_time(k):
                break
            ms, end, stats = clock.timed(
                lambda it=item: ex.run_with_fallback(it.plan, it.metadata, prefetcher.fallback_plan)
            )
            ran = ex.last_plan
            assert ran is not None
            mine.append(
                {
                    "origin": item.origin,
                    "reason": item.fallback_reason or "",
                    "served_fallback": item.served_fallback,
                    "wait_ms": item.wait_ms,
                    "end": end,
                }
            )
            if k < 0:
                run.say(schedule=name, warmup=n, ms=round(ms, 1), source=ran.header.source.value)
                continue
            if run.rank != 0:  # the others keep what a trace may re-run: the trace iteration, else the latest
                kept = {kk: p for kk, p in kept.items() if kk == k_trace}
            kept[k] = ran
            h = ran.header
            rows.append(
                {
                    "i": k,
                    "ms": round(ms, 3),
                    "loss": reduce_sum(run, stats.loss),
                    "source": h.source.value,
                    "fallback": h.source is PlanSource.FALLBACK,
                    "vote_fallback_reason": stats.fallback_reason,
                    "predicted_ms": h.predicted_makespan_ms or None,
                    "lower_bound_ms": h.lower_bound_ms or None,
                    "baselines_predicted_ms": dict(h.baseline_makespans_ms),
                }
            )
            run.say(schedule=name, iteration=k, ms=round(ms, 1), source=h.source.value, pred=rows[-1]["predicted_ms"])
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # ends the plan stream
    arrivals = dict(client.arrivals)
    views = run.gather({"mine": mine, "arrivals": arrivals})
    add_margins(run, rows, views)
    if name in a.trace_schedules.split(",") and rows:
        k = trace_index(run, len(rows))
        write_measured_trace(run, name, k, kept[k], ex, clock)
    run.semu_job["schedules"][name] = {
        "iterations": [run.warmup + r["i"] for r in rows],
        "plans": [kept[r["i"]] for r in rows] if run.rank == 0 else None,
    }
    stats = prefetcher.stats
    client.close()
    return {
        "rows": rows,
        "service": info,
        "prefetch_rank0": {
            "planned": stats.planned,
            "served_fallbacks": stats.served_fallbacks,
            "local_fallbacks": dict(stats.local_fallbacks),
            "max_wait_ms": stats.max_wait_ms,
        },
    }


def add_margins(run: Run, rows: list[dict[str, Any]], views: list[dict[str, Any]]) -> None:
    """Per measured iteration: the slowest rank's wait, every rank's origin, and the margin of its plan."""
    pp = run.wl.parallel.pp
    for row in rows:
        n = run.warmup + row["i"]
        it = run.batches[n].iteration
        margins = []
        for v in views:
            arrived = [v["arrivals"].get((it, r)) for r in range(pp)]
            if n == 0 or any(t is None for t in arrived):
                continue
            margins.append((v["mine"][n - 1]["end"] - max(arrived)) * 1e3)
        row["margin_ms"] = round(min(margins), 2) if len(margins) == len(views) else None
        row["wait_ms_max_rank"] = round(max(v["mine"][n]["wait_ms"] for v in views), 2)
        row["origin_per_rank"] = [v["mine"][n]["origin"] for v in views]
        row["local_fallback_reasons"] = sorted({v["mine"][n]["reason"] for v in views} - {""})
        row["served_fallback"] = any(v["mine"][n]["served_fallback"] for v in views)


def run_torch(run: Run, name: str, clock: Clock) -> dict[str, Any]:
    """torch.distributed.pipelining over the same modules, padded batches."""
    wl = run.wl
    placement = baseline_placement(TORCH_SCHEDULES[name], model=wl.model, parallel=wl.parallel)
    ex = BenchExecutor(wl.model, placement, run.rank, device=run.device, dtype=run.dtype)
    m = len(run.batches[0].microbatches)
    pipe = build_torch_pipeline(name, ex, wl.model, run.shape, m, run.device, run.dtype)
    params = list(ex.parameters())

    def step(batch: BatchMetadata) -> float:
        for p in params:  # as ours does inside run_iteration
            p.grad = None
        return pipe.step(wl.model, run.shape, batch, run.device, run.dtype)

    for w, batch in enumerate(run.batches[: run.warmup]):
        if w and clock.warmup_over():
            break
        ms, _, _ = clock.timed(lambda b=batch: step(b))
        run.say(schedule=name, warmup=w, ms=round(ms, 1))
    rows: list[dict[str, Any]] = []
    for k, batch in enumerate(run.measured):
        if clock.out_of_time(k):
            break
        ms, _, loss = clock.timed(lambda b=batch: step(b))
        rows.append({"i": k, "ms": round(ms, 3), "loss": reduce_sum(run, loss), **run.shape.padding(batch)})
        run.say(schedule=name, iteration=k, ms=round(ms, 1), loss=round(rows[-1]["loss"], 5))
    return {"rows": rows, "stages": len(placement.chunks)}


# ---- bookkeeping ----------------------------------------------------------------------------------------------


def run_schedule(run: Run, name: str, index: int, names: list[str]) -> None:
    """One schedule with its share of the remaining time; errors are recorded, the run goes on."""
    a = run.args
    end = run.t_start + a.total_s - FINAL_RESERVE_S
    left = run.bcast(end - time.monotonic())
    limit = left / (len(names) - index)
    if a.schedule_s > 0:
        limit = min(limit, a.schedule_s)
    entry: dict[str, Any] = {"status": "running", "limit_s": round(limit, 1)}
    run.result["schedules"][name] = entry
    run.write()
    if left <= 0:
        entry["status"] = "skipped: out of time"
        return
    reset_memory_stats(run)
    clock = Clock(run, limit)
    runner = run_pipeweaver if name == "pipeweaver" else run_torch if name in TORCH_SCHEDULES else run_ours
    try:
        entry |= runner(run, name, clock)
        entry["status"] = "ok"
    except Exception as e:
        entry["status"] = "error"
        entry["error"] = f"{type(e).__name__}: {e}"[:2000]
        entry["traceback"] = traceback.format_exc()[-3000:]
        run.say(schedule=name, error=entry["error"][:300])
    entry["wall_s"] = round(time.monotonic() - clock.started, 1)
    free_memory(run)
    entry |= memory_stats(run)
    run.write()


def start_semu(run: Run) -> None:
    """Rank 0: hand the plans that ran to `e2e_semu.py` in the background (host cores are idle meanwhile)."""
    if run.rank != 0 or run.semu_proc is not None or not run.semu_job["schedules"]:
        return
    work = Path(tempfile.mkdtemp(prefix="e2e_semu_"))
    info = run.result["schedules"].get("pipeweaver", {}).get("service", {})
    job = {
        **run.semu_job,
        "tiny": run.args.tiny,
        "warmup": run.warmup,
        "microbatches": run.args.microbatches,
        "hardware": run.hardware,
        "batches": run.batches,
        "rows": [(r.module, r.tokens, r.pass_.value, r.measured_ms) for r in run.profile_rows],
        "service": {
            "address": info.get("address"),
            "job_calibrated": info.get("job_calibrated"),
            "job_uncalibrated": info.get("job_uncalibrated"),
            "workers": run.args.workers,
        }
        if info.get("address") and run.sidecar is not None and run.sidecar.proc.poll() is None
        else None,
    }
    for t in job["traces"]:
        t["dir"] = str(work)  # SEMU's traces go to its work dir; finish_semu merges them into ours
    (work / "job.pkl").write_bytes(pickle.dumps(job))
    cmd = [sys.executable, str(Path(__file__).with_name("e2e_semu.py")), "--input", str(work / "job.pkl")]
    cmd += ["--out", str(work / "semu.json")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    if run.sidecar is not None:  # from now on the planner only answers SEMU's Simulate calls: leave the ranks the CPU
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PGRP, run.sidecar.proc.pid, 10)
    with (work / "semu.log").open("wb") as log:
        run.semu_proc = subprocess.Popen(["nice", "-n", "10", *cmd], stdout=log, stderr=subprocess.STDOUT, env=env)
    run.result["semu"] = {"status": "running", "work_dir": str(work)}


def finish_semu(run: Run) -> None:
    if run.rank != 0 or run.semu_proc is None:
        return
    work = Path(run.result["semu"]["work_dir"])
    budget = max(5.0, run.t_start + run.args.total_s - time.monotonic() - 5.0)
    try:
        run.semu_proc.wait(budget)
    except subprocess.TimeoutExpired:
        run.semu_proc.kill()
        run.semu_proc.wait(10)
    semu: dict[str, Any] = {"returncode": run.semu_proc.returncode}
    if (work / "semu.json").exists():
        semu |= json.loads((work / "semu.json").read_text())
        semu["status"] = "ok"
    else:
        semu["status"] = "no output"
        semu["log_tail"] = (work / "semu.log").read_text(errors="replace")[-3000:]
    merge_semu_traces(run, semu.pop("traces", []))
    run.result["semu"] = semu


def merge_semu_traces(run: Run, predicted: list[dict[str, Any]]) -> None:
    """Append SEMU's timelines of each traced plan to its measured trace file (processes 100+ and 200+)."""
    offsets = {"semu_calibrated": 100, "semu_uncalibrated": 200}
    for entry in run.result["traces"]:
        path = Path(entry["file"])
        with gzip.open(path, "rt", encoding="utf-8") as f:
            trace = json.load(f)
        for p in predicted:
            if p["schedule"] != entry["schedule"] or p["iteration"] != entry["iteration"]:
                continue
            extra = relabel(json.loads(Path(p["file"]).read_text()), offsets[p["kind"]], p["kind"])
            trace["traceEvents"] += extra["traceEvents"]
            trace["otherData"] |= {k: v for k, v in extra["otherData"].items() if k.endswith("_makespan_ms")}
            entry["processes"].append(p["kind"])
            entry[f"{p['kind']}_ms"] = p["predicted_ms"]
        write_trace(path, trace)


# ---- summary --------------------------------------------------------------------------------------------------


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]
    return {
        "n": len(xs),
        "mean_ms": statistics.fmean(xs),
        "median_ms": statistics.median(xs),
        "p90_ms": p90,
        "min_ms": s[0],
        "max_ms": s[-1],
        "stdev_ms": statistics.stdev(xs) if len(xs) > 1 else 0.0,
    }


def _mape(pred: Sequence[float | None], meas: Sequence[float]) -> dict[str, float] | None:
    pairs = [(p, m) for p, m in zip(pred, meas, strict=False) if p is not None and math.isfinite(p) and p > 0]
    if not pairs:
        return None
    return {
        "n": len(pairs),
        "mape_pct": 100.0 * statistics.fmean(abs(p - m) / m for p, m in pairs),
        "mean_signed_err_pct": 100.0 * statistics.fmean((p - m) / m for p, m in pairs),
        "mean_predicted_ms": statistics.fmean(p for p, _ in pairs),
        "mean_measured_ms": statistics.fmean(m for _, m in pairs),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per schedule: mean / p90 time, real tokens per second; PipeWeaver's speedups on the common iterations;
    SEMU's error per schedule with and without calibration."""
    tokens = [b["lm_tokens"] for b in result["batches"]["measured"]]
    out: dict[str, Any] = {"schedules": {}, "speedup_pipeweaver_vs": {}, "semu_mape": {}}
    times: dict[str, list[float]] = {}
    for name, s in result["schedules"].items():
        rows = s.get("rows") or []
        if not rows:
            continue
        ms = [r["ms"] for r in rows]
        times[name] = ms
        tok = sum(tokens[r["i"]] for r in rows)
        out["schedules"][name] = {**_stats(ms), "tokens_per_s": tok / (sum(ms) / 1e3)}
    pw = times.get("pipeweaver")
    for name, ms in times.items():
        if pw is None or name == "pipeweaver":
            continue
        c = min(len(pw), len(ms))
        out["speedup_pipeweaver_vs"][name] = {
            "iterations": c,
            "mean_time_ratio": statistics.fmean(ms[:c]) / statistics.fmean(pw[:c]),
            "p90_time_ratio": _stats(ms[:c])["p90_ms"] / _stats(pw[:c])["p90_ms"],
        }
    semu = result.get("semu", {}).get("schedules", {})
    for name, ms in times.items():
        pred = semu.get(name, {})
        entry = {kind: _mape(pred.get(f"{kind}_ms", []), ms) for kind in ("uncalibrated", "calibrated")}
        for kind in ("service_calibrated", "service_uncalibrated"):
            if f"{kind}_ms" in pred:
                entry[kind] = _mape(pred[f"{kind}_ms"], ms)
        if name == "pipeweaver":
            rows = result["schedules"][name]["rows"]
            entry["service_header_calibrated"] = _mape([r["predicted_ms"] for r in rows], ms)
        if any(v for v in entry.values()):
            out["semu_mape"][name] = entry
    out["loss_max_rel_diff_vs_1f1b"] = loss_check(result)
    pw_rows = result["schedules"].get("pipeweaver", {}).get("rows") or []
    if pw_rows:
        margins = [r["margin_ms"] for r in pw_rows if r.get("margin_ms") is not None]
        out["pipeweaver_plans"] = {
            "iterations": len(pw_rows),
            "sources": {s: sum(1 for r in pw_rows if r["source"] == s) for s in {r["source"] for r in pw_rows}},
            "local_fallbacks": sum(1 for r in pw_rows if r["local_fallback_reasons"] or r["vote_fallback_reason"]),
            "served_fallbacks": sum(1 for r in pw_rows if r["served_fallback"]),
            "late_plans": sum(1 for m in margins if m < 0),
            "margin_ms_min": min(margins) if margins else None,
            "margin_ms_median": statistics.median(margins) if margins else None,
        }
    return out


def loss_check(result: dict[str, Any]) -> dict[str, float]:
    """Every schedule computes the same mathematics on the same batches and weights: its loss per iteration must
    match 1F1B's (to bf16 rounding on GPUs; padding included for torch's)."""
    ref = {r["i"]: r["loss"] for r in result["schedules"].get("1f1b", {}).get("rows") or []}
    out = {}
    for name, s in result["schedules"].items():
        pairs = [(r["loss"], ref[r["i"]]) for r in s.get("rows") or [] if r["i"] in ref and ref[r["i"]]]
        if pairs and name != "1f1b":
            out[name] = max(abs(a - b) / abs(b) for a, b in pairs)
    return out


def batch_summary(shape: VLMShape, batches: list[BatchMetadata]) -> list[dict[str, Any]]:
    return [
        {
            "iteration": b.iteration,
            "documents": sum(len(mb.documents) for mb in b.microbatches),
            "images": sum(len(mb.media(Modality.IMAGE)) for mb in b.microbatches),
            **shape.padding(b),
        }
        for b in batches
    ]


# ---- main -----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--traces-dir", default="", help="default: <out> without .json, plus _traces")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: toy sizes, gloo, float32")
    ap.add_argument("--iterations", type=int, default=30, help="measured iterations of the dynamic trace")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations before each schedule's timed ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--schedules", default=",".join(ALL_SCHEDULES))
    ap.add_argument("--total-s", type=float, default=400.0, help="the script's own deadline, from its start")
    ap.add_argument("--schedule-s", type=float, default=0.0, help="cap per schedule (0: a fair share of the rest)")
    ap.add_argument("--profile-s", type=float, default=45.0, help="time box of the calibration profile")
    ap.add_argument("--no-calibration", action="store_true", help="register the job without the profile")
    ap.add_argument("--budget-ms", type=float, default=0.0, help="planning budget per batch (0: 1000, tiny 100)")
    ap.add_argument("--workers", type=int, default=0, help="sidecar search workers (0: 3, tiny 1)")
    ap.add_argument("--planner-nice", type=int, default=-1, help="nice of the sidecar (-1: 0, tiny 10)")
    ap.add_argument("--first-deadline-s", type=float, default=30.0, help="the first plan's deadline")
    ap.add_argument("--trace-schedules", default="pipeweaver,interleaved-1f1b")
    ap.add_argument("--trace-iteration", type=int, default=3, help="measured iteration drawn as Chrome traces")
    ap.add_argument("--pg-timeout-s", type=float, default=120.0, help="NCCL timeout: a hang aborts the run")
    ap.add_argument("--dtype", default="", choices=["", "bfloat16", "float32"], help="default: bf16, tiny fp32")
    ap.add_argument("--attention", default="fast", choices=["fast", "reference"])
    args = ap.parse_args()
    args.budget_ms = args.budget_ms or (100.0 if args.tiny else 1000.0)
    args.workers = args.workers or (1 if args.tiny else 3)
    args.planner_nice = args.planner_nice if args.planner_nice >= 0 else (10 if args.tiny else 0)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    unknown = set(args.schedules.split(",")) - set(ALL_SCHEDULES)
    if unknown:
        ap.error(f"unknown schedules {sorted(unknown)}; choose from {', '.join(ALL_SCHEDULES)}")
    return args


def setup(args: argparse.Namespace, t_start: float) -> Run:
    cuda = torch.cuda.is_available() and not args.tiny
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    timeout = timedelta(seconds=args.pg_timeout_s)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timeout)
    cpu = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(900.0, args.total_s)))
    rank, world = dist.get_rank(), dist.get_world_size()
    wl = scaled_vlm(microbatches=args.microbatches, tiny=args.tiny)
    if world != wl.parallel.pp:
        raise SystemExit(f"run with {wl.parallel.pp} ranks (the workload's pp), not {world}")
    warm = [dynamic_batch(wl, seed=args.seed, iteration=args.iterations + w) for w in range(args.warmup)]
    measured = [dynamic_batch(wl, seed=args.seed, iteration=k) for k in range(args.iterations)]
    # Iteration numbers run on through warm-up and measured batches (the prefetcher wants them increasing).
    warm = [replace(b, iteration=w) for w, b in enumerate(warm)]
    measured = [replace(b, iteration=args.warmup + k) for k, b in enumerate(measured)]
    batches = warm + measured
    shape = VLMShape.of(wl.model, batches)
    out = Path(args.out)
    traces = Path(args.traces_dir) if args.traces_dir else out.with_name(out.stem + "_traces")
    run = Run(
        args=args, device=device, dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16,
        wire=args.dtype, rank=rank, world=world, cpu=cpu, wl=wl, hardware=CPU if args.tiny else PLANNING_HARDWARE,
        batches=batches, warmup=args.warmup, shape=shape, out=out, traces=traces, t_start=t_start, result={},
    )  # fmt: skip
    run.result = {
        "benchmark": "e2e_compare",
        "env": env_info(device) if rank == 0 else {},
        "config": vars(args),
        "workload": {
            "name": wl.name,
            "params": wl.model.total_params(),
            "pp": wl.parallel.pp,
            "microbatches": wl.parallel.microbatches,
            "seq_len": wl.parallel.seq_len,
            "job_hardware": run.hardware.name,
            "job_hardware_memory_gb": run.hardware.memory_bytes / 1e9,
        },
        "padding": asdict(shape),
        "batches": {"warmup": batch_summary(shape, warm), "measured": batch_summary(shape, measured)},
        "phases_s": {},
        "schedules": {},
        "traces": [],
    }
    return run


def main() -> None:
    t_start = time.monotonic()
    args = parse_args()
    if args.attention == "fast":
        from fast_attention import use_fast_attention

        use_fast_attention()
    run = setup(args, t_start)
    names = args.schedules.split(",")
    if run.rank == 0 and "pipeweaver" in names:  # starts now: its workers compile while the GPUs profile
        run.sidecar = Sidecar.launch(
            run.traces, workers=args.workers, budget_ms=args.budget_ms, baselines=",".join(OURS), nice=args.planner_nice
        )
    run.result["phases_s"]["setup"] = round(time.monotonic() - t_start, 1)
    run.write()
    try:
        run.result["phases_s"]["pair_groups"] = round(pair_groups(run), 1)
        if "pipeweaver" in names and not args.no_calibration:
            prof: dict[str, Any] = {}
            if run.rank == 0:
                prof = profile_calibration(
                    run.wl.model, run.wl.parallel, device=run.device, dtype=run.dtype, budget_s=args.profile_s
                )
            prof = run.bcast(prof)
            run.profile_rows = prof["rows"]
            run.result["profile"] = {k: v for k, v in prof.items() if k != "rows"} | {
                "rows": [[r.module, r.tokens, r.pass_.value, round(r.measured_ms, 4)] for r in prof["rows"]]
            }
            free_memory(run)
        run.say(phase="setup done", **run.result["phases_s"])
        last_ours = max((i for i, n in enumerate(names) if n not in TORCH_SCHEDULES), default=-1)
        for i, name in enumerate(names):
            run_schedule(run, name, i, names)
            if i == last_ours:
                start_semu(run)
        start_semu(run)
        finish_semu(run)
    finally:
        if run.sidecar is not None:
            run.result["sidecar_log_tail"] = run.sidecar.log_tail(1500)
            run.sidecar.stop()
        run.result["phases_s"]["total"] = round(time.monotonic() - t_start, 1)
        run.write()
        if run.rank == 0:
            print(json.dumps({"summary": run.result.get("summary")}, default=_json_default), flush=True)
    dist.barrier(group=run.cpu)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

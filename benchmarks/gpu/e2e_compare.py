"""End-to-end comparison on pp GPUs (issue 10): PipeWeaver plans from the real planner service vs torch's and our
static schedules, on the same batches of the dynamic trace, in one run.

    bash benchmarks/gpu/run_e2e.sh --total-s 330                                              # 4 GPUs, NCCL, bf16
    torchrun --nproc-per-node 4 benchmarks/gpu/e2e_compare.py --out $OUT/e2e.json
    .venv/bin/torchrun --nproc-per-node 4 benchmarks/gpu/e2e_compare.py --tiny --iterations 3 --out /tmp/e2e.json

Workload (`--workload`, `e2e_workload.py`): `vlm`, the scaled VLM (ViT 0.3B + LM 1.1B, pp 4, 16 microbatches of
up to 4096 tokens), or `t2v`, the scaled T2V model (LM text encoder 0.4B + DiT 1.4B, pp 4, 16 microbatches of up to
16 s of 256 x 256 video, 512 DiT tokens a second); `vlm-large` / `t2v-large`, the same with the issue's ~1B + ~3B
modules, planned on an H200 with a 100 GB cap (`e2e_workload.PLANNING_H200`; `e2e_size_check.py` checks them on
CPU); `--tiny`: same structure, toy sizes, gloo, float32. Batches:
`--iterations` of the dynamic trace (seed
`--seed`), preceded by `--warmup` untimed batches taken from later in the trace (other contents, so no plan-cache
hits). Every schedule runs exactly these batches, in this order.

Schedules (`--schedules`, run one after another in order of importance, each in its own try block):
- `pipeweaver`: rank 0 starts `python -m pipeweaver serve` (sidecar, loopback) at the very beginning; every rank
  registers the job (`PlannerClient.register_job`, with the calibration profile below) and iterates a
  `PlanPrefetcher` (iteration k+1's metadata goes out while k trains; every rank asks for every rank's actions and
  proves the plan itself, see prefetch.py), then `run_with_fallback` (one vote: all ranks run the same plan).
  Per iteration: time, where the plan came from (search / cache / the service's fallback and why, from the
  service's metrics / a local fallback and why), the plan's predicted makespan (header), the wait for the plan,
  and the margin: end of iteration k-1 minus the moment the last rank's reply of iteration k was decoded on the
  slowest rank (negative: the plan was late). While the service is not ready yet (a fresh machine compiles the
  planner's kernels for about a minute), the next schedule runs first; waiting for it never counts as
  PipeWeaver's time.
- `1f1b`, `interleaved-1f1b`, `optimus-coarse`: our `PipelineExecutor` on the baseline plans
  (`build_baseline_plan`, built outside the timed region).
- `torch-1f1b`, `torch-interleaved-1f1b`: `torch.distributed.pipelining` `Schedule1F1B` /
  `ScheduleInterleaved1F1B` over the same modules (the `1f1b` / `interleaved-1f1b` placement: Megatron's, balanced
  by parameters), every microbatch padded to the run's most images and longest sequence (`e2e_torch_vlm.py`), or
  for T2V to the run's most DiT tokens and longest captions (`e2e_torch_t2v.py`).
Time: each schedule gets an equal share of what is left of `--total-s` (less `FINAL_RESERVE_S`), capped by
`--schedule-s`; its executor, warm-up, measured iterations and trace all fit in it (the last measured iteration
starts only if it and the trace still fit).
Timed region (all schedules): barrier, synchronize, t0, the step, synchronize, t1; the maximum over ranks. It
includes synthesising the inputs from the batch metadata (both sides alike) and, for ours, the plan check.
Throughput counts the real (unpadded) tokens of the backbone for every schedule (VLM: the language model's, T2V:
the DiT's), so padding shows up as cost.

SEMU: the calibration profile (`profile_layers` on the device, the executor's own blocks, time-boxed by
`--profile-s`) goes with RegisterJob; the uncalibrated job is registered too. Rank 0 runs `e2e_semu.py` in the
background (nice, one CPU thread each, own deadline): the baselines' plans of every measured iteration as soon as
the profile is known, PipeWeaver's plans (and the Simulate RPC cross-check) once they ran. Collected after every
schedule and, at the end, until the deadline: what finished is in the JSON even if the run is cut.
With `--report-timings` PipeWeaver's ranks report every measured iteration's time to the service (ReportTimings):
its makespan refit then scales the predictions of later plans, which the plan headers carry (the summary's
`service_header_calibrated` MAPE: SEMU after the profile and the online refit).
One iteration per `--trace-schedules` is run once more with per-action timing (CUDA events) and written as a
measured Chrome trace beside SEMU's, under the traces directory (default: `<out>` without `.json` + `_traces`).

Robustness. Every decision to stop uses all-reduced numbers (every rank stops after the same iteration), and every
collective is called by all ranks in the same order. The JSON is rewritten after every schedule, and the rows of
the schedule in progress are in it whenever it is written.
- A watchdog thread on every rank: when a schedule runs `--watchdog-s` past its limit or makes no progress for
  `--stall-s`, every rank prints where its iteration stands (actions the host issued, the action the device is
  at) and its Python stacks to stderr, and rank 0 writes the JSON (the schedule: `hung`, with why; `pending`: the
  schedules not started yet) and exits (code 75). SIGTERM on rank 0 (torchrun stopping the job after another
  rank died, or the run's timeout) does the same (`terminated`, 143). `--simulate-fault` tests these paths.
- An exception is printed on the rank that raised it and recorded per rank. If it left an iteration part way
  (point-to-point transfers may still be posted on the communicators), the process ends after the JSON (code 76)
  rather than run the next schedule on them.
- `run_e2e.sh` then relaunches with `--resume`: schedules with an entry in the JSON are kept (a hung one is not
  tried again), the others run in a fresh job, SEMU processes of the earlier attempt are adopted.
- The directed-pair NCCL communicators get `--pg-timeout-s` too (the default of new groups is 10 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import gzip
import json
import math
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_torch_t2v
import e2e_torch_vlm
from e2e_service import Sidecar, counter_delta, profile_calibration, scrape_metrics, stamped_client
from e2e_torch_t2v import T2VShape
from e2e_torch_vlm import TORCH_SCHEDULES, VLMShape
from e2e_workload import SCALED_WORKLOADS
from executor_overhead import env_info

from pipeweaver.client.cuda_env import prepare_cuda_for_dynamic_pipelines
from pipeweaver.client.executor import PipelineExecutor
from pipeweaver.client.host_gc import CollectorClock, CollectorTime, settle_host_objects
from pipeweaver.datagen import dynamic_batch
from pipeweaver.errors import InvalidPlan
from pipeweaver.plan.export import chrome_trace
from pipeweaver.plan.ir import Pass, Plan, PlanSource
from pipeweaver.search.baselines import baseline_placement, build_baseline_plan
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.hardware import CPU
from pipeweaver.spec.model import Modality
from pipeweaver.spec.workload import DatasetKind

OURS = ("1f1b", "interleaved-1f1b", "optimus-coarse")
ALL_SCHEDULES = ("pipeweaver", "torch-interleaved-1f1b", "interleaved-1f1b", "torch-1f1b", "optimus-coarse", "1f1b")
"""In order of importance: a run cut short still has the comparisons that matter most."""
FINAL_RESERVE_S = 20.0
"""Kept free at the end of `--total-s`: the last SEMU predictions, the sidecar's shutdown, the last JSON."""
EXIT_HUNG, EXIT_RESTART, EXIT_TERMINATED = 75, 76, 143
"""Exit codes of a process that ended early on purpose (the JSON says why; `run_e2e.sh` relaunches)."""


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
    shape: VLMShape | T2VShape
    out: Path
    traces: Path
    t_start: float
    result: dict[str, Any]
    sidecar: Sidecar | None = None
    profile_rows: list[Any] = field(default_factory=list)
    semu_job: dict[str, Any] = field(default_factory=lambda: {"schedules": {}, "traces": []})
    """PipeWeaver's plans that ran, for its SEMU job (rank 0)."""
    semu: SemuJobs | None = None
    watchdog: Watchdog | None = None
    executor: BenchExecutor | None = None
    """Our executor of the schedule in progress (None for torch's): where a hung iteration stands."""
    pending: list[str] = field(default_factory=list)
    """Schedules not finished yet (the one in progress included), in run order."""
    current: str = ""
    """The schedule in progress."""
    in_step: bool = False
    """Inside an iteration's step. An exception there may leave point-to-point transfers posted on the
    communicators, which the next schedule would receive: the process restarts instead of going on."""
    write_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def measured(self) -> list[BatchMetadata]:
        return self.batches[self.warmup :]

    def t_s(self) -> float:
        return round(time.monotonic() - self.t_start, 1)

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
            print(json.dumps({"t_s": self.t_s(), **kv}, default=str), flush=True)

    def write(self, lock_timeout_s: float = -1) -> None:
        """Rank 0: the JSON, atomically (also from the watchdog's thread, which waits at most `lock_timeout_s`)."""
        if self.rank != 0:
            return
        locked = self.write_lock.acquire(timeout=lock_timeout_s)
        try:
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
        finally:
            if locked:
                self.write_lock.release()


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


# ---- our executor, with shared pair communicators and an action timeline ---------------------------------------


class BenchExecutor(PipelineExecutor):
    """`PipelineExecutor` that reuses one set of NCCL pair communicators for every schedule of the run (created and
    warmed once by `pair_groups`), and records each action's start/end when `record` is set: CUDA events on the
    compute stream on a GPU (what the device did, not when Python launched it), `time.monotonic` on a CPU.

    Always, for the watchdog: how many of the iteration's actions the host has issued, and on a GPU one event per
    action (reused, no timing: a few microseconds per action), so `where` can tell which action a hung device is
    stuck at (a wait on a transfer that never comes, or a compute behind one)."""

    shared_pairs: ClassVar[dict[tuple[int, int], Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.record = False
        self._marks: list[tuple[Any, Any]] = []
        self._origin: Any = None
        self._host_marks: list[tuple[float, float]] = []
        self._host_origin = 0.0
        self.last_plan: Plan | None = None
        self._actions: tuple[Any, ...] = ()
        self._issued = 0
        self._done: list[Any] = []
        super().__init__(*args, **kwargs)

    def _create_pair_groups(self, pipelines: Sequence[Sequence[int]]) -> None:
        if not self.shared_pairs:
            super()._create_pair_groups(pipelines)
            BenchExecutor.shared_pairs.update(self._pair_group)
        self._pair_group = dict(self.shared_pairs)

    def run_iteration(self, plan: Plan, batch: BatchMetadata, **kwargs: Any) -> Any:
        self.last_plan = plan  # what ran, also when run_with_fallback chose the fallback
        self._actions, self._issued = plan.ranks[self.rank].actions, 0
        stats = super().run_iteration(plan, batch, **kwargs)
        self._actions, self._issued = (), 0  # between iterations (an exception leaves the position for `where`)
        return stats

    def _issue(self) -> None:
        if self.device.type == "cuda":
            if self._issued == len(self._done):
                self._done.append(torch.cuda.Event())
            self._done[self._issued].record()
        self._issued += 1

    def where(self) -> str:
        """This rank's position in its iteration (call from any thread; on a GPU it only queries events)."""
        acts, issued = self._actions, self._issued
        if not acts:
            return "between iterations"
        text = f"the host issued {issued} of {len(acts)} actions"
        if issued < len(acts):
            text += f" (next: {acts[issued]})"
        if self.device.type == "cuda" and issued:
            torch.cuda.set_device(self.device)
            stuck = next((i for i in range(issued) if not self._done[i].query()), None)
            text += "; the device finished them all" if stuck is None else f"; the device is at {stuck}: {acts[stuck]}"
        return text

    def begin_record(self) -> None:
        self.record, self._marks, self._host_marks = True, [], []
        if self.device.type == "cuda":
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()  # on an idle device (after a synchronize): it runs at once, as the host stamps
        else:
            self._origin = time.monotonic()
        self._host_origin = time.perf_counter()

    def recorded_ms(self) -> list[tuple[float, float]]:
        """(start, end) of every action since `begin_record`, in ms (call after the iteration synchronized)."""
        self.record = False
        if self.device.type == "cuda":
            o = self._origin
            return [(o.elapsed_time(s), o.elapsed_time(e)) for s, e in self._marks]
        return [((s - self._origin) * 1e3, (e - self._origin) * 1e3) for s, e in self._marks]

    def recorded_host_ms(self) -> list[tuple[float, float]]:
        """(start, end) of the host's issue of every action since `begin_record`, in ms: when the host began and
        finished launching it. Beside `recorded_ms` (the device's), it tells a device waiting for its host from a
        host held back by its device (docs/gpu.md section 13)."""
        o = self._host_origin
        return [((s - o) * 1e3, (e - o) * 1e3) for s, e in self._host_marks]

    def _timed(self, fn: Callable[..., None], *args: Any) -> None:
        if not self.record:
            fn(*args)
            self._issue()
            return
        h0 = time.perf_counter()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
        else:
            start = time.monotonic()
            fn(*args)
            end = time.monotonic()
        self._host_marks.append((h0, time.perf_counter()))
        self._marks.append((start, end))
        self._issue()

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
    # The run's NCCL timeout, not new_group's default of 10 minutes: a transfer that never completes must end in
    # the NCCL watchdog within the run (the iteration's P2P waits happen on these communicators only).
    timeout = timedelta(seconds=run.args.pg_timeout_s)
    for a in range(run.world):  # PipelineExecutor._create_pair_groups' order (new_group is collective)
        for b in range(run.world):
            if a != b:
                BenchExecutor.shared_pairs[(a, b)] = dist.new_group([a, b], timeout=timeout)
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
    name: str
    limit_s: float
    tail: float = 0.0
    """Iterations that still follow the measured ones within the limit (1: the traced one)."""
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0
    last_ms: float = 0.0
    last_gc: CollectorTime = field(default_factory=CollectorTime)
    """This rank's garbage collections during the last timed step."""
    collector: CollectorClock = field(default_factory=CollectorClock)

    def timed(self, fn: Callable[[], Any], label: str) -> tuple[float, float, Any]:
        """(max ms over ranks, this rank's end on the monotonic clock, fn's result)."""
        run = self.run
        dist.barrier()
        run.sync()
        t0 = time.perf_counter()
        run.in_step = True
        simulated_fault(run, self.name, label)
        self.collector.start().take()
        try:
            out = fn()
            run.sync()
        finally:
            self.last_gc = self.collector.take()
            self.collector.stop()
        run.in_step = False
        t1 = time.perf_counter()
        end = time.monotonic()
        x = torch.tensor([(t1 - t0) * 1e3, end - self.started], dtype=torch.float64, device=run.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        self.last_ms, self.elapsed_s = float(x[0]), float(x[1])
        if run.watchdog is not None:
            run.watchdog.progress(label, step=True)
        return self.last_ms, end, out

    def warmup_over(self) -> bool:
        """Stop warming up once half the schedule's time is gone (one warm-up iteration always runs)."""
        return self.elapsed_s > 0.5 * self.limit_s

    def out_of_time(self, done: int) -> bool:
        """Stop measuring when the next iteration (and the trace after the loop) would not fit; one measured
        iteration always runs. Same inputs on every rank (all-reduced), so the same answer on every rank."""
        return done >= 1 and self.elapsed_s + (1.2 + self.tail) * self.last_ms / 1e3 > self.limit_s


def reduce_sum(run: Run, value: float) -> float:
    x = torch.tensor([value], dtype=torch.float64, device=run.device)
    dist.all_reduce(x)
    return float(x)


def repeat_ms(run: Run, clock: Clock, ex: BenchExecutor, plan: Plan, batch: BatchMetadata, k: int) -> dict[str, Any]:
    """With --repeat: the iteration's plan run once more right away (no optimizer step in these runs, so nothing
    changes), timed alone: the same iteration with every shape already seen by the process (kernels, allocator
    blocks, attention plans), what a long run pays once its shapes recur."""
    if not run.args.repeat:
        return {}
    ms, _, stats = clock.timed(lambda: ex.run_iteration(plan, batch), f"iteration {k} again")
    return {
        "repeat_ms": round(ms, 3),
        "repeat_warmed_gemms": stats.warmed_gemms,
        **host_times(run, stats, "repeat_"),
        **gc_times(run, clock, "repeat_"),
    }


def gc_times(run: Run, clock: Clock, prefix: str = "") -> dict[str, Any]:
    """Each rank's time in the garbage collector during the last timed step, and its full passes."""
    rows = run.gather([round(clock.last_gc.ms, 2), clock.last_gc.collections[2]])
    return {f"{prefix}gc_ms_per_rank": [r[0] for r in rows], f"{prefix}gc_full_passes_per_rank": [r[1] for r in rows]}


def host_times(run: Run, stats: Any, prefix: str = "") -> dict[str, Any]:
    """Where each rank's host spent the iteration (`IterationStats`): issuing the actions, in the idle hook
    (of which checking the next plans and loading their kernels), waiting for the device at the end. A rank whose
    drain is near zero had a device that finished first: its host set the pace."""
    keys = ("dispatch", "idle_hook", "hook_check", "hook_warm", "drain")
    rows = run.gather([round(getattr(stats, f"{k}_ms"), 2) for k in keys])
    return {f"{prefix}host_ms_per_rank": {k: [r[i] for r in rows] for i, k in enumerate(keys)}}


def reduce_max(run: Run, value: float) -> float:
    x = torch.tensor([value], dtype=torch.float64, device=run.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return float(x)


def reset_memory_stats(run: Run) -> None:
    if run.cuda:
        try:  # the cudaMallocAsync backend keeps fewer statistics
            torch.cuda.reset_peak_memory_stats(run.device)
            torch.cuda.reset_accumulated_memory_stats(run.device)
        except RuntimeError:
            pass


def my_memory(run: Run) -> list[float]:
    """This rank's peak allocated GiB, allocator retries (cudaMalloc failures answered by freeing the cache and
    trying again: memory pressure that costs synchronizations) and OOMs since `reset_memory_stats`."""
    if not run.cuda:
        return []
    try:
        stats = torch.cuda.memory_stats(run.device)
        peak = torch.cuda.max_memory_allocated(run.device) / 2**30
    except RuntimeError:  # the cudaMallocAsync backend keeps fewer statistics
        return [-1.0, 0.0, 0.0]
    return [peak, float(stats.get("num_alloc_retries", 0)), float(stats.get("num_ooms", 0))]


def memory_of(every: list[list[float]]) -> dict[str, Any]:
    if not all(every):
        return {}
    return {
        "peak_gib_per_rank": [round(m[0], 2) for m in every],
        "alloc_retries_per_rank": [int(m[1]) for m in every],
        "ooms_per_rank": [int(m[2]) for m in every],
    }


def write_measured_trace(run: Run, name: str, k: int, plan: Plan, ex: BenchExecutor, clock: Clock) -> None:
    """Run iteration k's plan once more with per-action timing; rank 0 writes it as a Chrome trace."""
    batch = run.measured[k]
    # Checked before the clock starts, as every measured iteration's plan was (in the idle hook before it): by the
    # end of the schedule this plan has left the executor's cache of checked plans, and re-checking it on the
    # clock put 14-55 ms of validation before the first compute of the runs 15-18 traces.
    ex.prepare(plan, batch)

    def recorded() -> Any:
        ex.begin_record()  # after the barrier and the synchronize: every rank's origin is the same instant
        return ex.run_iteration(plan, batch)

    ms, _, _ = clock.timed(recorded, "trace")
    windows = run.gather(ex.recorded_ms())
    host_windows = run.gather(ex.recorded_host_ms())
    if run.rank == 0:
        path = trace_path(run, name, k)
        trace = relabel(chrome_trace(plan, windows), 0, "measured")
        # The host's issue of each action, as processes 300+ ("host_issue rank r"; SEMU's are 100+ and 200+).
        host = relabel(chrome_trace(plan, host_windows), HOST_ISSUE_PID, "host_issue")
        trace["traceEvents"] += host["traceEvents"]
        trace["otherData"] |= {key: v for key, v in host["otherData"].items() if key.endswith("_makespan_ms")}
        write_trace(path, trace)
        run.result["traces"].append(
            {
                "schedule": name,
                "iteration": k,
                "file": str(path),
                "measured_ms": ms,
                "processes": ["measured", "host_issue"],
            }
        )
        if name == "pipeweaver":  # the baselines' SEMU traces were asked for up front (`semu_baselines`)
            run.semu_job["traces"].append({"schedule": name, "iteration": run.warmup + k})


HOST_ISSUE_PID = 300
"""First process number of a measured trace's host-issue timeline."""


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


def simulated_fault(run: Run, name: str, label: str) -> None:
    """`--simulate-fault NAME:K:RANK:KIND` (tests of the watchdog and the restart): inside measured iteration K
    of NAME, RANK (a number, or `all`) hangs for good (KIND `hang`: a rank stuck in a transfer) or raises (`raise`:
    an iteration failing part way)."""
    spec = run.args.simulate_fault
    if not spec:
        return
    sched, k, rank, kind = spec.split(":")
    if (sched, f"iteration {k}") != (name, label) or rank not in ("all", str(run.rank)):
        return
    print(f"[rank {run.rank}] simulated {kind} in {name} {label}", file=sys.stderr, flush=True)
    if kind == "raise":
        raise RuntimeError(f"simulated failure in {name} {label}")
    while True:
        time.sleep(1.0)


def warm_kernels(run: Run, ex: PipelineExecutor) -> None:
    """Load the GEMM kernels of the executor's chunks for every row count of the run (see
    pipeweaver.client.kernel_warmup; a lazy load mid-iteration deadlocks the ranks)."""
    if not run.cuda:
        return
    rows = max(
        max(sum(m.tokens for m in mb.media(media)), mb.language_tokens(), mb.text_tokens)
        for batch in run.batches
        for mb in batch.microbatches
        for media in (Modality.IMAGE, Modality.VIDEO)
    )
    t0 = time.monotonic()
    n = ex.warm_up_kernels(rows)
    print(json.dumps({"rank": run.rank, "kernel_warmup": n, "max_rows": rows, "s": round(time.monotonic() - t0, 1)}))


def run_ours(run: Run, name: str, clock: Clock, entry: dict[str, Any]) -> dict[str, Any]:
    """Our executor on a baseline's plans."""
    wl = run.wl
    placement = baseline_placement(name, model=wl.model, parallel=wl.parallel)
    ex = BenchExecutor(wl.model, placement, run.rank, device=run.device, dtype=run.dtype)
    ex.warm_up()
    warm_kernels(run, ex)
    run.executor = ex
    if run.watchdog is not None:
        run.watchdog.progress("executor built")

    def plan_for(b: BatchMetadata) -> Plan:
        return build_baseline_plan(name, model=wl.model, parallel=wl.parallel, batch=b, tensors_dtype=run.wire)

    rows: list[dict[str, Any]] = entry.setdefault("rows", [])  # in the JSON as they come (a cut run keeps them)
    plans: dict[int, Plan] = {}

    def check_ahead(batch: BatchMetadata | None) -> None:
        """The next iteration's plan, built now (untimed) and checked in this iteration's idle hook, as
        PipeWeaver's prefetcher does with the plans that arrived: neither side checks a plan on the clock."""
        if batch is None:
            ex.idle_hook = None
            return
        t0 = time.perf_counter()
        nxt = plan_for(batch)
        built_ms[batch.iteration] = (time.perf_counter() - t0) * 1e3
        ex.idle_hook = lambda: ex.prepare(nxt, batch)
        ahead[batch.iteration] = nxt

    ahead: dict[int, Plan] = {}
    built_ms: dict[int, float] = {}
    for w, batch in enumerate(run.batches[: run.warmup]):
        if w and clock.warmup_over():
            break
        plan = ahead.pop(batch.iteration, None) or plan_for(batch)
        check_ahead(run.batches[w + 1])
        ms, _, _ = clock.timed(lambda p=plan, b=batch: ex.run_iteration(p, b), f"warm-up {w}")
        run.say(schedule=name, warmup=w, ms=round(ms, 1))
    for k, batch in enumerate(run.measured):
        if clock.out_of_time(k):
            break
        t0 = time.perf_counter()
        plans[k] = plan = ahead.pop(batch.iteration, None) or plan_for(batch)
        build_ms = built_ms.pop(batch.iteration, (time.perf_counter() - t0) * 1e3)
        check_ahead(run.measured[k + 1] if k + 1 < len(run.measured) else None)
        ms, _, stats = clock.timed(lambda p=plan, b=batch: ex.run_iteration(p, b), f"iteration {k}")
        collected = gc_times(run, clock)
        again = repeat_ms(run, clock, ex, plan, batch, k)
        rows.append(
            {
                "i": k,
                "ms": round(ms, 3),
                "loss": reduce_sum(run, stats.loss),
                "plan_build_ms": build_ms,
                "warmed_gemms": stats.warmed_gemms,  # this rank's new (layer, rows) kernels loaded first
                "warm_ms_max_rank": reduce_max(run, stats.warm_ms),  # their time, the slowest rank's
                "sends_released_early": stats.sends_released_early,
                "prewarmed_gemms_so_far": ex.prewarmed_gemms,  # loaded ahead by `prepare` (this rank)
                **host_times(run, stats),
                **collected,
                **again,
            }
        )
        run.say(schedule=name, iteration=k, ms=round(ms, 1), loss=round(rows[-1]["loss"], 5))
    if name in run.args.trace_schedules.split(",") and rows:
        k = trace_index(run, len(rows))
        write_measured_trace(run, name, k, plans[k], ex, clock)
    return {"chunks": len(placement.chunks)}


def wait_sidecar(run: Run) -> dict[str, Any]:
    """Rank 0 waits for the planner service, outside any schedule's clock, at most until the run leaves no time to
    use it; every rank gets the address or the error."""
    info: dict[str, Any] = {}
    if run.rank == 0:
        if run.sidecar is None:
            info["error"] = "no planner service was started"
        else:
            t0 = time.monotonic()
            last_use = run.t_start + run.args.total_s - FINAL_RESERVE_S - 20.0
            try:
                info["address"] = run.sidecar.wait_ready(timeout_s=max(1.0, last_use - run.sidecar.started))
            except RuntimeError as e:
                info["error"] = str(e)[-3000:]
            info["ready_s"] = run.sidecar.ready_s
            info["waited_s"] = round(time.monotonic() - t0, 1)
    return run.bcast(info)


def register_jobs(run: Run, address: str) -> tuple[Any, Any, dict[str, Any]]:
    """Every rank registers the calibrated job (idempotent: one job id); rank 0 also the uncalibrated one."""
    a = run.args
    info: dict[str, Any] = {"address": address}
    client = stamped_client(address)
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


FALLBACKS = "pipeweaver_fallback_plans_total"


def run_pipeweaver(run: Run, name: str, clock: Clock, entry: dict[str, Any]) -> dict[str, Any]:
    from pipeweaver.client.prefetch import PlanPrefetcher

    a = run.args
    client, job, info = register_jobs(run, entry["sidecar"]["address"])
    ex = BenchExecutor(run.wl.model, job.placement, run.rank, device=run.device, dtype=run.dtype)
    ex.warm_up()
    warm_kernels(run, ex)
    run.executor = ex
    if run.watchdog is not None:
        run.watchdog.progress("job registered, executor built")
    prefetcher = PlanPrefetcher(
        client, job, run.batches, rank=run.rank, first_deadline_s=a.first_deadline_s, lookahead=a.lookahead,
        prepare=ex.prepare,
    )  # fmt: skip
    ex.idle_hook = prefetcher.prepare_arrived  # plans that arrived are checked while the device finishes
    items: Iterator[Any] = iter(prefetcher)
    # Why the service fell back: the reply carries only a flag, the service's metrics count fallbacks by reason.
    # Each served fallback plan is one count, in the order the service decided them (rank 0 reads them).
    port = run.sidecar.metrics_port if run.rank == 0 and run.sidecar is not None else 0
    seen = scrape_metrics(port)
    info["metrics_start"] = seen
    reasons: deque[str] = deque()
    mine: list[dict[str, Any]] = []
    """This rank's view of each iteration (warm-up included): origin, wait, end time."""
    rows: list[dict[str, Any]] = entry.setdefault("rows", [])
    kept: dict[int, Plan] = {}
    k_trace = min(a.trace_iteration, len(run.measured) - 1)
    try:
        for n, item in enumerate(items):
            k = n - run.warmup
            # Warm-up always runs whole here: skipping an item would teach the prefetcher a tiny step time and
            # with it a deadline no plan can meet.
            if k >= 0 and clock.out_of_time(k):
                break
            if port:
                now = scrape_metrics(port)
                for why, count in counter_delta(now, seen, FALLBACKS).items():
                    reasons.extend([why] * int(count))
                seen = now or seen
            service_reason = ""
            if item.served_fallback:
                service_reason = reasons.popleft() if reasons else ("unknown" if port else "")
            ms, end, stats = clock.timed(
                lambda it=item: ex.run_with_fallback(it.plan, it.metadata, prefetcher.fallback_plan),
                f"warm-up {n}" if k < 0 else f"iteration {k}",
            )
            ran = ex.last_plan
            assert ran is not None
            collected = gc_times(run, clock) if k >= 0 else {}
            again = repeat_ms(run, clock, ex, ran, item.metadata, k) if k >= 0 else {}
            mine.append(
                {
                    "origin": item.origin,
                    "reason": item.fallback_reason or "",
                    "served_fallback": item.served_fallback,
                    "wait_ms": item.wait_ms,
                    "fallback_ms": item.fallback_ms,
                    "end": end,
                }
            )
            if k < 0:
                run.say(schedule=name, warmup=n, ms=round(ms, 1), source=ran.header.source.value, why=service_reason)
                continue
            if run.rank != 0:  # the others keep what a trace may re-run: the trace iteration, else the latest
                kept = {kk: p for kk, p in kept.items() if kk == k_trace}
            kept[k] = ran
            h = ran.header
            if k == k_trace and h.source is PlanSource.FALLBACK and k_trace < len(run.measured) - 1:
                k_trace += 1  # the picture is of a searched plan: the next one (every rank got the same plan)
            rows.append(
                {
                    "i": k,
                    "ms": round(ms, 3),
                    "loss": reduce_sum(run, stats.loss),
                    "warmed_gemms": stats.warmed_gemms,
                    "warm_ms_max_rank": reduce_max(run, stats.warm_ms),
                    "sends_released_early": stats.sends_released_early,
                    "prewarmed_gemms_so_far": ex.prewarmed_gemms,  # loaded ahead by `prepare` (this rank)
                    **host_times(run, stats),
                    **collected,
                    "source": h.source.value,
                    "plan_schedule": h.schedule,
                    "fallback": h.source is PlanSource.FALLBACK,
                    "service_fallback_reason": service_reason,
                    "vote_fallback_reason": stats.fallback_reason,
                    "predicted_ms": h.predicted_makespan_ms or None,
                    "lower_bound_ms": h.lower_bound_ms or None,
                    "baselines_predicted_ms": dict(h.baseline_makespans_ms),
                    **again,
                }
            )
            if a.report_timings and item.origin == "planner" and not stats.fallback_reason:
                # The service's makespan refit (ReportTimings): later headers predict with what it learnt.
                report = prefetcher.report(item.metadata.iteration, ms)
                rows[-1]["reported_error"] = report.iteration_error if report is not None else None
            run.say(
                schedule=name,
                iteration=k,
                ms=round(ms, 1),
                source=h.source.value,
                pred=rows[-1]["predicted_ms"],
                why=service_reason or stats.fallback_reason or item.fallback_reason or "",
            )
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()  # ends the plan stream
    info["metrics_end"] = scrape_metrics(port)
    arrivals = dict(client.arrivals)
    views = run.gather({"mine": mine, "arrivals": arrivals})
    add_margins(run, rows, views)
    if name in a.trace_schedules.split(",") and rows:
        k = k_trace if k_trace < len(rows) else len(rows) - 1
        write_measured_trace(run, name, k, kept[k], ex, clock)
    run.semu_job["schedules"][name] = {
        "iterations": [run.warmup + r["i"] for r in rows],
        "plans": [kept[r["i"]] for r in rows] if run.rank == 0 else None,
    }
    stats = prefetcher.stats
    client.close()
    return {
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
        row["local_fallback_ms_max_rank"] = round(max(v["mine"][n]["fallback_ms"] for v in views), 2)
        row["served_fallback"] = any(v["mine"][n]["served_fallback"] for v in views)


def run_torch(run: Run, name: str, clock: Clock, entry: dict[str, Any]) -> dict[str, Any]:
    """torch.distributed.pipelining over the same modules, padded batches."""
    wl = run.wl
    placement = baseline_placement(TORCH_SCHEDULES[name], model=wl.model, parallel=wl.parallel)
    ex = BenchExecutor(wl.model, placement, run.rank, device=run.device, dtype=run.dtype)
    m = len(run.batches[0].microbatches)
    torch_side = e2e_torch_vlm if isinstance(run.shape, VLMShape) else e2e_torch_t2v
    pipe = torch_side.build_torch_pipeline(name, ex, wl.model, run.shape, m, run.device, run.dtype)
    params = list(ex.parameters())
    if run.watchdog is not None:
        run.watchdog.progress("stages built")

    def step(batch: BatchMetadata) -> float:
        for p in params:  # as ours does inside run_iteration
            p.grad = None
        return pipe.step(wl.model, run.shape, batch, run.device, run.dtype)

    for w, batch in enumerate(run.batches[: run.warmup]):
        if w and clock.warmup_over():
            break
        ms, _, _ = clock.timed(lambda b=batch: step(b), f"warm-up {w}")
        run.say(schedule=name, warmup=w, ms=round(ms, 1))
    rows: list[dict[str, Any]] = entry.setdefault("rows", [])
    for k, batch in enumerate(run.measured):
        if clock.out_of_time(k):
            break
        ms, _, loss = clock.timed(lambda b=batch: step(b), f"iteration {k}")
        collected = gc_times(run, clock)
        rows.append(
            {"i": k, "ms": round(ms, 3), "loss": reduce_sum(run, loss), **run.shape.padding(batch), **collected}
        )
        run.say(schedule=name, iteration=k, ms=round(ms, 1), loss=round(rows[-1]["loss"], 5))
    return {"stages": len(placement.chunks)}


# ---- hangs, signals, restarts ---------------------------------------------------------------------------------


class Watchdog:
    """A thread on every rank that watches the schedule in progress. It is late when it runs `--watchdog-s` past
    its time limit, or makes no progress (built, a warm-up, an iteration, the trace) for `--stall-s` (twice that
    before its first step: cold caches, lazy CUDA and NCCL set-up, the first plan's search). Then every
    rank dumps its threads' Python stacks to stderr, the other ranks 5 s before rank 0 (so all of them get to),
    and rank 0 ends the process through `abort`: a hang costs one schedule, not the run."""

    EARLY_S = 5.0

    def __init__(self, run: Run) -> None:
        self.run = run
        self.lock = threading.Lock()
        self.name = ""
        self.limit_s = 0.0
        self.started = self.last = 0.0
        self.label = ""
        self.stepped = False
        self.dumped = False
        self.position = ""
        threading.Thread(target=self._loop, name="e2e-watchdog", daemon=True).start()

    def arm(self, name: str, limit_s: float) -> None:
        with self.lock:
            self.name, self.limit_s, self.label, self.dumped, self.stepped = name, limit_s, "start", False, False
            self.started = self.last = time.monotonic()

    def progress(self, label: str, step: bool = False) -> None:
        with self.lock:
            self.last, self.label = time.monotonic(), label
            self.stepped = self.stepped or step

    def disarm(self) -> None:
        with self.lock:
            self.name = ""

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "rank0_position": self.position or executor_position(self.run),
            "last_progress": self.label,
            "since_progress_s": round(now - self.last, 1),
            "since_start_s": round(now - self.started, 1),
        }

    def late(self, now: float) -> str:
        a = self.run.args
        over = now - self.started - self.limit_s
        if over > a.watchdog_s:
            return f"ran {over:.0f} s past its {self.limit_s:.0f} s limit (last progress: {self.label})"
        if now - self.last > (a.stall_s if self.stepped else 2 * a.stall_s):
            return f"made no progress for {now - self.last:.0f} s (last: {self.label})"
        return ""

    def _loop(self) -> None:
        run = self.run
        while True:
            time.sleep(0.5)
            with self.lock:
                if not self.name:
                    continue
                name = self.name
                why = self.late(time.monotonic() + (0.0 if run.rank == 0 else self.EARLY_S))
                dump = bool(why) and not self.dumped
                self.dumped = self.dumped or dump
            if not why:
                continue
            if dump:
                self.position = executor_position(run)
                print(f"[rank {run.rank}] watchdog: {name} {why}", file=sys.stderr, flush=True)
                print(f"[rank {run.rank}] watchdog: {self.position}; Python stacks:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                native_stacks()
            if run.rank == 0:
                abort(run, f"{name} {why}", "hung", EXIT_HUNG)


def native_stacks(timeout_s: float = 20.0) -> None:
    """This process's native stacks (py-spy, when installed): which CUDA, NCCL or allocator call a stuck host
    thread is in, which Python stacks cannot show."""
    spy = shutil.which("py-spy")
    if spy is None:
        return
    try:
        out = subprocess.run(
            [spy, "dump", "--native", "--pid", str(os.getpid())], capture_output=True, text=True, timeout=timeout_s
        )
        print(out.stdout[-12000:] + out.stderr[-2000:], file=sys.stderr, flush=True)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"py-spy failed: {e!r}", file=sys.stderr, flush=True)


def executor_position(run: Run, timeout_s: float = 3.0) -> str:
    """`BenchExecutor.where` of the schedule in progress, from a helper thread: a CUDA query that does not return
    must not keep the watchdog from ending the process."""
    ex = run.executor
    if ex is None:
        return "no executor of ours in progress"
    box: list[str] = []

    def ask() -> None:
        try:
            box.append(ex.where())
        except Exception as e:
            box.append(f"unknown ({type(e).__name__}: {e})")

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout_s)
    return box[0] if box else f"unknown (the device query did not return in {timeout_s:.0f} s)"


_aborting = threading.Lock()


def abort(run: Run, why: str, status: str, code: int) -> None:
    """Rank 0 (the watchdog or the SIGTERM thread): record why the process ends now, write the JSON (every row
    measured so far is in it), exit. torchrun then stops the other ranks, and `run_e2e.sh` relaunches the schedules
    not started yet (`--resume`); the one in progress is not tried again."""
    if not _aborting.acquire(blocking=False):
        return  # the other thread is already at it
    name = run.current
    try:
        if name:
            entry = run.result["schedules"].setdefault(name, {})
            entry["status"] = status
            entry["abort"] = {"why": why, "t_s": run.t_s()}
            if run.watchdog is not None:
                entry["abort"] |= run.watchdog.state()
        run.result["pending"] = [n for n in run.pending if n != name]
        run.result["attempts"][-1] |= {"end": f"{status}: {why}", "end_t_s": run.t_s()}
        run.result["phases_s"]["total"] = run.t_s()
    except Exception as e:  # the record is best effort, the exit is not
        print(f"abort: could not record: {e!r}", file=sys.stderr, flush=True)
    for _ in range(5):  # the main thread may be changing the result right now
        try:
            run.write(lock_timeout_s=5.0)
            break
        except Exception as e:
            print(f"abort: could not write the JSON: {e!r}", file=sys.stderr, flush=True)
            time.sleep(0.2)
    print(json.dumps({"t_s": run.t_s(), "abort": status, "schedule": name, "why": why}), flush=True)
    sys.stderr.flush()
    os._exit(code)


def catch_sigterm(run: Run) -> None:
    """Rank 0, main thread: SIGTERM (torchrun stopping the job because another rank died, or the run's timeout)
    ends the process through `abort`, so the JSON says what happened. A Python handler alone would run only once
    the main thread returns from the CUDA or NCCL wait it may be stuck in; the wakeup fd is written at once by the
    C-level handler, whatever thread the signal hit, and a thread reading it acts."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    signal.signal(signal.SIGTERM, lambda *_: None)  # Python's C handler (it writes the fd); the thread does the rest

    def watch() -> None:
        while True:
            if signal.SIGTERM in os.read(r, 64):
                cause = "SIGTERM: torchrun stopped the job (another rank ended) or the run's timeout"
                abort(run, cause, "terminated", EXIT_TERMINATED)

    threading.Thread(target=watch, name="e2e-sigterm", daemon=True).start()


def restart_exit(run: Run, why: str) -> None:
    """Every rank, together: the JSON says why and what is left, then every process ends (`run_e2e.sh` relaunches
    the rest in a fresh job, with fresh communicators)."""
    if run.rank == 0:
        run.result["pending"] = list(run.pending)
        run.result["attempts"][-1] |= {"end": f"restart: {why}", "end_t_s": run.t_s()}
        if run.semu is not None:
            run.semu.poll()
        run.write()
        print(json.dumps({"t_s": run.t_s(), "restart": why, "pending": run.pending}), flush=True)
    dist.barrier(group=run.cpu)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_RESTART)


# ---- SEMU in the background -----------------------------------------------------------------------------------


@dataclass
class SemuJob:
    name: str
    work: Path
    pid: int
    proc: subprocess.Popen[bytes] | None
    """None for a job adopted from an earlier attempt (`--resume`)."""
    done: bool = False

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        with contextlib.suppress(OSError):  # an orphan is reaped by init; a zombie counts as ended
            return Path(f"/proc/{self.pid}/stat").read_text().split(") ")[-1][:1] != "Z"
        return True

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait(5)
            else:
                os.kill(self.pid, signal.SIGKILL)


class SemuJobs:
    """Rank 0: the background `e2e_semu.py` processes and the merge of what they predicted into the JSON
    (`semu.schedules`, `semu.jobs`, SEMU's timelines into the measured trace files)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        semu = run.result.setdefault("semu", {})
        semu.setdefault("schedules", {})
        semu.setdefault("errors", [])
        semu.setdefault("jobs", {})
        left = semu.pop("traces_unmerged", [])
        self.unmerged: list[dict[str, Any]] = left if isinstance(left, list) else []
        self.jobs: dict[str, SemuJob] = {}
        for name, rec in semu["jobs"].items():  # an earlier attempt's jobs run on (own session, own deadline)
            if rec.get("status") == "running":
                self.jobs[name] = SemuJob(name, Path(rec["work_dir"]), int(rec["pid"]), None)

    @property
    def semu(self) -> dict[str, Any]:
        return self.run.result["semu"]

    def submit(self, name: str, payload: dict[str, Any]) -> None:
        run = self.run
        if not payload.get("schedules"):
            return
        work = Path(tempfile.mkdtemp(prefix=f"e2e_semu_{name}_"))
        job = {
            "tiny": run.args.tiny,
            "workload": run.args.workload,
            "warmup": run.warmup,
            "microbatches": run.args.microbatches,
            "hardware": run.hardware,
            "batches": run.batches,
            "rows": [(r.module, r.tokens, r.pass_.value, r.measured_ms) for r in run.profile_rows],
            **payload,
        }
        for t in job.get("traces", []):
            t["dir"] = str(work)  # SEMU's traces go to its work dir; `merge_traces` adds them to ours
        (work / "job.pkl").write_bytes(pickle.dumps(job))
        budget = run.t_start + run.args.total_s - 8.0 - time.monotonic()
        cmd = [sys.executable, str(Path(__file__).with_name("e2e_semu.py")), "--input", str(work / "job.pkl")]
        cmd += ["--out", str(work / "semu.json"), "--budget-s", f"{max(5.0, budget):.0f}"]
        # One CPU thread, nice: the ranks' host threads come first. Its own session: torchrun's stop signal to
        # rank 0's process group leaves it running for a relaunched attempt to collect.
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        with (work / "semu.log").open("wb") as log:
            proc = subprocess.Popen(
                ["nice", "-n", "15", *cmd], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.jobs[name] = SemuJob(name, work, proc.pid, proc)
        self.semu["jobs"][name] = {
            "status": "running",
            "work_dir": str(work),
            "pid": proc.pid,
            "submitted_t_s": run.t_s(),
            "schedules": sorted(payload["schedules"]),
        }

    def poll(self, final: bool = False) -> None:
        """Collect the jobs that ended (`final`: all of them, killing those still running)."""
        for job in self.jobs.values():
            if job.done:
                continue
            alive = job.alive()
            if alive and not final:
                continue
            if alive:
                job.kill()
            self._collect(job, killed=alive)
        self.merge_traces()

    def finish(self, deadline: float) -> None:
        while time.monotonic() < deadline and any(not j.done and j.alive() for j in self.jobs.values()):
            time.sleep(0.2)
        self.poll(final=True)
        if self.unmerged:  # SEMU timelines of iterations that were not the traced one
            self.semu["traces_unmerged"] = len(self.unmerged)

    def _collect(self, job: SemuJob, killed: bool) -> None:
        job.done = True
        rec = self.semu["jobs"].setdefault(job.name, {})
        rec |= {"returncode": job.proc.returncode if job.proc is not None else None, "killed_at_deadline": killed}
        out = job.work / "semu.json"
        try:
            data = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            rec["status"] = f"no output ({type(e).__name__})"
            with contextlib.suppress(OSError):
                rec["log_tail"] = (job.work / "semu.log").read_text(errors="replace")[-3000:]
            return
        for name, row in data.get("schedules", {}).items():
            self.semu["schedules"].setdefault(name, {}).update(row)
        self.semu["errors"] += data.get("errors", [])[:50]
        self.unmerged += data.get("traces", [])
        rec |= {
            "status": "ok" if data.get("complete") else "partial",
            "seconds": data.get("seconds"),
            "local_s": data.get("local_s"),
        }

    def merge_traces(self) -> None:
        """Append SEMU's timelines of each traced plan to its measured trace file (processes 100+ and 200+), once
        the measured one exists."""
        offsets = {"semu_calibrated": 100, "semu_uncalibrated": 200}
        left = []
        for p in self.unmerged:
            entry = next(
                (
                    e
                    for e in self.run.result["traces"]
                    if (e["schedule"], e["iteration"]) == (p["schedule"], p["iteration"])
                ),
                None,
            )
            if entry is None:
                left.append(p)
                continue
            try:
                path = Path(entry["file"])
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    trace = json.load(f)
                extra = relabel(json.loads(Path(p["file"]).read_text()), offsets[p["kind"]], p["kind"])
                trace["traceEvents"] += extra["traceEvents"]
                trace["otherData"] |= {k: v for k, v in extra["otherData"].items() if k.endswith("_makespan_ms")}
                write_trace(path, trace)
                entry["processes"].append(p["kind"])
                entry[f"{p['kind']}_ms"] = p["predicted_ms"]
            except (OSError, ValueError, KeyError) as e:
                self.semu["errors"].append(f"merging {p.get('file')}: {e!r}")
        self.unmerged = left
        if left:
            self.semu["traces_unmerged"] = left
        else:
            self.semu.pop("traces_unmerged", None)


def semu_baselines(run: Run, names: list[str]) -> dict[str, Any]:
    """The baselines' SEMU job: their plans are a pure function of the batch, so every measured iteration can be
    simulated before (while) they run; the summary pairs predictions with the iterations that ran."""
    semu = run.result["semu"]
    covered = {
        n
        for rec in semu["jobs"].values()
        if not rec.get("status", "").startswith("no output")
        for n in rec.get("schedules", ())
    }
    ours = [n for n in names if n in OURS and n not in semu["schedules"] and n not in covered]
    its = [run.warmup + k for k in range(len(run.measured))]
    last = min(run.args.trace_iteration, len(run.measured) - 1)  # the traced one: `trace_index`, if that many ran
    traced = [n for n in run.args.trace_schedules.split(",") if n in ours]
    traces = [{"schedule": n, "iteration": run.warmup + k} for n in traced for k in range(last + 1)]
    return {"schedules": {n: {"iterations": its, "plans": None} for n in ours}, "traces": traces, "service": None}


def semu_pipeweaver(run: Run, names: list[str]) -> dict[str, Any]:
    """PipeWeaver's SEMU job (the plans that ran), with the Simulate RPC cross-check of the baselines."""
    info = run.result["schedules"].get("pipeweaver", {}).get("service", {})
    alive = run.sidecar is not None and run.sidecar.proc.poll() is None
    its = [run.warmup + k for k in range(len(run.measured))]
    return {
        "schedules": {k: v for k, v in run.semu_job["schedules"].items() if v.get("iterations")},
        "traces": run.semu_job["traces"],
        "service": {
            "address": info.get("address"),
            "job_calibrated": info.get("job_calibrated"),
            "job_uncalibrated": info.get("job_uncalibrated"),
            "workers": run.args.workers,
        }
        if info.get("address") and alive
        else None,
        "service_schedules": {n: its for n in names if n in OURS},
    }


# ---- bookkeeping ----------------------------------------------------------------------------------------------


def next_schedule(run: Run, queue: list[str]) -> str:
    """The first of `queue`, except that PipeWeaver lets the next schedule go first while its planner service is
    not ready (a fresh machine compiles the planner's kernels for about a minute): the GPUs do not idle."""
    name = queue[0]
    if name != "pipeweaver" or len(queue) == 1:
        return name
    ready = run.bcast((run.sidecar is None or run.sidecar.poll_ready()) if run.rank == 0 else None)
    if ready:
        return name
    run.result.setdefault("deferred", []).append({"schedule": name, "t_s": run.t_s(), "ran_instead": queue[1]})
    run.say(schedule=name, deferred="the planner service is not ready yet", instead=queue[1])
    return queue[1]


def run_schedule(run: Run, name: str, remaining: int) -> bool:
    """One schedule with its share of the remaining time; errors are recorded (per rank), the run goes on. True
    when an iteration failed part way on some rank: the communicators may hold posted transfers (restart)."""
    a = run.args
    pre: dict[str, Any] = {}
    if name == "pipeweaver":  # outside the clock: waiting for the service is not PipeWeaver's iteration time
        pre = wait_sidecar(run)
    end = run.t_start + a.total_s - FINAL_RESERVE_S
    left = run.bcast(end - time.monotonic())
    limit = left / remaining
    if a.schedule_s > 0:
        limit = min(limit, a.schedule_s)
    entry: dict[str, Any] = {"status": "running", "limit_s": round(limit, 1), "start_t_s": run.t_s()}
    if len(run.result["attempts"]) > 1:
        entry["attempt"] = len(run.result["attempts"])
    if pre:
        entry["sidecar"] = pre
    run.result["schedules"][name] = entry
    run.current = name
    run.write()
    if left <= 0 or "error" in pre:
        entry["status"] = "skipped: out of time" if left <= 0 else "error"
        if "error" in pre:
            entry["error"] = f"planner service: {pre['error']}"[:3000]
        run.current = ""
        run.write()
        return False
    reset_memory_stats(run)
    # Every schedule, torch's included, starts with the process settled: survivors frozen, automatic collection
    # off (what PipelineExecutor does after its first iteration; our executors then collect every
    # host_gc.FULL_PASS_EVERY iterations, torch's schedules never). See pipeweaver.client.host_gc.
    settle_host_objects()
    clock = Clock(run, name, limit, tail=1.0 if name in a.trace_schedules.split(",") else 0.0)
    if run.watchdog is not None:
        run.watchdog.arm(name, limit)
    runner = run_pipeweaver if name == "pipeweaver" else run_torch if name in TORCH_SCHEDULES else run_ours
    error = ""
    try:
        entry |= runner(run, name, clock, entry)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"[:2000]
        if isinstance(e, InvalidPlan):  # raised before any tensor or communication
            run.in_step = False
        tb = traceback.format_exc()
        print(f"[rank {run.rank}] {name} failed: {tb}", file=sys.stderr, flush=True)  # every rank, not only 0
        entry["traceback"] = tb[-3000:]
    entry["wall_s"] = round(time.monotonic() - clock.started, 1)
    free_memory(run)
    views = run.gather({"error": error, "in_step": run.in_step, "memory": my_memory(run)})
    if run.watchdog is not None:
        run.watchdog.disarm()
    errors = {r: v["error"] for r, v in enumerate(views) if v["error"]}
    entry["status"] = "error" if errors else "ok"
    if errors:
        entry["error"] = error or next(iter(errors.values()))
        entry["errors_per_rank"] = {str(r): e[:500] for r, e in errors.items()}
        run.say(schedule=name, error=entry["error"][:300], ranks=sorted(errors))
    entry |= memory_of([v["memory"] for v in views])
    restart = any(v["in_step"] for v in views)
    if restart:
        entry["restart"] = "an iteration failed part way: a fresh job runs the schedules left"
    run.current = ""
    run.executor = None
    run.in_step = False
    run.write()
    return restart


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
    SEMU's error per schedule with and without calibration; how each schedule ended."""
    tokens = [b.get("tokens", b.get("lm_tokens")) for b in result["batches"]["measured"]]  # lm_tokens: before T2V
    out: dict[str, Any] = {"schedules": {}, "speedup_pipeweaver_vs": {}, "semu_mape": {}}
    out["status"] = {name: s.get("status") for name, s in result["schedules"].items()}
    times: dict[str, list[float]] = {}
    for name, s in result["schedules"].items():
        rows = s.get("rows") or []
        if not rows:
            continue
        ms = [r["ms"] for r in rows]
        times[name] = ms
        tok = sum(tokens[r["i"]] for r in rows)
        out["schedules"][name] = {**_stats(ms), "tokens_per_s": tok / (sum(ms) / 1e3)}
        if any("repeat_ms" in r for r in rows):
            again = [float(r["repeat_ms"]) for r in rows if "repeat_ms" in r]
            out["schedules"][name]["repeat"] = {
                "n": len(again),
                "mean_ms": statistics.fmean(again),
                "mean_first_ms": statistics.fmean(float(r["ms"]) for r in rows if "repeat_ms" in r),
            }
        if any("warm_ms_max_rank" in r for r in rows):
            # What a long run pays once a shape has been seen: each iteration without its kernel loads.
            warm = [float(r.get("warm_ms_max_rank") or 0.0) for r in rows]
            out["schedules"][name]["mean_ms_without_kernel_loads"] = statistics.fmean(
                m - w for m, w in zip(ms, warm, strict=True)
            )
            out["schedules"][name]["mean_kernel_load_ms"] = statistics.fmean(warm)
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
    for name, ms in times.items():  # predictions and measurements pair by position: both start at iteration 0
        pred = semu.get(name, {})
        entry = {kind: _mape(pred.get(f"{kind}_ms", []), ms) for kind in ("uncalibrated", "calibrated")}
        for kind in ("service_calibrated", "service_uncalibrated"):
            if f"{kind}_ms" in pred:
                entry[kind] = _mape(pred[f"{kind}_ms"], ms)
        if name == "pipeweaver":
            rows = result["schedules"][name]["rows"]
            entry["service_header_calibrated"] = _mape([r.get("predicted_ms") for r in rows], ms)
        if any(v for v in entry.values()):
            out["semu_mape"][name] = entry
    ref, losses = loss_check(result)
    out["loss_max_rel_diff_vs_1f1b"] = losses
    if ref != "1f1b":
        out["loss_reference"] = ref
    pw_rows = result["schedules"].get("pipeweaver", {}).get("rows") or []
    if pw_rows:
        margins = [r["margin_ms"] for r in pw_rows if r.get("margin_ms") is not None]
        served = [r for r in pw_rows if r.get("served_fallback")]
        out["pipeweaver_plans"] = {
            "iterations": len(pw_rows),
            "sources": dict(Counter(r["source"] for r in pw_rows)),
            "local_fallbacks": sum(
                1 for r in pw_rows if r.get("local_fallback_reasons") or r.get("vote_fallback_reason")
            ),
            "served_fallbacks": len(served),
            "served_fallback_reasons": dict(Counter(r.get("service_fallback_reason") or "?" for r in served)),
            "late_plans": sum(1 for m in margins if m < 0),
            "margin_ms_min": min(margins) if margins else None,
            "margin_ms_median": statistics.median(margins) if margins else None,
        }
    return out


def loss_check(result: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """Every schedule computes the same mathematics on the same batches and weights: its loss per iteration must
    match 1F1B's (to bf16 rounding on GPUs; padding included for torch's). Reference: 1F1B, else the first of our
    other baselines that ran."""
    runs = result["schedules"]
    ref = next((n for n in ("1f1b", "interleaved-1f1b", "optimus-coarse") if runs.get(n, {}).get("rows")), "1f1b")
    losses = {r["i"]: r["loss"] for r in runs.get(ref, {}).get("rows") or []}
    out = {}
    for name, s in runs.items():
        pairs = [(r["loss"], losses[r["i"]]) for r in s.get("rows") or [] if r["i"] in losses and losses[r["i"]]]
        if pairs and name != ref:
            out[name] = max(abs(a - b) / abs(b) for a, b in pairs)
    return ref, out


def batch_summary(shape: VLMShape | T2VShape, batches: list[BatchMetadata]) -> list[dict[str, Any]]:
    return [
        {
            "iteration": b.iteration,
            "documents": sum(len(mb.documents) for mb in b.microbatches),
            "images": sum(len(mb.media(Modality.IMAGE)) for mb in b.microbatches),
            "videos": sum(len(mb.media(Modality.VIDEO)) for mb in b.microbatches),
            **shape.padding(b),
        }
        for b in batches
    ]


# ---- main -----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--traces-dir", default="", help="default: <out> without .json, plus _traces")
    ap.add_argument("--workload", default="vlm", choices=sorted(SCALED_WORKLOADS), help="e2e_workload.py's model")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: toy sizes, gloo, float32")
    ap.add_argument("--iterations", type=int, default=30, help="measured iterations of the dynamic trace")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations before each schedule's timed ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--schedules", default=",".join(ALL_SCHEDULES), help="in the order to run them")
    ap.add_argument("--total-s", type=float, default=330.0, help="the script's own deadline, from its start")
    ap.add_argument("--schedule-s", type=float, default=0.0, help="cap per schedule (0: a fair share of the rest)")
    ap.add_argument("--watchdog-s", type=float, default=60.0, help="a schedule this far past its limit is hung")
    ap.add_argument("--stall-s", type=float, default=60.0, help="a schedule without progress this long is hung")
    ap.add_argument("--resume", action="store_true", help="keep the schedules --out has, run the others")
    ap.add_argument("--simulate-fault", default="", metavar="NAME:K:RANK:KIND", help="tests: hang or raise")
    ap.add_argument("--profile-s", type=float, default=45.0, help="time box of the calibration profile")
    ap.add_argument("--no-calibration", action="store_true", help="register the job without the profile")
    ap.add_argument("--budget-ms", type=float, default=0.0, help="planning budget per batch (0: 1000, tiny 100)")
    ap.add_argument("--workers", type=int, default=0, help="sidecar search workers (0: 3, tiny 1)")
    ap.add_argument("--planner-nice", type=int, default=-1, help="nice of the sidecar (-1: 0, tiny 10)")
    ap.add_argument("--lookahead", type=int, default=2, help="iterations ahead the metadata goes to the sidecar")
    ap.add_argument("--first-deadline-s", type=float, default=30.0, help="the first plan's deadline")
    ap.add_argument("--trace-schedules", default="pipeweaver,interleaved-1f1b")
    ap.add_argument("--trace-iteration", type=int, default=3, help="measured iteration drawn as Chrome traces")
    ap.add_argument("--pg-timeout-s", type=float, default=120.0, help="NCCL timeout: a hang aborts the run")
    ap.add_argument("--dtype", default="", choices=["", "bfloat16", "float32"], help="default: bf16, tiny fp32")
    ap.add_argument("--attention", default="fast", choices=["fast", "reference"])
    ap.add_argument("--repeat", action="store_true", help="run each measured iteration of our executor twice")
    ap.add_argument(
        "--report-timings",
        action="store_true",
        help="PipeWeaver's ranks report each measured iteration (ReportTimings): the service's online refit, whose "
        "predictions the plan headers then carry (SEMU MAPE 'service_header_calibrated')",
    )
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
    prepare_cuda_for_dynamic_pipelines()  # before the first CUDA call (run_e2e.sh sets it too)
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
    wl = SCALED_WORKLOADS[args.workload](microbatches=args.microbatches, tiny=args.tiny)
    if world != wl.parallel.pp:
        raise SystemExit(f"run with {wl.parallel.pp} ranks (the workload's pp), not {world}")
    warm = [dynamic_batch(wl, seed=args.seed, iteration=args.iterations + w) for w in range(args.warmup)]
    measured = [dynamic_batch(wl, seed=args.seed, iteration=k) for k in range(args.iterations)]
    # Iteration numbers run on through warm-up and measured batches (the prefetcher wants them increasing).
    warm = [replace(b, iteration=w) for w, b in enumerate(warm)]
    measured = [replace(b, iteration=args.warmup + k) for k, b in enumerate(measured)]
    batches = warm + measured
    shape = VLMShape.of(wl.model, batches) if wl.dataset is DatasetKind.VLM_MIX else T2VShape.of(wl.model, batches)
    out = Path(args.out)
    traces = Path(args.traces_dir) if args.traces_dir else out.with_name(out.stem + "_traces")
    run = Run(
        args=args, device=device, dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16,
        wire=args.dtype, rank=rank, world=world, cpu=cpu, wl=wl, hardware=CPU if args.tiny else wl.hardware,
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
        "semu": {"schedules": {}, "errors": [], "jobs": {}},
        "attempts": [],
        "pending": [],
    }
    return run


def resume(run: Run, names: list[str]) -> list[Any]:
    """`--resume`: rank 0 takes over what the earlier attempt's JSON holds. A schedule with an entry is done,
    whatever its status (a hung one is not tried again); the calibration profile comes back as layer timings.
    Returns the profile (every rank)."""
    from pipeweaver.client.profiler import LayerTiming

    prev: dict[str, Any] = {}
    if run.rank == 0 and run.args.resume and run.out.exists():
        try:
            prev = json.loads(run.out.read_text())
        except (OSError, ValueError) as e:
            print(f"--resume: cannot read {run.out}: {e!r}; starting afresh", file=sys.stderr, flush=True)
    if prev:
        for key in ("schedules", "traces", "semu", "profile", "deferred", "attempts"):
            if key in prev:
                run.result[key] = prev[key]
        if run.result["attempts"]:
            run.result["attempts"][-1].setdefault("phases_s", prev.get("phases_s"))
            run.result["attempts"][-1].setdefault("end", "unknown: the process ended without a record")
        for entry in run.result["schedules"].values():
            if entry.get("status") == "running":
                entry["status"] = "lost: its process ended without a record (SIGKILL or a crash)"
    profile = run.result.get("profile", {}).get("rows") or [] if prev else []
    shared = run.bcast({"done": [n for n in names if n in run.result["schedules"]], "profile": profile})
    run.pending = [n for n in names if n not in shared["done"]]
    rows = []
    for module, tokens, pass_, ms in shared["profile"]:
        with contextlib.suppress(ValueError):
            rows.append(LayerTiming(module, int(tokens), Pass(pass_), float(ms)))
    return rows


def main() -> None:
    t_start = time.monotonic()
    args = parse_args()
    if args.attention == "fast":
        from fast_attention import use_fast_attention

        use_fast_attention()
    run = setup(args, t_start)
    if args.attention == "fast":
        run.result["attention"] = use_fast_attention(run.device)  # packed documents: varlen flash if it checks out
        print(json.dumps({"rank": run.rank, "attention": run.result["attention"]}), flush=True)
    names = args.schedules.split(",")
    if any(n in TORCH_SCHEDULES for n in names):
        import torch.distributed.pipelining  # noqa: F401  # seconds of imports (dynamo), not the first torch schedule's
    restored = resume(run, names)
    run.result["attempts"].append(
        {"attempt": len(run.result["attempts"]) + 1, "started_unix": round(time.time(), 1), "schedules": run.pending}
    )
    run.result["pending"] = list(run.pending)
    run.watchdog = Watchdog(run)
    if run.rank == 0:
        catch_sigterm(run)
        if "pipeweaver" in run.pending:  # starts now: its workers compile while the GPUs profile
            run.sidecar = Sidecar.launch(
                run.traces, workers=args.workers, budget_ms=args.budget_ms, baselines=",".join(OURS),
                nice=args.planner_nice,
            )  # fmt: skip
    run.result["phases_s"]["setup"] = round(time.monotonic() - t_start, 1)
    run.write()
    dirty = False
    try:
        run.result["phases_s"]["pair_groups"] = round(pair_groups(run), 1)
        if restored:
            run.profile_rows = restored
        elif "pipeweaver" in run.pending and not args.no_calibration:
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
            run.result["phases_s"]["profile"] = round(prof["seconds"], 1)
            free_memory(run)
        if run.rank == 0:
            run.semu = SemuJobs(run)
            run.semu.submit(f"baselines{len(run.result['attempts'])}", semu_baselines(run, names))
        run.say(phase="setup done", **run.result["phases_s"], pending=run.pending)
        queue = list(run.pending)
        while queue:
            name = next_schedule(run, queue)
            restart = run_schedule(run, name, len(queue))
            queue.remove(name)
            run.pending = list(queue)
            run.result["pending"] = list(queue)
            if run.rank == 0:
                assert run.semu is not None
                if name == "pipeweaver":
                    run.semu.submit("pipeweaver", semu_pipeweaver(run, names))
                    if run.sidecar is not None:  # from now on it only answers SEMU's Simulate calls
                        with contextlib.suppress(OSError):
                            os.setpriority(os.PRIO_PGRP, run.sidecar.proc.pid, 10)
                run.semu.poll()
                run.write()
            if restart and queue:
                restart_exit(run, f"{name} failed part way through an iteration")
            dirty = dirty or restart
        if run.semu is not None:
            run.semu.finish(run.t_start + args.total_s - 6.0)
        run.result["attempts"][-1] |= {"end": "complete", "end_t_s": run.t_s()}
    finally:
        if run.sidecar is not None:
            run.result["sidecar_log_tail"] = run.sidecar.log_tail(1500)
            run.sidecar.stop()
        run.result["phases_s"]["total"] = round(time.monotonic() - t_start, 1)
        run.write()
        if run.rank == 0:
            print(json.dumps({"summary": run.result.get("summary")}, default=_json_default), flush=True)
    dist.barrier(group=run.cpu)
    if dirty:  # transfers may still be posted on the communicators: tearing them down could wait for good
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

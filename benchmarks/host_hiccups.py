"""How often, and for how long, a machine takes a core away from a thread that never blocks.

    python benchmarks/host_hiccups.py --cpus 0-7 --seconds 60 --out hiccups.json

One process per CPU, pinned there, spins on `time.perf_counter` for `--seconds` and records every stretch longer
than `--min-us` between two of its reads (a hiccup: the spinning thread did not run). For each hiccup it also
records what the kernel saw meanwhile: the thread's own CPU time (`time.thread_time_ns`) and its wait on the run
queue (/proc/thread-self/schedstat). A hiccup in which neither moved was not the guest kernel's scheduling: the
core was busy with interrupt work the kernel does not charge to the thread, or the hypervisor ran something else
on it (steal). /proc/stat's per-CPU steal, irq and softirq counters over the run tell those apart.

Why it exists: the planner service's event loop stalled for 1-3.6 ms within answer bursts on the 16-core GPU
host, off a CPU and not waiting for one, with no other server thread running, several in whole milliseconds
(2.996, 2.998, 1.993 ms; `delivery_breakdown.loop_stalls`). A spinning thread on the same cores, with nothing of
ours running, tells whether the host does that to any thread. The spinner allocates nothing in its loop (floats
only, freed at once), so Python's collector never runs inside a measurement.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path
from typing import Any

STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
"""/proc/stat's per-CPU columns kept, in its order (USER_HZ ticks)."""


def parse_cpus(text: str) -> list[int]:
    """A CPU list as taskset and cpusets write it ("0-15", "0,2,16-31"), sorted; empty: none."""
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return sorted(out)


def proc_stat() -> dict[int, dict[str, int]]:
    """Per-CPU /proc/stat counters (ticks) by CPU number."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                out[int(name[3:])] = dict(zip(STAT_FIELDS, map(int, values[: len(STAT_FIELDS)]), strict=True))
    return out


def cgroup_cpu() -> dict[str, Any]:
    """The process's cgroup v2 CPU limit and throttling counters (empty where there is no cgroup v2)."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        out: dict[str, Any] = {"cpu.max": (base / "cpu.max").read_text().strip()}
        for line in (base / "cpu.stat").read_text().splitlines():
            key, value = line.split()
            out[key] = int(value)
        return out
    except (OSError, IndexError, ValueError):
        return {}


def _spin(cpu: int, seconds: float, min_s: float, start_at: float, queue: Any) -> None:
    os.sched_setaffinity(0, {cpu})
    schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def run_queue_ns() -> int:
        return int(os.pread(schedstat, 64, 0).split()[1])

    while time.perf_counter() < start_at:  # every spinner starts at once, after all are pinned
        pass
    hiccups: list[tuple[float, float, float, float]] = []
    """(start, length, the thread's CPU time within, its run-queue wait within) per gap, in seconds."""
    reads = 0
    clock = time.perf_counter
    last = clock()
    end = last + seconds
    counted_at, cpu_before, queued_before = last, time.thread_time_ns(), run_queue_ns()
    while last < end:
        now = clock()
        reads += 1
        if now - last > min_s:
            cpu_now, queued_now = time.thread_time_ns(), run_queue_ns()
            # The counters are read only after a gap (3 us a read): since the previous read the thread spun,
            # on a CPU, for all but this gap, so what its CPU time gained beyond that fell within the gap.
            gap = now - last
            spun = (now - counted_at) - gap
            on_cpu = max(0.0, (cpu_now - cpu_before) / 1e9 - spun)
            hiccups.append((last, gap, min(on_cpu, gap), (queued_now - queued_before) / 1e9))
            now = clock()
            counted_at, cpu_before, queued_before = now, time.thread_time_ns(), run_queue_ns()
        last = now
    queue.put((cpu, reads, hiccups))


def unseen_by_the_kernel(gap_s: float, on_cpu_s: float, queued_s: float) -> bool:
    """A gap that neither the thread's CPU time nor its run-queue wait covers (half of it or more is neither):
    not the guest kernel's own scheduling, but interrupt work or the hypervisor (steal)."""
    return on_cpu_s + queued_s < 0.5 * gap_s


def summarize(gaps_ms: list[float]) -> dict[str, Any]:
    if not gaps_ms:
        return {"count": 0}
    gaps_ms = sorted(gaps_ms)
    edges = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, float("inf"))
    histogram: dict[str, int] = {}
    lo = 0.0
    for hi in edges:
        n = sum(1 for g in gaps_ms if lo < g <= hi)
        if n:
            histogram[f"{lo}-{hi}ms"] = n
        lo = hi
    return {
        "count": len(gaps_ms),
        "total_ms": round(sum(gaps_ms), 3),
        "max_ms": round(gaps_ms[-1], 3),
        "longest_ms": [round(g, 3) for g in gaps_ms[-10:]],
        "histogram": histogram,
    }


def measure(cpus: list[int], seconds: float, min_us: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.perf_counter() + 2.0  # spawning and pinning take under a second each
    procs = [ctx.Process(target=_spin, args=(c, seconds, min_us / 1e6, start_at, queue)) for c in cpus]
    for p in procs:
        p.start()
    while time.perf_counter() < start_at:
        time.sleep(0.01)
    stat_before, cgroup_before = proc_stat(), cgroup_cpu()
    results = [queue.get() for _ in procs]
    stat_after, cgroup_after = proc_stat(), cgroup_cpu()
    for p in procs:
        p.join()
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    per_cpu = {}
    invisible: list[float] = []
    for cpu, reads, hiccups in sorted(results):
        gaps = [h[1] * 1e3 for h in hiccups]
        unseen = [h[1] * 1e3 for h in hiccups if unseen_by_the_kernel(h[1], h[2], h[3])]
        invisible.extend(unseen)
        moved = {k: round((stat_after[cpu][k] - stat_before[cpu][k]) * tick_ms, 1) for k in STAT_FIELDS}
        per_cpu[str(cpu)] = {
            "reads_per_us": round(reads / seconds / 1e6, 2),
            "hiccups": summarize(gaps),
            "unseen_by_the_kernel": summarize(unseen),
            "run_queue_ms": round(sum(h[3] for h in hiccups) * 1e3, 3),
            "proc_stat_ms": {k: v for k, v in moved.items() if k in ("steal", "irq", "softirq", "system")},
        }
    throttling = {
        k: cgroup_after[k] - cgroup_before.get(k, 0)
        for k in ("nr_throttled", "throttled_usec", "nr_periods")
        if k in cgroup_after
    }
    return {
        "cpus": cpus,
        "seconds": seconds,
        "min_us": min_us,
        "kernel": platform.release(),
        "cgroup_cpu_max": cgroup_after.get("cpu.max"),
        "cgroup_throttling": throttling,
        "all_cpus": {
            "hiccups": summarize([h[1] * 1e3 for _, _, hs in results for h in hs]),
            "unseen_by_the_kernel": summarize(invisible),
            "steal_ms": round(sum(per_cpu[str(c)]["proc_stat_ms"]["steal"] for c in cpus), 1),
        },
        "per_cpu": per_cpu,
        "date": time.strftime("%Y-%m-%d"),
        "host_cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", default="0", help="CPUs to spin on (taskset syntax); default 0")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--min-us", type=float, default=100.0, help="shortest gap recorded (us; default 100)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.seconds <= 0 or args.min_us <= 0:
        parser.error("--seconds and --min-us must be positive")
    result = measure(parse_cpus(args.cpus), args.seconds, args.min_us)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(result["all_cpus"], indent=1))


if __name__ == "__main__":
    main()

"""`pipeweaver bench`: plan N sampled iterations with PipeWeaver and simulate every baseline on the same batches.

Prints one JSON object with --json (progress goes to stderr) and, with --out, writes the plots: a timeline of one
iteration (PipeWeaver over interleaved 1F1B), mean iteration time per system, and the planning-latency CDF.
A baseline whose simulation overflows device memory on any iteration (even with full recompute) would not run:
it is reported under `does_not_fit`, without a makespan, and is not counted in `speedup_vs`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeweaver.errors import SpecError

GIB = 2**30
SEARCHED = "pipeweaver"


def bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", required=True, help="preset workload (see `pipeweaver workloads`)")
    parser.add_argument("--batches", type=int, default=20, help="sampled iterations (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="search worker processes (default 1)")
    parser.add_argument("--budget-ms", type=float, default=1000.0, help="search budget per batch (default 1000)")
    parser.add_argument("--dynamic", action="store_true", help="use the dynamic trace instead of i.i.d. batches")
    parser.add_argument("--ablation", action="store_true", help="also run each search level (paper Table 5)")
    parser.add_argument(
        "--offload", action="store_true", help="let stage pairs offload activations to host memory (experimental)"
    )
    parser.add_argument(
        "--host-link-gbps", type=float, help="per-GPU host link, GB/s per direction (default: the hardware's, 26)"
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--out", type=Path, help="directory for bench.json and the plots")


def _summary(values_ms: list[float], bubbles: list[float], peaks: list[float]) -> dict[str, float]:
    arr = np.array(values_ms)
    return {
        "mean_iter_ms": round(float(arr.mean()), 3),
        "p50_iter_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_iter_ms": round(float(np.percentile(arr, 99)), 3),
        "mean_bubble_fraction": round(float(np.mean(bubbles)), 4),
        "max_peak_memory_gib": round(max(peaks) / GIB, 3),
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from rich.progress import Progress

    from pipeweaver.cli_plan import workload_named
    from pipeweaver.datagen import dynamic_batch, sample_batch
    from pipeweaver.search.planner import Planner, SearchConfig, SearchLevel

    if args.batches < 1:
        raise SpecError(f"--batches must be at least 1, got {args.batches}")
    if args.workers < 1:
        raise SpecError(f"--workers must be at least 1, got {args.workers}")
    if args.budget_ms <= 0:
        raise SpecError(f"--budget-ms must be positive, got {args.budget_ms}")
    w = workload_named(args.workload)
    if getattr(args, "host_link_gbps", None) is not None:
        if not args.host_link_gbps > 0:
            raise SpecError(f"--host-link-gbps must be positive, got {args.host_link_gbps}")
        w = replace(w, hardware=replace(w.hardware, host_link_bandwidth=args.host_link_gbps * 1e9))
    offload = bool(getattr(args, "offload", False))
    planner = Planner(
        w.model,
        w.parallel,
        w.hardware,
        config=SearchConfig(budget_ms=args.budget_ms, workers=args.workers, offload=offload),
    )
    times: dict[str, list[float]] = {}
    bubbles: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}
    over: dict[str, int] = {}
    """Batches on which each system's simulation overflows device memory (even with full recompute)."""
    latency: list[float] = []
    bounds: list[float] = []
    ablation: dict[str, list[float]] = {}
    first: tuple[Any, Any] | None = None
    try:
        with Progress(transient=True, console=None) as progress:
            task = progress.add_task(f"{w.name}: planning", total=args.batches)
            for i in range(args.batches):
                batch = (
                    dynamic_batch(w, seed=args.seed, iteration=i)
                    if args.dynamic
                    else sample_batch(w, seed=args.seed, iteration=i)
                )
                result = planner.plan(batch, job_id=f"bench-{w.name}")
                latency.append(result.search_ms)
                bounds.append(result.lower_bound_ms)
                for name, value, bubble, peak in [
                    (SEARCHED, result.predicted_ms, result.bubble_fraction, max(result.peak_memory_bytes))
                ] + [
                    (n, sim.makespan_ms, sim.bubble_fraction, float(np.max(sim.peak_memory_bytes)))
                    for n, sim in planner.baseline_results(batch).items()
                ]:
                    times.setdefault(name, []).append(value)
                    bubbles.setdefault(name, []).append(bubble)
                    peaks.setdefault(name, []).append(peak)
                    over[name] = over.get(name, 0) + int(peak > w.hardware.memory_bytes)
                if first is None:
                    first = (batch, result)
                if args.ablation:
                    base_config = planner.config
                    for level in SearchLevel:
                        planner.config = SearchConfig(
                            budget_ms=args.budget_ms,
                            level=level,
                            compare_baselines=(),
                            workers=args.workers,
                            offload=offload,
                        )
                        ablation.setdefault(level.name.lower(), []).append(planner.plan(batch).predicted_ms)
                    planner.config = base_config
                progress.advance(task)
    finally:
        planner.close()
    # A system that overflows device memory on any batch would not run there: it gets no makespan, only the
    # record that it does not fit (and it is no baseline to beat).
    unfit = {name: n for name, n in over.items() if n}
    systems = {name: _summary(times[name], bubbles[name], peaks[name]) for name in times if name not in unfit}
    if SEARCHED not in systems:  # never expected: the planner's plans fit; kept so the report stays complete
        systems[SEARCHED] = _summary(times[SEARCHED], bubbles[SEARCHED], peaks[SEARCHED])
    ours = systems[SEARCHED]["mean_iter_ms"]
    speedups = {n: round(s["mean_iter_ms"] / ours, 4) for n, s in systems.items() if n != SEARCHED}
    best = min(speedups, key=lambda n: speedups[n]) if speedups else None
    report: dict[str, Any] = {
        "workload": w.name,
        "hardware": w.hardware.name,
        "batches": args.batches,
        "offload": offload,
        "host_link_gbps": round(w.hardware.host_link_bandwidth / 1e9, 3),
        "systems": systems,
        "does_not_fit": {
            name: {
                "batches_over_memory": n,
                "max_peak_memory_gib": round(max(peaks[name]) / GIB, 3),
                "memory_capacity_gib": round(w.hardware.memory_bytes / GIB, 3),
            }
            for name, n in sorted(unfit.items())
        },
        "lower_bound_mean_ms": round(float(np.mean(bounds)), 3),
        "gap_to_lower_bound": round(ours / float(np.mean(bounds)) - 1, 4),
        "plan_latency_ms": {
            "p50": round(float(np.percentile(latency, 50)), 1),
            "p99": round(float(np.percentile(latency, 99)), 1),
        },
        "speedup_vs": speedups,
        "best_baseline": best,
        "speedup_vs_best_baseline": speedups[best] if best is not None else None,
    }
    if args.ablation:
        report["ablation_mean_ms"] = {k: round(float(np.mean(v)), 3) for k, v in ablation.items()}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
        assert first is not None
        _plots(args.out, w, planner, first[0], first[1], {n: times[n] for n in systems}, latency)
    return report


def _plots(
    out: Path, w: Any, planner: Any, batch: Any, result: Any, times: dict[str, list[float]], latency: list[float]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeweaver.search.baselines import build_baseline_plan
    from pipeweaver.viz import Timeline, write_timeline_png

    base = build_baseline_plan("interleaved-1f1b", model=w.model, parallel=w.parallel, batch=batch, hardware=w.hardware)
    base_sim = planner.baseline_result(base, batch)
    write_timeline_png(
        [
            Timeline(f"PipeWeaver ({w.name}, iteration 0)", result.plan, [rp.predicted_ms for rp in result.plan.ranks]),
            Timeline("interleaved 1F1B (Megatron VPP)", base, base_sim.to_rank_timings()),
        ],
        out / f"timeline-{w.name}.png",
    )
    names = sorted(times, key=lambda n: float(np.mean(times[n])))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(
        names,
        [float(np.mean(times[n])) / 1e3 for n in names],
        color=["#C44E52" if n == SEARCHED else "#4C72B0" for n in names],
    )
    ax.set_ylabel("mean iteration time (s)")
    ax.set_title(f"{w.name} on {w.hardware.name}: {len(latency)} sampled iterations (SEMU)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / f"iteration-time-{w.name}.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = np.sort(np.array(latency))
    ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post")
    ax.set_xlabel("planning latency (ms)")
    ax.set_ylabel("fraction of batches")
    ax.set_title(f"{w.name}: planning latency CDF")
    fig.tight_layout()
    fig.savefig(out / f"plan-latency-{w.name}.png", dpi=110)
    plt.close(fig)


def bench(args: argparse.Namespace) -> int:
    report = run_bench(args)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['workload']} on {report['hardware']}: {report['batches']} iterations")
    for name, s in sorted(report["systems"].items(), key=lambda kv: kv[1]["mean_iter_ms"]):
        speed = report["speedup_vs"].get(name)
        tail = f"  ({speed:.2f}x slower than PipeWeaver)" if speed else ""
        print(
            f"  {name:16s} mean {s['mean_iter_ms'] / 1e3:9.3f} s  p99 {s['p99_iter_ms'] / 1e3:9.3f} s  "
            f"bubble {s['mean_bubble_fraction']:.1%}  peak {s['max_peak_memory_gib']:.1f} GiB{tail}"
        )
    for name, d in report["does_not_fit"].items():
        print(
            f"  {name:16s} does not fit: peak {d['max_peak_memory_gib']:.1f} GiB > {d['memory_capacity_gib']:.1f} GiB "
            f"on {d['batches_over_memory']}/{report['batches']} iterations (even with full recompute)"
        )
    print(
        f"  lower bound mean {report['lower_bound_mean_ms'] / 1e3:.3f} s (gap {report['gap_to_lower_bound']:.1%}); "
        f"planning latency p50 {report['plan_latency_ms']['p50']:.0f} ms, p99 {report['plan_latency_ms']['p99']:.0f} ms"
    )
    if "ablation_mean_ms" in report:
        print("  ablation: " + ", ".join(f"{k} {v / 1e3:.3f} s" for k, v in report["ablation_mean_ms"].items()))
    if args.out:
        print(f"  wrote {args.out}", file=sys.stderr)
    return 0

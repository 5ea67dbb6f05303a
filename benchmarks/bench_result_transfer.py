"""A search result's way from a worker to the event loop, with glibc's default heap and with its pages kept
(`pipeweaver.server.heap.keep_heap_pages`), side by side in alternating rounds.

Each round starts one child process per heap setting. The child runs a `LoopProcessPool` of one worker (as the
service does, with the setting applied in the worker and on the loop); the worker plans one vlm-s batch once
(`work.plan_batch`), then hands the same `PlanOutcome` back `--repeats` times. Timed per hand-back: from the task's
end in the worker (its own stamp, `time.perf_counter`, one clock for the host's processes) to its future done on
the loop: pickling, the pipe, the wake-up, reading, unpickling. Also, per setting, the searches' evaluations in a
fixed budget (`--search-budget-ms`, `--searches` batches) and the worker's peak resident memory after them: what
the setting does to the search itself and what it costs.

    .venv/bin/python benchmarks/bench_result_transfer.py [--rounds 4] [--repeats 60] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "kept")

_outcome: Any = None


def _init(kept: bool) -> None:
    from pipeweaver.server import heap, work

    work.init_worker()
    if kept:
        heap.keep_heap_pages()


def _task(kind: str, seed: int, budget_ms: float) -> tuple[float, Any]:
    """("hand", ...): the cached outcome; ("search", seed): a fresh search. The task's end is stamped last."""
    global _outcome
    from dataclasses import replace

    from pipeweaver.datagen import dynamic_batch
    from pipeweaver.presets import workload
    from pipeweaver.server import work
    from pipeweaver.wire import batch_to_proto

    if kind == "search" or _outcome is None:
        w = workload("vlm-s")
        spec = work.JobSpec(model=w.model, parallel=replace(w.parallel, dp=16), hardware=w.hardware)
        registered = work.register_job(work.Job("bench-transfer", spec))
        assert isinstance(registered, work.Registered)
        job = work.Job("bench-transfer", spec, registered.partition)
        data = batch_to_proto(dynamic_batch(w, seed=seed, iteration=seed)).SerializeToString()
        outcome = work.plan_batch(work.PlanTask(job, data, "search", budget_ms))
        assert isinstance(outcome, work.PlanOutcome)
        if kind == "search":
            import resource

            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
            return time.perf_counter(), (outcome.evaluations, outcome.search_ms, peak_kib)
        _outcome = outcome
    return time.perf_counter(), _outcome


async def _child(kept: bool, repeats: int, searches: int, budget_ms: float) -> dict[str, Any]:
    from pipeweaver.server import heap
    from pipeweaver.server.loop_pool import LoopProcessPool

    if kept:
        heap.keep_heap_pages()
    pool = LoopProcessPool(1, initializer=partial(_init, kept))
    try:
        loop = asyncio.get_running_loop()

        async def run(kind: str, seed: int) -> tuple[float, Any, float]:
            done = loop.create_future()
            cf = pool.submit(_task, kind, seed, budget_ms)
            cf.add_done_callback(lambda f: done.set_result(time.perf_counter()))
            t_done = await done
            t_end, value = cf.result()
            return t_end, value, t_done

        await run("hand", 0)  # plans the batch once; the hand-backs below return it
        hand_ms = []
        for _ in range(repeats):
            t_end, outcome, t_done = await run("hand", 0)
            hand_ms.append((t_done - t_end) * 1e3)
            await asyncio.sleep(0.005)
        size = len(outcome.plan.header) + sum(map(len, outcome.plan.lean)) + sum(map(len, outcome.plan.timings))
        evaluations, peak_kib = [], 0
        for seed in range(1, searches + 1):
            _, (count, _search_ms, peak_kib), _ = await run("search", seed)
            evaluations.append(count)
        return {"hand_back_ms": hand_ms, "result_bytes": size, "evaluations": evaluations, "worker_peak_kib": peak_kib}
    finally:
        pool.shutdown()
        await pool.join(10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--searches", type=int, default=3, help="vlm-s searches per child, for their evaluations")
    parser.add_argument("--search-budget-ms", type=float, default=300.0)
    parser.add_argument("--out", default="")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report = asyncio.run(_child(args.child == "kept", args.repeats, args.searches, args.search_budget_ms))
        print(json.dumps(report))
        return
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
            cmd = [sys.executable, __file__, "--child", setting, "--repeats", str(args.repeats)]
            cmd += ["--searches", str(args.searches), "--search-budget-ms", str(args.search_budget_ms)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {setting}: done", file=sys.stderr)

    def summary(setting: str) -> dict[str, Any]:
        hand = np.concatenate([run["hand_back_ms"] for run in runs[setting]])
        evals = [e for run in runs[setting] for e in run["evaluations"]]
        return {
            "hand_back_ms": {q: round(float(np.percentile(hand, p)), 3) for q, p in (("p50", 50), ("p90", 90))},
            "evaluations_mean": round(float(np.mean(evals)), 1) if evals else None,
            "result_bytes": runs[setting][0]["result_bytes"],
            "worker_peak_rss_mib": round(max(run["worker_peak_kib"] for run in runs[setting]) / 1024, 1),
        }

    report = {
        "command": " ".join(["python", "benchmarks/bench_result_transfer.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()}-core {platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "repeats": args.repeats,
        "search_budget_ms": args.search_budget_ms,
        **{setting: summary(setting) for setting in SETTINGS},
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""SEMU's predictions for the plans `e2e_compare.py` runs, with and without the device calibration.

    python benchmarks/gpu/e2e_semu.py --input job.pkl --out semu.json [--budget-s 200]

Started by rank 0 of `e2e_compare.py` as background processes (nice, one CPU thread) that use spare host cores
while the GPUs train: one job for the baselines' plans as soon as the calibration profile is known (the plans are
a pure function of the batch: every measured iteration is simulated, the summary pairs them with the iterations
that ran), one for PipeWeaver's plans once they ran (with the Simulate RPC cross-check of the baselines). The
input (pickle, written by rank 0) holds the workload flags, the calibration rows, the batches, and per schedule
the iterations to simulate and (for PipeWeaver) the plans that ran.

Two local SEMUs simulate every plan (`Planner.simulate_plan`, with each plan's own recompute choices):
uncalibrated (the cost model's default efficiency factors) and calibrated (factors fitted to the profile rows
the way the service fits a RegisterJob calibration). The service's own numbers come along where it has them: a
served plan's header (`predicted_makespan_ms`, calibrated job) and the Simulate RPC for the baselines on the
calibrated and the uncalibrated job. Chrome traces of SEMU's predicted timeline are written for the plans asked.

Never depends on the run reaching its end: iterations are simulated in order (every schedule's first iterations
first), the output is rewritten as it grows (`complete` is false until the end), and `--budget-s` stops the work
in time: whatever was simulated by then is in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_workload import SCALED_WORKLOADS

from pipeweaver.plan.export import write_chrome_trace
from pipeweaver.plan.ir import Pass
from pipeweaver.search.baselines import build_baseline_plan
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.simulator.calibration import LayerDims, LayerProfile, fit_layer_factors
from pipeweaver.simulator.costmodel import EfficiencyFactors
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import ModelSpec


def fitted_factors(
    model: ModelSpec, rows: list[tuple[str, int, str, float]], hardware: HardwareSpec
) -> EfficiencyFactors | None:
    """What the service fits from a RegisterJob calibration (`server.work._factors`): one row (module, tokens,
    pass, ms) per measured block on one instance of `tokens` tokens."""
    if not rows:
        return None
    profiles = [
        LayerProfile(
            kind=model.module(module).kind,
            dims=LayerDims.of(model.module(module)),
            tokens=tokens,
            spans=(tokens,),
            context_tokens=0,
            pass_=Pass(pass_),
            measured_ms=ms,
        )
        for module, tokens, pass_, ms in rows
    ]
    return fit_layer_factors(profiles, hardware)


def service_simulations(job: dict[str, Any], batches: list[BatchMetadata], out: dict[str, Any], stop: float) -> None:
    """Simulate RPC of the baselines' iterations (`service_schedules`), on the calibrated and the uncalibrated job,
    iterations in order, until `stop` (monotonic)."""
    service = job.get("service")
    wanted: dict[str, list[int]] = job.get("service_schedules") or {}
    if not service or not wanted:
        return
    from pipeweaver.client.planner_client import PlannerClient

    client = PlannerClient(service["address"], timeout_s=30.0)
    kinds = [kind for kind in ("calibrated", "uncalibrated") if service.get(f"job_{kind}")]
    tasks = [
        (name, kind, i, k)
        for i in range(max(len(v) for v in wanted.values()))
        for name, ks in wanted.items()
        if i < len(ks)
        for kind in kinds
        for k in (ks[i],)
    ]

    def one(task: tuple[str, str, int, int]) -> tuple[str, str, int, float | None]:
        name, kind, i, k = task
        if time.monotonic() > stop:
            return name, kind, i, None
        try:
            ms = client.simulate(batches[k], name, job_id=service[f"job_{kind}"]).makespan_ms
        except Exception as e:  # a cross-check: record and go on
            out["errors"].append(f"Simulate {name} {kind} iteration {k}: {type(e).__name__}: {str(e)[:200]}")
            ms = float("nan")
        return name, kind, i, ms

    got: dict[tuple[str, str], dict[int, float]] = {}
    with ThreadPoolExecutor(max(1, int(service.get("workers", 2)))) as pool:
        for name, kind, i, ms in pool.map(one, tasks):
            if ms is not None:
                got.setdefault((name, kind), {})[i] = ms
    client.close()
    for (name, kind), by_i in got.items():
        row = out["schedules"].setdefault(name, {})
        row.setdefault("service_iterations", wanted[name])
        n = 0
        while n in by_i:  # the contiguous prefix: the summary pairs predictions with iterations by position
            n += 1
        row[f"service_{kind}_ms"] = [by_i[i] for i in range(n)]


def write_out(path: Path, out: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop simulating after this long (0: no limit)")
    args = ap.parse_args()
    t0 = time.monotonic()
    stop = t0 + args.budget_s if args.budget_s > 0 else float("inf")
    if args.budget_s > 0:  # the last resort: gone a little after the budget, whatever it is doing
        hard = threading.Timer(args.budget_s + 15.0, os._exit, (3,))
        hard.daemon = True
        hard.start()
    out_path = Path(args.out)
    job = pickle.loads(Path(args.input).read_bytes())
    wl = SCALED_WORKLOADS[job.get("workload", "vlm")](microbatches=job["microbatches"], tiny=job["tiny"])
    hardware: HardwareSpec = job["hardware"]
    batches: list[BatchMetadata] = job["batches"]
    out: dict[str, Any] = {"schedules": {}, "errors": [], "traces": [], "complete": False}
    planners: dict[str, Planner] = {}
    for kind, factors in (("uncalibrated", None), ("calibrated", fitted_factors(wl.model, job["rows"], hardware))):
        if kind == "calibrated" and factors is None:
            continue
        config = SearchConfig(compare_baselines=())
        planners[kind] = Planner(wl.model, wl.parallel, hardware, factors=factors, config=config)
    out["setup_s"] = time.monotonic() - t0
    wanted = {(t["schedule"], t["iteration"]): t for t in job.get("traces", [])}
    dtype = "float32" if hardware.dtype_bytes == 4 else "bfloat16"
    schedules: dict[str, dict[str, Any]] = job["schedules"]
    for name, s in schedules.items():
        out["schedules"][name] = {"iterations": list(s["iterations"])} | {f"{kind}_ms": [] for kind in planners}
    longest = max((len(s["iterations"]) for s in schedules.values()), default=0)
    written = time.monotonic()
    for i in range(longest):  # every schedule's first iterations first: a cut run still covers them all
        if time.monotonic() > stop:
            out["errors"].append(f"budget of {args.budget_s:.0f} s spent after {i} of {longest} iterations")
            break
        for name, s in schedules.items():
            if i >= len(s["iterations"]):
                continue
            k = s["iterations"][i]
            batch = batches[k]
            row = out["schedules"][name]
            try:
                if name == "pipeweaver":
                    plan = s["plans"][i]
                else:
                    plan = build_baseline_plan(
                        name, model=wl.model, parallel=wl.parallel, batch=batch, tensors_dtype=dtype
                    )
            except Exception as e:
                out["errors"].append(f"{name} iteration {k}: {type(e).__name__}: {str(e)[:300]}")
                for kind in planners:
                    row[f"{kind}_ms"].append(float("nan"))
                continue
            for kind, planner in planners.items():
                try:
                    sim = planner.simulate_plan(plan, batch, plan.recompute_map())
                    row[f"{kind}_ms"].append(float(sim.makespan_ms))
                except Exception as e:
                    out["errors"].append(f"{name} {kind} iteration {k}: {type(e).__name__}: {str(e)[:300]}")
                    row[f"{kind}_ms"].append(float("nan"))
                    continue
                trace = wanted.get((name, k))
                if trace is not None:
                    path = Path(trace["dir"]) / f"{name}_it{k - job['warmup']}_semu_{kind}.json"
                    write_chrome_trace(path, plan, sim.to_rank_timings())
                    out["traces"].append(
                        {
                            "schedule": name,
                            "iteration": k - job["warmup"],
                            "kind": f"semu_{kind}",
                            "file": str(path),
                            "predicted_ms": float(sim.makespan_ms),
                        }
                    )
        if time.monotonic() - written > 2.0:
            out["seconds"] = time.monotonic() - t0
            write_out(out_path, out)
            written = time.monotonic()
    out["local_s"] = time.monotonic() - t0
    write_out(out_path, out)
    service_simulations(job, batches, out, stop)
    out["seconds"] = time.monotonic() - t0
    out["complete"] = time.monotonic() <= stop
    write_out(out_path, out)


if __name__ == "__main__":
    main()

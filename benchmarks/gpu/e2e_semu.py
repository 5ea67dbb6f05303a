"""SEMU's predictions for the plans `e2e_compare.py` ran, with and without the device calibration.

    python benchmarks/gpu/e2e_semu.py --input job.pkl --out semu.json

Started by rank 0 of `e2e_compare.py` as a background process once our executor's schedules have run (it uses
spare host cores while torch's schedules run on the GPUs). The input (pickle, written by rank 0) holds the
workload flags, the calibration rows, the batches, and per schedule the measured iterations and (for PipeWeaver)
the plans that ran; baseline plans are rebuilt here (they are a pure function of the batch).

Two local SEMUs simulate every plan (`Planner.simulate_plan`, with each plan's own recompute choices):
uncalibrated (the cost model's default efficiency factors) and calibrated (factors fitted to the profile rows
the way the service fits a RegisterJob calibration). The service's own numbers come along where it has them: a
served plan's header (`predicted_makespan_ms`, calibrated job) and the Simulate RPC for the baselines on the
calibrated and the uncalibrated job. Chrome traces of SEMU's predicted timeline are written for the plans asked.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_workload import scaled_vlm

from pipeweaver.plan.export import write_chrome_trace
from pipeweaver.plan.ir import Compute, Pass, Plan, Recompute
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


def recompute_of(plan: Plan) -> dict[tuple[str, int, int, int], Recompute]:
    """The memory strategy of every forward stage that has one: SEMU replays the plan with it."""
    out: dict[tuple[str, int, int, int], Recompute] = {}
    for rp in plan.ranks:
        for a in rp.actions:
            if isinstance(a, Compute) and a.stage.pass_ is Pass.F and a.recompute is not Recompute.NONE:
                s = a.stage
                out[(s.pipeline, s.chunk, s.microbatch, s.sub)] = a.recompute
    return out


def service_simulations(job: dict[str, Any], batches: list[BatchMetadata], out: dict[str, Any]) -> None:
    """Simulate RPC of every measured baseline iteration, on the calibrated and the uncalibrated job."""
    service = job.get("service")
    if not service:
        return
    from pipeweaver.client.planner_client import PlannerClient

    client = PlannerClient(service["address"], timeout_s=60.0)
    tasks = [
        (name, kind, i, k)
        for name, s in job["schedules"].items()
        if name != "pipeweaver"
        for kind in ("calibrated", "uncalibrated")
        if service.get(f"job_{kind}")
        for i, k in enumerate(s["iterations"])
    ]

    def one(task: tuple[str, str, int, int]) -> tuple[str, str, int, float]:
        name, kind, i, k = task
        try:
            ms = client.simulate(batches[k], name, job_id=service[f"job_{kind}"]).makespan_ms
        except Exception as e:  # a cross-check: record and go on
            out["errors"].append(f"Simulate {name} {kind} iteration {k}: {type(e).__name__}: {str(e)[:200]}")
            ms = float("nan")
        return name, kind, i, ms

    for name, s in job["schedules"].items():
        if name != "pipeweaver":
            for kind in ("calibrated", "uncalibrated"):
                out["schedules"][name][f"service_{kind}_ms"] = [float("nan")] * len(s["iterations"])
    with ThreadPoolExecutor(max(1, int(service.get("workers", 2)))) as pool:
        for name, kind, i, ms in pool.map(one, tasks):
            out["schedules"][name][f"service_{kind}_ms"][i] = ms
    client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.monotonic()
    job = pickle.loads(Path(args.input).read_bytes())
    wl = scaled_vlm(microbatches=job["microbatches"], tiny=job["tiny"])
    hardware: HardwareSpec = job["hardware"]
    batches: list[BatchMetadata] = job["batches"]
    out: dict[str, Any] = {"schedules": {}, "errors": [], "traces": []}
    planners: dict[str, Planner] = {}
    for kind, factors in (("uncalibrated", None), ("calibrated", fitted_factors(wl.model, job["rows"], hardware))):
        if kind == "calibrated" and factors is None:
            continue
        config = SearchConfig(compare_baselines=())
        planners[kind] = Planner(wl.model, wl.parallel, hardware, factors=factors, config=config)
    out["setup_s"] = time.monotonic() - t0
    wanted = {(t["schedule"], t["iteration"]): t for t in job.get("traces", [])}
    dtype = "float32" if hardware.dtype_bytes == 4 else "bfloat16"
    for name, s in job["schedules"].items():
        row: dict[str, Any] = {f"{kind}_ms": [] for kind in planners}
        out["schedules"][name] = row
        for i, k in enumerate(s["iterations"]):
            batch = batches[k]
            if name == "pipeweaver":
                plan = s["plans"][i]
            else:
                plan = build_baseline_plan(name, model=wl.model, parallel=wl.parallel, batch=batch, tensors_dtype=dtype)
            for kind, planner in planners.items():
                try:
                    sim = planner.simulate_plan(plan, batch, recompute_of(plan))
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
    out["local_s"] = time.monotonic() - t0
    service_simulations(job, batches, out)
    out["seconds"] = time.monotonic() - t0
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()

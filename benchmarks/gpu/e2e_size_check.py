"""Before spending device time on an e2e model size (issue 10): its partition, memory, SEMU's predictions and
whether its actions are device-bound, on CPU, against what the committed runs of the default size measured.

    .venv/bin/python benchmarks/gpu/e2e_size_check.py --out benchmarks/results/e2e_size_check.json

Per workload (`e2e_workload.SCALED_WORKLOADS` key): SEMU calibrated with the committed run's device profile
(`--vlm-run` / `--t2v-run`: the efficiency factors are fitted on the default model that was profiled, against the
workload's planning hardware, and carried over to the workload's dims), the planner's partition (chunks per
module, B_i, K_i), static memory per rank as SEMU counts it and as the runs hold it (no optimizer step: bf16
parameters and gradients, 4 bytes per parameter), then for `--iterations` of the dynamic trace PipeWeaver's plan
(deterministic re-plan, as `semu_residuals.py`) and the baselines' plans, each simulated the way `e2e_semu.py` does
(`Planner.simulate_plan`): makespan, peak memory, the median device time of a compute action. For the default
sizes the run's measured host time per compute action is set beside it (`dispatch` of `host_ms_per_rank` over the
plan's computes on that rank, first runs: an upper bound, it includes the point-to-point calls): an action whose
device time exceeds that is device-bound. Last, the memory check of the planning cap (`PLANNING_H200` docstring)
and an estimate of each schedule's wall time in `e2e_compare.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_semu import fitted_factors
from e2e_torch_t2v import T2VShape
from e2e_torch_vlm import VLMShape
from e2e_workload import SCALED_WORKLOADS

from pipeweaver.datagen import dynamic_batch
from pipeweaver.plan.ir import Compute, Plan
from pipeweaver.search.baselines import build_baseline_plan
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.simulator.memory import static_memory
from pipeweaver.spec.batch import BatchMetadata, Document, MediaItem, Microbatch
from pipeweaver.spec.hardware import GB
from pipeweaver.spec.model import Modality
from pipeweaver.spec.workload import DatasetKind, Workload

ROOT = Path(__file__).resolve().parents[2]
SCHEDULES = ("pipeweaver", "torch-interleaved-1f1b", "interleaved-1f1b", "1f1b", "optimus-coarse")
"""torch's schedule is estimated as our interleaved 1F1B on its padded microbatches (`padded_batch`)."""
REPLAN_EVALUATIONS = 30
"""As `semu_residuals.py`: a deterministic re-plan whose prediction is within a few percent of a served plan's."""
DEVICE_BYTES_PER_PARAM = 4.0
"""What the e2e runs hold per parameter: bf16 weights and bf16 gradients (no optimizer step, no fp32 master)."""
ACTIVATION_RATIO = 1.5
"""Device activation bytes over SEMU's count, with a margin over what the committed runs held (`activation_ratio`
of each default-size workload's baselines: 1.0-1.06 VLM, 1.37-1.43 T2V on the ranks activations dominate)."""
DEVICE_OVERHEAD_BYTES = 3 * GB
"""Workspaces, NCCL buffers and the LM head's fp32 logits, beyond parameters, gradients and activations."""
USABLE_H200_BYTES = 140 * 2**30
SCHEDULE_OVERHEAD_S = {"pipeweaver": 23.0, "torch-interleaved-1f1b": 10.0}
"""Seconds of a schedule's slot in `e2e_compare.py` beyond its iterations (executor build, kernel warm-up, the
first plan), from runs 21 and 22 (`wall_s` less the iterations' times); others: `OTHER_OVERHEAD_S`."""
OTHER_OVERHEAD_S = 10.0
RUN_FIXED_S = 12.0 + 2.0 + 20.0
"""Setup, NCCL pair groups and the calibration profile (runs 21-22: 9-11 s; larger blocks take longer, and
`--profile-s` bounds it), before the first schedule."""
FINAL_RESERVE_S = 20.0
"""`e2e_compare.FINAL_RESERVE_S`."""


def family(key: str) -> str:
    return key.split("-")[0]


def compute_ms(plan: Plan, timings: tuple[tuple[tuple[float, float], ...], ...]) -> list[list[tuple[float, int]]]:
    """Per rank, each compute action's predicted duration and its chunk's layer count (host time grows with
    the layers a chunk launches, whatever their width)."""
    layers = {(c.pipeline, c.index): sum(r.stop - r.start for r in c.layers) for c in plan.header.placement.chunks}
    out = []
    for rank_plan in plan.ranks:
        spans = timings[rank_plan.rank]
        out.append(
            [
                (e - s, layers[(a.stage.pipeline, a.stage.chunk)])
                for a, (s, e) in zip(rank_plan.actions, spans, strict=True)
                if isinstance(a, Compute)
            ]
        )
    return out


def padded_batch(wl: Workload, shape: VLMShape | T2VShape, batch: BatchMetadata) -> BatchMetadata:
    """What torch's schedules compute on: every microbatch padded to the run's largest (`e2e_torch_*.py`); one
    image size; for T2V the padded DiT tokens as one clip (an upper bound on attention)."""
    if isinstance(shape, VLMShape):
        image = MediaItem(Modality.IMAGE, shape.patches_per_image, shape.merged_per_image)
        text = shape.max_tokens - shape.max_images * shape.merged_per_image
        mb = Microbatch((Document(text_tokens=text, media=(image,) * shape.max_images),))
    else:
        clip = MediaItem(Modality.VIDEO, shape.max_video_tokens)
        mb = Microbatch((Document(text_tokens=shape.max_text_tokens, media=(clip,)),))
    return replace(batch, microbatches=(mb,) * len(batch.microbatches))


def activation_ratio(wl: Workload, planner: Planner, run: dict[str, Any]) -> dict[str, float]:
    """Per baseline the run measured: (measured peak less 4 B per parameter) / SEMU's activation peak over the
    run's iterations, on the rank with the most predicted activation bytes."""
    cfg = run["config"]
    out = {}
    for name in ("1f1b", "interleaved-1f1b", "optimus-coarse"):
        peak = (run["schedules"].get(name) or {}).get("peak_gib_per_rank")
        if not peak:
            continue
        act = [0.0] * wl.parallel.pp
        static = None
        for k in range(cfg["iterations"] + cfg["warmup"]):
            batch = dynamic_batch(wl, seed=cfg["seed"], iteration=k)
            plan = build_baseline_plan(
                name, model=wl.model, parallel=wl.parallel, batch=batch, tensors_dtype="bfloat16"
            )
            sim = planner.simulate_plan(plan, batch)
            static = static_memory(wl.model, wl.parallel, plan.header.placement)
            act = [max(a, float(p) - s.total_bytes) for a, p, s in zip(act, sim.peak_memory_bytes, static, strict=True)]
        assert static is not None
        r = max(range(len(act)), key=act.__getitem__)
        out[name] = round((peak[r] * 2**30 - DEVICE_BYTES_PER_PARAM * static[r].params) / act[r], 2)
    return out


def check(key: str, run_path: Path, iterations: list[int]) -> dict[str, Any]:
    t0 = time.monotonic()
    run = json.loads(run_path.read_text())
    cfg = run["config"]
    wl = SCALED_WORKLOADS[key](microbatches=cfg["microbatches"])
    profiled = SCALED_WORKLOADS[family(key)](microbatches=cfg["microbatches"])  # the model the run's profile timed
    rows = [tuple(r) for r in run["profile"]["rows"]]
    factors = fitted_factors(profiled.model, rows, wl.hardware)  # type: ignore[arg-type]
    config = SearchConfig(compare_baselines=(), max_evaluations=REPLAN_EVALUATIONS, budget_ms=1e9)
    planner = Planner(wl.model, wl.parallel, wl.hardware, factors=factors, config=config)
    part = planner.partition
    static = static_memory(wl.model, wl.parallel, part.placement)
    chunks = {p.name: sum(1 for c in part.placement.chunks if c.pipeline == p.name) for p in part.placement.pipelines}
    out: dict[str, Any] = {
        "workload": wl.name,
        "modules": {
            m.name: {
                "display_name": m.display_name,
                "layers": m.layers,
                "hidden": m.hidden,
                "ffn_hidden": m.ffn_hidden,
                "heads": m.heads,
                "kv_heads": m.kv_heads,
                "params": m.layers * m.block_params() + m.pre_params() + m.post_params(),
            }
            for m in wl.model.modules
        },
        "params": wl.model.total_params(),
        "planning_hardware": wl.hardware.name,
        "planning_memory_gb": wl.hardware.memory_bytes / GB,
        "calibration_run": str(run_path.relative_to(ROOT) if run_path.is_relative_to(ROOT) else run_path),
        "partition": {
            "chunks": chunks,
            "sub_microbatch_size": part.sub_microbatch_size,
            "segments": part.segments,
            "module_time_ms": {k: round(v, 2) for k, v in part.module_time_ms.items()},
        },
        "static_gb_per_rank_semu": [round(s.total_bytes / GB, 2) for s in static],
        "static_gb_per_rank_device": [round(DEVICE_BYTES_PER_PARAM * s.params / GB, 2) for s in static],
        "schedules": {},
    }
    same_model = family(key) == key
    if same_model:
        out["activation_ratio"] = activation_ratio(wl, planner, run)
    # The run's batches as e2e_compare.py draws them: warm-up from later in the trace, then the measured ones.
    warm = [dynamic_batch(wl, seed=cfg["seed"], iteration=cfg["iterations"] + w) for w in range(cfg["warmup"])]
    batches = warm + [dynamic_batch(wl, seed=cfg["seed"], iteration=k) for k in range(cfg["iterations"])]
    shape = VLMShape.of(wl.model, batches) if wl.dataset is DatasetKind.VLM_MIX else T2VShape.of(wl.model, batches)
    measured = {name: {r["i"]: r for r in s.get("rows") or []} for name, s in run["schedules"].items()}
    for name in SCHEDULES:
        entry: dict[str, Any] = {"iterations": [], "predicted_ms": [], "peak_gb": [], "activation_gb": []}
        device_per_action: list[float] = []
        device_per_layer: list[float] = []
        host_per_action: list[float] = []
        host_per_layer: list[float] = []
        busy: list[float] = []
        per_rank: list[list[tuple[float, int]]] = []
        for k in iterations:
            batch = replace(dynamic_batch(wl, seed=cfg["seed"], iteration=k), iteration=cfg["warmup"] + k)
            if name == "pipeweaver":
                plan = planner.plan(batch).plan
            else:
                if name == "torch-interleaved-1f1b":  # our interleaved 1F1B on torch's padded microbatches
                    batch = padded_batch(wl, shape, batch)
                plan = build_baseline_plan(
                    name.removeprefix("torch-"),
                    model=wl.model,
                    parallel=wl.parallel,
                    batch=batch,
                    tensors_dtype="bfloat16",
                )
            sim = planner.simulate_plan(plan, batch, plan.recompute_map())
            plan_static = static_memory(wl.model, wl.parallel, plan.header.placement)
            per_rank = compute_ms(plan, sim.to_rank_timings())
            entry["iterations"].append(k)
            entry["predicted_ms"].append(round(float(sim.makespan_ms), 1))
            entry["peak_gb"].append(round(float(max(sim.peak_memory_bytes)) / GB, 1))
            entry["activation_gb"].append(
                round(
                    max(float(p) - s.total_bytes for p, s in zip(sim.peak_memory_bytes, plan_static, strict=True)) / GB,
                    1,
                )
            )
            device_per_action += [ms for r in per_rank for ms, _ in r]
            device_per_layer += [ms / n for r in per_rank for ms, n in r]
            busy.append(max(sum(ms for ms, _ in r) for r in per_rank) / float(sim.makespan_ms))
            row = measured.get(name, {}).get(k)
            if same_model and row and row.get("host_ms_per_rank") and not name.startswith("torch-"):
                dispatch = row["host_ms_per_rank"]["dispatch"]
                host_per_action += [d / len(r) for d, r in zip(dispatch, per_rank, strict=True) if r]
                host_per_layer += [d / sum(n for _, n in r) for d, r in zip(dispatch, per_rank, strict=True) if r]
        entry["predicted_ms_mean"] = round(statistics.fmean(entry["predicted_ms"]), 1)
        entry["device_ms_per_compute_median"] = round(statistics.median(device_per_action), 2)
        entry["device_ms_per_layer_median"] = round(statistics.median(device_per_layer), 3)
        entry["device_busy_fraction_busiest_rank"] = round(statistics.fmean(busy), 3)
        entry["computes_per_rank_max"] = max(len(r) for r in per_rank)
        if host_per_action:
            entry["measured_host_ms_per_compute_median"] = round(statistics.median(host_per_action), 2)
            entry["measured_host_ms_per_layer_median"] = round(statistics.median(host_per_layer), 3)
        got = [float(measured[name][k]["ms"]) for k in iterations if same_model and k in measured.get(name, {})]
        if got:
            entry["measured_ms_mean"] = round(statistics.fmean(got), 1)
        out["schedules"][name] = entry
    planner.close()
    at_cap = [
        DEVICE_BYTES_PER_PARAM * s.params
        + ACTIVATION_RATIO * max(0.0, wl.hardware.memory_bytes - s.total_bytes)
        + DEVICE_OVERHEAD_BYTES
        for s in static
    ]
    out["device_gb_at_cap_per_rank"] = [round(x / GB, 1) for x in at_cap]
    out["fits_h200_at_cap"] = all(x <= USABLE_H200_BYTES for x in at_cap)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def wall_estimate(
    check: dict[str, Any], schedules: list[str], *, iterations: int, warmup: int, repeat: bool, margin: float
) -> dict[str, Any]:
    """Seconds `e2e_compare.py` needs for `schedules`: per schedule its overhead, warm-up, measured iterations
    (our executor's twice with --repeat) and the traced one (pipeweaver, interleaved-1f1b), at SEMU's mean
    prediction times `margin`, or at the measured mean when the run measured this model (host-bound sizes)."""
    out: dict[str, Any] = {"per_schedule_s": {}}
    for name in schedules:
        s = check["schedules"][name]
        ms = s.get("measured_ms_mean") or margin * s["predicted_ms_mean"]
        runs = warmup + iterations * (2 if repeat and not name.startswith("torch-") else 1)
        runs += 1 if name in ("pipeweaver", "interleaved-1f1b") else 0
        overhead = SCHEDULE_OVERHEAD_S.get(name, OTHER_OVERHEAD_S)
        out["per_schedule_s"][name] = round(overhead + runs * ms / 1e3, 1)
    out["schedules_s"] = round(sum(out["per_schedule_s"].values()), 1)
    out["total_s_needed"] = round(out["schedules_s"] + RUN_FIXED_S + FINAL_RESERVE_S, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="vlm,vlm-large,t2v,t2v-large")
    ap.add_argument("--iterations", type=int, default=30, help="measured iterations of the dynamic trace")
    ap.add_argument("--vlm-run", default=str(ROOT / "benchmarks/results/e2e_compare_run21_h200x4.json"))
    ap.add_argument("--t2v-run", default=str(ROOT / "benchmarks/results/e2e_compare_run22_t2v_h200x4.json"))
    ap.add_argument("--schedules", default="pipeweaver,torch-interleaved-1f1b,optimus-coarse", help="to time")
    ap.add_argument("--margin", type=float, default=1.15, help="on SEMU's predictions in the wall estimate")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    iterations = list(range(args.iterations))
    result: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "workloads": {}}
    for key in args.workloads.split(","):
        wl = SCALED_WORKLOADS[key](microbatches=16)
        run = Path(args.vlm_run if wl.dataset is DatasetKind.VLM_MIX else args.t2v_run)
        res = check(key, run, iterations)
        res["wall"] = wall_estimate(
            res, args.schedules.split(","), iterations=len(iterations), warmup=2, repeat=True, margin=args.margin
        )
        result["workloads"][key] = res
        brief = {k: v for k, v in res.items() if k != "schedules"} | {
            "schedules": {
                n: {k: v for k, v in s.items() if k not in ("iterations", "predicted_ms", "peak_gb", "activation_gb")}
                | {"peak_gb_max": max(s["peak_gb"])}
                for n, s in res["schedules"].items()
            }
        }
        print(json.dumps({key: brief}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

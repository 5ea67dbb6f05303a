"""Would the service's online refits have predicted a measured e2e run better? SEMU replayed on its baselines.

    python benchmarks/gpu/semu_replay.py benchmarks/results/e2e_compare_run13_h200x4.json \\
        --scales-trace benchmarks/results/e2e_traces_run13/pipeweaver_it3.trace.json.gz \\
        --level-trace benchmarks/results/e2e_traces_run13/interleaved-1f1b_it3.trace.json.gz [--out replay.json]

Our executor's baseline plans are a pure function of the batch, so every measured iteration of an
`e2e_compare.py` run can be predicted again on the CPU: the same workload, batches (dynamic trace, seed and
iteration numbers from the run's config), calibration profile (the run's `profile.rows`) and planning hardware.
Three predictors, trained on one traced iteration each:

- ``calibrated``: SEMU with the profile's factors, what the run reported;
- ``+ time scale``: times the measured / predicted makespan of the `--level-trace` iteration (a baseline's, whose
  plan is rebuilt here: the service's makespan refit, `server.jobs.JobState.fold_report`, converged on it);
- ``+ stage scales``: first the per-(module, pass) factors from the `--scales-trace` compute times (PipeWeaver's
  plan: its pipelines are modules), relative to all its computes (what `JobState.fold_stage_timings` converges
  to), then the time scale of the level iteration under those factors.

Each is scored by MAPE against the measured first-run times (``ms``) and, where the run has them, the repeated
ones (``repeat_ms``: shapes already seen, what SEMU models), on every iteration of every baseline schedule except
the level iteration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_semu import fitted_factors
from e2e_workload import SCALED_WORKLOADS
from trace_ratios import kind_ratios

from pipeweaver.datagen import dynamic_batch
from pipeweaver.search.baselines import build_baseline_plan
from pipeweaver.search.planner import Planner, SearchConfig

BASELINES = ("1f1b", "interleaved-1f1b", "optimus-coarse")


def stage_scales_from_trace(path: Path) -> dict[tuple[str, str], float]:
    """Per (module, pass F/B): measured / predicted compute time of that kind over measured / predicted of all
    computes, from a trace's measured and calibrated timelines. Pipelines named after no module (a mixed
    `model` pipeline) are attributed by name only when they are a module; otherwise skipped."""
    rows = kind_ratios(path)
    total_m = sum(r.measured_ms * r.computes for r in rows)
    total_p = sum(r.predicted_ms * r.computes for r in rows)
    level = total_m / total_p
    got: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        module, _, pass_ = r.kind
        key = (module, "F" if pass_ == "F" else "B")
        m, p = got.setdefault(key, [0.0, 0.0])
        got[key] = [m + r.measured_ms * r.computes, p + r.predicted_ms * r.computes]
    return {k: (m / p) / level for k, (m, p) in got.items() if p > 0}


def mape(pairs: list[tuple[float, float]]) -> float:
    return 100.0 * statistics.fmean(abs(p - m) / m for p, m in pairs) if pairs else float("nan")


def replay(run_path: Path, scales_trace: Path, level_trace: Path) -> dict[str, Any]:
    run = json.loads(run_path.read_text())
    cfg = run["config"]
    wl = SCALED_WORKLOADS[cfg.get("workload", "vlm")](microbatches=cfg["microbatches"])
    rows = [tuple(r) for r in run["profile"]["rows"]]
    factors = fitted_factors(wl.model, rows, wl.hardware)  # type: ignore[arg-type]
    batches = [
        replace(dynamic_batch(wl, seed=cfg["seed"], iteration=k), iteration=cfg["warmup"] + k)
        for k in range(cfg["iterations"])
    ]
    train_name = level_trace.name.split("_it")[0]
    train_k = int(level_trace.name.split("_it")[1].split(".")[0])
    if train_name not in BASELINES:
        raise ValueError(f"--level-trace must be a baseline's trace ({', '.join(BASELINES)}), got {train_name}")
    modules = set(wl.model.module_names)
    # A mixed pipeline's computes hold parts of several modules: the trace cannot split them (as the service).
    scales = {k: v for k, v in stage_scales_from_trace(scales_trace).items() if k[0] in modules}
    if not scales:
        raise ValueError(f"{scales_trace} has no pipeline named after a module of {sorted(modules)}")
    config = SearchConfig(compare_baselines=())
    plain = Planner(wl.model, wl.parallel, wl.hardware, factors=factors, config=config)
    scaled = Planner(wl.model, wl.parallel, wl.hardware, factors=factors, config=config, stage_scales=scales)

    def predict(planner: Planner, name: str, k: int) -> float:
        plan = build_baseline_plan(
            name, model=wl.model, parallel=wl.parallel, batch=batches[k], tensors_dtype="bfloat16"
        )
        return float(planner.simulate_plan(plan, batches[k], plan.recompute_map()).makespan_ms)

    measured_train = {r["i"]: r for r in run["schedules"][train_name]["rows"]}[train_k]["ms"]
    level_plain = measured_train / predict(plain, train_name, train_k)
    level_scaled = measured_train / predict(scaled, train_name, train_k)
    out: dict[str, Any] = {
        "run": str(run_path),
        "scales_trace": str(scales_trace),
        "level": {"schedule": train_name, "iteration": train_k, "trace": str(level_trace)},
        "stage_scales": {f"{m}.{p}": round(v, 4) for (m, p), v in sorted(scales.items())},
        "time_scale": {"calibrated": level_plain, "with_stage_scales": level_scaled},
        "schedules": {},
    }
    for name in BASELINES:
        rows_ = run["schedules"].get(name, {}).get("rows") or []
        entry: dict[str, Any] = {"iterations": 0}
        pairs: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for r in rows_:
            k = r["i"]
            if name == train_name and k == train_k:
                continue
            base, with_scales = predict(plain, name, k), predict(scaled, name, k)
            predictions = {
                "calibrated": base,
                "calibrated + time scale": base * level_plain,
                "calibrated + stage scales + time scale": with_scales * level_scaled,
            }
            for what in ("ms", "repeat_ms"):
                if r.get(what):
                    for label, p in predictions.items():
                        pairs.setdefault(what, {}).setdefault(label, []).append((p, float(r[what])))
            entry["iterations"] += 1
        entry["mape_pct"] = {what: {label: mape(v) for label, v in d.items()} for what, d in pairs.items()}
        out["schedules"][name] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--scales-trace", type=Path, required=True, help="PipeWeaver's trace (module pipelines)")
    ap.add_argument("--level-trace", type=Path, required=True, help="a baseline's trace (its plan is rebuilt)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    try:
        result = replay(args.run, args.scales_trace, args.level_trace)
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"semu_replay: {type(e).__name__}: {e}")
    print(f"stage scales (relative, from {args.scales_trace.name}): {result['stage_scales']}")
    print(f"time scale: {result['time_scale']}")
    for name, s in result["schedules"].items():
        for what, d in s["mape_pct"].items():
            cells = ", ".join(f"{label} {v:.1f}%" for label, v in d.items())
            print(f"{name:17s} {what:9s} n={s['iterations']:2d}: {cells}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Does SEMU's error on the GPU runs grow with a plan's action count? Residuals per schedule, beside its actions.

    python benchmarks/gpu/semu_residuals.py \\
        benchmarks/results/e2e_compare_run{17,18_t2v,19_t2v,20_t2v,21}_h200x4.json \\
        [--out benchmarks/results/semu_residuals.json]
    python benchmarks/gpu/semu_residuals.py \\
        benchmarks/results/e2e_compare_run{17,18_t2v,19_t2v,20_t2v,21,22_t2v}_h200x4.json \\
        --input-build-trace benchmarks/results/e2e_traces_run19_t2v/pipeweaver_it3.trace.json.gz \\
        --input-build-trace benchmarks/results/e2e_traces_run22_t2v/pipeweaver_it3.trace.json.gz \\
        --input-build-trace benchmarks/results/e2e_traces_run17/pipeweaver_it3.trace.json.gz \\
        --out benchmarks/results/semu_host_term.json

Our iterations are host-bound on the scaled models (the host waits < 1.3 ms for the device at an iteration's end),
and SEMU has no per-action host cost beyond each operator's dispatch floor. If that missing cost were what SEMU
misses, its error would grow with the actions a rank issues: under-predicted most where the plan has the most
computes and transfers. Per run and schedule: the calibrated prediction the run recorded (`semu` section), the
measured first-run and repeated times, their mean signed residual, and the actions per rank of the plan (our
baselines' plans are a pure function of the microbatch count and the placement: rebuilt here; PipeWeaver's
searched plans are not recorded, so their actions are not counted).

``--input-build-trace`` (one traced iteration per workload, of a run among those given): fits SEMU's input-building
host term (`CostModel.input_build_ms`, `calibration.fit_input_build_ms`) on that trace's forwards, then simulates
every iteration of every schedule of the runs of that workload again, calibrated, without and with the term, and
scores both against the measured first-run times; the trace's own run is marked as not held out. Our baselines'
plans are rebuilt exactly. PipeWeaver's searched plans were not kept, so each of its iterations is planned again
(`SearchConfig.max_evaluations`, deterministic, with the run's profile): `replan_mape_pct` says how far the
re-planned plans' calibrated prediction is from the one the run recorded for the plan that ran, and
`placement_matches_run` whether the re-planned partition is the run's.
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
from trace_ratios import forward_timings

from pipeweaver.datagen import dynamic_batch
from pipeweaver.plan.ir import CommBatch, Compute, Pass, Placement, Plan
from pipeweaver.search.baselines import build_baseline_plan
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.simulator.calibration import fit_input_build_ms, mape
from pipeweaver.spec.batch import BatchMetadata

BASELINES = ("1f1b", "interleaved-1f1b", "optimus-coarse")


def action_counts(name: str, run: dict[str, Any]) -> list[dict[str, int]]:
    """Per rank: forward computes, other computes, posted point-to-point ops of the schedule's plan."""
    cfg = run["config"]
    wl = SCALED_WORKLOADS[cfg.get("workload", "vlm")](microbatches=cfg["microbatches"])
    batch = replace(dynamic_batch(wl, seed=cfg["seed"], iteration=cfg["warmup"]), iteration=cfg["warmup"])
    plan = build_baseline_plan(name, model=wl.model, parallel=wl.parallel, batch=batch, tensors_dtype="bfloat16")
    out = []
    for rank_plan in plan.ranks:
        computes = [a for a in rank_plan.actions if isinstance(a, Compute)]
        forwards = sum(1 for a in computes if a.stage.pass_ is Pass.F)
        ops = sum(len(a.ops) for a in rank_plan.actions if isinstance(a, CommBatch))
        out.append({"forwards": forwards, "other_computes": len(computes) - forwards, "p2p_ops": ops})
    return out


def residuals(path: Path) -> dict[str, Any]:
    run = json.loads(path.read_text())
    warmup = run["config"]["warmup"]
    out: dict[str, Any] = {}
    for name, semu in run["semu"]["schedules"].items():
        rows = {r["i"]: r for r in run["schedules"][name].get("rows") or []}
        pairs = [
            (float(c), rows[it - warmup])
            for it, c in zip(semu["iterations"], semu["calibrated_ms"], strict=True)
            if it - warmup in rows
        ]
        if not pairs:
            continue
        entry: dict[str, Any] = {"iterations": len(pairs), "predicted_ms": statistics.fmean(p for p, _ in pairs)}
        for what in ("ms", "repeat_ms"):
            got = [(p, float(r[what])) for p, r in pairs if r.get(what)]
            if got:
                entry[f"measured_{what}"] = statistics.fmean(m for _, m in got)
                entry[f"residual_pct_{what}"] = 100 * statistics.fmean((m - p) / m for p, m in got)
        if name in BASELINES:
            entry["actions_per_rank"] = action_counts(name, run)
        out[name] = entry
    return out


REPLAN_EVALUATIONS = 30
"""Rollouts per re-planned PipeWeaver iteration: deterministic, and its plans' calibrated predictions stay
within a few percent of the recorded ones (`replan_mape_pct`)."""


class _Run:
    """One e2e run's workload, calibrated planners (without and with an input-building term) and batches."""

    def __init__(self, path: Path, input_build_ms: dict[str, float] | None = None) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text())
        cfg = self.data["config"]
        self.workload = str(cfg.get("workload", "vlm"))
        self.wl = SCALED_WORKLOADS[self.workload](microbatches=cfg["microbatches"])
        rows = [tuple(r) for r in self.data["profile"]["rows"]]
        factors = fitted_factors(self.wl.model, rows, self.wl.hardware)  # type: ignore[arg-type]
        config = SearchConfig(compare_baselines=(), max_evaluations=REPLAN_EVALUATIONS, budget_ms=1e9)
        model, parallel = self.wl.model, self.wl.parallel
        self.plain = Planner(model, parallel, self.wl.hardware, factors=factors, config=config)
        self.built = Planner(
            model, parallel, self.wl.hardware, factors=factors, config=config, input_build_ms=input_build_ms
        )
        self.warmup = int(cfg["warmup"])
        self.seed = int(cfg["seed"])

    def batch(self, k: int) -> BatchMetadata:
        return replace(dynamic_batch(self.wl, seed=self.seed, iteration=k), iteration=self.warmup + k)

    def plan(self, name: str, k: int) -> Plan:
        """The plan schedule `name` ran on measured iteration k: rebuilt (baselines) or searched again."""
        if name == "pipeweaver":
            return self.plain.plan(self.batch(k)).plan
        return build_baseline_plan(
            name, model=self.wl.model, parallel=self.wl.parallel, batch=self.batch(k), tensors_dtype="bfloat16"
        )

    def placement(self, name: str) -> Placement:
        return self.plan(name, 0).header.placement if name != "pipeweaver" else self.plain.partition.placement

    def placement_matches_run(self) -> bool | None:
        recorded = (self.data["schedules"].get("pipeweaver", {}).get("service") or {}).get("placement")
        if recorded is None:
            return None
        ours = [
            [c.pipeline, c.index, c.rank, [repr(r) for r in c.layers]] for c in self.plain.partition.placement.chunks
        ]
        return bool(ours == recorded)


def _run_key(path: Path) -> str:
    """`e2e_compare_run19_t2v_h200x4.json` and `e2e_traces_run19_t2v/...` -> `run19_t2v`."""
    if path.name.startswith("e2e_compare_"):
        return path.name.removeprefix("e2e_compare_").rsplit("_", 1)[0]
    return path.parent.name.removeprefix("e2e_traces_")


def _mape_pct(pairs: list[tuple[float, float]]) -> float:
    """MAPE in percent over (predicted, measured) pairs."""
    return 100 * mape([p for p, _ in pairs], [m for _, m in pairs])


def _signed_pct(pairs: list[tuple[float, float]]) -> float:
    """Mean signed (measured - predicted) / measured in percent: positive when SEMU under-predicts."""
    return 100 * statistics.fmean((m - p) / m for p, m in pairs)


def rescore(path: Path, input_build_ms: dict[str, float]) -> dict[str, Any]:
    """Per schedule run with our executor: calibrated SEMU's MAPE (and mean signed residual) against the measured
    first-run times, without and with the term, every iteration simulated again."""
    run = _Run(path, input_build_ms)
    recorded = run.data["semu"]["schedules"]
    out: dict[str, Any] = {}
    for name, schedule in run.data["schedules"].items():
        rows = schedule.get("rows") or []
        if name.startswith("torch") or not rows:
            continue
        before: list[tuple[float, float]] = []
        after: list[tuple[float, float]] = []
        replan: list[tuple[float, float]] = []
        record = recorded.get(name, {})
        recorded_ms = dict(zip(record.get("iterations", []), record.get("calibrated_ms", []), strict=True))
        for r in rows:
            k, measured = int(r["i"]), float(r["ms"])
            plan, batch = run.plan(name, k), run.batch(k)
            recompute = plan.recompute_map()
            plain = run.plain.simulate_plan(plan, batch, recompute).makespan_ms
            before.append((plain, measured))
            after.append((run.built.simulate_plan(plan, batch, recompute).makespan_ms, measured))
            if name == "pipeweaver" and run.warmup + k in recorded_ms:
                replan.append((plain, float(recorded_ms[run.warmup + k])))
        entry: dict[str, Any] = {
            "iterations": len(rows),
            "mape_pct": {"calibrated": _mape_pct(before), "calibrated + input build": _mape_pct(after)},
            "mean_signed_pct": {"calibrated": _signed_pct(before), "calibrated + input build": _signed_pct(after)},
        }
        if name == "pipeweaver":
            entry["replan_mape_pct"] = _mape_pct(replan) if replan else None
            entry["placement_matches_run"] = run.placement_matches_run()
        out[name] = entry
    return out


def input_build_scores(runs: list[Path], traces: list[Path]) -> dict[str, Any]:
    by_key = {_run_key(p): p for p in runs}
    out: dict[str, Any] = {"replan_evaluations": REPLAN_EVALUATIONS, "fits": []}
    for trace in traces:
        source = by_key.get(_run_key(trace))
        if source is None:
            raise ValueError(f"{trace} belongs to run '{_run_key(trace)}', which is not among the runs given")
        source_run = _Run(source)
        workload = source_run.workload
        # Fitted on the forwards of the traced schedule's placement (the trace is `<schedule>_it<k>...`).
        build = fit_input_build_ms(forward_timings(trace, source_run.placement(trace.name.split("_it")[0])))
        fit: dict[str, Any] = {"trace": str(trace), "workload": workload, "input_build_ms": build, "runs": {}}
        for path in runs:
            if json.loads(path.read_text())["config"].get("workload", "vlm") != workload:
                continue
            fit["runs"][path.name] = {"held_out": path != source, "schedules": rescore(path, build)}
        out["fits"].append(fit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--input-build-trace",
        type=Path,
        action="append",
        default=[],
        help="fit the input-building host term on this trace (one per workload) and score it on the runs",
    )
    args = ap.parse_args()
    try:
        result: dict[str, Any] = {p.name: residuals(p) for p in args.runs}
        if args.input_build_trace:
            result = {"residuals": result, "input_build": input_build_scores(args.runs, args.input_build_trace)}
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"semu_residuals: {type(e).__name__}: {e}")
    for run_name, schedules in result.get("residuals", result).items():
        for name, e in schedules.items():
            acts = e.get("actions_per_rank")
            busiest = (
                max((a["forwards"] + a["other_computes"] + a["p2p_ops"] for a in acts), default=0) if acts else "-"
            )
            cells = ", ".join(
                f"{what} {e['measured_' + what]:.0f} ({e['residual_pct_' + what]:+.1f}%)"
                for what in ("ms", "repeat_ms")
                if "measured_" + what in e
            )
            print(f"{run_name:36s} {name:17s} predicted {e['predicted_ms']:7.0f}  measured {cells}  actions {busiest}")
    for fit in result.get("input_build", {}).get("fits", []):
        terms = ", ".join(f"{m} {ms:.2f} ms" for m, ms in fit["input_build_ms"].items())
        print(f"input build fitted on {fit['trace']}: {terms} per sub-microbatch")
        for run_name, r in fit["runs"].items():
            for name, e in r["schedules"].items():
                mape, signed = e["mape_pct"], e["mean_signed_pct"]
                held = "held out" if r["held_out"] else "fit run "
                replan = (
                    f"  (re-planned: {e['replan_mape_pct']:.1f}% from recorded)" if e.get("replan_mape_pct") else ""
                )
                print(
                    f"  {run_name:36s} {held} {name:17s} MAPE {mape['calibrated']:5.1f}% -> "
                    f"{mape['calibrated + input build']:5.1f}%  signed {signed['calibrated']:+6.1f}% -> "
                    f"{signed['calibrated + input build']:+6.1f}%{replan}"
                )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

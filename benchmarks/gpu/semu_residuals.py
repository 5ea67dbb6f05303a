"""Does SEMU's error on the GPU runs grow with a plan's action count? Residuals per schedule, beside its actions.

    python benchmarks/gpu/semu_residuals.py \\
        benchmarks/results/e2e_compare_run{17,18_t2v,19_t2v,20_t2v,21}_h200x4.json \\
        [--out benchmarks/results/semu_residuals.json]

Our iterations are host-bound on the scaled models (the host waits < 1.3 ms for the device at an iteration's end),
and SEMU has no per-action host cost beyond each operator's dispatch floor. If that missing cost were what SEMU
misses, its error would grow with the actions a rank issues: under-predicted most where the plan has the most
computes and transfers. Per run and schedule: the calibrated prediction the run recorded (`semu` section), the
measured first-run and repeated times, their mean signed residual, and the actions per rank of the plan (our
baselines' plans are a pure function of the microbatch count and the placement: rebuilt here; PipeWeaver's
searched plans are not recorded, so their actions are not counted).
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

from e2e_workload import SCALED_WORKLOADS

from pipeweaver.datagen import dynamic_batch
from pipeweaver.plan.ir import CommBatch, Compute, Pass
from pipeweaver.search.baselines import build_baseline_plan

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    try:
        result = {p.name: residuals(p) for p in args.runs}
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"semu_residuals: {type(e).__name__}: {e}")
    for run_name, schedules in result.items():
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
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

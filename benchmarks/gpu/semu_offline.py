"""SEMU against committed e2e runs, on the CPU: online refits of its predictions, and the partition per profile.

    python benchmarks/gpu/semu_offline.py refit \
        benchmarks/results/e2e_compare_run{17,18_t2v,19_t2v,20_t2v,21}_h200x4.json
    python benchmarks/gpu/semu_offline.py partition benchmarks/results/e2e_compare_run*_h200x4.json

``refit``: per schedule of each run, the MAPE of SEMU's calibrated prediction (what the run recorded in its
``semu`` section) against the measured first-run times, and of two online refits of it that see each iteration's
measured time two iterations later (the plan for k + 1 is made while k runs; k's report comes at its end):
``scale`` (an EWMA of measured / predicted, as the service's `JobState.fold_report`) and ``affine`` (measured =
a * predicted + b, least squares weighted by the same decay, after 4 iterations; a scale before).

``partition``: the offline partitioner on each run's calibration profile (its ``profile.rows``): each module's
time relative to the fastest and the K_i it gets (K_i = floor of that ratio, capped at layers / pp).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_semu import fitted_factors
from e2e_workload import SCALED_WORKLOADS

LAG = 2
ALPHA = 0.3
AFFINE_AFTER = 4
RATIO_RANGE = (0.25, 4.0)


def _scale(past: list[tuple[float, float]]) -> float:
    s = 1.0
    for predicted, measured in past:
        s = (1 - ALPHA) * s + ALPHA * min(max(measured / predicted, RATIO_RANGE[0]), RATIO_RANGE[1])
    return s


def _affine(past: list[tuple[float, float]]) -> tuple[float, float]:
    if len(past) < AFFINE_AFTER:
        return _scale(past), 0.0
    w = np.sqrt([(1 - ALPHA) ** (len(past) - 1 - i) for i in range(len(past))])
    x = np.array([[p, 1.0] for p, _ in past]) * w[:, None]
    y = np.array([m for _, m in past]) * w
    a, b = np.linalg.lstsq(x, y, rcond=None)[0]
    if not RATIO_RANGE[0] < a < RATIO_RANGE[1]:
        return _scale(past), 0.0
    return float(a), float(b)


def _mape(predicted: list[float], measured: list[float]) -> float:
    p, m = np.array(predicted), np.array(measured)
    return round(float(100 * np.mean(np.abs(p - m) / m)), 1)


def refit(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    warmup = run["config"]["warmup"]
    for name, semu in run["semu"]["schedules"].items():
        rows = {r["i"]: r for r in run["schedules"][name].get("rows") or []}
        pairs = [
            (float(c), float(rows[it - warmup]["ms"]))
            for it, c in zip(semu["iterations"], semu["calibrated_ms"], strict=True)
            if it - warmup in rows
        ]
        if not pairs:
            continue
        measured = [m for _, m in pairs]
        scaled, affine = [], []
        for k, (predicted, _) in enumerate(pairs):
            past = pairs[: max(0, k - LAG + 1)]
            scaled.append(_scale(past) * predicted)
            a, b = _affine(past)
            affine.append(a * predicted + b)
        out[name] = {
            "iterations": len(pairs),
            "mape_pct": {
                "calibrated": _mape([p for p, _ in pairs], measured),
                "scale": _mape(scaled, measured),
                "affine": _mape(affine, measured),
            },
        }
    return out


def partition(run: dict[str, Any]) -> dict[str, Any] | None:
    from pipeweaver.search.planner import Planner, SearchConfig

    cfg = run.get("config", {})
    rows = run.get("profile", {}).get("rows")
    if not rows:
        return None
    wl = SCALED_WORKLOADS[cfg.get("workload", "vlm")](microbatches=cfg["microbatches"])
    factors = fitted_factors(wl.model, [tuple(r) for r in rows], wl.hardware)  # type: ignore[arg-type]
    config = SearchConfig(compare_baselines=())
    part = Planner(wl.model, wl.parallel, wl.hardware, factors=factors, config=config).partition
    fastest = min(part.module_time_ms.values())
    return {
        "time_ratio": {m: round(t / fastest, 3) for m, t in part.module_time_ms.items()},
        "segments": dict(part.segments),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["refit", "partition"])
    ap.add_argument("runs", nargs="+", type=Path)
    a = ap.parse_args()
    result: dict[str, Any] = {}
    for path in a.runs:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"semu_offline: {path}: {e}")
        got = refit(run) if a.what == "refit" else partition(run)
        if got:
            result[path.name] = got
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

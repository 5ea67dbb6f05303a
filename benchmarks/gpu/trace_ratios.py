"""Measured against SEMU per stage kind, from one e2e trace: where the cost model is off, and by how much.

    python benchmarks/gpu/trace_ratios.py benchmarks/results/e2e_traces_run13/pipeweaver_it3.trace.json.gz

An `e2e_compare.py` trace holds one iteration three times: measured (CUDA events around every action), SEMU
calibrated and SEMU uncalibrated. For each (module, chunk, pass) this prints the mean measured and predicted time
of a compute and their ratio, per stage kind rather than per iteration: an iteration's error mixes every kind's
error with the schedule's, a kind's ratio says which calibration input is wrong (on the scaled VLM of run 13, a
decoder chunk's forward measured 1.6-1.9x its prediction and its backward 0.75-0.89x, while ViT chunks were within
15%: see docs/gpu.md section 6).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeweaver.plan.ir import Placement
from pipeweaver.simulator.calibration import ForwardTiming

StageKind = tuple[str, int, str]
"""(module or pipeline, chunk index, pass)."""


@dataclass(frozen=True, slots=True)
class KindRatio:
    kind: StageKind
    computes: int
    measured_ms: float
    """Mean measured time of one compute of this kind."""
    predicted_ms: float
    """Mean SEMU time of one compute of this kind (the trace's `semu_<which>` timeline)."""

    @property
    def ratio(self) -> float:
        return self.measured_ms / self.predicted_ms if self.predicted_ms > 0 else float("nan")


def _load(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events: list[dict[str, Any]] = trace["traceEvents"] if isinstance(trace, dict) else trace
    return events


def kind_ratios(path: Path, which: str = "semu_calibrated") -> list[KindRatio]:
    """Per stage kind, the measured timeline's mean compute time against the `which` timeline's."""
    events = _load(path)
    timeline = {e["pid"]: e["args"]["name"].rsplit(" rank", 1)[0] for e in events if e.get("name") == "process_name"}
    if which not in set(timeline.values()):
        raise ValueError(f"{path} has no '{which}' timeline; it has {sorted(set(timeline.values()))}")
    total: dict[tuple[str, StageKind], float] = defaultdict(float)
    count: dict[tuple[str, StageKind], int] = defaultdict(int)
    for e in events:
        if e.get("ph") != "X" or e.get("tid") != 0:  # thread 0: computes (1: transfers)
            continue
        a = e["args"]
        key = (timeline[e["pid"]], (str(a["pipeline"]), int(a["chunk"]), str(a["pass"])))
        total[key] += float(e["dur"]) / 1e3
        count[key] += 1
    out = []
    for kind in sorted({k for t, k in count if t == "measured"}):
        m, p = ("measured", kind), (which, kind)
        if count.get(p):
            out.append(KindRatio(kind, count[m], total[m] / count[m], total[p] / count[p]))
    return out


def forward_timings(path: Path, placement: Placement, which: str = "semu_calibrated") -> list[ForwardTiming]:
    """Every forward of the trace's measured timeline beside the `which` timeline's, for
    `calibration.fit_input_build_ms`: chunks of one module only (a mixed chunk's time cannot be split between its
    modules); `placement` is the traced plan's."""
    events = _load(path)
    timeline = {e["pid"]: e["args"]["name"].rsplit(" rank", 1)[0] for e in events if e.get("name") == "process_name"}
    chunks = {(c.pipeline, c.index): c for c in placement.chunks}
    got: dict[tuple[str, int, int, int], dict[str, float]] = defaultdict(dict)
    for e in events:
        a = e.get("args") or {}
        if e.get("ph") != "X" or e.get("tid") != 0 or a.get("pass") != "F":
            continue
        unit = (str(a["pipeline"]), int(a["chunk"]), int(a["microbatch"]), int(a["sub_microbatch"]))
        got[unit][timeline[e["pid"]]] = float(e["dur"]) / 1e3
    out = []
    for (pipeline, chunk, _, _), times in sorted(got.items()):
        c = chunks.get((pipeline, chunk))
        if c is None:
            raise ValueError(f"{path}: chunk {chunk} of pipeline '{pipeline}' is not in the placement given")
        if len({r.module for r in c.layers}) != 1 or "measured" not in times or which not in times:
            continue
        first = c.layers[0]
        out.append(ForwardTiming(first.module, first.start == 0, times["measured"], times[which]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--against", default="semu_calibrated", choices=["semu_calibrated", "semu_uncalibrated"])
    args = ap.parse_args()
    try:
        rows = kind_ratios(args.trace, args.against)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"trace_ratios: {e}")
    print(f"{'module':>14} {'chunk':>5} pass {'n':>4} {'measured ms':>12} {'SEMU ms':>9} {'ratio':>6}")
    for r in rows:
        module, chunk, pass_ = r.kind
        times = f"{r.measured_ms:12.2f} {r.predicted_ms:9.2f} {r.ratio:6.2f}"
        print(f"{module:>14} {chunk:5d} {pass_:>4} {r.computes:4d} {times}")


if __name__ == "__main__":
    main()

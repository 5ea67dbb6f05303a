"""How long a planned schedule holds activations, against what the lower bound's memory argument charges (CPU).

    .venv/bin/python benchmarks/bench_pair_lifetimes.py [--workload t2v-s] [--batches 2] [--out FILE]

The bound's memory-time argument (`pipeweaver.search.bounds`, argument 3) charges every stage pair its dependency
chain as lifetime: the forward, the longest path through the downstream stages to its freeing pass, and that pass.
Per rank it compares sum(bytes x lifetime) / budget with the makespan. This benchmark plans i.i.d. batches of the
workload (seed 0, 700 ms, the H800 model) and reports, per rank and per (pipeline, chunk), in seconds of a full
budget:

- ``chain_area_s``: sum over the pairs of their bytes without recompute x their chain, / the rank's budget (what
  the bound uses, at the strategy that holds most);
- ``held_area_s``: the same bytes x the lifetime the planned schedule gives them (forward start to freeing-pass end
  in SEMU's timeline): what the schedule would need without any recompute;
- ``lifetime_ratio``: held / chain.

Where ``held_area_s`` exceeds the makespan, the schedule cannot run without recompute (the plan's memory programs
bought it), while the bound, seeing only ``chain_area_s``, charges none.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeweaver.datagen import sample_batch
from pipeweaver.plan.ir import Compute, PlanSource, Recompute
from pipeweaver.presets import workload
from pipeweaver.search import bounds
from pipeweaver.search.planner import Planner


def lifetimes(planner: Planner, batch: Any) -> dict[str, Any]:
    result = planner.plan(batch, budget_ms=700)
    sim = result.simulation
    assert sim is not None
    header = planner.header_for(batch, job_id="", source=PlanSource.SEARCH, schedule="pipeweaver")
    prep = planner._prepare(batch, header, Recompute.NONE)  # the bound's problem, without recompute
    p = prep.problem
    pairs = bounds._pairs(p)
    f, fr = pairs.forward, pairs.free
    d = p.duration_ms
    gap = bounds._pair_paths_kernel(bounds._order(p), d, p.pred_ptr, p.pred_idx, p.pred_delay_ms, f, fr)
    chain = np.where(fr == f, d[f], gap + d[fr])
    held = p.alloc_bytes[f]
    budget = planner._device_budget_bytes()
    window: dict[Any, tuple[float, float]] = {}
    for r, rp in enumerate(result.plan.ranks):
        for action, s, e in zip(rp.actions, sim.start_ms[r], sim.end_ms[r], strict=True):
            if isinstance(action, Compute):
                window[action.stage] = (float(s), float(e))
    ranks = []
    for r in range(p.pp):
        per: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for k in np.flatnonzero(p.rank[f] == r):
            first, last = p.stages[f[k]], p.stages[fr[k]]
            actual = window[last][1] - window[first][0]
            row = per[(first.pipeline, first.chunk)]
            row[0] += 1
            row[1] += float(held[k] * chain[k] / budget[r]) / 1e3
            row[2] += float(held[k] * actual / budget[r]) / 1e3
        chain_s = float(sum(v[1] for v in per.values()))
        held_s = float(sum(v[2] for v in per.values()))
        ranks.append(
            {
                "rank": r,
                "busy_s": round(float(sim.busy_ms[r]) / 1e3, 2),
                "chain_area_s": round(chain_s, 2),
                "held_area_s": round(held_s, 2),
                "lifetime_ratio": round(held_s / chain_s, 2) if chain_s else None,
                "chunks": [
                    {
                        "pipeline": key[0],
                        "chunk": key[1],
                        "pairs": int(v[0]),
                        "chain_area_s": round(v[1], 2),
                        "held_area_s": round(v[2], 2),
                        "lifetime_ratio": round(v[2] / v[1], 2) if v[1] else None,
                    }
                    for key, v in sorted(per.items())
                ],
            }
        )
    return {
        "iteration": batch.iteration,
        "predicted_s": round(result.predicted_ms / 1e3, 2),
        "lower_bound_s": round(result.lower_bound_ms / 1e3, 2),
        "ranks": ranks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="t2v-s")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    w = workload(args.workload)
    planner = Planner(w.model, w.parallel, w.hardware)
    rows = []
    for i in range(args.batches):
        row = lifetimes(planner, sample_batch(w, seed=0, iteration=i))
        rows.append(row)
        brief = [(x["rank"], x["busy_s"], float(x["chain_area_s"]), float(x["held_area_s"])) for x in row["ranks"]]
        print(
            f"batch {i}: predicted {row['predicted_s']} s, bound {row['lower_bound_s']} s; "
            f"(rank, busy, chain area, held area) s: {brief}",
            file=sys.stderr,
        )
    out = {"benchmark": "pair_lifetimes", "workload": args.workload, "budget_ms": 700, "batches": rows}
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()

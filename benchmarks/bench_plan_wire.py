"""A searched plan on the wire, as `Action` messages and packed (`PackedActions`): bytes per rank, and the time to
encode the whole plan (the worker, on every plan's way out), to parse a rank's bytes and to decode them to the
plan IR (the trainer). Best of `--repeats` on the same plan, one after the other in one process.

    .venv/bin/python benchmarks/bench_plan_wire.py [--workload vlm-s] [--budget-ms 300] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pipeweaver import wire
from pipeweaver.datagen import sample_batch
from pipeweaver.plan.ir import Plan, RankPlan
from pipeweaver.presets import workload
from pipeweaver.search.planner import Planner, SearchConfig
from pipeweaver.server.work import EncodedPlan
from pipeweaver.v1 import planner_pb2 as pb


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(best * 1e3, 3)


def encode(plan: Plan, packed: bool) -> EncodedPlan:
    return EncodedPlan.of(wire.plan_to_proto(plan, packed=packed))


def decode(data: bytes) -> RankPlan:
    return wire.rank_plan_from_proto(pb.RankPlan.FromString(data))


def measure(name: str, budget_ms: float, repeats: int) -> dict[str, Any]:
    w = workload(name)
    planner = Planner(w.model, w.parallel, w.hardware, config=SearchConfig(budget_ms=budget_ms, compare_baselines=()))
    plan = planner.plan(sample_batch(w, seed=0, iteration=0)).plan
    out: dict[str, Any] = {"actions_per_rank": [len(rp.actions) for rp in plan.ranks]}
    for form, packed in (("actions", False), ("packed", True)):
        lean = EncodedPlan.of(wire.plan_to_proto(plan, packed=packed)).lean  # a rank's answer without its times
        out[form] = {
            "bytes_per_rank": [len(b) for b in lean],
            "encode_plan_ms": best_ms(partial(encode, plan, packed), repeats),
            "parse_rank_ms": [best_ms(partial(pb.RankPlan.FromString, b), repeats) for b in lean],
            "decode_rank_ms": [best_ms(partial(decode, b), repeats) for b in lean],
        }
        assert [decode(b).actions for b in lean] == [rp.actions for rp in plan.ranks]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="vlm-s,t2v-s")
    parser.add_argument("--budget-ms", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {
        "command": "python benchmarks/bench_plan_wire.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "workloads": {name: measure(name, args.budget_ms, args.repeats) for name in args.workloads.split(",")},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

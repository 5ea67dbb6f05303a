"""Rotary tables for one microbatch: computed at its positions (`rope_tables`) against gathered from the shared
table (`shared_rope_tables`, what `TextGeometry.rope_tables` does): top-level operators issued and host time per call.

    .venv/bin/python benchmarks/bench_rope_table.py [--head-dim 128] [--documents 300,500,224] [--calls 2000]

On a GPU every operator is a kernel launch, and on host-bound ranks (small microbatches, docs/gpu.md section 11)
launches are the iteration's critical path; on the CPU the table also saves the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from pipeweaver.client.geometry import rope_tables, shared_rope_tables


def top_level_ops(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None)


def us_per_call(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--documents", default="300,500,224", help="document lengths of the microbatch")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spans = [int(n) for n in args.documents.split(",")]
    positions = torch.cat([torch.arange(n) for n in spans])
    longest = max(spans)

    def computed() -> object:
        return rope_tables(positions, args.head_dim, torch.bfloat16)

    def gathered() -> object:
        return shared_rope_tables(positions, longest, args.head_dim, torch.bfloat16)

    gathered()  # the table is built once per process
    report = {
        "tokens": len(positions),
        "head_dim": args.head_dim,
        "device": "cpu",
        "top_level_ops": {"computed": top_level_ops(computed), "gathered": top_level_ops(gathered)},
        "host_us_per_call": {
            "computed": round(us_per_call(computed, args.calls), 1),
            "gathered": round(us_per_call(gathered, args.calls), 1),
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

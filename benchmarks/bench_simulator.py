"""SEMU event-simulation speed on a VLM-L-sized plan: simulated actions per second, numba vs pure Python.

The plan: VLM-L (ViT 22B + Qwen2 72B) in its modular placement at pp 8, 64 microbatches of a few images
each, ordered like Megatron's interleaved 1F1B with the ViT and LLM pipelines as each rank's two virtual
chunks.
Stage costs are synthetic (proportional to layer parameters x tokens); only their shape matters for speed.

    .venv/bin/python benchmarks/bench_simulator.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from pipeweaver import presets
from pipeweaver.plan import (
    Compute,
    Pass,
    Plan,
    PlanHeader,
    StageKey,
    TransferShapes,
    assemble_plan,
    stage_graph,
)
from pipeweaver.plan.layouts import modular_placement, whole_sub_microbatches
from pipeweaver.simulator.engine import LinkModel, StageCosts, flatten, simulate
from pipeweaver.simulator.sim_kernel import run_numba, run_reference
from pipeweaver.spec import (
    BatchMetadata,
    Document,
    MediaItem,
    Microbatch,
    Modality,
    ModelSpec,
    module_instances,
)

PP, MICROBATCHES = 8, 64


def synthetic_batch(seed: int = 0) -> BatchMetadata:
    """64 microbatches of 2-4 documents with 1-2 images (2,704 patches, 169 merged tokens) each."""
    rng = random.Random(seed)
    mbs = []
    for _ in range(MICROBATCHES):
        docs = []
        for _ in range(rng.randint(2, 4)):
            images = tuple(MediaItem(Modality.IMAGE, 2704, 169) for _ in range(rng.randint(1, 2)))
            docs.append(Document(rng.randint(64, 1500), images))
        mbs.append(Microbatch(tuple(docs)))
    return BatchMetadata(iteration=0, microbatches=tuple(mbs))


def interleaved_orders(header: PlanHeader, pipelines: tuple[str, ...]) -> list[list[Compute]]:
    """Megatron's interleaved 1F1B where virtual chunk i of rank r is chunk r of pipeline i."""
    p, v, m = PP, len(pipelines), MICROBATCHES
    total = m * v

    def unit(k: int, forward: bool, r: int) -> Compute:
        group, in_group = divmod(k, p * v)
        local = in_group // p
        if not forward:
            local = v - 1 - local
        pass_ = Pass.F if forward else Pass.B
        return Compute(StageKey(pipelines[local], r, group * p + in_group % p, 0, pass_))

    orders = []
    for r in range(p):
        warm = min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [unit(k, True, r) for k in range(warm)]
        for k in range(total - warm):
            order += [unit(k + warm, True, r), unit(k, False, r)]
        order += [unit(k, False, r) for k in range(total - warm, total)]
        orders.append(order)
    return orders


def synthetic_costs(model: ModelSpec, header: PlanHeader, batch: BatchMetadata, tp: int) -> StageCosts:
    """Forward ~ 2 * params * tokens at 40% of H800 peak per TP rank; backward twice that."""
    chunks = {(c.pipeline, c.index): c for c in header.placement.chunks}
    subs = {(s.pipeline, s.microbatch, s.index): s for s in header.sub_microbatches}
    compute: dict[StageKey, float] = {}
    act: dict[StageKey, float] = {}
    for s in stage_graph(header).stages:
        chunk = chunks[(s.pipeline, s.chunk)]
        sub = subs[(s.pipeline, s.microbatch, s.sub)]
        ms = 0.0
        bytes_ = 0.0
        for rng in chunk.layers:
            module = model.module(rng.module)
            instances = module_instances(model, rng.module, batch.microbatches[s.microbatch])
            tokens = sum(instances[i].tokens for i in sub.instances_of(rng.module))
            layers = rng.stop - rng.start
            ms += 2 * module.block_params() * tokens * layers / tp / (0.4 * 989e12) * 1e3
            bytes_ += 34 * tokens * module.hidden * layers / tp
        compute[s] = ms if s.pass_ is Pass.F else 2 * ms
        if s.pass_ is Pass.F:
            act[s] = bytes_
    return StageCosts(compute_ms=compute, act_bytes=act, static_bytes=(40e9,) * PP)


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50, help="timed numba kernel runs (python: 1/10)")
    args = parser.parse_args()

    workload = presets.workload("vlm-l")
    model, parallel = workload.model, workload.parallel
    batch = synthetic_batch()
    placement = modular_placement(model, PP)
    header = PlanHeader(
        job_id="bench",
        iteration=0,
        placement=placement,
        sub_microbatches=whole_sub_microbatches(model, placement, batch),
        num_microbatches=MICROBATCHES,
        schedule="interleaved-1f1b",
    )
    shapes = TransferShapes(model, batch, header, dtype="bfloat16")
    plan: Plan = assemble_plan(header, interleaved_orders(header, model.module_names), shapes.tensors)
    costs = synthetic_costs(model, header, batch, parallel.tp)
    link = LinkModel.from_specs(workload.hardware, parallel)

    flat = flatten(plan, costs, link)
    t0 = time.perf_counter()
    run_numba(flat)  # compiles, or loads numba's on-disk cache
    first_call_s = time.perf_counter() - t0
    slow_repeat = max(1, args.repeat // 10)
    flatten_s = best_of(lambda: flatten(plan, costs, link), slow_repeat)
    kernel_numba_s = best_of(lambda: run_numba(flat), args.repeat)
    kernel_python_s = best_of(lambda: run_reference(flat), slow_repeat)
    simulate_numba_s = best_of(lambda: simulate(plan, costs, link=link, use_numba=True), slow_repeat)
    simulate_python_s = best_of(lambda: simulate(plan, costs, link=link, use_numba=False), slow_repeat)

    res = simulate(plan, costs, link=link)
    n = flat.num_actions
    print(
        json.dumps(
            {
                "plan": {
                    "workload": "vlm-l",
                    "pp": PP,
                    "microbatches": MICROBATCHES,
                    "actions": n,
                    "computes": sum(1 for rp in plan.ranks for a in rp.actions if isinstance(a, Compute)),
                    "transfers": int(flat.transfer_ms.shape[0]),
                    "makespan_ms": round(res.makespan_ms, 3),
                    "bubble_fraction": round(res.bubble_fraction, 4),
                },
                "numba_first_call_s": round(first_call_s, 4),
                "seconds": {
                    "flatten": flatten_s,
                    "kernel_numba": kernel_numba_s,
                    "kernel_python": kernel_python_s,
                    "simulate_numba": simulate_numba_s,
                    "simulate_python": simulate_python_s,
                },
                "actions_per_s": {
                    "kernel_numba": round(n / kernel_numba_s),
                    "kernel_python": round(n / kernel_python_s),
                    "simulate_numba": round(n / simulate_numba_s),
                    "simulate_python": round(n / simulate_python_s),
                },
                "kernel_speedup": round(kernel_python_s / kernel_numba_s, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

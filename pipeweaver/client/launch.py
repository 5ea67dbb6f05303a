"""Run a workload's plans on real ranks: ``torchrun --nproc-per-node N -m pipeweaver.client.launch ...``.

NCCL when CUDA is available (one GPU per local rank), gloo otherwise. World size = pp x dp: pipeline ranks are
consecutive, replicas take the next block. Every rank builds the same plan from the batch metadata (a baseline,
or the static fallback) from the batch metadata; with ``--schedule pipeweaver`` pipeline rank 0 searches and
broadcasts its plan, and every rank falls back together if it is missing or invalid. Rank 0 prints one JSON line
per iteration. ``--check`` compares the first iteration's loss and gradients with the unpipelined
reference on rank 0 (float32 only; keep it to the tiny models).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from pipeweaver.client.cuda_env import prepare_cuda_for_dynamic_pipelines
from pipeweaver.client.executor import PipelineExecutor
from pipeweaver.plan.ir import Placement, Plan
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.workload import Workload

PlanFn = Callable[[BatchMetadata], Plan]


def _plans(workload: Workload, schedule: str, dtype: str, budget_ms: float) -> tuple[Placement, PlanFn, PlanFn]:
    """(static placement, per-batch plan builder, per-batch fallback) of `schedule`; imports the search lazily."""
    model, parallel = workload.model, workload.parallel
    if schedule in ("pipeweaver", "fallback"):
        from pipeweaver.plan.layouts import modular_placement
        from pipeweaver.search.fallback import build_fallback_plan

        if schedule == "pipeweaver":
            from pipeweaver.search.planner import Planner, SearchConfig

            planner = Planner(model, parallel, workload.hardware, config=SearchConfig(budget_ms=budget_ms))
            placement, sizes = planner.partition.placement, dict(planner.partition.sub_microbatch_size)
        else:
            placement, sizes = modular_placement(model, parallel.pp), {}

        def fallback(batch: BatchMetadata) -> Plan:
            return build_fallback_plan(model, placement, sizes, batch, dtype=dtype)

        if schedule == "pipeweaver":
            return placement, lambda batch: planner.plan(batch).plan, fallback
        return placement, fallback, fallback
    from pipeweaver.search.baselines import baseline_placement, build_baseline_plan

    placement = baseline_placement(schedule, model=model, parallel=parallel)

    def plan(batch: BatchMetadata) -> Plan:
        return build_baseline_plan(schedule, model=model, parallel=parallel, batch=batch, tensors_dtype=dtype)

    return placement, plan, plan


def _check(ex: PipelineExecutor, workload: Workload, batch: BatchMetadata, loss: float) -> dict[str, Any]:
    """Gather every pipeline rank's gradients on rank 0 and compare them with the unpipelined reference."""
    grads = {k: v.cpu() for k, v in ex.gradients().items()}
    gathered: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(grads, gathered if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() != 0:
        return {}
    from pipeweaver.client.reference import ReferenceModel

    ref = ReferenceModel(workload.model, init_seed=0).step(batch, data_seed=0)
    merged: dict[str, torch.Tensor] = {}
    for g in gathered[: workload.parallel.pp]:  # replica 0's pipeline
        merged.update(g or {})
    worst = max(
        (float((merged[k] - v).abs().max()) / max(float(v.abs().max()), 1e-30) for k, v in ref.grads.items()),
        default=0.0,
    )
    return {"reference_loss": ref.loss, "loss_rel_err": abs(loss - ref.loss) / abs(ref.loss), "grad_rel_err": worst}


def main(argv: Sequence[str] | None = None) -> None:
    from pipeweaver import presets
    from pipeweaver.datagen import sample_batch

    ap = argparse.ArgumentParser(prog="pipeweaver.client.launch", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="tiny-vlm", choices=sorted(presets.WORKLOADS))
    ap.add_argument("--schedule", default="1f1b", help="a baseline name, 'fallback' or 'pipeweaver'")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--budget-ms", type=float, default=1000.0, help="search budget per batch (pipeweaver)")
    ap.add_argument("--lr", type=float, default=0.0, help="SGD learning rate (0: no optimizer step)")
    ap.add_argument("--check", action="store_true", help="compare iteration 0 with the unpipelined reference")
    args = ap.parse_args(argv)

    prepare_cuda_for_dynamic_pipelines()  # before the first CUDA call, is_available() included
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before the first communication (NCCL)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = presets.workload(args.workload)
    pp = base.parallel.pp
    if world % pp:
        raise SystemExit(f"world size {world} is not a multiple of the workload's pp ({pp})")
    dp = world // pp
    workload = replace(base, parallel=replace(base.parallel, dp=dp))
    replica, pp_rank = divmod(rank, pp)
    pp_groups = [dist.new_group(list(range(r * pp, (r + 1) * pp))) for r in range(dp)]
    dp_groups = [dist.new_group(list(range(p, world, pp))) for p in range(pp)]
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16

    placement, plan_for, fallback = _plans(workload, args.schedule, args.dtype, args.budget_ms)
    # A time-budgeted search is not deterministic: one rank per pipeline searches and shares its plan.
    searched = args.schedule == "pipeweaver"
    ex = PipelineExecutor(
        workload.model, placement, pp_rank, pp_ranks=list(range(replica * pp, (replica + 1) * pp)),
        pp_group=pp_groups[replica], dp_group=dp_groups[pp_rank] if dp > 1 else None,
        data_seed=args.seed, device=device, dtype=dtype,
    )  # fmt: skip
    ex.warm_up()
    opt = torch.optim.SGD(list(ex.parameters()), lr=args.lr) if args.lr > 0 else None
    for k in range(args.iterations):
        batch = sample_batch(workload, seed=args.seed, iteration=k, dp_replica=replica)
        t0 = time.perf_counter()
        box: list[Plan | None] = [plan_for(batch) if not searched or pp_rank == 0 else None]
        if searched:
            dist.broadcast_object_list(box, src=replica * pp, group=pp_groups[replica])
        plan_ms = (time.perf_counter() - t0) * 1e3
        dist.barrier()
        step_opt = opt if not (args.check and k == 0) else None
        stats = ex.run_with_fallback(box[0], batch, fallback, optimizer=step_opt)
        numbers = torch.tensor([stats.loss, stats.wall_ms, plan_ms], dtype=torch.float64, device=device)
        loss_t = numbers[:1].clone()
        dist.all_reduce(loss_t, group=pp_groups[replica])  # the iteration loss is spread over the loss ranks
        dist.all_reduce(numbers, op=dist.ReduceOp.MAX)
        line: dict[str, Any] = {
            "iteration": k,
            "workload": args.workload,
            "schedule": stats.schedule,
            "pp": pp,
            "dp": dp,
            "backend": dist.get_backend(),
            "loss": float(loss_t),
            "step_ms": float(numbers[1]),
            "plan_ms": float(numbers[2]),
            "computes": stats.computes,
            "fallback_reason": stats.fallback_reason,
        }
        if args.check and k == 0:
            line |= _check(ex, workload, batch, float(loss_t))
        if rank == 0:
            print(json.dumps(line), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

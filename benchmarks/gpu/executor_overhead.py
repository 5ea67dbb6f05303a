"""Executor overhead (issue 7): PipelineExecutor running baseline plans vs torch.distributed.pipelining.

    torchrun --nproc-per-node 4 benchmarks/gpu/executor_overhead.py --out $OUT/executor_overhead.json
    torchrun --nproc-per-node 4 benchmarks/gpu/executor_overhead.py --tiny --out /tmp/eo.json    # CPU/gloo smoke

What is compared (both sides run the SAME nn.Module objects, so the same layers, weights and kernels):

- model: a language model alone (one decoder module: embedding, N x (RMSNorm, GQA with RoPE, SwiGLU), final
  RMSNorm, LM head + next-token cross-entropy), the reference blocks of `pipeweaver.client.models`;
- batch: M microbatches, each ONE document of exactly T tokens (fixed shapes, which torch's schedules need:
  every microbatch is "padded to the max tokens" by construction, so neither side does padding work);
- placement: the baseline's own (`1f1b`: pp chunks; `interleaved-1f1b`: 2*pp chunks round robin), balanced by
  parameters; torch's stage i wraps exactly the parts of our chunk i (same rank: chunk i sits on rank i % pp);
- ours: `PipelineExecutor.run_iteration(plan, batch)` on the baseline plan (built once, outside the timing);
  its time includes everything the executor does per iteration: validating the plan against the batch,
  building the inputs and labels from the batch metadata (SyntheticData on CPU, then to GPU), the compute, the
  batched point-to-point transfers, and the final `cuda.synchronize`;
- torch: `Schedule1F1B` / `ScheduleInterleaved1F1B(...).step(...)` with `scale_grads=False` (ours does not scale
  either); token ids and labels are prepared on the GPU once, outside the timing; torch's last stage ends at the
  final RMSNorm and its `loss_fn` applies the (same) LM head and the same summed cross-entropy / target count,
  so the head's forward and backward run inside the stage's autograd graph exactly as ours does; grads are set
  to None before each step on both sides (ours does this inside run_iteration).

One iteration = barrier, cuda.synchronize, t0, step, cuda.synchronize, t1; the reported time is the max over
ranks of t1 - t0. Ours and torch alternate in blocks of `--block` iterations after `--warmup` iterations each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import _bare_client  # noqa: F401  (before pipeweaver.client: no grpc on the GPU image)
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeweaver.client.data import SyntheticData
from pipeweaver.client.executor import PipelineExecutor
from pipeweaver.client.geometry import LossScale, geometry
from pipeweaver.client.models import Stream
from pipeweaver.errors import InvalidPlan
from pipeweaver.plan.fuse import fuse_sends_with_next_receives
from pipeweaver.plan.ir import Plan
from pipeweaver.search.baselines import baseline_placement, build_baseline_plan
from pipeweaver.spec.batch import BatchMetadata, Document, Microbatch
from pipeweaver.spec.model import LayerKind, Modality, ModelSpec, ModuleSpec
from pipeweaver.spec.parallel import ParallelSpec


def lm_model(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int) -> ModelSpec:
    llm = ModuleSpec(
        name="llm",
        display_name="scaled LM",
        kind=LayerKind.DECODER_BLOCK,
        input=Modality.TEXT,
        layers=layers,
        hidden=hidden,
        ffn_hidden=ffn,
        heads=heads,
        kv_heads=kv_heads,
        vocab_size=vocab,
        lm_head=True,
    )
    return ModelSpec(name="lm-only", modules=(llm,), edges=())


def fixed_batch(m: int, tokens: int) -> BatchMetadata:
    return BatchMetadata(iteration=0, microbatches=tuple(Microbatch((Document(text_tokens=tokens),)) for _ in range(m)))


class TorchStage(nn.Module):
    """Torch pipelining stage over one of our chunks: the same pre/blocks/post modules, fixed geometry."""

    def __init__(self, parts: list[Any], geom: Any) -> None:
        super().__init__()
        assert len(parts) == 1, "an LM-only chunk holds one layer range"
        part = parts[0]
        self.pre = part.pre
        self.blocks = nn.ModuleList(part.blocks)
        self.norm = part.post.norm if part.post is not None else None
        self.geom = geom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre.embed(x.reshape(-1)) if self.pre is not None else x
        for b in self.blocks:
            h = b.run(Stream(h), self.geom, False).hidden
        if self.norm is not None:
            h = self.norm(h)
        return h


def summary(times: list[float]) -> dict[str, Any]:
    s = sorted(times)
    return {
        "n": len(times),
        "mean_ms": statistics.fmean(times),
        "median_ms": statistics.median(times),
        "min_ms": s[0],
        "max_ms": s[-1],
        "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
        "all_ms": [round(t, 3) for t in times],
    }


def env_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
    }
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cuda_module_loading"] = os.environ.get("CUDA_MODULE_LOADING", "LAZY (default)")
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # pragma: no cover
            info["nccl"] = repr(e)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            info["nvidia_smi"] = out.stdout.strip().splitlines()
            info["driver"] = out.stdout.split(",")[1].strip() if out.stdout else ""
        except Exception as e:  # pragma: no cover
            info["driver"] = repr(e)
    return info


def profile_one(out_dir: str, case: str, runners: dict[str, Any], timed: Any) -> dict[str, dict[str, list[int]]]:
    """One profiled iteration of each side, as gzipped Chrome traces per rank (where did the GPU idle?); returns,
    per side, every rank's count of host operators (`cpu_op` events, nested ones included) and of GPU kernels in
    that iteration: on host-bound ranks each operator is a launch on the critical path."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    mine: list[int] = []
    for name, fn in runners.items():
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed(fn)
        path = os.path.join(out_dir, f"{case}_{name}_r{dist.get_rank()}.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as src:
            data = src.read()
        events = [e for e in json.loads(data).get("traceEvents", []) if e.get("ph") == "X"]
        mine += [sum(1 for e in events if e.get("cat") == c) for c in ("cpu_op", "kernel")]
        with gzip.open(path + ".gz", "wb") as dst:
            dst.write(data)
        os.remove(path)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {
        name: {"host_ops": [r[2 * i] for r in every], "kernels": [r[2 * i + 1] for r in every]}
        for i, name in enumerate(runners)
    }


def run_case(args: argparse.Namespace, schedule: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    rank, world = dist.get_rank(), dist.get_world_size()
    model = lm_model(args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab)
    parallel = ParallelSpec(pp=world, microbatches=args.microbatches, seq_len=args.tokens)
    batch = fixed_batch(args.microbatches, args.tokens)
    placement = baseline_placement(schedule, model=model, parallel=parallel)
    plan = build_baseline_plan(schedule, model=model, parallel=parallel, batch=batch, tensors_dtype=args.dtype)
    ex = PipelineExecutor(model, placement, rank, device=device, dtype=dtype)
    ex.warm_up()
    n_chunks = len(placement.chunks)
    mine = sorted(c.index for c in placement.chunks if c.rank == rank)

    # ---- torch side: the same modules --------------------------------------------------------------------------
    data = SyntheticData(seed=0, iteration=batch.iteration)
    scale = LossScale.of(model, batch)
    geoms = [
        geometry(model, batch, "llm", j, (0,), data, scale, device=device, dtype=dtype)
        for j in range(len(batch.microbatches))
    ]
    g0 = geoms[0]
    _ = g0.positions, g0.segments  # cached once: torch's stages reuse them every iteration
    ids = torch.stack([g.token_ids for g in geoms])  # (M, T) on device
    labels = torch.stack([g.labels for g in geoms])
    t, h = args.tokens, args.hidden
    stages = []
    head = None
    for c in mine:
        parts = ex.chunks[("model", c)]
        if parts[-1].post is not None:
            head = parts[-1].post.head
        mod = TorchStage(parts, g0)
        # requires_grad matters: torch (2.13 at least) takes it from these examples for its receive buffers
        if c == 0:
            inp = torch.zeros(1, t, dtype=torch.long, device=device)
        else:
            inp = torch.zeros(t, h, dtype=dtype, device=device, requires_grad=True)
        out = torch.zeros(t, h, dtype=dtype, device=device, requires_grad=True)
        stages.append(PipelineStage(mod, c, n_chunks, device, input_args=(inp,), output_args=(out,)))
    targets = scale.text_targets

    def loss_fn(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert head is not None
        logits = head(hidden).float()
        return F.cross_entropy(logits, target.reshape(-1), ignore_index=-100, reduction="sum") / targets

    if schedule == "1f1b":
        sched = Schedule1F1B(stages[0], args.microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        sched = ScheduleInterleaved1F1B(stages, args.microbatches, loss_fn=loss_fn, scale_grads=False)
    first = 0 in mine
    last = (n_chunks - 1) in mine
    params = list(ex.parameters())
    torch_losses: list[float] = []

    def torch_step() -> None:
        for p in params:
            p.grad = None
        if first and last:
            raise SystemExit("pp must be >= 2")
        losses: list[torch.Tensor] = []
        if first:
            sched.step(ids)
        elif last:
            sched.step(target=labels, losses=losses)
        else:
            sched.step()
        if last:
            torch_losses.append(float(sum(x.detach().float() for x in losses)))

    our_losses: list[float] = []
    check_ms: list[float] = []

    def ours_step() -> None:
        stats = ex.run_iteration(plan, batch)
        our_losses.append(stats.loss)

    # The other ways of running our plan (--variants), each timed in the same blocks as ours and torch.
    fused = fuse_sends_with_next_receives(plan)
    variant_notes: dict[str, str] = {}

    ran_on_one: dict[str, bool] = {}

    def variant(name: str, fused_plan: Plan, one_communicator: bool) -> Any:
        def step() -> None:
            ex.one_communicator_plans = one_communicator
            try:
                ran_on_one[name] = ex.run_iteration(fused_plan, batch).one_communicator
            finally:
                ex.one_communicator_plans = True

        return step

    runners: dict[str, Any] = {"ours": ours_step, "torch": torch_step}
    for name in [v for v in args.variants.split(",") if v]:
        if name not in ("fused", "fused-pairs"):
            raise SystemExit(f"--variants: unknown variant {name!r} (fused, fused-pairs)")
        try:
            ex.check(fused, batch)
        except InvalidPlan as e:  # the same answer on every rank: the plan alone decides
            variant_notes[name] = "refused: " + str(e).splitlines()[0]
            continue
        runners[name] = variant(name, fused, one_communicator=name == "fused")

    def timed(fn: Any) -> float:
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - t0) * 1e3
        x = torch.tensor([ms], dtype=torch.float64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return float(x)

    times: dict[str, list[float]] = {name: [] for name in runners}
    for name in runners:
        for _ in range(args.warmup):
            timed(runners[name])
    blocks = max(1, args.iters // args.block)
    names = list(runners)
    for b in range(blocks):
        order = names[b % len(names) :] + names[: b % len(names)]  # each side leads a block in turn
        for name in order:
            for _ in range(args.block):
                times[name].append(timed(runners[name]))
    profiled: dict[str, dict[str, list[int]]] = {}
    if args.profile_dir:
        profiled = profile_one(args.profile_dir, f"{schedule}_{args.tokens}x{args.microbatches}", runners, timed)
    for _ in range(5):  # CPU cost of the per-iteration plan check alone (part of ours' time above)
        t0 = time.perf_counter()
        ex.check(plan, batch)
        check_ms.append((time.perf_counter() - t0) * 1e3)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    x = torch.tensor([mem, statistics.median(check_ms)], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    loss = torch.tensor(
        [our_losses[-1] if last else 0.0, torch_losses[-1] if last and torch_losses else 0.0],
        dtype=torch.float64, device=device,
    )  # fmt: skip
    dist.all_reduce(loss)
    ours, theirs = summary(times["ours"]), summary(times["torch"])
    variants: dict[str, Any] = {name: {"note": note} for name, note in variant_notes.items()}
    for name in runners:
        if name in ("ours", "torch"):
            continue
        v = summary(times[name])
        variants[name] = v | {
            "overhead_median_pct": 100.0 * (v["median_ms"] / theirs["median_ms"] - 1.0),
            "one_communicator": ran_on_one.get(name),
        }
    params_total = model.total_params()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {
        "schedule_ours": schedule,
        "schedule_torch": "Schedule1F1B" if schedule == "1f1b" else "ScheduleInterleaved1F1B",
        "pp": world,
        "chunks": n_chunks,
        "chunk_layers": [[(r.module, r.start, r.stop) for r in c.layers] for c in placement.chunks],
        "microbatches": args.microbatches,
        "tokens_per_microbatch": args.tokens,
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "ffn_hidden": args.ffn,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
            "params": params_total,
        },
        "dtype": args.dtype,
        "ours": ours,
        "torch": theirs,
        "overhead_median_pct": 100.0 * (ours["median_ms"] / theirs["median_ms"] - 1.0),
        "overhead_mean_pct": 100.0 * (ours["mean_ms"] / theirs["mean_ms"] - 1.0),
        "variants": variants,
        "plan_check_ms_median_max_rank": float(x[1]),
        "peak_mem_gib_max_rank": float(x[0]),
        "loss_ours": float(loss[0]),
        "loss_torch": float(loss[1]),
        "profiled_ops": profiled,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", default="1f1b,interleaved-1f1b")
    ap.add_argument("--configs", default="4096:8,1024:16", help="tokens:microbatches pairs, comma separated")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: 8 x 64 hidden, vocab 512")
    ap.add_argument(
        "--attention",
        default="fast",
        choices=["fast", "reference"],
        help="fast: benchmarks/gpu/fast_attention.py (4-D SDPA, flash); reference: models._attend as is",
    )
    ap.add_argument(
        "--receive-lookaheads",
        default="",
        help="comma-separated computes between a receive's post and its consumer to compare (default: the "
        "planner's RECEIVE_LOOKAHEAD); each case is measured once per value",
    )
    ap.add_argument(
        "--variants",
        default="",
        help="also time our plan with each send batch fused into the next receive batch (pipeweaver.plan.fuse): "
        "'fused' on one communicator per pipeline (the executor's choice for such plans), 'fused-pairs' on the "
        "pair groups; comma separated",
    )
    ap.add_argument("--profile-dir", default="", help="also write one profiled iteration per side (Chrome traces)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.attention == "fast":
        from fast_attention import use_fast_attention

        use_fast_attention()
    if args.tiny:
        args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab = 8, 64, 192, 4, 2, 512
        if args.configs == ap.get_default("configs"):
            args.configs = "64:8"

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    result: dict[str, Any] = {
        "benchmark": "executor_overhead", "attention": args.attention, "env": env_info(device), "cases": []
    }  # fmt: skip
    from pipeweaver.plan import assemble

    lookaheads = [int(v) for v in args.receive_lookaheads.split(",")] if args.receive_lookaheads else [None]
    cases = [
        (cfg, schedule, la)
        for cfg in args.configs.split(",")
        for schedule in args.schedules.split(",")
        for la in lookaheads
    ]
    for cfg, schedule, lookahead in cases:
        tokens, m = (int(v) for v in cfg.split(":"))
        args.tokens, args.microbatches = tokens, m
        # The plans' receive posts: assemble_plan's default, which every baseline builder uses.
        la = assemble.RECEIVE_LOOKAHEAD if lookahead is None else lookahead
        assert assemble.assemble_plan.__kwdefaults__ is not None
        assemble.assemble_plan.__kwdefaults__["receive_lookahead"] = la
        try:
            case = run_case(args, schedule, device, dtype) | {"receive_lookahead": la}
        except Exception as e:  # print and stop: a failed case leaves the ranks out of step
            import traceback

            traceback.print_exc()
            case = {"schedule_ours": schedule, "tokens_per_microbatch": tokens, "microbatches": m, "error": repr(e)}
            result["cases"].append(case)
            if dist.get_rank() == 0:
                print(json.dumps(case), flush=True)
            raise
        result["cases"].append(case)
        gc.collect()  # the case's executor and stages went with its frame: free them before the next case
        if dist.get_rank() == 0:
            brief = {k: v for k, v in case.items() if k not in ("ours", "torch", "chunk_layers", "model", "variants")}
            brief |= {f"{k}_median_ms": v.get("median_ms", v.get("note")) for k, v in case["variants"].items()}
            brief["ours_median_ms"] = case["ours"]["median_ms"]
            brief["torch_median_ms"] = case["torch"]["median_ms"]
            brief["ours_mean_ms"] = case["ours"]["mean_ms"]
            brief["torch_mean_ms"] = case["torch"]["mean_ms"]
            print(json.dumps(brief), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

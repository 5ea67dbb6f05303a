"""What one block's forward keeps for its backward on a GPU, against SEMU's activation model (`simulator.memory`).

SEMU decides whether a plan fits device memory from `layer_activation_bytes` (per block kind and strategy, per
token). This measures the executor's reference blocks (`client.models`, the attention the product runs by default)
on one GPU at tp = 1 in bf16, for each block kind of the paper's workloads (vlm-s's ViT 5B and Llama3 8B layers,
t2v-s's DiT 5B layer) at a few token counts, with `selective` off and on:

- saved: the bytes of every distinct storage autograd saves in the block's forward (parameters excluded), through
  `torch.autograd.graph.saved_tensors_hooks`: what the backward keeps alive, the block's input included;
- held: `torch.cuda.memory_allocated()` after the forward minus before it, minus the output (the next block's
  input): new memory the forward leaves behind (the input was allocated before, so it is not in it);
- semu: `layer_activation_bytes` for NONE and SELECTIVE, and the ratio saved / semu;
- fwd_bwd_ms (GPU only): the block's forward plus backward, median of 5 after 2 warm-up runs (CUDA events), so
  that a leaner block can be checked not to be slower.

    python benchmarks/gpu/activation_memory.py --out $OUT/activation_memory_h200.json

On a CPU it runs too (`--device cpu`, small token counts), but there attention saves its score matrix (the math
kernel), so only a GPU's numbers speak for the executor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import torch

from pipeweaver.client.data import SyntheticData
from pipeweaver.client.geometry import LossScale, context_source, geometry
from pipeweaver.client.models import Stream, reference_modules
from pipeweaver.client.profiler import _one_instance
from pipeweaver.plan.ir import Recompute
from pipeweaver.presets import workload
from pipeweaver.simulator.memory import layer_activation_bytes
from pipeweaver.spec.batch import module_instances
from pipeweaver.spec.model import LayerKind, ModelSpec, ModuleSpec

CASES = (("vlm-s", "vit"), ("vlm-s", "llm"), ("t2v-s", "dit"))
"""(workload, module): one module of each block kind."""


def _saved_and_held(
    model: ModelSpec, spec: ModuleSpec, tokens: int, selective: bool, device: torch.device
) -> dict[str, float]:
    batch = _one_instance(model, spec, tokens)
    geom = geometry(
        model,
        batch,
        spec.name,
        0,
        (0,),
        SyntheticData(seed=0, iteration=0),
        LossScale.of(model, batch),
        device=device,
        dtype=torch.bfloat16,
    )
    block = reference_modules(model)[spec.name].build_block(0).to(device=device, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, spec.hidden, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    context = None
    if spec.kind is LayerKind.DIT_BLOCK:
        src = context_source(model, spec.name)
        if src is not None:
            rows = batch.microbatches[0].text_tokens
            context = torch.randn(rows, src.output_hidden(), generator=g).to(device=device, dtype=torch.bfloat16)
    geom_warm = block.run(Stream(x, context), geom, selective)  # geometry caches, kernels: not the block's memory
    del geom_warm
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block.run(Stream(x, context), geom, selective)
    held = 0.0
    if cuda:
        torch.cuda.synchronize(device)
        held = float(torch.cuda.memory_allocated(device) - before - out.hidden.untyped_storage().nbytes())
    out.hidden.float().sum().backward()  # the graph is whole: the backward runs (and frees what was kept)
    got = {"saved_bytes": float(sum(storages.values())), "held_bytes": held}
    if cuda:
        times = []
        for i in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            block.run(Stream(x, context), geom, selective).hidden.float().sum().backward()
            end.record()
            torch.cuda.synchronize(device)
            if i >= 2:
                times.append(start.elapsed_time(end))
        got["fwd_bwd_ms"] = round(sorted(times)[len(times) // 2], 3)
    return got


def measure(device: torch.device, token_counts: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for wname, module in CASES:
        model = workload(wname).model
        spec = model.module(module)
        for tokens in token_counts[spec.kind.name]:
            batch = _one_instance(model, spec, tokens)
            instances = module_instances(model, spec.name, batch.microbatches[0])
            for selective in (False, True):
                got = _saved_and_held(model, spec, tokens, selective, device)
                strategy = Recompute.SELECTIVE if selective else Recompute.NONE
                semu = layer_activation_bytes(spec, instances, tp=1, recompute=strategy)
                row = {
                    "workload": wname,
                    "module": module,
                    "kind": spec.kind.name,
                    "tokens": tokens,
                    "strategy": strategy.value,
                    **got,
                    "semu_bytes": semu,
                    "saved_over_semu": round(got["saved_bytes"] / semu, 4),
                    "saved_per_token_hidden": round(got["saved_bytes"] / 2 / tokens / spec.hidden, 3),
                    "semu_per_token_hidden": round(semu / 2 / tokens / spec.hidden, 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    counts = {
        "VIT_BLOCK": (1024, 4096) if gpu else (256,),
        "DECODER_BLOCK": (4096, 8192) if gpu else (256,),
        "DIT_BLOCK": (8190, 32760) if gpu else (390,),
    }
    report = {
        "command": "python benchmarks/gpu/activation_memory.py" + (f" --device {args.device}" if not gpu else ""),
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "driver": _driver() if gpu else None,
        "torch": torch.__version__,
        "rows": measure(device, counts),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


def _driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except OSError:
        return None


if __name__ == "__main__":
    main()

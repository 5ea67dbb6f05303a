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

Then the backward's working memory (GPU only, `chunks` in the report): a chunk of `CHUNK_BLOCKS` blocks run as
the executor runs a stage (FULL through its per-block checkpoint), for each strategy: what its forward leaves
allocated, against SEMU's count for the chunk, and the peak during its backward above the memory just before it
(`torch.cuda.max_memory_allocated`), in units of one block's NONE bytes by SEMU: what a plan needs on top of its
activations while a backward runs (SEMU's `memory.BACKWARD_WORKSPACE_BLOCKS` comes from these).

And the loss head (`loss_head` in the report): vlm-s's Llama3 8B post part at 8,192 tokens, its forward's kept
bytes against SEMU's `post_activation_bytes` and its backward's peak in units of the fp32 logits.

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
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pipeweaver.client.data import SyntheticData
from pipeweaver.client.executor import _checkpointed
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
CHUNK_BLOCKS = 4
CHUNK_TOKENS = {"VIT_BLOCK": 4096, "DECODER_BLOCK": 8192, "DIT_BLOCK": 32760}


def _setup(model: ModelSpec, spec: ModuleSpec, tokens: int, device: torch.device) -> tuple[Any, Tensor, Tensor | None]:
    batch = _one_instance(model, spec, tokens)
    geom = geometry(
        model, batch, spec.name, 0, (0,), SyntheticData(seed=0, iteration=0), LossScale.of(model, batch),
        device=device, dtype=torch.bfloat16,
    )  # fmt: skip
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, spec.hidden, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    context = None
    if spec.kind is LayerKind.DIT_BLOCK:
        src = context_source(model, spec.name)
        if src is not None:
            rows = batch.microbatches[0].text_tokens
            context = torch.randn(rows, src.output_hidden(), generator=g).to(device=device, dtype=torch.bfloat16)
    return geom, x, context


def _chunk_forward(
    blocks: list[Any], x: Tensor, context: Tensor | None, geom: Any, strategy: Recompute, whole: bool = False
) -> Tensor:
    """The blocks as the executor runs a stage's blocks under `strategy`; `whole`: FULL as the executor ran it
    before the fifteenth session, the whole chunk under one checkpoint."""
    if whole:

        def run(h: Tensor) -> Tensor:
            return _chunk_forward(blocks, h, context, geom, Recompute.NONE)

        out: Tensor = checkpoint(run, x, use_reentrant=False)
        return out
    stream = Stream(x, context)
    for b in blocks:
        if strategy is Recompute.FULL:
            stream = _checkpointed(b, stream, geom)
        else:
            stream = b.run(stream, geom, strategy is Recompute.SELECTIVE)
    return stream.hidden


def loss_head_memory(device: torch.device, tokens: int = 8192) -> dict[str, Any]:
    """vlm-s's Llama3 8B post part (final norm, LM head, next-token loss) on `tokens` tokens: what its forward
    leaves allocated against SEMU's `post_activation_bytes`, and its backward's peak above that."""
    from pipeweaver.simulator.memory import post_activation_bytes

    model = workload("vlm-s").model
    spec = model.module("llm")
    geom, x, _ = _setup(model, spec, tokens, device)
    post = reference_modules(model)["llm"].build_post().to(device=device, dtype=torch.bfloat16)
    loss = post.run(Stream(x), geom).loss  # warm-up
    assert loss is not None
    loss.backward()
    x.grad = None
    post.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    loss = post.run(Stream(x), geom).loss
    assert loss is not None
    torch.cuda.synchronize(device)
    kept = torch.cuda.memory_allocated(device) - before
    level = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - level
    instances = module_instances(model, "llm", _one_instance(model, spec, tokens).microbatches[0])
    semu = post_activation_bytes(spec, instances, tp=1)
    logits_fp32 = tokens * spec.vocab_size * 4
    row = {
        "workload": "vlm-s",
        "module": "llm post (final norm, LM head, loss)",
        "tokens": tokens,
        "kept_bytes": float(kept),
        "semu_bytes": semu,
        "kept_over_semu": round(kept / semu, 4),
        "backward_peak_bytes": float(peak),
        "backward_peak_in_fp32_logits": round(peak / logits_fp32, 3),
    }
    print(json.dumps(row), flush=True)
    return row


def chunk_backward_memory(device: torch.device) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for wname, module in CASES:
        model = workload(wname).model
        spec = model.module(module)
        tokens = CHUNK_TOKENS[spec.kind.name]
        geom, x, context = _setup(model, spec, tokens, device)
        maker = reference_modules(model)[spec.name]
        blocks = [maker.build_block(i).to(device=device, dtype=torch.bfloat16) for i in range(CHUNK_BLOCKS)]
        instances = module_instances(model, spec.name, _one_instance(model, spec, tokens).microbatches[0])
        one_block = layer_activation_bytes(spec, instances, tp=1, recompute=Recompute.NONE)
        for strategy, whole in (
            (Recompute.NONE, False),
            (Recompute.SELECTIVE, False),
            (Recompute.FULL, False),
            (Recompute.FULL, True),
        ):
            _chunk_forward(
                blocks, x, context, geom, strategy
            ).float().sum().backward()  # warm-up: geometry caches, kernels
            x.grad = None
            for b in blocks:
                b.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            out = _chunk_forward(blocks, x, context, geom, strategy, whole)
            grad = torch.ones_like(out)
            torch.cuda.synchronize(device)
            kept = torch.cuda.memory_allocated(device) - before - out.untyped_storage().nbytes() - grad.nbytes
            level = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out.backward(grad)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - level
            semu = CHUNK_BLOCKS * layer_activation_bytes(spec, instances, tp=1, recompute=strategy)
            row = {
                "workload": wname,
                "module": module,
                "tokens": tokens,
                "blocks": CHUNK_BLOCKS,
                "strategy": strategy.value + (", whole chunk checkpointed" if whole else ""),
                "kept_bytes": float(kept),
                "semu_bytes": semu,
                "kept_over_semu": round(kept / semu, 4),
                "backward_peak_bytes": float(peak),
                "backward_peak_in_blocks": round(peak / one_block, 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del out, grad
            x.grad = None
            for b in blocks:
                b.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return rows


def _saved_and_held(
    model: ModelSpec, spec: ModuleSpec, tokens: int, selective: bool, device: torch.device
) -> dict[str, float]:
    geom, x, context = _setup(model, spec, tokens, device)
    block = reference_modules(model)[spec.name].build_block(0).to(device=device, dtype=torch.bfloat16)
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
    if gpu:
        report["chunks"] = chunk_backward_memory(device)
        report["loss_head"] = loss_head_memory(device)
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

"""The scaled VLM and T2V workloads of the end-to-end GPU runs (issue 10) and the SEMU side of them.

Shared by `e2e_plans.py` (CPU: PipeWeaver plans + SEMU predictions, written as JSON), `e2e_dynamic.py`
(GPUs: runs the plans with `PipelineExecutor`) and `e2e_compare.py` (GPUs: the planner service's plans against
torch's and our static schedules in one run). Kept free of ortools/numba/grpc imports at module level: the
GPU image has neither ortools nor grpc.

Model: ViT 0.3B (16 x 1280, ffn 5120, 16 heads; 336 px images at 14 px patches = 576 patches, merged 2 x 2 into
144 language tokens) + LM 1.1B (16 x 2048, ffn 8192, GQA 16/8, vocab 32000); pp 4, 16 microbatches of up to
4096 language tokens, the paper's dynamic trace (image bounds rise and fall every 20 iterations).

T2V model: LM text encoder 0.4B (12 x 1536, GQA 12/4, no head) + DiT 1.4B (20 x 2048, ffn 8192, 16 heads,
cross-attention to the captions, adaLN); 256 x 256 px video, VAE 8 x 8 x 8, 2 x 2 latent patches: 256 tokens per
latent frame, 512 per second, up to 16 s (8,192 DiT tokens) per microbatch; pp 4, 16 microbatches. The same
dynamic trace in seconds of video (its last 6 iterations of 20 carry captions only: the DiT has no tokens).

`size="large"` (`--workload vlm-large` / `t2v-large`), opt-in: the sizes issue 10 names. Each action's device
time grows against the per-iteration host work that does not scale with it (the idle hook's plan check and kernel
loads, the first chunks' input building). (Sections 7-8 of docs/gpu.md read the default sizes as host-bound; the
traces say the device rarely waits for its host, section 13.) Same structure, batches and trace; wider and deeper
modules, planned on `PLANNING_H200`:
- VLM: ViT 1.1B (32 x 1664, ffn 6656, 16 heads of 104 as ViT-bigG; merger to 3072) + LM 3.0B (Llama-3.2-3B-like:
  28 x 3072, ffn 8192, GQA 24/8; vocab 32000). Wider rather than deeper than the default ViT: a layer's device
  time grows with width, its host time does not (32 x 1664: 1.5x the default layer's predicted time, 40 x 1408
  only 1.2x).
- T2V: LM text encoder 1.1B (16 x 2048, ffn 8192, GQA 16/8, no head) + DiT 3.1B (20 x 3072, ffn 12288, 24 heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Literal

from pipeweaver.presets import t2v, vlm
from pipeweaver.spec.hardware import GB, H100_SXM
from pipeweaver.spec.model import ImageGeometry, LayerKind, Modality, ModuleSpec, VideoGeometry
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.spec.workload import DatasetKind, Workload

BASELINES = ("1f1b", "interleaved-1f1b", "optimus-coarse")

PLANNING_HARDWARE = replace(H100_SXM, name="h100-sxm-plan40", memory_bytes=40e9)
"""The H100 with half its memory, for planning only: the reference blocks of `pipeweaver.client.models` keep about
1.7-2x the activation bytes SEMU's memory model counts (saved-tensor hooks on a ViT and a decoder block, bf16,
flash-style attention assumed on GPU), so a plan SEMU fits in 40 GB needs about the real 80 GB."""

PLANNING_H200 = replace(H100_SXM, name="h200-plan100", hbm_bandwidth=4.8e12, memory_bytes=100 * GB)
"""The H200 (datasheet: the H100's 989 TFLOP/s, 4.8 TB/s HBM, 141 GB) with a 100 GB cap, for planning the large
sizes (`e2e_size_check.py` has the numbers). SEMU counts 18 bytes of static memory per parameter (Megatron's
mixed-precision Adam; 17-21 GB per rank at these sizes); the runs hold 4 (bf16 weights and gradients, no optimizer
step; 4-5 GB). Activations: where they dominate a rank, the committed H200 runs held 1.0-1.06x (VLM) and
1.37-1.43x (T2V) the activation bytes SEMU predicted for the same baseline plans (ratio of measured peak less 4 B
per parameter, runs 17-22), below the 1.7-2x of the CPU reference blocks behind `PLANNING_HARDWARE`. A plan that
fills a cap C then holds about 4.7 + 1.5 x (C - 16) + 3 GB on the device (busiest rank, 3 GB for workspaces and
NCCL): 133 GB at C = 100, inside the H200's ~140 GiB (150 GB). Half the H200 (70 GB) would be tighter than what
the VLM baselines use unplanned (SEMU peaks 90-102 GB on their busiest ranks, no recompute: about 100 GB on the
device at the measured VLM ratio), so PipeWeaver alone would recompute to fit; from 100 GB up its predictions
barely change (T2V plans peak under 85 GB)."""

Size = Literal["default", "large"]
"""`default`: the committed runs' models; `large`: the issue's ~1B + ~3B modules (module docstring)."""


def scaled_vlm(
    pp: int = 4, microbatches: int = 16, seq_len: int = 4096, tiny: bool = False, size: Size = "default"
) -> Workload:
    hardware = PLANNING_HARDWARE
    if tiny:  # CPU smoke test: same structure, toy sizes
        vit = ModuleSpec(
            name="vit", display_name="tiny ViT", kind=LayerKind.VIT_BLOCK, input=Modality.IMAGE, layers=8,
            hidden=64, ffn_hidden=256, heads=4, kv_heads=4, image=ImageGeometry(image_px=56, patch_px=14, merge=2),
            projector_hidden=128, projector_out=64,
        )  # fmt: skip
        llm = ModuleSpec(
            name="llm", display_name="tiny LM", kind=LayerKind.DECODER_BLOCK, input=Modality.TEXT, layers=8,
            hidden=64, ffn_hidden=192, heads=4, kv_heads=2, vocab_size=512, lm_head=True,
        )  # fmt: skip
        seq_len = 256
    elif size == "large":
        vit = ModuleSpec(
            name="vit", display_name="ViT 1.1B", kind=LayerKind.VIT_BLOCK, input=Modality.IMAGE, layers=32,
            hidden=1664, ffn_hidden=6656, heads=16, kv_heads=16,
            image=ImageGeometry(image_px=336, patch_px=14, merge=2), projector_hidden=1664 * 4, projector_out=3072,
        )  # fmt: skip
        llm = ModuleSpec(
            name="llm", display_name="LM 3.0B", kind=LayerKind.DECODER_BLOCK, input=Modality.TEXT, layers=28,
            hidden=3072, ffn_hidden=8192, heads=24, kv_heads=8, vocab_size=32000, lm_head=True,
        )  # fmt: skip
        hardware = PLANNING_H200
    else:
        vit = ModuleSpec(
            name="vit", display_name="ViT 0.3B", kind=LayerKind.VIT_BLOCK, input=Modality.IMAGE, layers=16,
            hidden=1280, ffn_hidden=5120, heads=16, kv_heads=16,
            image=ImageGeometry(image_px=336, patch_px=14, merge=2), projector_hidden=1280 * 4, projector_out=2048,
        )  # fmt: skip
        llm = ModuleSpec(
            name="llm", display_name="LM 1.1B", kind=LayerKind.DECODER_BLOCK, input=Modality.TEXT, layers=16,
            hidden=2048, ffn_hidden=8192, heads=16, kv_heads=8, vocab_size=32000, lm_head=True,
        )  # fmt: skip
    name = "vlm-scaled-tiny" if tiny else "vlm-scaled-large" if size == "large" else "vlm-scaled"
    return Workload(
        name=name,
        description="scaled VLM for the 4-GPU end-to-end runs",
        model=vlm(name.removesuffix("-tiny"), vit, llm),
        parallel=ParallelSpec(pp=pp, microbatches=microbatches, seq_len=seq_len),
        hardware=hardware,
        dataset=DatasetKind.VLM_MIX,
    )


def scaled_t2v(
    pp: int = 4, microbatches: int = 16, seq_len: int = 4096, tiny: bool = False, size: Size = "default"
) -> Workload:
    hardware = PLANNING_HARDWARE
    video = VideoGeometry(fps=16, temporal_compression=8, spatial_compression=8, patch=2, width_px=256, height_px=256)
    if tiny:  # CPU smoke test: the tiny-t2v preset's modules
        text = ModuleSpec(
            name="text_encoder", display_name="tiny text encoder", kind=LayerKind.DECODER_BLOCK, input=Modality.TEXT,
            layers=8, hidden=64, ffn_hidden=192, heads=4, kv_heads=2, vocab_size=512,
        )  # fmt: skip
        video = VideoGeometry(fps=4, temporal_compression=2, spatial_compression=8, patch=2, width_px=64, height_px=64)
        dit = ModuleSpec(
            name="dit", display_name="tiny DiT", kind=LayerKind.DIT_BLOCK, input=Modality.VIDEO, layers=8,
            hidden=64, ffn_hidden=256, heads=4, kv_heads=4, video=video, context_hidden=64,
        )  # fmt: skip
        seq_len = 256
    elif size == "large":
        text = ModuleSpec(
            name="text_encoder", display_name="LM 1.1B", kind=LayerKind.DECODER_BLOCK, input=Modality.TEXT,
            layers=16, hidden=2048, ffn_hidden=8192, heads=16, kv_heads=8, vocab_size=32000,
        )  # fmt: skip
        dit = ModuleSpec(
            name="dit", display_name="DiT 3.1B", kind=LayerKind.DIT_BLOCK, input=Modality.VIDEO, layers=20,
            hidden=3072, ffn_hidden=12288, heads=24, kv_heads=24, video=video, context_hidden=2048,
        )  # fmt: skip
        hardware = PLANNING_H200
    else:
        text = ModuleSpec(
            name="text_encoder", display_name="LM 0.4B", kind=LayerKind.DECODER_BLOCK, input=Modality.TEXT,
            layers=12, hidden=1536, ffn_hidden=6144, heads=12, kv_heads=4, vocab_size=32000,
        )  # fmt: skip
        dit = ModuleSpec(
            name="dit", display_name="DiT 1.4B", kind=LayerKind.DIT_BLOCK, input=Modality.VIDEO, layers=20,
            hidden=2048, ffn_hidden=8192, heads=16, kv_heads=16, video=video, context_hidden=1536,
        )  # fmt: skip
    name = "t2v-scaled-tiny" if tiny else "t2v-scaled-large" if size == "large" else "t2v-scaled"
    return Workload(
        name=name,
        description="scaled T2V for the 4-GPU end-to-end runs",
        model=t2v(name.removesuffix("-tiny"), text, dit),
        parallel=ParallelSpec(pp=pp, microbatches=microbatches, seq_len=seq_len),
        hardware=hardware,
        dataset=DatasetKind.VIDEO_CAPTION,
    )


SCALED_WORKLOADS: dict[str, Callable[..., Workload]] = {
    "vlm": scaled_vlm,
    "t2v": scaled_t2v,
    "vlm-large": partial(scaled_vlm, size="large"),
    "t2v-large": partial(scaled_t2v, size="large"),
}
"""`--workload` of the e2e scripts -> the workload builder (keyword arguments `microbatches`, `tiny`; `--tiny`
builds the toy sizes whatever the size). The key travels in the results' `config.workload`, so the offline SEMU
scripts rebuild the same model from a run's JSON."""

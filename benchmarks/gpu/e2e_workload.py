"""The scaled VLM workload of the end-to-end GPU runs (issue 10) and the SEMU side of them.

Shared by `e2e_plans.py` (CPU: PipeWeaver plans + SEMU predictions, written as JSON), `e2e_dynamic.py`
(GPUs: runs the plans with `PipelineExecutor`) and `e2e_compare.py` (GPUs: the planner service's plans against
torch's and our static schedules in one run). Kept free of ortools/numba/grpc imports at module level: the
GPU image has neither ortools nor grpc.

Model: ViT 0.3B (16 x 1280, ffn 5120, 16 heads; 336 px images at 14 px patches = 576 patches, merged 2 x 2 into
144 language tokens) + LM 1.1B (16 x 2048, ffn 8192, GQA 16/8, vocab 32000); pp 4, 16 microbatches of up to
4096 language tokens, the paper's dynamic trace (image bounds rise and fall every 20 iterations).
"""

from __future__ import annotations

from dataclasses import replace

from pipeweaver.presets import vlm
from pipeweaver.spec.hardware import H100_SXM
from pipeweaver.spec.model import ImageGeometry, LayerKind, Modality, ModuleSpec
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.spec.workload import DatasetKind, Workload

BASELINES = ("1f1b", "interleaved-1f1b", "optimus-coarse")

PLANNING_HARDWARE = replace(H100_SXM, name="h100-sxm-plan40", memory_bytes=40e9)
"""The H100 with half its memory, for planning only: the reference blocks of `pipeweaver.client.models` keep about
1.7-2x the activation bytes SEMU's memory model counts (saved-tensor hooks on a ViT and a decoder block, bf16,
flash-style attention assumed on GPU), so a plan SEMU fits in 40 GB needs about the real 80 GB."""


def scaled_vlm(pp: int = 4, microbatches: int = 16, seq_len: int = 4096, tiny: bool = False) -> Workload:
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
    return Workload(
        name="vlm-scaled-tiny" if tiny else "vlm-scaled",
        description="scaled VLM for the 4-GPU end-to-end runs",
        model=vlm("vlm-scaled", vit, llm),
        parallel=ParallelSpec(pp=pp, microbatches=microbatches, seq_len=seq_len),
        hardware=PLANNING_HARDWARE,
        dataset=DatasetKind.VLM_MIX,
    )

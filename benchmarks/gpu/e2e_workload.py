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
"""

from __future__ import annotations

from dataclasses import replace

from pipeweaver.presets import t2v, vlm
from pipeweaver.spec.hardware import H100_SXM
from pipeweaver.spec.model import ImageGeometry, LayerKind, Modality, ModuleSpec, VideoGeometry
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


def scaled_t2v(pp: int = 4, microbatches: int = 16, seq_len: int = 4096, tiny: bool = False) -> Workload:
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
    else:
        text = ModuleSpec(
            name="text_encoder", display_name="LM 0.4B", kind=LayerKind.DECODER_BLOCK, input=Modality.TEXT,
            layers=12, hidden=1536, ffn_hidden=6144, heads=12, kv_heads=4, vocab_size=32000,
        )  # fmt: skip
        video = VideoGeometry(
            fps=16, temporal_compression=8, spatial_compression=8, patch=2, width_px=256, height_px=256
        )
        dit = ModuleSpec(
            name="dit", display_name="DiT 1.4B", kind=LayerKind.DIT_BLOCK, input=Modality.VIDEO, layers=20,
            hidden=2048, ffn_hidden=8192, heads=16, kv_heads=16, video=video, context_hidden=1536,
        )  # fmt: skip
    return Workload(
        name="t2v-scaled-tiny" if tiny else "t2v-scaled",
        description="scaled T2V for the 4-GPU end-to-end runs",
        model=t2v("t2v-scaled", text, dit),
        parallel=ParallelSpec(pp=pp, microbatches=microbatches, seq_len=seq_len),
        hardware=PLANNING_HARDWARE,
        dataset=DatasetKind.VIDEO_CAPTION,
    )


SCALED_WORKLOADS = {"vlm": scaled_vlm, "t2v": scaled_t2v}
"""`--workload` of the e2e scripts -> the workload builder."""

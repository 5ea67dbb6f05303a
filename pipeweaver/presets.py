"""Preset modules and workloads: the paper's Tables 2 and 3, its motivating 37B example, and tiny CPU models.

Plain functions returning configs, kept apart from the library code (torchtitan style).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeweaver.spec.hardware import CPU, H800
from pipeweaver.spec.model import (
    ImageGeometry,
    LayerKind,
    MergeKind,
    Modality,
    ModelSpec,
    ModuleEdge,
    ModuleSpec,
    VideoGeometry,
)
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.spec.workload import DatasetKind, Workload

# ---- modules (Table 2) -----------------------------------------------------------------------------------------


def vit_5b(*, projector_out: int, layers: int = 63, name: str = "vit") -> ModuleSpec:
    """Qwen2-VL-style ViT: 63 x (1792, 15360, 16 heads); its 4x4 merger MLP (hidden 1792*16) is about 0.9B."""
    return ModuleSpec(
        name=name,
        display_name="ViT 5B",
        kind=LayerKind.VIT_BLOCK,
        input=Modality.IMAGE,
        layers=layers,
        hidden=1792,
        ffn_hidden=15360,
        heads=16,
        kv_heads=16,
        image=ImageGeometry(),
        projector_hidden=1792 * 16,
        projector_out=projector_out,
    )


def vit_22b(*, projector_out: int, name: str = "vit") -> ModuleSpec:
    """ViT-22B dims (48 x 6144, 24576, 48 heads) with a slimmer merger MLP (hidden 8192)."""
    return ModuleSpec(
        name=name,
        display_name="ViT 22B",
        kind=LayerKind.VIT_BLOCK,
        input=Modality.IMAGE,
        layers=48,
        hidden=6144,
        ffn_hidden=24576,
        heads=48,
        kv_heads=48,
        image=ImageGeometry(),
        projector_hidden=8192,
        projector_out=projector_out,
    )


def llama3_8b(*, name: str = "llm", lm_head: bool = True) -> ModuleSpec:
    return ModuleSpec(
        name=name,
        display_name="Llama3 8B",
        kind=LayerKind.DECODER_BLOCK,
        input=Modality.TEXT,
        layers=32,
        hidden=4096,
        ffn_hidden=14336,
        heads=32,
        kv_heads=8,
        vocab_size=128256,
        lm_head=lm_head,
    )


def qwen2_32b(*, name: str = "llm", lm_head: bool = True, layers: int = 64) -> ModuleSpec:
    return ModuleSpec(
        name=name,
        display_name="Qwen2 32B",
        kind=LayerKind.DECODER_BLOCK,
        input=Modality.TEXT,
        layers=layers,
        hidden=5120,
        ffn_hidden=27648,
        heads=40,
        kv_heads=8,
        vocab_size=152064,
        lm_head=lm_head,
    )


def qwen2_72b(*, name: str = "llm", lm_head: bool = True) -> ModuleSpec:
    return ModuleSpec(
        name=name,
        display_name="Qwen2 72B",
        kind=LayerKind.DECODER_BLOCK,
        input=Modality.TEXT,
        layers=80,
        hidden=8192,
        ffn_hidden=29568,
        heads=64,
        kv_heads=8,
        vocab_size=152064,
        lm_head=lm_head,
    )


def dit_5b(*, context_hidden: int, name: str = "dit") -> ModuleSpec:
    return ModuleSpec(
        name=name,
        display_name="DiT 5B",
        kind=LayerKind.DIT_BLOCK,
        input=Modality.VIDEO,
        layers=28,
        hidden=3584,
        ffn_hidden=10240,
        heads=28,
        kv_heads=28,
        video=VideoGeometry(),
        context_hidden=context_hidden,
    )


def dit_30b(*, context_hidden: int, name: str = "dit") -> ModuleSpec:
    return ModuleSpec(
        name=name,
        display_name="DiT 30B",
        kind=LayerKind.DIT_BLOCK,
        input=Modality.VIDEO,
        layers=48,
        hidden=6144,
        ffn_hidden=24576,
        heads=48,
        kv_heads=48,
        video=VideoGeometry(),
        context_hidden=context_hidden,
    )


def named_modules() -> dict[str, ModuleSpec]:
    """The seven modules of Table 2 as the presets use them (for parameter-count checks and listings)."""
    return {
        "ViT 5B": vit_5b(projector_out=4096),
        "ViT 22B": vit_22b(projector_out=8192),
        "Llama3 8B": llama3_8b(),
        "Qwen2 32B": qwen2_32b(),
        "Qwen2 72B": qwen2_72b(),
        "DiT 5B": dit_5b(context_hidden=4096),
        "DiT 30B": dit_30b(context_hidden=5120),
    }


# ---- models ----------------------------------------------------------------------------------------------------


def vlm(name: str, vit: ModuleSpec, llm: ModuleSpec) -> ModelSpec:
    return ModelSpec(
        name=name,
        modules=(vit, llm),
        edges=(ModuleEdge(src=vit.name, dst=llm.name, merge=MergeKind.TOKEN_SCATTER),),
    )


def t2v(name: str, text_encoder: ModuleSpec, dit: ModuleSpec) -> ModelSpec:
    return ModelSpec(
        name=name,
        modules=(text_encoder, dit),
        edges=(ModuleEdge(src=text_encoder.name, dst=dit.name, merge=MergeKind.CROSS_ATTENTION_CONTEXT),),
    )


# ---- workloads (Table 3, H800) ---------------------------------------------------------------------------------
# Microbatches per iteration are not given by the paper; we use 8 per pipeline rank (32 at pp 4, 64 at pp 8),
# the Megatron rule of thumb that keeps the 1F1B fill/drain bubble under 30%.


def vlm_s() -> Workload:
    return Workload(
        name="vlm-s",
        description="ViT 5B + Llama3 8B, TP4 PP4, 16 H800 (paper Table 3)",
        model=vlm("vlm-s", vit_5b(projector_out=4096), llama3_8b()),
        parallel=ParallelSpec(pp=4, tp=4, dp=1, microbatches=32),
        hardware=H800,
        dataset=DatasetKind.VLM_MIX,
    )


def vlm_m() -> Workload:
    return Workload(
        name="vlm-m",
        description="ViT 5B + Qwen2 32B, TP8 PP4, 32 H800 (paper Table 3)",
        model=vlm("vlm-m", vit_5b(projector_out=5120), qwen2_32b()),
        parallel=ParallelSpec(pp=4, tp=8, dp=1, microbatches=32),
        hardware=H800,
        dataset=DatasetKind.VLM_MIX,
    )


def vlm_l() -> Workload:
    return Workload(
        name="vlm-l",
        description="ViT 22B + Qwen2 72B, TP8 PP8, 64 H800 (paper Table 3)",
        model=vlm("vlm-l", vit_22b(projector_out=8192), qwen2_72b()),
        parallel=ParallelSpec(pp=8, tp=8, dp=1, microbatches=64),
        hardware=H800,
        dataset=DatasetKind.VLM_MIX,
    )


def t2v_s() -> Workload:
    return Workload(
        name="t2v-s",
        description="Llama3 8B text encoder + DiT 5B, TP4 PP4, 16 H800 (paper Table 3)",
        model=t2v("t2v-s", llama3_8b(name="text_encoder", lm_head=False), dit_5b(context_hidden=4096)),
        parallel=ParallelSpec(pp=4, tp=4, dp=1, microbatches=32),
        hardware=H800,
        dataset=DatasetKind.VIDEO_CAPTION,
    )


def t2v_l() -> Workload:
    return Workload(
        name="t2v-l",
        description="Qwen2 32B text encoder + DiT 30B, TP8 PP8, 64 H800 (paper Table 3)",
        model=t2v("t2v-l", qwen2_32b(name="text_encoder", lm_head=False), dit_30b(context_hidden=5120)),
        parallel=ParallelSpec(pp=8, tp=8, dp=1, microbatches=64),
        hardware=H800,
        dataset=DatasetKind.VIDEO_CAPTION,
    )


def motivation_37b() -> Workload:
    return Workload(
        name="motivation-37b",
        description="5B ViT (64 layers) + 32B LM (64 layers), 16 stages, 64 microbatches (paper section 2.2)",
        model=vlm("motivation-37b", vit_5b(projector_out=5120, layers=64), qwen2_32b()),
        parallel=ParallelSpec(pp=16, tp=4, dp=1, microbatches=64),
        hardware=H800,
        dataset=DatasetKind.VLM_MIX,
    )


TINY_IMAGE = ImageGeometry(image_px=56, patch_px=14, merge=2)  # 16 patches, 4 merged tokens per image
TINY_VIDEO = VideoGeometry(fps=4, temporal_compression=2, spatial_compression=8, patch=2, width_px=64, height_px=64)


def tiny_vlm(pp: int = 4) -> Workload:
    vit = ModuleSpec(
        name="vit",
        display_name="tiny ViT",
        kind=LayerKind.VIT_BLOCK,
        input=Modality.IMAGE,
        layers=8,
        hidden=64,
        ffn_hidden=256,
        heads=4,
        kv_heads=4,
        image=TINY_IMAGE,
        projector_hidden=128,
        projector_out=64,
    )
    llm = ModuleSpec(
        name="llm",
        display_name="tiny LM",
        kind=LayerKind.DECODER_BLOCK,
        input=Modality.TEXT,
        layers=8,
        hidden=64,
        ffn_hidden=192,
        heads=4,
        kv_heads=2,
        vocab_size=512,
        lm_head=True,
    )
    return Workload(
        name="tiny-vlm",
        description="tiny ViT + tiny LM for gloo runs on CPU",
        model=vlm("tiny-vlm", vit, llm),
        parallel=ParallelSpec(pp=pp, microbatches=8, seq_len=256),
        hardware=CPU,
        dataset=DatasetKind.VLM_MIX,
    )


def tiny_t2v(pp: int = 4) -> Workload:
    text = ModuleSpec(
        name="text_encoder",
        display_name="tiny text encoder",
        kind=LayerKind.DECODER_BLOCK,
        input=Modality.TEXT,
        layers=8,
        hidden=64,
        ffn_hidden=192,
        heads=4,
        kv_heads=2,
        vocab_size=512,
    )
    dit = ModuleSpec(
        name="dit",
        display_name="tiny DiT",
        kind=LayerKind.DIT_BLOCK,
        input=Modality.VIDEO,
        layers=8,
        hidden=64,
        ffn_hidden=256,
        heads=4,
        kv_heads=4,
        video=TINY_VIDEO,
        context_hidden=64,
    )
    return Workload(
        name="tiny-t2v",
        description="tiny text encoder + tiny DiT for gloo runs on CPU",
        model=t2v("tiny-t2v", text, dit),
        parallel=ParallelSpec(pp=pp, microbatches=8, seq_len=256),
        hardware=CPU,
        dataset=DatasetKind.VIDEO_CAPTION,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "vlm-s": vlm_s,
    "vlm-m": vlm_m,
    "vlm-l": vlm_l,
    "t2v-s": t2v_s,
    "t2v-l": t2v_l,
    "motivation-37b": motivation_37b,
    "tiny-vlm": tiny_vlm,
    "tiny-t2v": tiny_t2v,
}


def workload(name: str) -> Workload:
    """The preset workload called `name`; raises KeyError listing the choices."""
    try:
        return WORKLOADS[name]()
    except KeyError:
        raise KeyError(f"unknown workload '{name}'; choose one of {sorted(WORKLOADS)}") from None

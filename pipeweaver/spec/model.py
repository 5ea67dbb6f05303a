"""Modality modules, the module DAG and the token geometry that drives every cost.

A module is a stack of identical transformer blocks plus optional pre (embedding, patchify) and post (merger,
projector, head) parts. Token counts follow the data: a ViT sees each image's patch sequence and hands a merged,
much shorter sequence to the language model; a DiT sees video latent tokens and cross-attends to a text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from pipeweaver.errors import require


class LayerKind(StrEnum):
    """Block architecture of a module's layers."""

    VIT_BLOCK = "vit_block"
    """Pre-norm MHA (heads == kv heads) + GELU MLP, LayerNorm; attention within each image."""
    DECODER_BLOCK = "decoder_block"
    """Llama/Qwen decoder block: RMSNorm, GQA self-attention (causal, per document), SwiGLU MLP."""
    DIT_BLOCK = "dit_block"
    """MovieGen-style DiT block: self-attention, cross-attention to text, GELU MLP, adaLN modulation."""


class Modality(StrEnum):
    """What one instance of a module's input is."""

    IMAGE = "image"
    VIDEO = "video"
    TEXT = "text"


class MergeKind(StrEnum):
    """How a module's output enters the next module."""

    TOKEN_SCATTER = "token_scatter"
    """Merged image tokens are scattered into the language model's placeholder positions (VLM)."""
    CROSS_ATTENTION_CONTEXT = "cross_attention_context"
    """The text encoder's output is the DiT's cross-attention context (T2V)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageGeometry:
    """Patch geometry of a ViT: a square image of `image_px` is cut into patches, then merged for the LM."""

    image_px: int = 728
    """Side of the (resized) square image in pixels."""
    patch_px: int = 14
    """Side of one ViT patch in pixels."""
    merge: int = 4
    """Side of the square of patches merged into one language-model token (Qwen2-VL spatial merge)."""

    def __post_init__(self) -> None:
        require(self.patch_px > 0, f"patch_px must be positive, got {self.patch_px}")
        require(
            self.image_px > 0 and self.image_px % self.patch_px == 0,
            f"image_px ({self.image_px}) must be a positive multiple of patch_px ({self.patch_px})",
        )
        side = self.image_px // self.patch_px
        require(
            self.merge > 0 and side % self.merge == 0,
            f"merge ({self.merge}) must divide the patch grid side ({side}); change image_px or merge",
        )

    @property
    def patches_per_image(self) -> int:
        """Sequence length the ViT runs on for one image (728 px at 14 px: 52 x 52 = 2,704)."""
        side = self.image_px // self.patch_px
        return side * side

    @property
    def tokens_per_image(self) -> int:
        """Tokens one image contributes to the language model after the merger (2,704 / 16 = 169)."""
        return self.patches_per_image // (self.merge * self.merge)


@dataclass(frozen=True, kw_only=True, slots=True)
class VideoGeometry:
    """Latent geometry of a video DiT (MovieGen-like defaults)."""

    fps: int = 16
    """Frames per second after transcoding."""
    temporal_compression: int = 8
    """Frames per latent frame (VAE temporal compression)."""
    spatial_compression: int = 8
    """Pixels per latent pixel along each side (VAE spatial compression)."""
    patch: int = 2
    """Side of the latent patch that becomes one token."""
    width_px: int = 768
    height_px: int = 768

    def __post_init__(self) -> None:
        require(self.fps > 0, f"fps must be positive, got {self.fps}")
        require(
            self.temporal_compression > 0 and self.fps % self.temporal_compression == 0,
            f"temporal_compression ({self.temporal_compression}) must divide fps ({self.fps})",
        )
        step = self.spatial_compression * self.patch
        require(
            self.spatial_compression > 0 and self.patch > 0,
            "spatial_compression and patch must be positive",
        )
        require(
            self.width_px % step == 0 and self.height_px % step == 0,
            f"width_px and height_px ({self.width_px} x {self.height_px}) must be multiples of "
            f"spatial_compression * patch ({step})",
        )

    @property
    def tokens_per_latent_frame(self) -> int:
        step = self.spatial_compression * self.patch
        return (self.width_px // step) * (self.height_px // step)

    @property
    def tokens_per_second(self) -> int:
        """DiT tokens per second of video (16 fps / 8 x (768 / 16)^2 = 4,608)."""
        return self.fps // self.temporal_compression * self.tokens_per_latent_frame

    def tokens_for(self, duration_s: float) -> int:
        """DiT tokens of a clip: whole latent frames, at least one."""
        latent_frames = max(1, round(duration_s * self.fps / self.temporal_compression))
        return latent_frames * self.tokens_per_latent_frame


@dataclass(frozen=True, kw_only=True, slots=True)
class ModuleSpec:
    """One modality module: a stack of identical blocks and its pre/post parts."""

    name: str
    """Short identifier used in plans and metrics (``vit``, ``llm``, ``text_encoder``, ``dit``)."""
    kind: LayerKind
    layers: int
    hidden: int
    ffn_hidden: int
    heads: int
    kv_heads: int
    input: Modality
    """What one instance is: an image (ViT), a video clip (DiT) or a packed text sequence (decoders)."""
    frozen: bool = False
    """Frozen modules run forward only (and input-gradient backward when a trainable module feeds them)."""
    vocab_size: int = 0
    """Token embedding rows (decoder modules); 0 means no embedding table."""
    lm_head: bool = False
    """Whether the module ends in a vocabulary projection and loss (backbones, not text encoders)."""
    image: ImageGeometry | None = None
    """Patch geometry, for ViT modules."""
    projector_hidden: int = 0
    """Hidden width of the ViT's two-layer merger MLP (Qwen2-VL: hidden * merge^2); 0 for none."""
    projector_out: int = 0
    """Output width of the merger (the language model's hidden)."""
    video: VideoGeometry | None = None
    """Latent geometry, for DiT modules."""
    context_hidden: int = 0
    """Width of the cross-attention context before its projection (the text encoder's hidden), DiT only."""
    display_name: str = ""
    """Human name of the preset, e.g. ``ViT 5B``."""

    def __post_init__(self) -> None:
        n = self.name
        require(n.isidentifier() and n.islower(), f"module name must be a lowercase identifier, got {n!r}")
        for fname in ("layers", "hidden", "ffn_hidden", "heads", "kv_heads"):
            value = getattr(self, fname)
            require(value > 0, f"module '{n}': {fname} must be positive, got {value}")
        require(
            self.hidden % self.heads == 0,
            f"module '{n}': heads ({self.heads}) must divide hidden ({self.hidden})",
        )
        require(
            self.heads % self.kv_heads == 0,
            f"module '{n}': kv_heads ({self.kv_heads}) must divide heads ({self.heads})",
        )
        if self.kind is LayerKind.VIT_BLOCK:
            require(self.input is Modality.IMAGE, f"module '{n}': a vit_block module takes images")
            require(self.image is not None, f"module '{n}': a vit_block module needs image geometry")
        if self.kind is LayerKind.DIT_BLOCK:
            require(self.input is Modality.VIDEO, f"module '{n}': a dit_block module takes video")
            require(self.video is not None, f"module '{n}': a dit_block module needs video geometry")
        if self.kind is LayerKind.DECODER_BLOCK:
            require(self.input is Modality.TEXT, f"module '{n}': a decoder_block module takes text")
        require(not (self.lm_head and self.vocab_size <= 0), f"module '{n}': lm_head needs vocab_size > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the K (and V) projection: kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def trainable(self) -> bool:
        return not self.frozen

    # ---- parameter counts (bias terms included where the architecture has them) ----
    def block_params(self) -> int:
        """Parameters of one block."""
        h, f, kv = self.hidden, self.ffn_hidden, self.kv_dim
        if self.kind is LayerKind.VIT_BLOCK:
            attn = (h * 3 * h + 3 * h) + (h * h + h)
            mlp = (h * f + f) + (f * h + h)
            norms = 2 * 2 * h
            return attn + mlp + norms
        if self.kind is LayerKind.DECODER_BLOCK:
            attn = h * h + 2 * h * kv + 2 * kv + h + h * h  # Qwen2-style qkv bias; Llama has none (0.01%)
            mlp = 3 * h * f
            norms = 2 * h
            return attn + mlp + norms
        # DiT: self-attention, cross-attention (q from video, k/v from projected text), GELU MLP,
        # adaLN-single per-block modulation table (6 vectors: shift/scale/gate for attention and MLP).
        self_attn = 4 * h * h + 4 * h
        cross_attn = 4 * h * h + 4 * h
        mlp = (h * f + f) + (f * h + h)
        norms = 3 * 2 * h
        ada = 6 * h
        return self_attn + cross_attn + mlp + norms + ada

    def pre_params(self) -> int:
        """Parameters of the pre part (embedding table, patchify, context projection, timestep MLP)."""
        h = self.hidden
        if self.kind is LayerKind.VIT_BLOCK:
            assert self.image is not None
            return 3 * 2 * self.image.patch_px**2 * h  # Conv3d patchify over 2 frames, no bias
        if self.kind is LayerKind.DIT_BLOCK:
            assert self.video is not None
            latent_channels = 16
            patchify = latent_channels * self.video.patch**2 * h + h
            context_proj = self.context_hidden * h + h if self.context_hidden else 0
            timestep_mlp = (256 * h + h) + (h * 6 * h + 6 * h)
            return patchify + context_proj + timestep_mlp
        return self.vocab_size * h

    def post_params(self) -> int:
        """Parameters of the post part (merger/projector, final norm, LM head, unpatchify)."""
        h = self.hidden
        if self.kind is LayerKind.VIT_BLOCK:
            if not self.projector_hidden:
                return 2 * h
            assert self.image is not None
            merged = h * self.image.merge**2
            return (
                2 * h
                + (merged * self.projector_hidden + self.projector_hidden)
                + (self.projector_hidden * self.projector_out + self.projector_out)
            )
        if self.kind is LayerKind.DIT_BLOCK:
            assert self.video is not None
            return 2 * h + h * 16 * self.video.patch**2
        return h + (self.vocab_size * h if self.lm_head else 0)

    def total_params(self) -> int:
        return self.pre_params() + self.layers * self.block_params() + self.post_params()

    def output_hidden(self) -> int:
        """Width of the tensor this module hands to the next module."""
        if self.kind is LayerKind.VIT_BLOCK and self.projector_out:
            return self.projector_out
        return self.hidden


@dataclass(frozen=True, kw_only=True, slots=True)
class ModuleEdge:
    """Data flows from module `src` into module `dst` by `merge`."""

    src: str
    dst: str
    merge: MergeKind


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """A multimodal model: modality modules and the DAG between them."""

    name: str
    modules: tuple[ModuleSpec, ...]
    edges: tuple[ModuleEdge, ...] = field(default=())

    def __post_init__(self) -> None:
        require(len(self.modules) > 0, f"model '{self.name}': modules must not be empty")
        names = [m.name for m in self.modules]
        require(len(set(names)) == len(names), f"model '{self.name}': module names must be unique, got {names}")
        for e in self.edges:
            require(e.src in names, f"model '{self.name}': edge source '{e.src}' is not a module ({names})")
            require(e.dst in names, f"model '{self.name}': edge target '{e.dst}' is not a module ({names})")
            require(e.src != e.dst, f"model '{self.name}': edge '{e.src}' -> itself is a cycle")
            src, dst = self.module(e.src), self.module(e.dst)
            if e.merge is MergeKind.TOKEN_SCATTER:
                require(
                    dst.input is Modality.TEXT,
                    f"model '{self.name}': token_scatter edge '{e.src}' -> '{e.dst}' needs a text module target",
                )
                require(
                    src.output_hidden() == dst.hidden,
                    f"model '{self.name}': '{e.src}' hands width {src.output_hidden()} to '{e.dst}' of hidden "
                    f"{dst.hidden}; set projector_out={dst.hidden}",
                )
            else:
                require(
                    dst.kind is LayerKind.DIT_BLOCK and src.input is Modality.TEXT,
                    f"model '{self.name}': cross_attention_context edge '{e.src}' -> '{e.dst}' must go from a "
                    "text module to a DiT",
                )
        # Topological order must equal declaration order: plans and costs rely on it.
        position = {n: i for i, n in enumerate(names)}
        for e in self.edges:
            require(
                position[e.src] < position[e.dst],
                f"model '{self.name}': declare '{e.src}' before '{e.dst}' (modules are listed in DAG order)",
            )

    def module(self, name: str) -> ModuleSpec:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"model '{self.name}' has no module '{name}' (modules: {[m.name for m in self.modules]})")

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    def upstream(self, name: str) -> tuple[ModuleEdge, ...]:
        return tuple(e for e in self.edges if e.dst == name)

    def downstream(self, name: str) -> tuple[ModuleEdge, ...]:
        return tuple(e for e in self.edges if e.src == name)

    def needs_backward(self, name: str) -> bool:
        """A module runs backward if it is trainable or a trainable module sits upstream of it."""
        if self.module(name).trainable:
            return True
        return any(self.needs_backward(e.src) for e in self.upstream(name))

    def total_params(self) -> int:
        return sum(m.total_params() for m in self.modules)

"""Token layouts of one module's work on one (sub-)microbatch: attention segments, positions and input data.

Every layout follows `spec.batch.module_instances` order, the order the plan's sub-microbatches index and
`plan.shapes` counts: images and clips in document order, one packed sequence per microbatch for text (each
document's merged image tokens first, then its text). Geometries are pure functions of the batch metadata, the
instance subset and the data seed, so any rank can build the one it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from pipeweaver.client.data import LATENT_CHANNELS, SyntheticData, cosine_alpha
from pipeweaver.spec.batch import BatchMetadata, Microbatch
from pipeweaver.spec.model import LayerKind, MergeKind, Modality, ModelSpec, ModuleSpec

IGNORE_INDEX = -100
"""Label of positions without a next-token target (image placeholders, a document's last token)."""

Segment = tuple[int, int, int, int]
"""(query start, query length, key start, key length): one independent attention block."""


def patch_dim(module: ModuleSpec) -> int:
    """Values of one ViT patch: 3 channels x 2 frames x patch_px^2 (Qwen2-VL's Conv3d patchify)."""
    assert module.image is not None
    return 3 * 2 * module.image.patch_px**2


def latent_dim(module: ModuleSpec) -> int:
    """Values of one DiT token: LATENT_CHANNELS x patch^2."""
    assert module.video is not None
    return LATENT_CHANNELS * module.video.patch**2


def context_source(model: ModelSpec, module: str) -> ModuleSpec | None:
    """The module whose output is `module`'s cross-attention context, if any."""
    for e in model.upstream(module):
        if e.merge is MergeKind.CROSS_ATTENTION_CONTEXT:
            return model.module(e.src)
    return None


def scatters_images(model: ModelSpec, module: str) -> bool:
    return any(e.merge is MergeKind.TOKEN_SCATTER for e in model.upstream(module))


def _media(mb: Microbatch, modality: Modality) -> list[tuple[int, int, int, int]]:
    """(document, item within the document's media, tokens, merged tokens) in module-instance order."""
    return [
        (d, k, m.tokens, m.merged_tokens)
        for d, doc in enumerate(mb.documents)
        for k, m in enumerate(doc.media)
        if m.modality is modality
    ]


def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding (rotate-half form) at `positions`: (cos, sin), each (N, 1, head_dim) in `dtype`."""
    half = head_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(half, device=positions.device, dtype=torch.float32) / half))
    with torch.no_grad():
        ang = positions.to(torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        cos = torch.cat([cos, cos], -1)[:, None, :].to(dtype)
        sin = torch.cat([sin, sin], -1)[:, None, :].to(dtype)
    return cos, sin


ROPE_TABLE_MAX_POSITIONS = 1 << 16
"""Longest document whose rotary angles come from the shared table (`shared_rope_tables`); longer ones are
computed."""

_ROPE_TABLES: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def shared_rope_tables(
    positions: torch.Tensor, longest: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_tables` at `positions`, all below `longest` (known on the host: reading them back would wait for the
    device), as two row gathers from one table of positions 0..n-1 per (head_dim, dtype, device), computed once and
    grown by doubling: instead of ~15 small kernels per microbatch and iteration (shapes change every iteration, so
    nothing else is reused; on host-bound ranks each launch counts). The rows are bit for bit `rope_tables` of the
    same positions: the same float32 products and elementwise functions."""
    if longest > ROPE_TABLE_MAX_POSITIONS:
        return rope_tables(positions, head_dim, dtype)
    key = (head_dim, dtype, positions.device)
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < longest:
        size = 1 << max(longest - 1, 255).bit_length()  # at least 256 rows, then powers of two
        every = torch.arange(size, device=positions.device)
        table = _ROPE_TABLES[key] = rope_tables(every, head_dim, dtype)
    cos, sin = table
    return cos.index_select(0, positions), sin.index_select(0, positions)


def _positions(lengths: list[int]) -> torch.Tensor:
    """0, 1, ... restarting at every length: whole-tensor ops (an arange per document cost 4.5 ms at 1,024)."""
    if not lengths:
        return torch.zeros(0, dtype=torch.long)
    spans = torch.tensor(lengths, dtype=torch.long)
    total = int(spans.sum())
    starts = spans.cumsum(0) - spans
    return torch.arange(total) - starts.repeat_interleave(spans, output_size=total)


@dataclass(frozen=True, slots=True)
class LossScale:
    """Denominators that make the sum of per-microbatch losses the iteration's mean (pipelined == unpipelined)."""

    text_targets: int
    """Next-token targets of the whole iteration (at least 1)."""
    video_values: int
    """Latent values of every clip of the iteration (at least 1)."""

    @staticmethod
    def of(model: ModelSpec, batch: BatchMetadata) -> LossScale:
        targets = sum(max(d.text_tokens - 1, 0) for mb in batch.microbatches for d in mb.documents)
        values = 0
        for m in model.modules:
            if m.kind is LayerKind.DIT_BLOCK:
                values += sum(x.tokens for mb in batch.microbatches for x in mb.media(Modality.VIDEO)) * latent_dim(m)
        return LossScale(text_targets=max(targets, 1), video_values=max(values, 1))


@dataclass(eq=False)
class Geometry:
    """What a module's parts need to process `instances` of microbatch `microbatch` (shared by every chunk)."""

    model: ModelSpec
    module: ModuleSpec
    microbatch: int
    instances: tuple[int, ...]
    mb: Microbatch
    data: SyntheticData
    scale: LossScale
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def tokens(self) -> int:
        return sum(q for _, q, _, _ in self.segments)

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        """Self-attention blocks: one per image or clip, one per document for text."""
        out: list[Segment] = []
        start = 0
        for n in self.spans:
            out.append((start, n, start, n))
            start += n
        return tuple(out)

    @property
    def spans(self) -> list[int]:
        raise NotImplementedError

    def gemm_rows(self) -> tuple[int, ...]:
        """The row counts the module's linear layers see on this geometry (what `kernel_warmup` loads kernels
        for): the tokens, plus per kind the merged image tokens, the caption context and the clip count."""
        return (self.tokens,)

    def _float(self, t: torch.Tensor) -> torch.Tensor:
        return self._dev(t.to(self.dtype))

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (built on the host) on the device. To a GPU through pinned memory and without blocking: a pageable
        copy makes the host wait for every kernel queued before it, which stalls the executor's kernel launches
        and its posting of transfers (the GPU then idles while the host catches up)."""
        if self.device.type != "cuda" or t.device.type == "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)


@dataclass(eq=False)
class VisionGeometry(Geometry):
    """Images of a ViT sub-microbatch: each image attends within itself; merged in windows of merge^2 patches."""

    @cached_property
    def images(self) -> list[tuple[int, int, int, int]]:
        every = _media(self.mb, Modality.IMAGE)
        return [every[i] for i in self.instances]

    @property
    def spans(self) -> list[int]:
        return [n for _, _, n, _ in self.images]

    def gemm_rows(self) -> tuple[int, ...]:
        return (self.tokens, sum(merged for _, _, _, merged in self.images))

    @cached_property
    def window(self) -> int:
        """Patches merged into one output token."""
        assert self.module.image is not None
        w = self.module.image.merge**2
        for _, _, n, merged in self.images:
            if merged and n != merged * w:
                raise ValueError(
                    f"module '{self.module.name}': an image of {n} patches cannot give {merged} merged tokens with "
                    f"merge windows of {w} patches"
                )
        return w

    @cached_property
    def positions(self) -> torch.Tensor:
        return self._dev(_positions(self.spans))

    @cached_property
    def patches(self) -> torch.Tensor:
        dim = patch_dim(self.module)
        parts = [self.data.image_patches(self.microbatch, d, k, n, dim) for d, k, n, _ in self.images]
        return self._float(torch.cat(parts) if parts else torch.zeros(0, dim, device=self.data.device))


@dataclass(eq=False)
class TextGeometry(Geometry):
    """The packed text sequence of a microbatch: causal attention within each document, RoPE positions per
    document, image placeholders (when a ViT scatters into it) before each document's text."""

    @cached_property
    def _layout(self) -> tuple[list[int], list[int], list[int], dict[int, list[int]]]:
        """(per-document image tokens, per-document text tokens, document start, image instance -> slots)."""
        scatter = scatters_images(self.model, self.module.name)
        images, texts, starts = [], [], []
        slots: dict[int, list[int]] = {}
        pos, instance = 0, 0
        for doc in self.mb.documents:
            starts.append(pos)
            n_img = 0
            for m in doc.media:
                if m.modality is not Modality.IMAGE:
                    continue
                if scatter:
                    slots[instance] = list(range(pos + n_img, pos + n_img + m.merged_tokens))
                    n_img += m.merged_tokens
                instance += 1
            images.append(n_img)
            texts.append(doc.text_tokens)
            pos += n_img + doc.text_tokens
        return images, texts, starts, slots

    @property
    def spans(self) -> list[int]:
        images, texts, _, _ = self._layout
        return [i + t for i, t in zip(images, texts, strict=True) if i + t > 0]

    @cached_property
    def positions(self) -> torch.Tensor:
        """Position of each token inside its document (RoPE restarts per document)."""
        return self._dev(_positions(self.spans))

    def rope_tables(self, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the rotary embedding at `positions`, (tokens, 1, head_dim) each, computed once per
        geometry: every block of every chunk on this geometry (and q and k alike) rotates by the same angles, and
        computing them per call was ~20 small kernels per block."""
        found = self._rope.get((head_dim, dtype))
        if found is None:
            longest = max(self.spans, default=0)
            found = self._rope[(head_dim, dtype)] = shared_rope_tables(self.positions, longest, head_dim, dtype)
        return found

    @cached_property
    def _rope(self) -> dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]:
        return {}

    @cached_property
    def _ids_and_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (image placeholders 0) and next-token labels (IGNORE_INDEX on image tokens and on each
        document's last text token), built with a handful of whole-sequence ops however many documents."""
        images, texts, _, _ = self._layout
        n_text = sum(texts)
        total = n_text + sum(images)
        text = self.data.text_ids(self.microbatch, n_text, self.module.vocab_size)
        # Each document is its image tokens, then its text tokens: mark the text positions.
        spans = torch.tensor([n for pair in zip(images, texts, strict=True) for n in pair], dtype=torch.long)
        is_text = torch.arange(len(spans)).remainder(2).repeat_interleave(spans, output_size=total).bool()
        ids = torch.zeros(total, dtype=torch.long)
        ids[is_text] = text
        target = torch.full((n_text,), IGNORE_INDEX, dtype=torch.long)
        if n_text:
            target[:-1] = text[1:]
            lengths = torch.tensor(texts, dtype=torch.long)
            ends = lengths.cumsum(0)[lengths > 0] - 1
            target[ends] = IGNORE_INDEX  # a document's last token predicts nothing (the next one is another's)
        labels = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
        labels[is_text] = target
        return ids, labels

    @property
    def token_ids(self) -> torch.Tensor:
        return self._dev(self._ids_and_labels[0])

    @property
    def labels(self) -> torch.Tensor:
        return self._dev(self._ids_and_labels[1])

    def image_slots(self, image_instances: tuple[int, ...]) -> torch.Tensor:
        """Sequence positions of the merged tokens of `image_instances`, in that order."""
        slots = self._layout[3]
        return self._dev(torch.tensor([p for i in image_instances for p in slots[i]], dtype=torch.long))


@dataclass(eq=False)
class VideoGeometry(Geometry):
    """Clips of a DiT sub-microbatch: self-attention within each clip, cross-attention from each clip to its own
    document's caption inside the microbatch's packed text sequence, one diffusion timestep per clip."""

    @cached_property
    def clips(self) -> list[tuple[int, int, int, int]]:
        every = _media(self.mb, Modality.VIDEO)
        return [every[i] for i in self.instances]

    @property
    def spans(self) -> list[int]:
        return [n for _, _, n, _ in self.clips]

    def gemm_rows(self) -> tuple[int, ...]:
        return (self.tokens, self.context_tokens, len(self.clips))  # tokens, cross-attention K/V, timestep MLP

    @cached_property
    def positions(self) -> torch.Tensor:
        return self._dev(_positions(self.spans))

    @cached_property
    def _clip_of_token_host(self) -> torch.Tensor:
        return torch.cat(
            [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.spans)]
            or [torch.zeros(0, dtype=torch.long)]
        )

    @cached_property
    def clip_of_token(self) -> torch.Tensor:
        return self._dev(self._clip_of_token_host)

    @cached_property
    def context_tokens(self) -> int:
        """Length of the packed caption sequence the context carries (every document's text)."""
        return self.mb.text_tokens if context_source(self.model, self.module.name) is not None else 0

    @cached_property
    def cross_segments(self) -> tuple[Segment, ...]:
        starts: list[int] = []
        pos = 0
        for doc in self.mb.documents:
            starts.append(pos)
            pos += doc.text_tokens
        out: list[Segment] = []
        q = 0
        for d, _, n, _ in self.clips:
            k_len = self.mb.documents[d].text_tokens if self.context_tokens else 0
            out.append((q, n, starts[d], k_len))
            q += n
        return tuple(out)

    @cached_property
    def timesteps(self) -> torch.Tensor:
        t = [self.data.diffusion_timestep(self.microbatch, d, k) for d, k, _, _ in self.clips]
        return self._float(torch.tensor(t, dtype=torch.float32))

    @cached_property
    def _latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        dim = latent_dim(self.module)
        x0 = [self.data.video_latents(self.microbatch, d, k, n, dim) for d, k, n, _ in self.clips]
        noise = [self.data.diffusion_noise(self.microbatch, d, k, n, dim) for d, k, n, _ in self.clips]
        if not x0:
            empty = torch.zeros(0, dim, device=self.data.device)
            return empty, empty
        return torch.cat(x0), torch.cat(noise)

    @property
    def noise(self) -> torch.Tensor:
        """The regression target (epsilon prediction)."""
        return self._float(self._latents[1])

    @property
    def noisy_latents(self) -> torch.Tensor:
        """x_t = a(t) * x0 + s(t) * noise, per clip."""
        x0, noise = self._latents
        t = torch.tensor([self.data.diffusion_timestep(self.microbatch, d, k) for d, k, _, _ in self.clips])
        a, s = cosine_alpha(t)
        per_token = self._clip_of_token_host
        # Scales per token on the host (a few values), applied where the latents were drawn.
        a_tok, s_tok = (v[per_token, None].to(x0.device, non_blocking=True) for v in (a, s))
        return self._float(a_tok * x0 + s_tok * noise)


def geometry(
    model: ModelSpec,
    batch: BatchMetadata,
    module: str,
    microbatch: int,
    instances: tuple[int, ...],
    data: SyntheticData,
    scale: LossScale,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Geometry:
    """The geometry of `module` on `instances` of microbatch `microbatch` (text modules: instance 0, the whole
    packed sequence)."""
    spec = model.module(module)
    cls: type[Geometry] = {
        LayerKind.VIT_BLOCK: VisionGeometry,
        LayerKind.DECODER_BLOCK: TextGeometry,
        LayerKind.DIT_BLOCK: VideoGeometry,
    }[spec.kind]
    return cls(
        model=model,
        module=spec,
        microbatch=microbatch,
        instances=instances,
        mb=batch.microbatches[microbatch],
        data=data,
        scale=scale,
        device=device or torch.device("cpu"),
        dtype=dtype,
    )

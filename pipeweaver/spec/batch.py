"""Batch metadata: what the trainer tells the planner about an upcoming iteration.

An iteration holds microbatches; a microbatch is a packed sequence of documents; a document has text tokens
and media items (images, video clips) with their token counts. Document boundaries are kept because attention
cost depends on them. `module_instances` turns a microbatch into the per-module work items every cost follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeweaver.errors import require
from pipeweaver.spec.model import MergeKind, Modality, ModelSpec, ModuleSpec
from pipeweaver.spec.parallel import ParallelSpec


@dataclass(frozen=True, slots=True)
class MediaItem:
    """One image or video clip inside a document."""

    modality: Modality
    tokens: int
    """Sequence length the encoder (ViT) or decoder (DiT) runs on for this item."""
    merged_tokens: int = 0
    """Tokens this item contributes to the language model after merging (images: 169); 0 for video."""

    def __post_init__(self) -> None:
        require(self.modality is not Modality.TEXT, "a media item is an image or a video, not text")
        require(self.tokens > 0, f"media tokens must be positive, got {self.tokens}")
        require(self.merged_tokens >= 0, f"merged_tokens must not be negative, got {self.merged_tokens}")


@dataclass(frozen=True, slots=True)
class Document:
    """One sample: text tokens plus the media it carries (order within the document is not modelled)."""

    text_tokens: int
    media: tuple[MediaItem, ...] = ()

    def __post_init__(self) -> None:
        require(self.text_tokens >= 0, f"text_tokens must not be negative, got {self.text_tokens}")

    def count(self, modality: Modality) -> int:
        return sum(1 for m in self.media if m.modality is modality)


@dataclass(frozen=True, slots=True)
class Microbatch:
    """A packed sequence of documents."""

    documents: tuple[Document, ...]

    def media(self, modality: Modality) -> tuple[MediaItem, ...]:
        return tuple(m for d in self.documents for m in d.media if m.modality is modality)

    @property
    def text_tokens(self) -> int:
        return sum(d.text_tokens for d in self.documents)

    def language_tokens(self) -> int:
        """Tokens of the packed language-model sequence: text plus merged image tokens."""
        return sum(d.text_tokens + sum(m.merged_tokens for m in d.media) for d in self.documents)


@dataclass(frozen=True, slots=True)
class BatchMetadata:
    """One iteration's data as the planner sees it (no tensors, only counts)."""

    iteration: int
    microbatches: tuple[Microbatch, ...]
    dp_replica: int = 0

    def __post_init__(self) -> None:
        require(self.iteration >= 0, f"iteration must not be negative, got {self.iteration}")
        require(self.dp_replica >= 0, f"dp_replica must not be negative, got {self.dp_replica}")
        require(len(self.microbatches) > 0, "a batch needs at least one microbatch")

    def signature(self) -> tuple[object, ...]:
        """A hashable key of everything that shapes a plan (not the iteration number): the plan-cache key."""
        return tuple(
            tuple(
                (d.text_tokens, tuple((m.modality.value, m.tokens, m.merged_tokens) for m in d.media))
                for d in mb.documents
            )
            for mb in self.microbatches
        )


@dataclass(frozen=True, slots=True)
class Instance:
    """One unit of a module's work for one microbatch (an image, a clip, or a packed text sequence)."""

    tokens: int
    """Sequence length the module's blocks process."""
    attention_spans: tuple[int, ...]
    """Lengths of the independent attention blocks (documents / images / clips); they sum to `tokens`."""
    context_tokens: int = 0
    """Cross-attention context length (DiT: the caption's tokens)."""
    output_tokens: int = 0
    """Tokens handed to downstream modules (ViT: merged tokens; others: `tokens`)."""


def _text_module_scatters_images(model: ModelSpec, module: ModuleSpec) -> bool:
    return any(e.merge is MergeKind.TOKEN_SCATTER for e in model.upstream(module.name))


def module_instances(model: ModelSpec, module_name: str, microbatch: Microbatch) -> tuple[Instance, ...]:
    """The work items of `module_name` for one microbatch, in a stable order.

    - image modules: one instance per image (attention within the image);
    - video modules: one instance per clip, cross-attending to its document's text;
    - text modules: one packed sequence per microbatch (attention per document); images scattered into it by a
      token-scatter edge add their merged tokens to their document.
    """
    module = model.module(module_name)
    if module.input is Modality.IMAGE:
        return tuple(
            Instance(tokens=m.tokens, attention_spans=(m.tokens,), output_tokens=m.merged_tokens or m.tokens)
            for m in microbatch.media(Modality.IMAGE)
        )
    if module.input is Modality.VIDEO:
        return tuple(
            Instance(
                tokens=m.tokens,
                attention_spans=(m.tokens,),
                context_tokens=max(d.text_tokens, 1),
                output_tokens=m.tokens,
            )
            for d in microbatch.documents
            for m in d.media
            if m.modality is Modality.VIDEO
        )
    scatter = _text_module_scatters_images(model, module)
    spans = tuple(
        s
        for s in (
            d.text_tokens + (sum(m.merged_tokens for m in d.media if m.modality is Modality.IMAGE) if scatter else 0)
            for d in microbatch.documents
        )
        if s > 0
    )
    if not spans:
        return ()
    total = sum(spans)
    return (Instance(tokens=total, attention_spans=spans, output_tokens=total),)


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchLimits:
    """Upper bounds a planner accepts; requests beyond them are refused, naming the field and the limit."""

    max_microbatches: int = 1024
    max_documents_per_microbatch: int = 4096
    max_media_per_microbatch: int = 512
    max_tokens_per_media: int = 1 << 20


def validate_batch(
    model: ModelSpec, parallel: ParallelSpec, batch: BatchMetadata, limits: BatchLimits | None = None
) -> None:
    """Raise `SpecError` naming the offending field (``microbatches[3].documents[2].text_tokens``) and limit."""
    lim = limits or BatchLimits()
    require(
        len(batch.microbatches) <= lim.max_microbatches,
        f"microbatches: {len(batch.microbatches)} exceeds the limit of {lim.max_microbatches}",
    )
    modalities = {m.input for m in model.modules}
    text_modules = [m for m in model.modules if m.input is Modality.TEXT]
    for i, mb in enumerate(batch.microbatches):
        where = f"microbatches[{i}]"
        require(len(mb.documents) > 0, f"{where}.documents: a microbatch needs at least one document")
        require(
            len(mb.documents) <= lim.max_documents_per_microbatch,
            f"{where}.documents: {len(mb.documents)} exceeds the limit of {lim.max_documents_per_microbatch}",
        )
        n_media = sum(len(d.media) for d in mb.documents)
        require(
            n_media <= lim.max_media_per_microbatch,
            f"{where}: {n_media} media items exceed the limit of {lim.max_media_per_microbatch}",
        )
        for j, d in enumerate(mb.documents):
            for k, m in enumerate(d.media):
                require(
                    m.modality in modalities,
                    f"{where}.documents[{j}].media[{k}]: model '{model.name}' has no {m.modality.value} module",
                )
                require(
                    m.tokens <= lim.max_tokens_per_media,
                    f"{where}.documents[{j}].media[{k}].tokens: {m.tokens} exceeds the limit of "
                    f"{lim.max_tokens_per_media}",
                )
        if text_modules:
            seq = max(sum(i.tokens for i in module_instances(model, t.name, mb)) for t in text_modules)
            require(
                seq <= parallel.seq_len,
                f"{where}: {seq} language-model tokens exceed seq_len ({parallel.seq_len})",
            )

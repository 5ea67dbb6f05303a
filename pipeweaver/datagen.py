"""Seeded synthetic workloads: one iteration's `BatchMetadata`, drawn from dataset-like sample distributions.

Documents come from stand-ins for the paper's datasets (LAION-2B, OBELICS, ScienceQA, ShareGPT4Video,
InternVid, MMTrail-2M) and are greedily packed into exactly `parallel.microbatches` microbatches under the
model's limits. Iteration k draws from its own generator, seeded from (seed, k), so any iteration is
reproducible on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np

from pipeweaver.errors import SpecError, require
from pipeweaver.spec.batch import BatchLimits, BatchMetadata, Document, MediaItem, Microbatch
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import Modality, ModelSpec, ModuleSpec
from pipeweaver.spec.parallel import ParallelSpec
from pipeweaver.spec.workload import DatasetKind, Workload

__all__ = [
    "DYNAMIC_PERIOD",
    "BatchSummary",
    "MediaBounds",
    "describe",
    "dynamic_bounds",
    "dynamic_trace",
    "representative_batch",
    "sample_batch",
]

# ---- packing limits (paper section 6.3) --------------------------------------------------------------------

MAX_CLIPS_PER_MICROBATCH = 8
MAX_VIDEO_SECONDS_PER_MICROBATCH = 16.0
MAX_CLIP_SECONDS = 16.0

# Text lengths are the datasets' own at real sequence lengths. Only toy sequences (tiny-* presets, seq_len
# < 512) shrink text, by seq_len / 512, so a 256-token sequence still holds a couple of ScienceQA items and
# packing mixes image-heavy and text-only microbatches instead of truncating one document per microbatch.
_TOY_SEQ_LEN = 512

# Drafts are drawn in blocks to keep numpy call overhead off the per-document path.
_DRAW_BLOCK = 64
# A bounded draw (lower bound on images) skips text-only documents; this guards against a source that never
# yields media.
_MAX_DRAWS_PER_MICROBATCH = 100_000


# ---- sample distributions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Draft:
    """A sampled document before packing: text tokens plus either images or one clip (in latent frames)."""

    text_tokens: int
    images: int = 0
    clip_frames: int = 0


@dataclass(frozen=True, slots=True)
class _Scale:
    """What a source needs to know about the workload to draw documents."""

    text: float
    """Multiplier on dataset text lengths (1 except for toy sequence lengths)."""
    frame_s: float
    """Seconds of video per latent frame (video sources only)."""


_Source = Callable[[np.random.Generator, int, _Scale], list[_Draft]]


def _text(values: np.ndarray, scale: _Scale) -> list[int]:
    return [max(1, round(float(v))) for v in values * scale.text]


def _laion(rng: np.random.Generator, n: int, scale: _Scale) -> list[_Draft]:
    """Image-text pairs: one image, a short caption averaging 16.4 tokens (lognormal, sigma 0.6)."""
    sigma = 0.6
    text = rng.lognormal(math.log(16.4) - sigma**2 / 2, sigma, n)
    return [_Draft(text_tokens=t, images=1) for t in _text(text, scale)]


def _obelics(rng: np.random.Generator, n: int, scale: _Scale) -> list[_Draft]:
    """Interleaved web documents: geometric image count (mean 2.5, at most 30) and heavy-tailed text per image
    (lognormal, median 160, sigma 1.2, clipped to the paper's 0.4..3115): about 800 text tokens a document."""
    images = np.minimum(rng.geometric(0.4, n), 30)
    per_image = np.clip(rng.lognormal(math.log(160.0), 1.2, n), 0.4, 3115.0)
    return [_Draft(text_tokens=t, images=int(k)) for t, k in zip(_text(per_image * images, scale), images, strict=True)]


def _scienceqa(rng: np.random.Generator, n: int, scale: _Scale) -> list[_Draft]:
    """Question-answer items: half carry one image; 100..400 text tokens
    (lognormal, median 210, sigma 0.3)."""
    has_image = rng.random(n) < 0.5
    text = np.clip(rng.lognormal(math.log(210.0), 0.3, n), 100.0, 400.0)
    return [_Draft(text_tokens=t, images=int(i)) for t, i in zip(_text(text, scale), has_image, strict=True)]


def _video_source(*, median_s: float, sigma_s: float, min_s: float, tokens_per_s: float, sigma_text: float) -> _Source:
    """Video-caption pairs: lognormal clip duration (clipped to [min_s, 16 s]) and a caption whose length is
    proportional to the duration, with a lognormal per-clip density of `tokens_per_s` (median)."""

    def draw(rng: np.random.Generator, n: int, scale: _Scale) -> list[_Draft]:
        seconds = np.clip(rng.lognormal(math.log(median_s), sigma_s, n), min_s, MAX_CLIP_SECONDS)
        density = rng.lognormal(math.log(tokens_per_s), sigma_text, n)
        frames = [
            max(1, min(round(float(s) / scale.frame_s), math.floor(MAX_CLIP_SECONDS / scale.frame_s))) for s in seconds
        ]
        text = _text(seconds * density, scale)
        return [_Draft(text_tokens=t, clip_frames=f) for t, f in zip(text, frames, strict=True)]

    return draw


# ShareGPT4Video: long clips (most hit the 16 s cap) with dense, detailed captions (~300 tokens a clip).
_sharegpt4video = _video_source(median_s=12.0, sigma_s=0.5, min_s=2.0, tokens_per_s=24.0, sigma_text=0.35)
# InternVid: shorter clips with one-line captions (~2.5 tokens a second).
_internvid = _video_source(median_s=7.0, sigma_s=0.6, min_s=1.0, tokens_per_s=2.5, sigma_text=0.5)
# MMTrail-2M: 5..15 s trailer clips with medium captions covering picture and sound.
_mmtrail = _video_source(median_s=8.0, sigma_s=0.4, min_s=2.0, tokens_per_s=10.0, sigma_text=0.4)

# A mixture packs each microbatch from one source chosen uniformly, as Megatron's BlendedDataset blends packed
# sequences of its component datasets; this keeps the cross-batch imbalance the paper measures (Fig. 4c-d).
_SOURCES: dict[DatasetKind, tuple[_Source, ...]] = {
    DatasetKind.LAION: (_laion,),
    DatasetKind.OBELICS: (_obelics,),
    DatasetKind.SCIENCEQA: (_scienceqa,),
    DatasetKind.VLM_MIX: (_laion, _obelics, _scienceqa),
    DatasetKind.VIDEO_CAPTION: (_sharegpt4video, _internvid, _mmtrail),
}


class _Stream:
    """Documents of one source in draw order; a document that did not fit is handed out again first."""

    def __init__(self, source: _Source, rng: np.random.Generator, scale: _Scale) -> None:
        self._source, self._rng, self._scale = source, rng, scale
        self._buffer: list[_Draft] = []
        self._pending: _Draft | None = None

    def next(self) -> _Draft:
        if self._pending is not None:
            draft, self._pending = self._pending, None
            return draft
        if not self._buffer:
            self._buffer = self._source(self._rng, _DRAW_BLOCK, self._scale)[::-1]
        return self._buffer.pop()

    def push_back(self, draft: _Draft) -> None:
        self._pending = draft


# ---- bounds ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaBounds:
    """Per-microbatch bounds on media: images (VLM) or seconds of video (T2V)."""

    low: float
    high: float
    unit: Literal["images", "seconds"]

    def __post_init__(self) -> None:
        require(
            0 <= self.low <= self.high,
            f"media bounds must satisfy 0 <= low <= high, got ({self.low}, {self.high}) {self.unit}",
        )


DYNAMIC_PERIOD = 20
"""Iterations in one rise-and-fall of the dynamic trace (paper Fig. 8b)."""


def _dynamic_fractions(iteration: int) -> tuple[float, float]:
    """Bounds as fractions of the per-microbatch cap; with the paper's cap of 48 images, 16/48 and 32/48.

    Phase p = iteration % 20 is the paper's iteration p + 1: during p = 0..4 the lower bound rises 0 -> 1/3
    under an upper bound of 2/3; from p = 5 both fall linearly to 0 at p = 14 and stay there (text only) to
    p = 19.
    """
    phase = iteration % DYNAMIC_PERIOD
    if phase < 5:
        return phase / 4 / 3, 2 / 3
    fall = max(0.0, (14 - phase) / 9)
    return fall / 3, 2 * fall / 3


def dynamic_bounds(workload: Workload, iteration: int) -> MediaBounds:
    """The media bounds the dynamic trace imposes on `iteration`: images (VLM) or seconds of video (T2V)."""
    require(iteration >= 0, f"iteration must not be negative, got {iteration}")
    low, high = _dynamic_fractions(iteration)
    if _is_video(workload.dataset):
        cap_s = MAX_VIDEO_SECONDS_PER_MICROBATCH
        return MediaBounds(low * cap_s, high * cap_s, "seconds")
    cap = _ImageLimits.of(workload).max_images
    return MediaBounds(round(low * cap), round(high * cap), "images")


# ---- packing -----------------------------------------------------------------------------------------------


def _is_video(dataset: DatasetKind) -> bool:
    return dataset is DatasetKind.VIDEO_CAPTION


def _module_for(model: ModelSpec, modality: Modality, dataset: DatasetKind) -> ModuleSpec:
    for m in model.modules:
        if m.input is modality:
            return m
    raise SpecError(
        f"dataset '{dataset.value}' needs a {modality.value} module, but model '{model.name}' has modules "
        f"{list(model.module_names)}"
    )


@dataclass(frozen=True, slots=True)
class _ImageLimits:
    seq_len: int
    patches: int
    """ViT tokens of one image."""
    merged: int
    """Language-model tokens of one image."""
    max_images: int
    """floor(seq_len / merged): 48 for 8192 tokens and 169 tokens an image."""
    max_documents: int

    @staticmethod
    def of(workload: Workload) -> _ImageLimits:
        vit = _module_for(workload.model, Modality.IMAGE, workload.dataset)
        assert vit.image is not None
        seq_len = workload.parallel.seq_len
        merged = vit.image.tokens_per_image
        limits = BatchLimits()
        return _ImageLimits(
            seq_len=seq_len,
            patches=vit.image.patches_per_image,
            merged=merged,
            max_images=min(seq_len // merged, limits.max_media_per_microbatch),
            max_documents=limits.max_documents_per_microbatch,
        )


def _image_document(text_tokens: int, images: int, lim: _ImageLimits) -> Document:
    item = MediaItem(modality=Modality.IMAGE, tokens=lim.patches, merged_tokens=lim.merged)
    return Document(text_tokens=text_tokens, media=(item,) * images)


def _pack_images(stream: _Stream, lim: _ImageLimits, low: int, high: int) -> Microbatch:
    """Next-fit packing under seq_len and the image cap, with `low <= images <= high`.

    Images beyond `high` are dropped from their document (its text stays). Until `low` images are in,
    text-only documents are skipped and room for the missing images (one text token each) is held back,
    trimming text.
    """
    docs: list[Document] = []
    room, images = lim.seq_len, 0
    for _ in range(_MAX_DRAWS_PER_MICROBATCH):
        if len(docs) >= lim.max_documents:
            break
        draft = stream.next()
        need = low - images
        if need > 0:
            k = min(draft.images, high - images, room // lim.merged)
            if k == 0:
                continue
            held_back = max(0, need - k) * (lim.merged + 1)
            text = min(draft.text_tokens, room - k * lim.merged - held_back)
        else:
            k = min(draft.images, high - images)
            text = draft.text_tokens
            if text + k * lim.merged > room:
                if docs:
                    stream.push_back(draft)
                    break
                text = room - k * lim.merged  # a lone document longer than the sequence is truncated
        docs.append(_image_document(text, k, lim))
        room -= text + k * lim.merged
        images += k
        if room == 0:
            break
    else:
        raise RuntimeError(f"could not pack {low} images into a microbatch in {_MAX_DRAWS_PER_MICROBATCH} draws")
    return Microbatch(documents=tuple(docs))


@dataclass(frozen=True, slots=True)
class _VideoLimits:
    seq_len: int
    frame_tokens: int
    """DiT tokens of one latent frame."""
    frame_s: float
    max_frames: int
    """16 s of video in latent frames."""

    @staticmethod
    def of(workload: Workload) -> _VideoLimits:
        dit = _module_for(workload.model, Modality.VIDEO, workload.dataset)
        assert dit.video is not None
        geometry = dit.video
        frame_s = geometry.temporal_compression / geometry.fps
        return _VideoLimits(
            seq_len=workload.parallel.seq_len,
            frame_tokens=geometry.tokens_per_latent_frame,
            frame_s=frame_s,
            max_frames=math.floor(MAX_VIDEO_SECONDS_PER_MICROBATCH / frame_s + 1e-9),
        )


def _pack_video(stream: _Stream, lim: _VideoLimits, low_frames: int, high_frames: int) -> Microbatch:
    """Next-fit packing of video-caption pairs: at most 8 clips and 16 s, captions within seq_len.

    A clip longer than what `high_frames` leaves is cut to fit; while the microbatch holds fewer than
    `low_frames`, clips are stretched so the remaining clip slots can still reach it (captions scale with the
    clip). When no video may be added at all, the microbatch is one caption (text only).
    """
    docs: list[Document] = []
    room, frames = lim.seq_len, 0
    while len(docs) < MAX_CLIPS_PER_MICROBATCH:
        draft = stream.next()
        need = low_frames - frames
        if need <= 0 and docs and (draft.clip_frames > lim.max_frames - frames or draft.text_tokens > room):
            stream.push_back(draft)
            break
        f = min(draft.clip_frames, high_frames - frames)
        if need > 0:
            f = max(f, math.ceil(need / (MAX_CLIPS_PER_MICROBATCH - len(docs))))
        if f <= 0:
            if not docs:
                docs.append(Document(text_tokens=min(draft.text_tokens, room)))
            else:
                stream.push_back(draft)
            break
        # A cut or stretched clip keeps its caption's density: captions are proportional to duration.
        text = min(max(1, round(draft.text_tokens * f / draft.clip_frames)), room)
        clip = MediaItem(modality=Modality.VIDEO, tokens=f * lim.frame_tokens)
        docs.append(Document(text_tokens=text, media=(clip,)))
        room -= text
        frames += f
    return Microbatch(documents=tuple(docs))


# ---- public API --------------------------------------------------------------------------------------------


def _generator(seed: int, iteration: int, dp_replica: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(iteration, dp_replica))))


def _sample(
    workload: Workload, *, seed: int, iteration: int, dp_replica: int, bounds: MediaBounds | None
) -> BatchMetadata:
    require(seed >= 0, f"seed must not be negative, got {seed}")
    require(iteration >= 0, f"iteration must not be negative, got {iteration}")
    require(dp_replica >= 0, f"dp_replica must not be negative, got {dp_replica}")
    parallel = workload.parallel
    rng = _generator(seed, iteration, dp_replica)
    text_scale = min(1.0, parallel.seq_len / _TOY_SEQ_LEN)
    sources = _SOURCES[workload.dataset]
    pack: Callable[[_Stream], Microbatch]

    if _is_video(workload.dataset):
        vlim = _VideoLimits.of(workload)
        lo_f, hi_f = 0, vlim.max_frames
        if bounds is not None:
            require(bounds.unit == "seconds", f"workload '{workload.name}' is bounded in seconds of video")
            require(
                bounds.low <= MAX_VIDEO_SECONDS_PER_MICROBATCH,
                f"video_bounds_s: low ({bounds.low}) exceeds the {MAX_VIDEO_SECONDS_PER_MICROBATCH:g} s a "
                "microbatch holds",
            )
            hi_f = min(hi_f, math.floor(bounds.high / vlim.frame_s + 1e-9))
            lo_f = min(math.ceil(bounds.low / vlim.frame_s - 1e-9), hi_f)  # the upper bound wins a rounding tie
        scale = _Scale(text=text_scale, frame_s=vlim.frame_s)

        def pack(stream: _Stream) -> Microbatch:
            return _pack_video(stream, vlim, lo_f, hi_f)

    else:
        ilim = _ImageLimits.of(workload)
        lo, hi = 0, ilim.max_images
        if bounds is not None:
            require(bounds.unit == "images", f"workload '{workload.name}' is bounded in images")
            feasible = min(ilim.max_images, ilim.seq_len // (ilim.merged + 1))  # each with one text token
            require(
                math.ceil(bounds.low) <= feasible,
                f"image_bounds: low ({bounds.low:g}) images of {ilim.merged} tokens do not fit seq_len "
                f"({ilim.seq_len}); use at most {feasible}",
            )
            hi = min(hi, math.floor(bounds.high))
            lo = min(math.ceil(bounds.low), hi)
        scale = _Scale(text=text_scale, frame_s=1.0)

        def pack(stream: _Stream) -> Microbatch:
            return _pack_images(stream, ilim, lo, hi)

    streams = [_Stream(source, rng, scale) for source in sources]
    picks = rng.integers(len(streams), size=parallel.microbatches)
    microbatches = tuple(pack(streams[int(i)]) for i in picks)
    return BatchMetadata(iteration=iteration, microbatches=microbatches, dp_replica=dp_replica)


def sample_batch(
    workload: Workload,
    *,
    seed: int,
    iteration: int = 0,
    image_bounds: tuple[int, int] | None = None,
    video_bounds_s: tuple[float, float] | None = None,
    dp_replica: int = 0,
) -> BatchMetadata:
    """One iteration's batch for `workload`, reproducible from (seed, iteration, dp_replica) alone.

    `image_bounds=(low, high)` constrains images per microbatch (VLM workloads); `video_bounds_s` constrains
    seconds of video per microbatch (T2V workloads). Every batch passes `validate_batch`.
    """
    bounds: MediaBounds | None = None
    if image_bounds is not None:
        require(video_bounds_s is None, "give image_bounds or video_bounds_s, not both")
        bounds = MediaBounds(image_bounds[0], image_bounds[1], "images")
    elif video_bounds_s is not None:
        bounds = MediaBounds(video_bounds_s[0], video_bounds_s[1], "seconds")
    return _sample(workload, seed=seed, iteration=iteration, dp_replica=dp_replica, bounds=bounds)


def dynamic_batch(workload: Workload, *, seed: int, iteration: int, dp_replica: int = 0) -> BatchMetadata:
    """Iteration `iteration` of `dynamic_trace`, sampled on its own."""
    bounds = dynamic_bounds(workload, iteration)
    return _sample(workload, seed=seed, iteration=iteration, dp_replica=dp_replica, bounds=bounds)


HEAVIEST_DYNAMIC_PHASE = 4
"""The dynamic trace's iteration (within a period) with the most media: lower bound 1/3, upper 2/3 of the cap."""


def representative_batch(
    model: ModelSpec, parallel: ParallelSpec, hardware: HardwareSpec, *, seed: int = 0
) -> BatchMetadata | None:
    """A heavy batch for a model known only by its specs (a job registered with the planner service): the
    heaviest phase of the dynamic trace, drawn from video-caption pairs for a model with a video module, from the
    image-text mix for one with an image module. None for a model with neither (no sample distribution fits)."""
    inputs = {m.input for m in model.modules}
    if Modality.VIDEO in inputs:
        dataset = DatasetKind.VIDEO_CAPTION
    elif Modality.IMAGE in inputs:
        dataset = DatasetKind.VLM_MIX
    else:
        return None
    workload = Workload(
        name=f"{model.name}-representative",
        description="a registered job's model with the sample distribution its modules imply",
        model=model,
        parallel=parallel,
        hardware=hardware,
        dataset=dataset,
    )
    return dynamic_batch(workload, seed=seed, iteration=HEAVIEST_DYNAMIC_PHASE)


def dynamic_trace(workload: Workload, *, seed: int, iterations: int) -> Iterator[BatchMetadata]:
    """The paper's dynamic workload (Fig. 8b): media bounds rise and fall every 20 iterations."""
    require(iterations >= 0, f"iterations must not be negative, got {iterations}")
    for k in range(iterations):
        yield dynamic_batch(workload, seed=seed, iteration=k)


class BatchSummary(TypedDict):
    """Counts of one batch, for printing and for tests."""

    iteration: int
    microbatches: int
    documents: int
    images: int
    clips: int
    text_tokens: int
    image_tokens: int
    """ViT tokens (patches) of all images."""
    video_tokens: int
    """DiT tokens of all clips."""
    text_only_microbatches: int
    images_per_microbatch: list[int]
    clips_per_microbatch: list[int]
    text_tokens_per_microbatch: list[int]
    language_tokens_per_microbatch: list[int]


def describe(batch: BatchMetadata) -> BatchSummary:
    """Summary counts of `batch` (images and clips per microbatch, text and media tokens)."""
    images = [len(mb.media(Modality.IMAGE)) for mb in batch.microbatches]
    clips = [len(mb.media(Modality.VIDEO)) for mb in batch.microbatches]
    text = [mb.text_tokens for mb in batch.microbatches]
    return BatchSummary(
        iteration=batch.iteration,
        microbatches=len(batch.microbatches),
        documents=sum(len(mb.documents) for mb in batch.microbatches),
        images=sum(images),
        clips=sum(clips),
        text_tokens=sum(text),
        image_tokens=sum(m.tokens for mb in batch.microbatches for m in mb.media(Modality.IMAGE)),
        video_tokens=sum(m.tokens for mb in batch.microbatches for m in mb.media(Modality.VIDEO)),
        text_only_microbatches=sum(1 for i, c in zip(images, clips, strict=True) if i + c == 0),
        images_per_microbatch=images,
        clips_per_microbatch=clips,
        text_tokens_per_microbatch=text,
        language_tokens_per_microbatch=[mb.language_tokens() for mb in batch.microbatches],
    )

"""The workload generator: determinism, validity, packing limits and dataset-like distributions."""

from __future__ import annotations

import dataclasses
import statistics
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeweaver import presets
from pipeweaver.datagen import (
    DYNAMIC_PERIOD,
    MAX_CLIPS_PER_MICROBATCH,
    MAX_VIDEO_SECONDS_PER_MICROBATCH,
    describe,
    dynamic_batch,
    dynamic_bounds,
    dynamic_trace,
    sample_batch,
)
from pipeweaver.errors import SpecError
from pipeweaver.spec import BatchMetadata, DatasetKind, Modality, Workload, validate_batch


@cache
def preset(name: str) -> Workload:
    return presets.workload(name)


@cache
def with_dataset(name: str, dataset: DatasetKind) -> Workload:
    return dataclasses.replace(preset(name), dataset=dataset)


def image_limits(w: Workload) -> tuple[int, int]:
    """(merged tokens per image, image cap per microbatch)."""
    vit = next(m for m in w.model.modules if m.input is Modality.IMAGE)
    assert vit.image is not None
    return vit.image.tokens_per_image, w.parallel.seq_len // vit.image.tokens_per_image


def video_seconds(w: Workload, batch: BatchMetadata) -> list[float]:
    dit = next(m for m in w.model.modules if m.input is Modality.VIDEO)
    assert dit.video is not None
    return [sum(c.tokens for c in mb.media(Modality.VIDEO)) / dit.video.tokens_per_second for mb in batch.microbatches]


def assert_limits(w: Workload, batch: BatchMetadata) -> None:
    """Every packing limit of paper section 6.3 holds, and the batch validates."""
    validate_batch(w.model, w.parallel, batch)
    assert len(batch.microbatches) == w.parallel.microbatches
    for mb in batch.microbatches:
        assert mb.language_tokens() <= w.parallel.seq_len
    if w.dataset is DatasetKind.VIDEO_CAPTION:
        dit = next(m for m in w.model.modules if m.input is Modality.VIDEO)
        assert dit.video is not None
        for mb, seconds in zip(batch.microbatches, video_seconds(w, batch), strict=True):
            assert len(mb.media(Modality.VIDEO)) <= MAX_CLIPS_PER_MICROBATCH
            assert seconds <= MAX_VIDEO_SECONDS_PER_MICROBATCH + 1e-9
            assert mb.text_tokens <= w.parallel.seq_len
            assert all(d.count(Modality.VIDEO) <= 1 for d in mb.documents)
    else:
        merged, cap = image_limits(w)
        for mb in batch.microbatches:
            images = mb.media(Modality.IMAGE)
            assert len(images) <= cap
            assert all(m.merged_tokens == merged for m in images)


# ---- determinism -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vlm-s", "t2v-s", "tiny-vlm"])
def test_same_seed_and_iteration_give_the_same_batch(name: str) -> None:
    w = preset(name)
    a = sample_batch(w, seed=7, iteration=3)
    assert a == sample_batch(w, seed=7, iteration=3)
    assert a.iteration == 3
    assert a.signature() != sample_batch(w, seed=7, iteration=4).signature()
    assert a.signature() != sample_batch(w, seed=8, iteration=3).signature()
    assert a.signature() != sample_batch(w, seed=7, iteration=3, dp_replica=1).signature()


@pytest.mark.parametrize("name", ["vlm-s", "tiny-t2v"])
def test_dynamic_trace_iterations_are_reproducible_alone(name: str) -> None:
    w = preset(name)
    trace = list(dynamic_trace(w, seed=5, iterations=8))
    assert [b.iteration for b in trace] == list(range(8))
    for k in (0, 4, 7):
        assert trace[k] == dynamic_batch(w, seed=5, iteration=k)


# ---- validity and limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(presets.WORKLOADS))
def test_every_preset_batch_validates_and_respects_limits(name: str) -> None:
    w = preset(name)
    for iteration in range(3):
        assert_limits(w, sample_batch(w, seed=11, iteration=iteration))
    for iteration in (2, 4, 9, 16):  # rising, peak, falling, text-only phases of the dynamic trace
        assert_limits(w, dynamic_batch(w, seed=11, iteration=iteration))


@pytest.mark.parametrize("dataset", [DatasetKind.LAION, DatasetKind.OBELICS, DatasetKind.SCIENCEQA])
@pytest.mark.parametrize("name", ["vlm-s", "tiny-vlm"])
def test_every_image_dataset_validates(name: str, dataset: DatasetKind) -> None:
    w = with_dataset(name, dataset)
    for iteration in range(2):
        assert_limits(w, sample_batch(w, seed=2, iteration=iteration))


def test_image_cap_is_48_per_8192_tokens() -> None:
    w = with_dataset("vlm-s", DatasetKind.LAION)
    assert image_limits(w) == (169, 48)
    # LAION documents are ~185 tokens, so microbatches pack ~44 images; bounds above that meet the cap.
    batch = sample_batch(w, seed=0, image_bounds=(40, 100))
    assert max(describe(batch)["images_per_microbatch"]) <= 48


def test_a_document_longer_than_the_sequence_is_truncated() -> None:
    w = with_dataset("vlm-s", DatasetKind.OBELICS)
    batches = [sample_batch(w, seed=s) for s in range(4)]
    full = [mb for b in batches for mb in b.microbatches if mb.language_tokens() == w.parallel.seq_len]
    assert any(len(mb.documents) == 1 for mb in full), "heavy-tailed OBELICS should yield truncated lone documents"


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["vlm-s", "tiny-vlm"]),
    seed=st.integers(0, 2**32),
    iteration=st.integers(0, 10_000),
    low=st.integers(0, 24),
    width=st.integers(0, 30),
)
def test_image_bounds_hold(name: str, seed: int, iteration: int, low: int, width: int) -> None:
    w = preset(name)
    _, cap = image_limits(w)
    batch = sample_batch(w, seed=seed, iteration=iteration, image_bounds=(low, low + width))
    assert_limits(w, batch)
    for n in describe(batch)["images_per_microbatch"]:
        assert min(low, cap) <= n <= min(low + width, cap)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["t2v-s", "tiny-t2v"]),
    seed=st.integers(0, 2**32),
    low=st.floats(0, 12),
    width=st.floats(0.5, 8),
)
def test_video_bounds_hold(name: str, seed: int, low: float, width: float) -> None:
    w = preset(name)
    high = min(low + width, MAX_VIDEO_SECONDS_PER_MICROBATCH)
    batch = sample_batch(w, seed=seed, video_bounds_s=(low, high))
    assert_limits(w, batch)
    frame_s = 0.5  # both presets: 16 fps / 8 and 4 fps / 2
    for seconds in video_seconds(w, batch):
        assert low - frame_s < seconds <= high + 1e-9


def test_zero_bounds_give_text_only_microbatches() -> None:
    for name, kwargs in (("vlm-s", {"image_bounds": (0, 0)}), ("t2v-s", {"video_bounds_s": (0.0, 0.0)})):
        w = preset(name)
        batch = sample_batch(w, seed=1, **kwargs)
        assert_limits(w, batch)
        assert describe(batch)["text_only_microbatches"] == w.parallel.microbatches


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(SpecError, match="seed"):
        sample_batch(preset("vlm-s"), seed=-1)
    with pytest.raises(SpecError, match="seconds"):
        sample_batch(preset("t2v-s"), seed=0, image_bounds=(1, 2))
    with pytest.raises(SpecError, match="image_bounds"):
        sample_batch(preset("vlm-s"), seed=0, image_bounds=(49, 60))
    with pytest.raises(SpecError, match="low <= high"):
        sample_batch(preset("vlm-s"), seed=0, image_bounds=(5, 2))
    with pytest.raises(SpecError, match="image module"):
        sample_batch(with_dataset("t2v-s", DatasetKind.LAION), seed=0)


# ---- distributions -----------------------------------------------------------------------------------------


def documents(w: Workload, iterations: int = 4) -> list[tuple[int, int]]:
    """(text tokens, media count) of each document not truncated (not alone in a full microbatch)."""
    out = []
    for k in range(iterations):
        for mb in sample_batch(w, seed=3, iteration=k).microbatches:
            truncated = len(mb.documents) == 1 and mb.language_tokens() == w.parallel.seq_len
            if not truncated:
                out += [(d.text_tokens, len(d.media)) for d in mb.documents]
    return out


def test_laion_is_one_image_and_about_16_text_tokens() -> None:
    docs = documents(with_dataset("vlm-s", DatasetKind.LAION))
    assert all(n == 1 for _, n in docs)
    assert 14.5 < statistics.mean(t for t, _ in docs) < 18.5
    assert min(t for t, _ in docs) >= 1


def test_obelics_is_interleaved_and_heavy_tailed() -> None:
    obelics = documents(with_dataset("vlm-s", DatasetKind.OBELICS), iterations=8)
    laion = documents(with_dataset("vlm-s", DatasetKind.LAION), iterations=1)
    assert 1.8 < statistics.mean(n for _, n in obelics) < 3.5  # several images a document
    per_image = np.array([t / n for t, n in obelics])
    laion_per_image = np.array([t / n for t, n in laion])
    assert per_image.min() < 10 and per_image.max() > 1000
    assert per_image.std() > 20 * laion_per_image.std()
    spread = np.percentile(per_image, 95) / np.percentile(per_image, 5)
    laion_spread = np.percentile(laion_per_image, 95) / np.percentile(laion_per_image, 5)
    assert spread > 4 * laion_spread


def test_scienceqa_is_half_with_an_image_and_a_few_hundred_tokens() -> None:
    docs = documents(with_dataset("vlm-s", DatasetKind.SCIENCEQA))
    with_image = sum(1 for _, n in docs if n == 1) / len(docs)
    assert 0.4 < with_image < 0.6
    assert all(n <= 1 for _, n in docs)
    assert all(100 <= t <= 400 for t, _ in docs)


def test_vlm_mix_varies_across_microbatches() -> None:
    summary = describe(sample_batch(preset("vlm-s"), seed=4))
    images = summary["images_per_microbatch"]
    assert max(images) >= 5 * max(1, min(images))  # the paper's 10x image-stage imbalance after packing
    assert 15 < statistics.mean(images) < 32


def test_video_captions_scale_with_duration_and_differ_by_dataset() -> None:
    w = preset("t2v-s")
    dit = w.model.module("dit")
    assert dit.video is not None
    seconds, text = [], []
    for k in range(4):
        for mb in sample_batch(w, seed=9, iteration=k).microbatches:
            for d in mb.documents:
                for clip in d.media:
                    seconds.append(clip.tokens / dit.video.tokens_per_second)
                    text.append(d.text_tokens)
    assert max(seconds) == MAX_VIDEO_SECONDS_PER_MICROBATCH and min(seconds) < 4
    assert np.corrcoef(seconds, text)[0, 1] > 0.2
    density = np.array(text) / np.array(seconds)
    assert np.percentile(density, 90) / np.percentile(density, 10) > 4  # InternVid short vs ShareGPT4Video long


def test_tiny_workloads_still_mix() -> None:
    w = preset("tiny-vlm")
    images = [n for k in range(6) for n in describe(sample_batch(w, seed=0, iteration=k))["images_per_microbatch"]]
    assert images.count(0) >= 1, "some microbatches are text only"
    assert sum(1 for n in images if 1 <= n <= 8) >= len(images) // 4, "many carry a few images"
    assert max(images) > 8
    t2v = preset("tiny-t2v")
    batch = sample_batch(t2v, seed=0)
    assert 1 <= statistics.mean(describe(batch)["clips_per_microbatch"]) <= 4


# ---- the dynamic trace -------------------------------------------------------------------------------------


def test_dynamic_bounds_follow_the_paper_pattern() -> None:
    w = preset("vlm-s")
    bounds = [dynamic_bounds(w, k) for k in range(DYNAMIC_PERIOD)]
    assert [b.low for b in bounds[:5]] == [0, 4, 8, 12, 16]
    assert all(b.high == 32 for b in bounds[:6])
    assert all(b.low == b.high == 0 for b in bounds[14:])
    assert dynamic_bounds(w, DYNAMIC_PERIOD + 3) == bounds[3]
    video = dynamic_bounds(preset("t2v-s"), 4)
    assert video.unit == "seconds" and video.low == pytest.approx(16 / 3) and video.high == pytest.approx(32 / 3)


@pytest.mark.parametrize("name", ["vlm-s", "tiny-vlm", "t2v-s"])
def test_dynamic_trace_rises_and_falls(name: str) -> None:
    w = preset(name)
    trace = list(dynamic_trace(w, seed=0, iterations=DYNAMIC_PERIOD))
    if w.dataset is DatasetKind.VIDEO_CAPTION:
        load = [statistics.mean(video_seconds(w, b)) for b in trace]
    else:
        load = [statistics.mean(describe(b)["images_per_microbatch"]) for b in trace]
    high, low = statistics.mean(load[2:6]), statistics.mean(load[14:20])
    assert high > 5 and high > 4 * low
    assert load[19] == 0  # text only at the end of the pattern
    if name == "vlm-s":
        assert 18 < max(load) < 27  # the paper's peak average is ~22 images per microbatch


def test_describe_counts_tokens() -> None:
    w = preset("vlm-s")
    batch = sample_batch(w, seed=1)
    s = describe(batch)
    assert s["microbatches"] == len(s["images_per_microbatch"]) == w.parallel.microbatches
    assert s["image_tokens"] == 2704 * s["images"]
    assert s["text_tokens"] == sum(s["text_tokens_per_microbatch"])
    assert s["language_tokens_per_microbatch"] == [
        t + 169 * n for t, n in zip(s["text_tokens_per_microbatch"], s["images_per_microbatch"], strict=True)
    ]
    assert s["video_tokens"] == s["clips"] == 0


def test_a_representative_batch_follows_the_models_modules() -> None:
    from pipeweaver.datagen import representative_batch

    for name, media in (("vlm-s", "images"), ("t2v-s", "clips")):
        w = presets.workload(name)
        b = representative_batch(w.model, w.parallel, w.hardware, seed=0)
        assert b is not None
        validate_batch(w.model, w.parallel, b)
        s = describe(b)
        assert s["microbatches"] == w.parallel.microbatches and s[media] > 0
        # the heaviest phase of the dynamic trace: every microbatch carries media
        assert s["text_only_microbatches"] == 0

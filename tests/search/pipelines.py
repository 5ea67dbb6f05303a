"""Small stage graphs shared by the interleaver and bound tests."""

from __future__ import annotations

from pipeweaver.plan import PlanHeader
from pipeweaver.plan.layouts import mixed_placement, whole_sub_microbatches
from pipeweaver.presets import workload
from pipeweaver.spec import BatchMetadata, Document, MediaItem, Microbatch, Modality


def small_batch(images_per_mb: list[int], text: list[int]) -> BatchMetadata:
    """One document per microbatch: `text[i]` tokens and `images_per_mb[i]` images of 16 patches (4 merged)."""
    img = MediaItem(Modality.IMAGE, 16, 4)
    return BatchMetadata(
        0, tuple(Microbatch((Document(t, (img,) * k),)) for k, t in zip(images_per_mb, text, strict=True))
    )


def uniform_pipeline_header(pp: int, m: int) -> PlanHeader:
    """tiny-vlm as a plain pipeline: one chunk per rank, m text-only microbatches, whole microbatches."""
    model = workload("tiny-vlm").model
    batch = small_batch([0] * m, [20] * m)
    placement = mixed_placement(model, pp, 1)
    return PlanHeader(
        job_id="t",
        iteration=0,
        placement=placement,
        sub_microbatches=whole_sub_microbatches(model, placement, batch),
        num_microbatches=m,
        schedule="test",
    )

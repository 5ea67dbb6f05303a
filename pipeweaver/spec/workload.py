"""A workload: model + parallelism + hardware + the data distribution its batches come from."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pipeweaver.errors import require
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import ModelSpec
from pipeweaver.spec.parallel import ParallelSpec


class DatasetKind(StrEnum):
    """Sample distributions the workload generator knows (see `pipeweaver.datagen`)."""

    LAION = "laion"
    """Image-text pairs: one image, about 16 text tokens."""
    OBELICS = "obelics"
    """Interleaved documents: many images, 0.4 to 3,000+ text tokens per image."""
    SCIENCEQA = "scienceqa"
    """Question-answer items with zero or one image and a few hundred text tokens."""
    VLM_MIX = "vlm-mix"
    """Equal mixture of the three image-text distributions above."""
    VIDEO_CAPTION = "video-caption"
    """Video-caption pairs at 16 fps, clips up to 16 s, at most 8 clips and 16 s per microbatch."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Workload:
    """Everything needed to sample batches and plan them."""

    name: str
    description: str
    model: ModelSpec
    parallel: ParallelSpec
    hardware: HardwareSpec
    dataset: DatasetKind

    def __post_init__(self) -> None:
        require(bool(self.name), "workload name must not be empty")
        self.parallel.check_model(self.model)

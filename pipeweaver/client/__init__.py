"""Trainer side: reference models, synthetic data, the torch pipeline executor and the unpipelined reference.

Imports torch, never ortools or numba: a trainer runs plans, it does not search them.
"""

from pipeweaver.client.data import SyntheticData
from pipeweaver.client.executor import IterationStats, PipelineExecutor, wire_dtype
from pipeweaver.client.geometry import Geometry, LossScale, TextGeometry, VideoGeometry, VisionGeometry
from pipeweaver.client.models import (
    BlockPart,
    ModalityModule,
    Piece,
    PostOutput,
    PostPart,
    PrePart,
    Stream,
    reference_modules,
)
from pipeweaver.client.reference import ReferenceModel, ReferenceResult, reference_step

__all__ = [
    "BlockPart",
    "Geometry",
    "IterationStats",
    "LossScale",
    "ModalityModule",
    "Piece",
    "PipelineExecutor",
    "PostOutput",
    "PostPart",
    "PrePart",
    "ReferenceModel",
    "ReferenceResult",
    "Stream",
    "SyntheticData",
    "TextGeometry",
    "VideoGeometry",
    "VisionGeometry",
    "reference_modules",
    "reference_step",
    "wire_dtype",
]

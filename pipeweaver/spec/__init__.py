"""The nouns every part of PipeWeaver shares: model, parallelism, hardware, batch metadata, workloads."""

from pipeweaver.spec.batch import (
    BatchLimits,
    BatchMetadata,
    Document,
    Instance,
    MediaItem,
    Microbatch,
    module_instances,
    validate_batch,
)
from pipeweaver.spec.hardware import HARDWARE_PRESETS, HardwareSpec, hardware_preset
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

__all__ = [
    "HARDWARE_PRESETS",
    "BatchLimits",
    "BatchMetadata",
    "DatasetKind",
    "Document",
    "HardwareSpec",
    "ImageGeometry",
    "Instance",
    "LayerKind",
    "MediaItem",
    "MergeKind",
    "Microbatch",
    "Modality",
    "ModelSpec",
    "ModuleEdge",
    "ModuleSpec",
    "ParallelSpec",
    "VideoGeometry",
    "Workload",
    "hardware_preset",
    "module_instances",
    "validate_batch",
]

"""Trainer side: the planner client and plan prefetcher, reference models, synthetic data, the torch pipeline
executor, the unpipelined reference and the layer profiler.

Imports torch, never ortools or numba: a trainer runs plans, it does not search them. The gRPC side
(`PlannerClient`, `PlanPrefetcher` and their types) loads on first use, so the executor also runs on images
without grpc; the channel itself opens on the client's first call, never at import (fork safety: see
`planner_client`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from pipeweaver.client.profiler import LayerTiming, TimedExecutor, profile_layers
from pipeweaver.client.reference import ReferenceModel, ReferenceResult, reference_step

if TYPE_CHECKING:
    from pipeweaver.client.planner_client import (
        JobRegistration,
        PlannerClient,
        PlanReply,
        PlanStream,
        RetryPolicy,
        RpcFailure,
        SimulationResult,
        TimingReport,
        assemble_plan_replies,
        rpc_failure,
    )
    from pipeweaver.client.prefetch import PlannedBatch, PlanPrefetcher, PrefetchStats, batch_metadata

_GRPC_SIDE = {
    **dict.fromkeys(
        (
            "JobRegistration",
            "PlanReply",
            "PlanStream",
            "PlannerClient",
            "RetryPolicy",
            "RpcFailure",
            "SimulationResult",
            "TimingReport",
            "assemble_plan_replies",
            "rpc_failure",
        ),
        "pipeweaver.client.planner_client",
    ),
    **dict.fromkeys(
        ("PlanPrefetcher", "PlannedBatch", "PrefetchStats", "batch_metadata"), "pipeweaver.client.prefetch"
    ),
}


def __getattr__(name: str) -> Any:
    module = _GRPC_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeweaver.client' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BlockPart",
    "Geometry",
    "IterationStats",
    "JobRegistration",
    "LayerTiming",
    "LossScale",
    "ModalityModule",
    "Piece",
    "PipelineExecutor",
    "PlanPrefetcher",
    "PlanReply",
    "PlanStream",
    "PlannedBatch",
    "PlannerClient",
    "PostOutput",
    "PostPart",
    "PrePart",
    "PrefetchStats",
    "ReferenceModel",
    "ReferenceResult",
    "RetryPolicy",
    "RpcFailure",
    "SimulationResult",
    "Stream",
    "SyntheticData",
    "TextGeometry",
    "TimedExecutor",
    "TimingReport",
    "VideoGeometry",
    "VisionGeometry",
    "assemble_plan_replies",
    "batch_metadata",
    "profile_layers",
    "reference_modules",
    "reference_step",
    "rpc_failure",
    "wire_dtype",
]

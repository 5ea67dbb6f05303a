"""Baseline schedules PipeWeaver is measured against, emitted in the plan IR.

Pure Python (no numba, no ortools): the trainer client imports them to build fallback plans on its own.

- ``gpipe``, ``1f1b``: modules end to end as one pipeline, one chunk a rank;
- ``interleaved-1f1b``: Megatron-LM's virtual pipeline with parameter-balanced chunks (the paper's
  Megatron-LM);
- ``zb-h1``, ``zbv``: zero-bubble schedules with the backward split into I and W passes;
- ``optimus-coarse``: one pipeline per module, encoder forwards first, then the backbone 1F1B (the paper's
  Optimus);
- ``nnscaler-static``: one FLOP-balanced 1F1B partition from a representative batch, reused (the paper's
  nnScaler*).
"""

from pipeweaver.search.baselines.nnscaler import layer_flops, nominal_batch
from pipeweaver.search.baselines.registry import (
    BASELINES,
    INTERLEAVED_VIRTUAL,
    BaselineSchedule,
    baseline,
    baseline_header,
    baseline_orders,
    baseline_placement,
    build_baseline_plan,
    tensors_dtype_for,
)

__all__ = [
    "BASELINES",
    "INTERLEAVED_VIRTUAL",
    "BaselineSchedule",
    "baseline",
    "baseline_header",
    "baseline_orders",
    "baseline_placement",
    "build_baseline_plan",
    "layer_flops",
    "nominal_batch",
    "tensors_dtype_for",
]

"""SEMU: operator-level cost model, memory model, reuse cache, calibration and the event simulation.

The cost side (this package's `ops`, `costmodel`, `memory`, `reuse`, `calibration`) turns a model, a parallelism,
an accelerator and a sub-microbatch into stage latencies and memory; `engine` replays a plan on those costs.
`engine` is imported from its module (it pulls in numba), not from here.
"""

from pipeweaver.simulator.calibration import (
    ForwardTiming,
    LayerDims,
    LayerProfile,
    Profile,
    TransferProfile,
    fit_factors,
    fit_input_build_ms,
    fit_layer_factors,
    fit_transfer_factors,
    hardware_for_card,
    holdout_split,
    load_profile,
    mape,
    predict_ms,
    profile_mape,
    save_profile,
)
from pipeweaver.simulator.costmodel import (
    DEFAULT_CLASS_FACTORS,
    ClassFactors,
    CostModel,
    EfficiencyFactors,
    HeaderCosts,
    op_time_s,
    ops_time_s,
    sub_microbatch_instances,
    training_flops,
)
from pipeweaver.simulator.memory import (
    RankStaticMemory,
    check_fits,
    layer_activation_bytes,
    static_memory,
    static_memory_bytes,
)
from pipeweaver.simulator.ops import Op, OpClass, layer_ops, post_ops, pre_ops
from pipeweaver.simulator.reuse import CacheStats, StageCostCache, token_signature

__all__ = [
    "DEFAULT_CLASS_FACTORS",
    "CacheStats",
    "ClassFactors",
    "CostModel",
    "EfficiencyFactors",
    "ForwardTiming",
    "HeaderCosts",
    "LayerDims",
    "LayerProfile",
    "Op",
    "OpClass",
    "Profile",
    "RankStaticMemory",
    "StageCostCache",
    "TransferProfile",
    "check_fits",
    "fit_factors",
    "fit_input_build_ms",
    "fit_layer_factors",
    "fit_transfer_factors",
    "hardware_for_card",
    "holdout_split",
    "layer_activation_bytes",
    "layer_ops",
    "load_profile",
    "mape",
    "op_time_s",
    "ops_time_s",
    "post_ops",
    "pre_ops",
    "predict_ms",
    "profile_mape",
    "save_profile",
    "static_memory",
    "static_memory_bytes",
    "sub_microbatch_instances",
    "token_signature",
    "training_flops",
]

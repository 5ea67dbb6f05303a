"""The offline modality-aware partitioner (paper section 4): sub-microbatch sizes B_i, segments K_i, placement.

- B_i: the smallest instance count per sub-microbatch whose throughput reaches 95% of the module's best over the
  sweep (small sub-microbatches balance better but waste the GPU; SEMU's cost model knows by how much);
- K_i = floor(T_i / T_1), with T_i the module's forward+backward time on B_i instances and T_1 the fastest
  module's, so every module's segments take about as long as one segment of the fastest module;
- P * K_i chunks of near-equal layer counts per module, never mixing modules, round-robin over the ranks;
- static memory per rank checked against the device, with `DoesNotFit` naming the rank when it cannot fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeweaver.errors import DoesNotFit
from pipeweaver.plan.ir import Pass, Placement
from pipeweaver.plan.layouts import RankOrder, modular_placement
from pipeweaver.simulator.costmodel import CostModel
from pipeweaver.simulator.memory import static_memory_bytes
from pipeweaver.spec.batch import Instance
from pipeweaver.spec.model import Modality, ModuleSpec

EFFICIENCY_THRESHOLD = 0.95
MAX_IMAGES = 48
MAX_CLIPS = 8
REFERENCE_CLIP_S = 4.0
"""Clip length used to size video sub-microbatches (the middle of the video-caption distribution)."""


@dataclass(frozen=True, slots=True)
class JobPartition:
    placement: Placement
    sub_microbatch_size: dict[str, int]
    """B_i: instances per sub-microbatch (images, clips; 1 packed sequence for text modules)."""
    segments: dict[str, int]
    """K_i: segments per pass (the module is cut into pp * K_i chunks)."""
    static_memory_bytes: tuple[float, ...]
    module_time_ms: dict[str, float]
    """T_i: forward + backward of the whole module on one B_i sub-microbatch."""


def _instance(module: ModuleSpec, seq_len: int) -> Instance:
    if module.input is Modality.IMAGE:
        assert module.image is not None
        t = module.image.patches_per_image
        return Instance(tokens=t, attention_spans=(t,), output_tokens=module.image.tokens_per_image)
    if module.input is Modality.VIDEO:
        assert module.video is not None
        t = module.video.tokens_for(REFERENCE_CLIP_S)
        return Instance(tokens=t, attention_spans=(t,), context_tokens=64, output_tokens=t)
    return Instance(tokens=seq_len, attention_spans=(seq_len,), output_tokens=seq_len)


def _module_ms(cost: CostModel, module: ModuleSpec, instances: tuple[Instance, ...]) -> float:
    per_layer = sum(cost.layer_time_ms(module.name, instances, p) for p in (Pass.F, Pass.B))
    parts = sum(
        cost.pre_time_ms(module.name, instances, p) + cost.post_time_ms(module.name, instances, p)
        for p in (Pass.F, Pass.B)
    )
    return module.layers * per_layer + parts


def sub_microbatch_size(cost: CostModel, module: ModuleSpec, seq_len: int) -> int:
    """B_i by the 95%-of-peak-throughput rule (text modules: one packed sequence)."""
    if module.input is Modality.TEXT:
        return 1
    limit = MAX_IMAGES if module.input is Modality.IMAGE else MAX_CLIPS
    one = _instance(module, seq_len)
    throughput = []
    for b in range(1, limit + 1):
        t = sum(cost.layer_time_ms(module.name, (one,) * b, p) for p in (Pass.F, Pass.B))
        throughput.append(b / t if t > 0 else 0.0)
    best = max(throughput)
    return next(b + 1 for b, x in enumerate(throughput) if x >= EFFICIENCY_THRESHOLD * best)


def partition_job(
    cost: CostModel,
    *,
    sizes: Mapping[str, int] | None = None,
    segments: Mapping[str, int] | None = None,
    order: RankOrder = RankOrder.ROUND_ROBIN,
) -> JobPartition:
    """Run the offline partitioner; `sizes`/`segments` override B_i/K_i per module (ablations, tests), `order` the
    chunks' order over the ranks. Round robin is the default: a V shape (a rank holds a module's first and last
    chunks, balancing their activations' lifetimes) planned t2v-s 0.8-1.4% slower (docs/benchmarks.md)."""
    model, parallel = cost.model, cost.parallel
    pp = parallel.pp
    b = {m.name: (sizes or {}).get(m.name) or sub_microbatch_size(cost, m, parallel.seq_len) for m in model.modules}
    t = {m.name: _module_ms(cost, m, (_instance(m, parallel.seq_len),) * b[m.name]) for m in model.modules}
    fastest = min(x for x in t.values() if x > 0) if any(x > 0 for x in t.values()) else 1.0
    k: dict[str, int] = {}
    for m in model.modules:
        want = (segments or {}).get(m.name) or max(1, int(t[m.name] // fastest))
        k[m.name] = max(1, min(want, m.layers // pp))
    placement = modular_placement(model, pp, k, order=order)
    static = static_memory_bytes(model, parallel, placement)
    capacity = cost.hardware.memory_bytes
    for r, need in enumerate(static):
        if need > capacity:
            raise DoesNotFit(
                f"rank {r} needs {need / 2**30:.1f} GiB for parameters, gradients and optimizer states but "
                f"'{cost.hardware.name}' has {capacity / 2**30:.1f} GiB; raise pp or tp, or enable the "
                "distributed optimizer with dp > 1"
            )
    return JobPartition(
        placement=placement, sub_microbatch_size=b, segments=k, static_memory_bytes=tuple(static), module_time_ms=t
    )

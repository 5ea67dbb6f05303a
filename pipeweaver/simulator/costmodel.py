"""SEMU's cost model: stage latencies and activation memory from operator-level roofline times.

Each operator takes max(a_flop * flops / peak_flops, a_mem * bytes / hbm_bw, a_net * bytes / link_bw) plus a
fixed per-operator overhead (kernel launch, collective latency), with efficiency factors a per operator class.
The flop term grows for small work: a_flop_eff = a_flop * (1 + half_rows / rows), so efficiency is
rows / (rows + half_rows) of its large-size value. Small sub-microbatches therefore cost more per token, which is
the whole reason sub-microbatch sizes B_i exist; a cost linear in tokens would make splitting look free. A block
also cannot run faster than the host dispatches its kernels (`ClassFactors.host_s`, `combine_host_device`).

Factors can differ per layer kind and per direction (forward or backward kernels): calibration fits them from
measured layer times (`calibration.fit_factors`). A stage is a chunk running one pass on one sub-microbatch; its
time is the sum over its layer ranges of (layers x one block) plus the module's pre/post parts where the chunk
holds the first/last layer. The forward of a chunk that starts a module also pays the host's time to build the
sub-microbatch's inputs there (`CostModel.input_build_ms`), which host-bound ranks cannot overlap with kernels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeweaver.plan.graph import backward_passes
from pipeweaver.plan.ir import Chunk, Pass, PlanHeader, Recompute, StageKey, SubMicrobatch
from pipeweaver.simulator import memory
from pipeweaver.simulator.ops import (
    ATTENTION_BACKWARD_FLOPS,
    ATTENTION_BACKWARD_MODEL_FLOPS,
    Op,
    OpClass,
    layer_ops,
    post_ops,
    pre_ops,
)
from pipeweaver.simulator.reuse import StageCostCache, TokenSignature, signature_instances, token_signature
from pipeweaver.spec.batch import BatchMetadata, Instance, module_instances
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import LayerKind, ModelSpec, ModuleSpec
from pipeweaver.spec.parallel import ParallelSpec

# ---- efficiency factors --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassFactors:
    """Efficiency factors of one operator class (1 / achieved fraction of peak; larger is slower)."""

    a_flop: float = 1.0
    a_mem: float = 1.0
    a_net: float = 1.0
    half_rows: float = 0.0
    """Rows (GEMM tokens, attention block length) at which flop efficiency is half its large-size value."""
    overhead_s: float = 0.0
    """Fixed device time per operator: gaps between kernels, collective latency."""
    host_s: float = 0.0
    """Host (CPU) time to dispatch the operator. A block takes about max(sum of device times, sum of host
    times) (`combine_host_device`): the host runs ahead of large kernels but bounds small ones (eager PyTorch on
    small sub-microbatches)."""

    def to_json(self) -> dict[str, float]:
        return {
            "a_flop": self.a_flop,
            "a_mem": self.a_mem,
            "a_net": self.a_net,
            "half_rows": self.half_rows,
            "overhead_s": self.overhead_s,
            "host_s": self.host_s,
        }


ANY = ""
"""Wildcard for the layer kind or direction of a factor key."""
FactorKey = tuple[str, str, OpClass]
"""(layer kind value or ANY, "F" / "B" or ANY, operator class)."""


def direction(backward: bool) -> str:
    return "B" if backward else "F"


@dataclass(frozen=True)
class EfficiencyFactors:
    """Factor table with fallbacks: (kind, dir, class) -> (kind, ANY, class) -> (ANY, dir, class) -> (ANY, ANY,
    class). Every class must have an (ANY, ANY) entry. Pre/post parts of modules use kind ANY."""

    entries: tuple[tuple[FactorKey, ClassFactors], ...]
    _index: dict[FactorKey, ClassFactors] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index = dict(self.entries)
        missing = [c.value for c in OpClass if (ANY, ANY, c) not in index]
        if missing:
            raise ValueError(f"efficiency factors need a default (kind '', direction '') entry for {missing}")
        object.__setattr__(self, "_index", index)

    def lookup(self, op_class: OpClass, *, kind: LayerKind | None = None, backward: bool = False) -> ClassFactors:
        k = kind.value if kind is not None else ANY
        d = direction(backward)
        index = self._index
        for key in ((k, d, op_class), (k, ANY, op_class), (ANY, d, op_class)):
            cf = index.get(key)
            if cf is not None:
                return cf
        return index[(ANY, ANY, op_class)]

    def with_entries(self, updates: Mapping[FactorKey, ClassFactors]) -> EfficiencyFactors:
        merged = dict(self.entries)
        merged.update(updates)
        return EfficiencyFactors(tuple(sorted(merged.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2].value))))

    @staticmethod
    def uncalibrated() -> EfficiencyFactors:
        """Datasheet-style defaults (see DEFAULT_CLASS_FACTORS); within ~10-20% of an H100's measured blocks."""
        return EfficiencyFactors(tuple(((ANY, ANY, c), f) for c, f in DEFAULT_CLASS_FACTORS.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": [
                {"kind": k, "direction": d, "op_class": c.value, **f.to_json()} for (k, d, c), f in self.entries
            ]
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> EfficiencyFactors:
        entries = []
        for e in data["entries"]:
            key: FactorKey = (str(e["kind"]), str(e["direction"]), OpClass(e["op_class"]))
            entries.append(
                (
                    key,
                    ClassFactors(
                        a_flop=float(e["a_flop"]),
                        a_mem=float(e["a_mem"]),
                        a_net=float(e["a_net"]),
                        half_rows=float(e["half_rows"]),
                        overhead_s=float(e["overhead_s"]),
                        host_s=float(e.get("host_s", 0.0)),
                    ),
                )
            )
        return EfficiencyFactors(tuple(entries))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


DEFAULT_CLASS_FACTORS: dict[OpClass, ClassFactors] = {
    # Large bf16 GEMMs reach ~70% of dense peak (an H100 runs 8k^3 at ~790 of 989 TFLOP/s; layer GEMMs less);
    # efficiency halves around 128 rows.
    OpClass.GEMM: ClassFactors(a_flop=1 / 0.7, a_mem=1 / 0.8, half_rows=128.0, overhead_s=5e-6, host_s=20e-6),
    # Flash attention forward runs ~50-60% of peak on long blocks; short documents run less efficiently.
    OpClass.ATTENTION: ClassFactors(a_flop=1 / 0.55, a_mem=1 / 0.8, half_rows=256.0, overhead_s=5e-6, host_s=20e-6),
    OpClass.ELEMENTWISE: ClassFactors(a_flop=1.0, a_mem=1 / 0.7, overhead_s=5e-6, host_s=20e-6),
    # NCCL ring all-reduce reaches ~70% of the link's bandwidth; tens of microseconds of latency.
    OpClass.TP_ALLREDUCE: ClassFactors(a_net=1 / 0.7, overhead_s=15e-6),
    OpClass.P2P: ClassFactors(a_net=1 / 0.8, overhead_s=0.0),
    OpClass.DP_ALLREDUCE: ClassFactors(a_net=1 / 0.7, overhead_s=30e-6),
    OpClass.OPTIMIZER: ClassFactors(a_mem=1 / 0.7, overhead_s=50e-6),
}


HOST_OVERLAP_P = 4.0
"""A block takes (device^p + host^p)^(1/p): the larger of its device and host times where one dominates, more
near the crossover, where the GPU sometimes waits for a launch and the host for a free queue slot."""


def combine_host_device(device: float, host: float) -> float:
    """Time of a block whose kernels take `device` seconds on the GPU and `host` seconds to dispatch."""
    if host <= 0.0:
        return device
    if math.isinf(HOST_OVERLAP_P):
        return max(device, host)
    p = HOST_OVERLAP_P
    big = max(device, host)
    return big * float(((device / big) ** p + (host / big) ** p) ** (1.0 / p))


def class_time_s(op: Op, cf: ClassFactors, peak_flops: float, hbm_bandwidth: float, link_bw: float) -> float:
    """Roofline time of `op` under resolved class factors."""
    t = 0.0
    if op.flops:
        t = cf.a_flop * op.flops / peak_flops
        if cf.half_rows:
            t *= 1.0 + cf.half_rows / max(op.rows, 1)
    if op.mem_bytes:
        t = max(t, cf.a_mem * op.mem_bytes / hbm_bandwidth)
    if op.net_bytes:
        t = max(t, cf.a_net * op.net_bytes / link_bw)
    return t + cf.overhead_s


def ops_time_s(
    ops: Sequence[Op],
    hardware: HardwareSpec,
    factors: EfficiencyFactors,
    link_bw: float | None = None,
    *,
    kind: LayerKind | None = None,
) -> float:
    """Seconds of a sequence of operators (one block or part): device time and host dispatch time combined by
    `combine_host_device`."""
    bw = link_bw if link_bw is not None else hardware.nvlink_bandwidth
    device = 0.0
    host = 0.0
    for op in ops:
        cf = factors.lookup(op.op_class, kind=kind, backward=op.backward)
        device += class_time_s(op, cf, hardware.peak_flops, hardware.hbm_bandwidth, bw)
        host += cf.host_s
    return combine_host_device(device, host)


def op_time_s(
    op: Op,
    hardware: HardwareSpec,
    factors: EfficiencyFactors,
    link_bw: float | None = None,
    *,
    kind: LayerKind | None = None,
) -> float:
    """Seconds one tp rank spends on `op` (of a block of layer kind `kind`; None for pre/post parts)."""
    cf = factors.lookup(op.op_class, kind=kind, backward=op.backward)
    bw = link_bw if link_bw is not None else hardware.nvlink_bandwidth
    return class_time_s(op, cf, hardware.peak_flops, hardware.hbm_bandwidth, bw)


# ---- the cost model ------------------------------------------------------------------------------------------


def sub_microbatch_instances(
    model: ModelSpec, batch: BatchMetadata, sub: SubMicrobatch
) -> dict[str, tuple[Instance, ...]]:
    """Instances of each module that sub-microbatch `sub` carries (what `CostModel.stage_time_ms` takes)."""
    mb = batch.microbatches[sub.microbatch]
    out: dict[str, tuple[Instance, ...]] = {}
    for name, idx in sub.instances:
        all_inst = module_instances(model, name, mb)
        out[name] = tuple(all_inst[i] for i in idx)
    return out


@dataclass(frozen=True, slots=True)
class HeaderCosts:
    """Costs of every stage of a plan header: what the search's `build_problem` and the engine's `StageCosts`
    take."""

    duration_ms: dict[StageKey, float]
    activation_bytes: dict[tuple[str, int, int, int], float]
    """Keyed by (pipeline, chunk, microbatch, sub): held from the chunk's F to its last backward pass."""

    workspace_bytes: dict[tuple[str, int, int, int], float] = field(default_factory=dict)
    """Same keys: what the pair's backward pass (B, or I) allocates on top while it runs
    (`memory.backward_workspace_bytes`, the largest over the chunk's modules)."""

    def act_bytes_by_forward(self) -> dict[StageKey, float]:
        """The same activation bytes keyed by forward stage (`engine.StageCosts.act_bytes`)."""
        return {StageKey(p, c, mb, s, Pass.F): b for (p, c, mb, s), b in self.activation_bytes.items()}


_BACKWARD_PASSES = frozenset({Pass.B, Pass.I, Pass.W})


class CostModel:
    """Stage latencies and activation memory of one model under one parallelism on one accelerator.

    Pass `cache` (a `StageCostCache`) to reuse costs across calls, rollouts and iterations; results are
    bit-identical with and without it.
    """

    def __init__(
        self,
        model: ModelSpec,
        parallel: ParallelSpec,
        hardware: HardwareSpec,
        factors: EfficiencyFactors | None = None,
        cache: StageCostCache | None = None,
        stage_scales: Mapping[tuple[str, str], float] | None = None,
        input_build_ms: Mapping[str, float] | None = None,
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.hardware = hardware
        self.factors = factors if factors is not None else EfficiencyFactors.uncalibrated()
        self.cache = cache
        self.tp = parallel.tp
        self.dtype_bytes = hardware.dtype_bytes
        # TP groups are innermost in the GPU order, so they stay inside a node whenever tp <= gpus_per_node.
        self.tp_link_bw = (
            hardware.nvlink_bandwidth if parallel.tp <= hardware.gpus_per_node else hardware.internode_bandwidth
        )
        self._modules = {m.name: m for m in model.modules}
        self._needs_backward = {m.name: model.needs_backward(m.name) for m in model.modules}
        self._dims: dict[str, Hashable] = {m.name: _dims_key(m) for m in model.modules}
        self._resolved: dict[tuple[LayerKind | None, bool], dict[OpClass, ClassFactors]] = {}
        self._context = ("costmodel/1", hardware, self.factors, self.dtype_bytes, self.tp)
        # Layer and part costs depend on dims, never on module names: one table per (hardware, factors, dtype,
        # tp), shared by every model. Stage keys name modules, so stages get a table per model (and scales).
        self._table = cache.table(self._context) if cache is not None else None
        self.stage_scales: dict[tuple[str, str], float] = {}
        """(module, pass) -> factor on that module's share of a stage's time: what a job's measured stage times
        taught the service (`server.jobs.JobState.fold_stage_timings`); pass ``F`` or ``B`` (I and W use B's)."""
        self._stage_table: dict[Any, Any] | None = None
        self.input_build_ms: dict[str, float] = {}
        """module -> host ms that the forward of the chunk holding the module's first layer adds per sub-microbatch:
        the executor builds the sub-microbatch's inputs and geometry there (token ids, latents, positions) before it
        launches the chunk's kernels, and an iteration that is host-bound cannot hide that behind the device.
        Measured on the GPU runs, not modelled from operators (`calibration.fit_input_build_ms`); not scaled by
        `stage_scales`, which are device-time factors. Empty (the default) adds nothing."""
        for module, ms in (input_build_ms or {}).items():
            if module not in self._modules or not 0.0 <= ms < math.inf:
                raise ValueError(f"input_build_ms[{module!r}] = {ms}: needs a module of the model and a finite ms >= 0")
            if ms > 0.0:
                self.input_build_ms[module] = float(ms)
        self.set_stage_scales(stage_scales or {})

    def set_stage_scales(self, stage_scales: Mapping[tuple[str, str], float]) -> None:
        """Replace the per-(module, pass) factors (see `stage_scales`). Layer and part costs stay cached (they are
        unscaled); stage costs go to the table of the new factors."""
        scales: dict[tuple[str, str], float] = {}
        for (module, pass_), scale in stage_scales.items():
            if module not in self._modules or pass_ not in ("F", "B") or not 0 < scale < math.inf:
                raise ValueError(f"stage scale ({module!r}, {pass_!r}) = {scale}: needs a module, F or B, > 0")
            if scale != 1.0:
                scales[(module, pass_)] = float(scale)
        if self.cache is not None:
            build = tuple(sorted(self.input_build_ms.items()))
            old = (*self._context, self.model, tuple(sorted(self.stage_scales.items())), build)
            new = (*self._context, self.model, tuple(sorted(scales.items())), build)
            if self._stage_table is not None and old != new:
                self.cache.drop(old)  # an online refit moves on; its earlier factors' stage costs are dead weight
            self._stage_table = self.cache.table(new)
        self.stage_scales = scales

    # ---- operators ----
    def module(self, name: str) -> ModuleSpec:
        try:
            return self._modules[name]
        except KeyError:
            raise KeyError(f"model '{self.model.name}' has no module '{name}'") from None

    def layer_ops(
        self, module_name: str, instances: Sequence[Instance], pass_: Pass, recompute: Recompute = Recompute.NONE
    ) -> tuple[Op, ...]:
        """Operators of one block (for inspection; costs go through `layer_time_ms`)."""
        return layer_ops(
            self.module(module_name),
            instances,
            tp=self.tp,
            pass_=pass_,
            recompute=recompute,
            dtype_bytes=self.dtype_bytes,
        )

    def _factors_for(self, kind: LayerKind | None, backward: bool) -> dict[OpClass, ClassFactors]:
        key = (kind, backward)
        r = self._resolved.get(key)
        if r is None:
            r = {c: self.factors.lookup(c, kind=kind, backward=backward) for c in OpClass}
            self._resolved[key] = r
        return r

    def ops_time_s(self, ops: Sequence[Op], kind: LayerKind | None) -> float:
        """Sum of device roofline times (one stream, nothing overlaps inside a block) combined with the sum of
        host dispatch times by `combine_host_device`: the host runs ahead unless kernels are shorter than their
        dispatch."""
        peak, hbm, link = self.hardware.peak_flops, self.hardware.hbm_bandwidth, self.tp_link_bw
        fwd = self._factors_for(kind, False)
        bwd = self._factors_for(kind, True)
        device = 0.0
        host = 0.0
        for op in ops:
            cf = (bwd if op.backward else fwd)[op.op_class]
            device += class_time_s(op, cf, peak, hbm, link)
            host += cf.host_s
        return combine_host_device(device, host)

    # ---- per layer ----
    def _skip(self, module_name: str, pass_: Pass) -> bool:
        return pass_ in _BACKWARD_PASSES and not self._needs_backward[module_name]

    def _layer_ms(self, module_name: str, sig: TokenSignature, pass_: Pass, recompute: Recompute) -> float:
        m = self._modules[module_name]
        ops = layer_ops(
            m, signature_instances(sig), tp=self.tp, pass_=pass_, recompute=recompute, dtype_bytes=self.dtype_bytes
        )
        return self.ops_time_s(ops, m.kind) * 1e3

    def _part_ms(self, module_name: str, part: str, sig: TokenSignature, pass_: Pass) -> float:
        m = self._modules[module_name]
        build = pre_ops if part == "pre" else post_ops
        ops = build(m, signature_instances(sig), tp=self.tp, pass_=pass_, dtype_bytes=self.dtype_bytes)
        return self.ops_time_s(ops, None) * 1e3

    def _cached_layer_ms(self, module_name: str, sig: TokenSignature, pass_: Pass, recompute: Recompute) -> float:
        if self._table is None or self.cache is None:
            return self._layer_ms(module_name, sig, pass_, recompute)
        key = ("layer", self._dims[module_name], self.tp, sig, pass_, recompute)
        return self.cache.lookup(self._table, key, lambda: self._layer_ms(module_name, sig, pass_, recompute))

    def _cached_part_ms(self, module_name: str, part: str, sig: TokenSignature, pass_: Pass) -> float:
        if self._table is None or self.cache is None:
            return self._part_ms(module_name, part, sig, pass_)
        key = (part, self._modules[module_name], self.tp, sig, pass_)
        return self.cache.lookup(self._table, key, lambda: self._part_ms(module_name, part, sig, pass_))

    def layer_time_ms(
        self, module_name: str, instances: Sequence[Instance], pass_: Pass, recompute: Recompute = Recompute.NONE
    ) -> float:
        """Time of one block of `module_name` running `pass_` on a sub-microbatch of `instances`."""
        self.module(module_name)
        if not instances or self._skip(module_name, pass_):
            return 0.0
        scale = self._scale(module_name, pass_)
        return scale * self._cached_layer_ms(module_name, token_signature(instances), pass_, recompute)

    def _scale(self, module_name: str, pass_: Pass) -> float:
        if not self.stage_scales:
            return 1.0
        return self.stage_scales.get((module_name, "F" if pass_ is Pass.F else "B"), 1.0)

    def pre_time_ms(self, module_name: str, instances: Sequence[Instance], pass_: Pass) -> float:
        self.module(module_name)
        if not instances or self._skip(module_name, pass_):
            return 0.0
        return self._scale(module_name, pass_) * self._cached_part_ms(
            module_name, "pre", token_signature(instances), pass_
        )

    def post_time_ms(self, module_name: str, instances: Sequence[Instance], pass_: Pass) -> float:
        self.module(module_name)
        if not instances or self._skip(module_name, pass_):
            return 0.0
        return self._scale(module_name, pass_) * self._cached_part_ms(
            module_name, "post", token_signature(instances), pass_
        )

    # ---- per stage ----
    def _signatures(
        self, chunk: Chunk, instances_by_module: Mapping[str, Sequence[Instance]]
    ) -> tuple[TokenSignature, ...]:
        return tuple(token_signature(instances_by_module.get(r.module, ())) for r in chunk.layers)

    def _structure(self, chunk: Chunk) -> tuple[tuple[str, int, bool, bool], ...]:
        out = []
        for r in chunk.layers:
            m = self.module(r.module)
            out.append((r.module, r.stop - r.start, r.start == 0, r.stop == m.layers))
        return tuple(out)

    def _stage_ms(
        self,
        structure: tuple[tuple[str, int, bool, bool], ...],
        sigs: tuple[TokenSignature, ...],
        pass_: Pass,
        recompute: Recompute,
    ) -> float:
        total = 0.0
        scales = self.stage_scales
        build = self.input_build_ms
        for (name, n, pre, post), sig in zip(structure, sigs, strict=True):
            if not sig or self._skip(name, pass_):
                continue
            part = 0.0
            if pre:
                part += self._cached_part_ms(name, "pre", sig, pass_)
            part += n * self._cached_layer_ms(name, sig, pass_, recompute)
            if self.cache is not None:
                self.cache.note_layers(n)
            if post:
                part += self._cached_part_ms(name, "post", sig, pass_)
            if scales:
                part *= self._scale(name, pass_)
            if pre and build and pass_ is Pass.F:
                part += build.get(name, 0.0)
            total += part
        return total

    def stage_time_ms(
        self,
        chunk: Chunk,
        instances_by_module: Mapping[str, Sequence[Instance]],
        pass_: Pass,
        recompute: Recompute = Recompute.NONE,
    ) -> float:
        """Time of `chunk` running `pass_` on one sub-microbatch (instances per module it touches)."""
        structure = self._structure(chunk)
        sigs = self._signatures(chunk, instances_by_module)
        if self._stage_table is None or self.cache is None:
            return self._stage_ms(structure, sigs, pass_, recompute)
        key = ("stage", structure, sigs, pass_, recompute)
        return self.cache.lookup(
            self._stage_table, key, lambda: self._stage_ms(structure, sigs, pass_, recompute), stage=True
        )

    def _stage_act(
        self, structure: tuple[tuple[str, int, bool, bool], ...], sigs: tuple[TokenSignature, ...], recompute: Recompute
    ) -> float:
        total = 0.0
        tp, b = self.tp, self.dtype_bytes
        for (name, n, pre, post), sig in zip(structure, sigs, strict=True):
            if not sig or not self._needs_backward[name]:
                continue
            m = self._modules[name]
            inst = signature_instances(sig)
            if pre:
                total += memory.pre_activation_bytes(m, inst, tp=tp, dtype_bytes=b)
            total += n * memory.layer_activation_bytes(m, inst, tp=tp, recompute=recompute, dtype_bytes=b)
            total += memory.caption_bytes(m, inst, tp=tp, dtype_bytes=b)
            if post:
                total += memory.post_activation_bytes(m, inst, tp=tp, dtype_bytes=b)
        return total

    def layer_activation_bytes(
        self, module_name: str, instances: Sequence[Instance], recompute: Recompute = Recompute.NONE
    ) -> float:
        """Bytes one block keeps from F to B (for per-layer strategy mixes; 0 where no backward runs)."""
        m = self.module(module_name)
        if not instances or not self._needs_backward[module_name]:
            return 0.0
        b = self.dtype_bytes
        return memory.layer_activation_bytes(m, instances, tp=self.tp, recompute=recompute, dtype_bytes=b)

    def stage_activation_bytes(
        self, chunk: Chunk, instances_by_module: Mapping[str, Sequence[Instance]], recompute: Recompute = Recompute.NONE
    ) -> float:
        """Bytes one rank holds from the chunk's F to its last backward pass for one sub-microbatch."""
        return self.stage_memory_bytes(chunk, instances_by_module, recompute)[0]

    def stage_workspace_bytes(
        self, chunk: Chunk, instances_by_module: Mapping[str, Sequence[Instance]], recompute: Recompute = Recompute.NONE
    ) -> float:
        """Bytes the chunk's backward pass allocates on top of its activations while it runs, for one
        sub-microbatch: the largest over its modules' blocks here (one block's backward runs at a time) and its
        loss head, if it holds one."""
        return self.stage_memory_bytes(chunk, instances_by_module, recompute)[1]

    def stage_memory_bytes(
        self, chunk: Chunk, instances_by_module: Mapping[str, Sequence[Instance]], recompute: Recompute = Recompute.NONE
    ) -> tuple[float, float]:
        """(`stage_activation_bytes`, `stage_workspace_bytes`), from one look at the chunk's structure."""
        structure = self._structure(chunk)
        sigs = self._signatures(chunk, instances_by_module)
        if self._stage_table is None or self.cache is None:
            return self._stage_act(structure, sigs, recompute), self._stage_workspace(structure, sigs, recompute)
        table, cache = self._stage_table, self.cache
        act = cache.lookup(
            table, ("act", structure, sigs, recompute), lambda: self._stage_act(structure, sigs, recompute), stage=True
        )
        workspace = cache.lookup(
            table,
            ("workspace", structure, sigs, recompute),
            lambda: self._stage_workspace(structure, sigs, recompute),
            stage=True,
        )
        return act, workspace

    def _stage_workspace(
        self, structure: tuple[tuple[str, int, bool, bool], ...], sigs: tuple[TokenSignature, ...], recompute: Recompute
    ) -> float:
        tp, b = self.tp, self.dtype_bytes
        most = 0.0
        for (name, n, _, post), sig in zip(structure, sigs, strict=True):
            if not sig or not self._needs_backward[name]:
                continue
            m = self._modules[name]
            inst = signature_instances(sig)
            if n:
                most = max(most, memory.backward_workspace_bytes(m, inst, tp=tp, recompute=recompute, dtype_bytes=b))
            if post:  # the loss head's backward runs before the blocks': the larger of the two counts
                most = max(most, memory.loss_head_workspace_bytes(m, inst, tp=tp))
        return most

    # ---- whole plans ----
    def header_costs(
        self,
        header: PlanHeader,
        batch: BatchMetadata,
        recompute: Recompute | Mapping[tuple[str, int], Recompute] = Recompute.NONE,
    ) -> HeaderCosts:
        """Duration of every stage of `header` and activation bytes of every (chunk, sub-microbatch).

        `recompute` is one strategy for all, or per (pipeline, chunk) (missing = NONE).
        """
        placement = header.placement
        chunks = {(c.pipeline, c.index): c for c in placement.chunks}
        passes = {p.name: (Pass.F, *backward_passes(header, p.name)) for p in placement.pipelines}
        durations: dict[StageKey, float] = {}
        acts: dict[tuple[str, int, int, int], float] = {}
        workspace: dict[tuple[str, int, int, int], float] = {}
        for sub in header.sub_microbatches:
            inst = sub_microbatch_instances(self.model, batch, sub)
            for c in range(placement.num_chunks(sub.pipeline)):
                chunk = chunks[(sub.pipeline, c)]
                rc = recompute if isinstance(recompute, Recompute) else recompute.get((sub.pipeline, c), Recompute.NONE)
                for p in passes[sub.pipeline]:
                    key = StageKey(sub.pipeline, c, sub.microbatch, sub.index, p)
                    durations[key] = self.stage_time_ms(chunk, inst, p, rc)
                if len(passes[sub.pipeline]) > 1:
                    key4 = (sub.pipeline, c, sub.microbatch, sub.index)
                    acts[key4], workspace[key4] = self.stage_memory_bytes(chunk, inst, rc)
        return HeaderCosts(duration_ms=durations, activation_bytes=acts, workspace_bytes=workspace)

    # ---- communication and the optimizer ----
    def transfer_ms(self, num_bytes: float, src_rank: int, dst_rank: int) -> float:
        """Point-to-point time of a `num_bytes` activation (or gradient) between pipeline ranks.

        With sequence parallelism each of the tp GPUs sends its 1/tp share over its own link, in parallel.
        Pipeline rank r sits on GPU r * tp of its replica (TP innermost, as `engine.LinkModel.from_specs`).
        """
        if src_rank == dst_rank or num_bytes <= 0:
            return 0.0
        cf = self.factors.lookup(OpClass.P2P)
        bw = self.hardware.link_bandwidth(src_rank * self.tp, dst_rank * self.tp)
        t = self.hardware.p2p_latency_s + cf.overhead_s + cf.a_net * num_bytes / self.tp / bw
        return t * 1e3

    def optimizer_step_ms(self, rank_params: float) -> float:
        """Mixed-precision Adam step over the trainable parameters one GPU holds (after the tp split).

        Memory bound: per parameter it reads the fp32 gradient, master weight, m and v and writes master, m, v and
        the bf16 weight (30 B); the distributed optimizer updates only its 1/dp shard.
        """
        if rank_params <= 0:
            return 0.0
        shard = rank_params / (self.parallel.dp if self.parallel.distributed_optimizer else 1)
        cf = self.factors.lookup(OpClass.OPTIMIZER)
        return (cf.a_mem * 30.0 * shard / self.hardware.hbm_bandwidth + cf.overhead_s) * 1e3

    def dp_sync_ms(self, rank_params: float) -> float:
        """Data-parallel gradient synchronisation at the end of a step (0 when dp = 1).

        Distributed optimizer: reduce-scatter the fp32 gradients, then all-gather the bf16 weights; otherwise an
        all-reduce of the fp32 gradients. Ring algorithms: each GPU moves (dp-1)/dp of the buffer per phase.
        """
        dp = self.parallel.dp
        if dp <= 1 or rank_params <= 0:
            return 0.0
        frac = (dp - 1) / dp
        net = frac * rank_params * (4.0 + 2.0) if self.parallel.distributed_optimizer else 2 * frac * rank_params * 4
        # Data-parallel peers are tp GPUs apart: inside a node while tp * dp fits in it.
        bw = self.hardware.link_bandwidth(0, self.tp * (dp - 1))
        cf = self.factors.lookup(OpClass.DP_ALLREDUCE)
        return (cf.a_net * net / bw + cf.overhead_s) * 1e3


def _dims_key(m: ModuleSpec) -> Hashable:
    """What a block's cost depends on besides tokens (not the module's name)."""
    return (m.kind.value, m.hidden, m.ffn_hidden, m.heads, m.kv_heads, m.trainable)


# ---- training FLOPs --------------------------------------------------------------------------------------------


def training_flops(model: ModelSpec, batch: BatchMetadata) -> float:
    """Model FLOPs of one training step over `batch` (the MFU convention, tp = 1, no recompute).

    Forward GEMMs and attention cores; backward GEMMs 2x (input gradient, plus weight gradient for trainable
    modules); backward attention 2x forward (flash attention's recomputed scores are not counted); frozen modules
    with nothing trainable upstream run forward only. Elementwise work is excluded.
    """
    attention_scale = ATTENTION_BACKWARD_MODEL_FLOPS / ATTENTION_BACKWARD_FLOPS

    def flops(ops: Sequence[Op]) -> float:
        return sum(
            o.flops * (attention_scale if o.backward and o.op_class is OpClass.ATTENTION else 1.0)
            for o in ops
            if o.op_class in (OpClass.GEMM, OpClass.ATTENTION)
        )

    total = 0.0
    for mb in batch.microbatches:
        for m in model.modules:
            inst = module_instances(model, m.name, mb)
            if not inst:
                continue
            passes = (Pass.F, Pass.B) if model.needs_backward(m.name) else (Pass.F,)
            for p in passes:
                total += m.layers * flops(layer_ops(m, inst, tp=1, pass_=p))
                total += flops(pre_ops(m, inst, tp=1, pass_=p)) + flops(post_ops(m, inst, tp=1, pass_=p))
    return total


__all__ = [
    "ANY",
    "DEFAULT_CLASS_FACTORS",
    "ClassFactors",
    "CostModel",
    "EfficiencyFactors",
    "FactorKey",
    "HeaderCosts",
    "class_time_s",
    "op_time_s",
    "ops_time_s",
    "sub_microbatch_instances",
    "training_flops",
]

"""The baseline registry and the functions that turn a baseline name and a batch into a plan.

A baseline's placement depends only on (name, model, pp) (nnscaler-static: also its representative batch), so
a trainer can build the same plan alone as a fallback. Its order is a fixed rule over the batch's stage graph:
the order stays the same from batch to batch while stage costs follow the data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from pipeweaver.plan.assemble import assemble_plan
from pipeweaver.plan.ir import Compute, Placement, Plan, PlanHeader, PlanSource
from pipeweaver.plan.layouts import RankOrder, mixed_placement, modular_placement, whole_sub_microbatches
from pipeweaver.plan.shapes import TransferShapes
from pipeweaver.search.baselines._line import Line, Op, lower_all, single_line
from pipeweaver.search.baselines.gpipe import gpipe_ops
from pipeweaver.search.baselines.interleaved import interleaved_ops
from pipeweaver.search.baselines.nnscaler import nnscaler_placement, nominal_batch
from pipeweaver.search.baselines.one_f_one_b import one_f_one_b_ops
from pipeweaver.search.baselines.optimus import optimus_orders
from pipeweaver.search.baselines.zero_bubble import zb_h1_ops, zbv_ops
from pipeweaver.spec.batch import BatchMetadata
from pipeweaver.spec.hardware import HardwareSpec
from pipeweaver.spec.model import ModelSpec
from pipeweaver.spec.parallel import ParallelSpec

PlacementFn = Callable[[ModelSpec, ParallelSpec, BatchMetadata | None], Placement]
OrdersFn = Callable[[PlanHeader], list[list[Compute]]]

INTERLEAVED_VIRTUAL = 2
"""Chunks per rank of the interleaved-1f1b baseline (Megatron's virtual pipeline size)."""

_DTYPES = {2: "bfloat16", 4: "float32"}


@dataclass(frozen=True, slots=True)
class BaselineSchedule:
    """A static schedule family: how it places chunks and how it orders each rank's stages."""

    name: str
    description: str
    placement: PlacementFn
    """(model, parallel, representative batch or None) -> the static placement."""
    orders: OrdersFn
    """Header -> per-rank compute orders over the header's stage graph."""
    split_backward: bool = False
    """The backward is split into input-gradient and weight-gradient passes (zero-bubble schedules)."""


def _single(ops: Callable[[Line], list[list[Op]]], name: str) -> OrdersFn:
    def orders(header: PlanHeader) -> list[list[Compute]]:
        line = single_line(header, name)
        return lower_all(line, ops(line))

    return orders


def _mixed(virtual: int, order: RankOrder = RankOrder.ROUND_ROBIN) -> PlacementFn:
    def placement(model: ModelSpec, parallel: ParallelSpec, representative: BatchMetadata | None) -> Placement:
        return mixed_placement(model, parallel.pp, virtual, order=order)

    return placement


def _modular(model: ModelSpec, parallel: ParallelSpec, representative: BatchMetadata | None) -> Placement:
    return modular_placement(model, parallel.pp)


def _nnscaler(model: ModelSpec, parallel: ParallelSpec, representative: BatchMetadata | None) -> Placement:
    return nnscaler_placement(model, parallel.pp, representative or nominal_batch(model, parallel))


BASELINES: dict[str, BaselineSchedule] = {
    b.name: b
    for b in (
        BaselineSchedule(
            name="gpipe",
            description=("GPipe fill-drain: all forwards, then all backwards; modules end to end, one chunk a rank"),
            placement=_mixed(1),
            orders=_single(gpipe_ops, "gpipe"),
        ),
        BaselineSchedule(
            name="1f1b",
            description="1F1B (Megatron, no virtual pipeline); modules end to end, one chunk a rank",
            placement=_mixed(1),
            orders=_single(one_f_one_b_ops, "1f1b"),
        ),
        BaselineSchedule(
            name="interleaved-1f1b",
            description=(
                f"Megatron-LM virtual pipeline ({INTERLEAVED_VIRTUAL} chunks a rank, balanced by parameters, "
                "modules end to end): the paper's Megatron-LM baseline"
            ),
            placement=_mixed(INTERLEAVED_VIRTUAL),
            orders=_single(interleaved_ops, "interleaved-1f1b"),
        ),
        BaselineSchedule(
            name="zb-h1",
            description="Zero-bubble ZB-H1: 1F1B with split backward and deferred weight gradients",
            placement=_mixed(1),
            orders=_single(zb_h1_ops, "zb-h1"),
            split_backward=True,
        ),
        BaselineSchedule(
            name="zbv",
            description="Zero-bubble ZB-V: two chunks a rank in a V, split backward (ScheduleZBVZeroBubble)",
            placement=_mixed(2, RankOrder.V_SHAPE),
            orders=_single(zbv_ops, "zbv"),
            split_backward=True,
        ),
        BaselineSchedule(
            name="optimus-coarse",
            description=(
                "Optimus coarse-grained: one pipeline per module, all encoder forwards first, then the "
                "backbone 1F1B, then the encoder backwards (the paper's Optimus baseline)"
            ),
            placement=_modular,
            orders=optimus_orders,
        ),
        BaselineSchedule(
            name="nnscaler-static",
            description=(
                "nnScaler*: one FLOP-balanced partition and 1F1B order from a representative batch, reused "
                "for every batch (the paper's nnScaler* baseline)"
            ),
            placement=_nnscaler,
            orders=_single(one_f_one_b_ops, "nnscaler-static"),
        ),
    )
}


def baseline(name: str) -> BaselineSchedule:
    try:
        return BASELINES[name]
    except KeyError:
        raise KeyError(f"unknown baseline '{name}'; choose one of {sorted(BASELINES)}") from None


@lru_cache(maxsize=128)
def baseline_placement(
    name: str, *, model: ModelSpec, parallel: ParallelSpec, representative: BatchMetadata | None = None
) -> Placement:
    """The static placement of baseline `name` (cached: it does not depend on the batch).

    `representative` is used by nnscaler-static only; without it, `nominal_batch(model, parallel)` stands in.
    """
    return baseline(name).placement(model, parallel, representative)


def baseline_header(
    name: str,
    *,
    model: ModelSpec,
    parallel: ParallelSpec,
    batch: BatchMetadata,
    job_id: str = "",
    iteration: int | None = None,
    representative: BatchMetadata | None = None,
) -> PlanHeader:
    """The plan header of baseline `name` for `batch`: static placement, one sub-microbatch per microbatch."""
    b = baseline(name)
    placement = baseline_placement(name, model=model, parallel=parallel, representative=representative)
    return PlanHeader(
        job_id=job_id,
        iteration=batch.iteration if iteration is None else iteration,
        placement=placement,
        sub_microbatches=whole_sub_microbatches(model, placement, batch),
        num_microbatches=len(batch.microbatches),
        schedule=name,
        source=PlanSource.BASELINE,
        dp_replica=batch.dp_replica,
        split_backward=b.split_backward,
    )


def baseline_orders(name: str, header: PlanHeader) -> list[list[Compute]]:
    """Per-rank compute orders of baseline `name` over `header`'s stage graph (no transfers)."""
    return baseline(name).orders(header)


def tensors_dtype_for(hardware: HardwareSpec | None) -> str:
    """The activation dtype a plan's transfers carry on `hardware` (bfloat16 unless it trains in float32)."""
    if hardware is None:
        return "bfloat16"
    return _DTYPES[hardware.dtype_bytes]


def build_baseline_plan(
    name: str,
    *,
    model: ModelSpec,
    parallel: ParallelSpec,
    batch: BatchMetadata,
    job_id: str = "",
    iteration: int | None = None,
    tensors_dtype: str | None = None,
    hardware: HardwareSpec | None = None,
    representative: BatchMetadata | None = None,
) -> Plan:
    """The complete plan (computes, batched sends and receives, waits) of baseline `name` for `batch`.

    Transfers carry `tensors_dtype`, else the dtype of `hardware` (`dtype_bytes` 2: bfloat16, 4: float32),
    else bfloat16. Raises KeyError for an unknown name and ValueError when the model cannot be cut as the
    baseline needs.
    """
    header = baseline_header(
        name,
        model=model,
        parallel=parallel,
        batch=batch,
        job_id=job_id,
        iteration=iteration,
        representative=representative,
    )
    orders = baseline_orders(name, header)
    dtype = tensors_dtype or tensors_dtype_for(hardware)
    shapes = TransferShapes(model, batch, header, dtype=dtype)
    return assemble_plan(header, orders, shapes.tensors)

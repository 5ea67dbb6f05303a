"""Our textbook baselines against torch.distributed.pipelining's own orders, on linear (one-module) pipelines.

Torch's schedules are built with the mock stages of its `_schedule_visualizer` (no process group, no GPU) and
read through `pipeline_order`: per rank, compute actions (stage index, F/B/I/W, microbatch). Our mixed
placements put chunk c on rank c % p (round robin) or in a V, so a chunk index is torch's stage index.

Where torch differs, a test below shows both orders:
- `Schedule1F1B`'s IR gives the last rank forwards 1..m instead of 0..m-1 (its step() runs correctly);
- `Schedule1F1B` refuses fewer microbatches than ranks, while its order builder would schedule ones that don't
  exist.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pipeweaver.plan.ir import Pass
from pipeweaver.search.baselines import baseline_header, baseline_orders
from pipeweaver.spec import (
    BatchMetadata,
    Document,
    LayerKind,
    Microbatch,
    Modality,
    ModelSpec,
    ModuleSpec,
    ParallelSpec,
)

torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
visualizer = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")

Action = tuple[int, str, int]
"""(stage index, computation type, microbatch) as torch's `_Action` prints them."""

COMPUTE = {"F", "B", "I", "W"}
GRID = [(p, m) for p in (2, 4, 8) for m in (4, 8, 16)]
TORCH_CLASS = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "zbv": "ScheduleZBVZeroBubble",
}
STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2, "zbv": 2}


def _compute_only(actions: list[Any]) -> list[Action]:
    return [
        (a.stage_index, a.computation_type.value, a.microbatch_index)
        for a in actions
        if a is not None and a.computation_type.value in COMPUTE
    ]


def torch_orders(name: str, p: int, m: int) -> list[list[Action]]:
    cls = getattr(torch_schedules, TORCH_CLASS[name])
    ops = visualizer.get_schedule_ops(cls, p, m, num_stages_per_rank=STAGES_PER_RANK[name])
    return [_compute_only(rank_ops) for rank_ops in ops]


def our_orders(name: str, p: int, m: int) -> list[list[Action]]:
    llm = ModuleSpec(
        name="llm",
        kind=LayerKind.DECODER_BLOCK,
        input=Modality.TEXT,
        layers=2 * p,
        hidden=64,
        ffn_hidden=128,
        heads=4,
        kv_heads=4,
        vocab_size=64,
        lm_head=True,
    )
    model = ModelSpec(name="linear", modules=(llm,))
    batch = BatchMetadata(0, tuple(Microbatch((Document(16),)) for _ in range(m)))
    header = baseline_header(name, model=model, parallel=ParallelSpec(pp=p, microbatches=m, seq_len=64), batch=batch)
    return [
        [(c.stage.chunk, c.stage.pass_.value, c.stage.microbatch) for c in o] for o in baseline_orders(name, header)
    ]


def text(order: list[Action]) -> str:
    return " ".join(f"{s}{t}{mb}" for s, t, mb in order)


@pytest.mark.parametrize(("p", "m"), GRID)
@pytest.mark.parametrize("name", ["gpipe", "interleaved-1f1b", "zbv"])
def test_orders_equal_torch(name: str, p: int, m: int) -> None:
    ours, theirs = our_orders(name, p, m), torch_orders(name, p, m)
    for r in range(p):
        assert text(ours[r]) == text(theirs[r]), f"rank {r}"


@pytest.mark.parametrize(("p", "m"), [(p, m) for p, m in GRID if m >= p])
def test_1f1b_equals_torch_except_its_last_rank(p: int, m: int) -> None:
    ours, theirs = our_orders("1f1b", p, m), torch_orders("1f1b", p, m)
    for r in range(p - 1):
        assert text(ours[r]) == text(theirs[r]), f"rank {r}"
    # Torch's last rank: forward_mb starts at 0 and is incremented before its first use when there are no
    # warm-up forwards, so its IR runs F1..Fm (Fm does not exist) and B0 before any forward. Ours is F0 B0 F1
    # B1 ...
    last = p - 1
    assert text(theirs[last]) == " ".join(f"{last}F{k + 1} {last}B{k}" for k in range(m))
    assert text(ours[last]) == " ".join(f"{last}F{k} {last}B{k}" for k in range(m))


def test_1f1b_with_fewer_microbatches_than_ranks() -> None:
    """p=8, m=4: torch's Schedule1F1B refuses; its order builder (called without the check) schedules
    microbatches 4..6 that do not exist. Ours warms up with min(p-1-r, m) forwards and runs the m
    microbatches."""
    p, m = 8, 4
    with pytest.raises(ValueError, match="must be greater than or equal to the number of stages"):
        torch_orders("1f1b", p, m)
    fake = SimpleNamespace(_num_stages=p, _n_microbatches=m)
    raw = torch_schedules.Schedule1F1B._get_pipeline_order(fake)
    theirs = [_compute_only(raw[r]) for r in range(p)]
    assert text(theirs[0]) == "0F0 0F1 0F2 0F3 0F4 0F5 0F6 0B0 0B1 0B2 0B3"
    ours = our_orders("1f1b", p, m)
    assert text(ours[0]) == "0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3"
    assert text(ours[p - 1]) == " ".join(f"{p - 1}F{k} {p - 1}B{k}" for k in range(m))
    for order in ours:
        assert sorted(mb for _, t, mb in order if t == Pass.F.value) == list(range(m))

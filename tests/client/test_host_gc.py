"""The trainer host's garbage collector: collections are timed per iteration, the executor settles the process
after its first iteration and then runs the full passes itself (`pipeweaver.client.host_gc`)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeweaver.client import PipelineExecutor
from pipeweaver.client.host_gc import CollectorClock, is_settled, settle_host_objects, unsettle_host_objects
from pipeweaver.datagen import sample_batch

sys.path.insert(0, str(Path(__file__).parent))
from test_executor_local import local_plan, small


@pytest.fixture(autouse=True)
def _unsettled() -> Iterator[None]:
    """Each test starts and ends with the collector as Python leaves it (it is process-wide)."""
    unsettle_host_objects()
    torch.set_num_threads(1)
    yield
    gc.set_debug(0)
    gc.garbage.clear()
    unsettle_host_objects()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_clock_counts_each_generations_passes_and_their_time_then_resets() -> None:
    clock = CollectorClock().start()
    try:
        gc.collect()
        gc.collect(0)
        got = clock.take()
        assert got.collections[2] >= 1 and got.collections[0] >= 1
        assert got.ms > 0
        assert clock.take().collections == (0, 0, 0)  # take resets
    finally:
        clock.stop()
    gc.collect()
    with CollectorClock() as c:
        pass
    assert c.take().collections == (0, 0, 0)  # stopped clocks hear nothing
    assert c._callback not in gc.callbacks


def test_settling_freezes_survivors_turns_automatic_passes_off_and_unsettling_undoes_it() -> None:
    keep = [_Cycle() for _ in range(20_000)]
    frozen = settle_host_objects()
    assert frozen >= len(keep) and gc.get_freeze_count() == frozen
    assert is_settled() and not gc.isenabled()
    garbage = _Cycle()
    del garbage
    assert gc.collect() >= 1  # cycles made after the freeze are still found by a full pass
    unsettle_host_objects()
    assert gc.get_freeze_count() == 0 and gc.isenabled() and not is_settled()
    del keep


def test_the_executor_settles_after_its_first_iteration_then_runs_full_passes_itself() -> None:
    wl = small("tiny-t2v")
    batch = sample_batch(wl, seed=5)
    plan = local_plan(wl.model, batch, mixed=False, split=False)
    ex = PipelineExecutor(wl.model, plan.header.placement, 0, settle_gc=True)
    ex.full_pass_every = 3
    ex.idle_hook = gc.collect  # a full pass inside the iteration, as the interpreter may start one anywhere
    first = ex.run_iteration(plan, batch)
    assert first.gc_passes[2] >= 1 and first.gc_ms > 0
    assert is_settled() and gc.get_freeze_count() > 0 and not gc.isenabled()
    ex.idle_hook = None
    passes = [ex.run_iteration(plan, batch).gc_passes for _ in range(4)]  # iterations 2..5: the 3rd collects
    assert [p[2] for p in passes] == [0, 1, 0, 0]
    assert all(p[0] == p[1] == 0 for p in passes)  # no automatic pass in between
    fallback = ex.run_with_fallback(None, batch, lambda b: plan)
    assert fallback.fallback_reason == "no plan arrived" and fallback.dispatch_ms > 0  # a fallback keeps every field

    unsettle_host_objects()
    off = PipelineExecutor(wl.model, plan.header.placement, 0)  # CPU default: the process's collector untouched
    off.run_iteration(plan, batch)
    off.run_iteration(plan, batch)
    assert gc.get_freeze_count() == 0 and gc.isenabled() and not is_settled()


@pytest.mark.parametrize("name", ["tiny-vlm", "tiny-t2v"])
def test_iterations_leave_no_reference_cycle_that_holds_a_tensor(name: str) -> None:
    """What makes switching the automatic collector off safe for device memory: garbage that only a full pass
    would free holds no tensor (torch's pytree leaves a few small function/cell cycles per call)."""
    wl = small(name)
    batch = sample_batch(wl, seed=5)
    for mixed, split in [(False, True), (True, True)]:
        plan = local_plan(wl.model, batch, mixed=mixed, split=split)
        ex = PipelineExecutor(wl.model, plan.header.placement, 0)
        ex.run_iteration(plan, batch)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        ex.run_iteration(plan, batch)
        ex.run_iteration(plan, batch)
        gc.collect()
        gc.set_debug(0)
        held = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
        kinds = sorted({type(o).__name__ for o in gc.garbage})
        gc.garbage.clear()
        gc.enable()
        assert not held, f"{name} mixed={mixed}: {len(held)} tensors in reference cycles; cycle kinds {kinds}"

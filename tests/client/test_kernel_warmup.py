"""The GEMM warm-up sweep (CPU): which row counts, which layers, and that training state is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeweaver.client import kernel_warmup
from pipeweaver.client.kernel_warmup import distinct_linears, gemm_row_sweep, warm_up_gemms


def test_sweep_is_dense_where_kernels_change_and_reaches_the_maximum() -> None:
    rows = gemm_row_sweep(3000)
    assert rows == sorted(set(rows)) and rows[0] == 1 and rows[-1] == 3000
    assert set(range(1, 65)) <= set(rows)
    assert set(range(8, 1025, 8)) <= set(rows)
    assert {1088, 2944, 129, 2945} <= set(rows)
    assert gemm_row_sweep(5) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="max_rows"):
        gemm_row_sweep(0)


def test_one_layer_per_shape() -> None:
    a = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(4, 8))
    b = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 4))
    shapes = {(m.in_features, m.out_features, m.bias is not None) for m in distinct_linears([a, b])}
    assert shapes == {(4, 8, True), (8, 4, True), (4, 8, False)}
    assert len(distinct_linears([a, b])) == 3


def test_warm_up_leaves_gradients_alone_and_skips_warmed_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_warmup, "_loaded", set())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 6))
    before = [p.detach().clone() for p in model.parameters()]
    runs = warm_up_gemms([model], 70)
    assert runs == 2 * len(gemm_row_sweep(70))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert warm_up_gemms([model], 70) == 0  # loaded kernels serve later executors
    new_rows = set(gemm_row_sweep(80)) - set(gemm_row_sweep(70))
    assert warm_up_gemms([model], 80) == 2 * len(new_rows)  # only the row counts not run yet


def test_executor_warms_every_layer_shape_of_its_own_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeweaver import presets
    from pipeweaver.client import PipelineExecutor
    from pipeweaver.plan.layouts import modular_placement

    monkeypatch.setattr(kernel_warmup, "_loaded", set())
    wl = presets.tiny_vlm()
    ex = PipelineExecutor(wl.model, modular_placement(wl.model, wl.parallel.pp), 0)
    layers = distinct_linears(ex.parts.values())
    assert layers and ex.warm_up_kernels(12) == len(layers) * len(gemm_row_sweep(12))
    assert all(p.grad is None for p in ex.parameters())


def test_iterations_load_only_row_counts_not_run_before(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeweaver import presets
    from pipeweaver.client import PipelineExecutor
    from pipeweaver.datagen import dynamic_batch
    from pipeweaver.plan.layouts import modular_placement
    from pipeweaver.search.fallback import build_fallback_plan

    monkeypatch.setattr(kernel_warmup, "_loaded", set())
    wl = presets.tiny_vlm(pp=1)
    placement = modular_placement(wl.model, 1)
    ex = PipelineExecutor(wl.model, placement, 0)
    ex.warm_new_shapes = True  # on by default on GPUs only (CPUs load no kernels lazily)
    batch = dynamic_batch(wl, seed=0, iteration=0)
    plan = build_fallback_plan(wl.model, placement, {}, batch)
    assert ex.run_iteration(plan, batch).warmed_gemms > 0
    loaded_rows = {m for _, m in kernel_warmup._loaded}
    assert {mb.language_tokens() for mb in batch.microbatches} <= loaded_rows  # the LM's exact token counts
    assert ex.run_iteration(plan, batch).warmed_gemms == 0  # the same shapes again: nothing new to load


def test_prepare_loads_a_plans_new_row_counts_ahead_of_its_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeweaver import presets
    from pipeweaver.client import PipelineExecutor
    from pipeweaver.datagen import dynamic_batch
    from pipeweaver.plan.layouts import modular_placement
    from pipeweaver.search.fallback import build_fallback_plan

    monkeypatch.setattr(kernel_warmup, "_loaded", set())
    wl = presets.tiny_vlm(pp=1)
    placement = modular_placement(wl.model, 1)
    ex = PipelineExecutor(wl.model, placement, 0)
    ex.warm_new_shapes = True
    batch = dynamic_batch(wl, seed=0, iteration=1)
    plan = build_fallback_plan(wl.model, placement, {}, batch)
    ex.prepare(plan, batch)
    assert ex.prewarmed_gemms > 0
    loaded_rows = {m for _, m in kernel_warmup._loaded}
    assert {mb.language_tokens() for mb in batch.microbatches} <= loaded_rows
    ex.prepare(plan, batch)  # once per plan
    assert ex.prewarmed_gemms == len(kernel_warmup._loaded)
    assert ex.run_iteration(plan, batch).warmed_gemms == 0  # nothing left to load at the iteration's start

"""The static fallback: FLOP costs from the spec, the trainer's lean cap, the planner's looser caps checked on SEMU."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

from pipeweaver.datagen import dynamic_batch, sample_batch
from pipeweaver.plan.graph import stage_graph
from pipeweaver.plan.ir import Pass, PlanSource
from pipeweaver.plan.validator import validate
from pipeweaver.presets import workload
from pipeweaver.search import planner as planner_module
from pipeweaver.search.fallback import build_fallback_plan, stage_work
from pipeweaver.search.planner import Planner, SearchConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))

from e2e_workload import scaled_vlm

FAST = SearchConfig(budget_ms=100, compare_baselines=())


def test_stage_work_follows_tokens_and_passes() -> None:
    w = workload("tiny-vlm")
    planner = Planner(w.model, w.parallel, w.hardware, config=FAST)
    batch = sample_batch(w, seed=1)
    plan = planner.fallback_plan(batch)
    graph = stage_graph(plan.header)
    work = stage_work(w.model, batch, plan.header, graph)
    assert set(work) == set(graph.stages) and all(v > 0 for v in work.values())
    for s in graph.stages:
        if s.pass_ is Pass.B:
            forward = s.with_pass(Pass.F)
            assert work[s] == pytest.approx(2 * work[forward])
    # The same chunk on microbatches with more tokens does more work.
    llm = sorted(
        (s for s in graph.stages if s.pipeline == "llm" and s.chunk == 1 and s.pass_ is Pass.F),
        key=lambda s: work[s],
    )
    tokens = {mb: m.language_tokens() for mb, m in enumerate(batch.microbatches)}
    assert tokens[llm[0].microbatch] <= tokens[llm[-1].microbatch]


@pytest.mark.parametrize("cap_scale", [None, 1.0, 2.0, math.inf])
def test_every_fallback_variant_is_valid(cap_scale: float | None) -> None:
    w = workload("tiny-t2v")
    placement_planner = Planner(w.model, w.parallel, w.hardware, config=FAST)
    part = placement_planner.partition
    for seed in range(3):
        batch = sample_batch(w, seed=seed)
        for unit_costs in (False, True):
            plan = build_fallback_plan(
                w.model,
                part.placement,
                part.sub_microbatch_size,
                batch,
                cap_scale=cap_scale,
                unit_costs=unit_costs,
            )
            validate(plan)
            assert plan.header.source is PlanSource.FALLBACK


def test_the_service_fallback_is_faster_when_a_looser_cap_fits() -> None:
    """The scaled VLM of the GPU runs: the uncapped order fits 40 GB and is about as fast as a search."""
    wl = scaled_vlm(microbatches=16)
    planner = Planner(wl.model, wl.parallel, wl.hardware, config=FAST)
    part = planner.partition
    batch = dynamic_batch(wl, seed=0, iteration=0)
    served = planner.fallback_plan(batch)
    validate(served)
    lean = build_fallback_plan(wl.model, part.placement, part.sub_microbatch_size, batch)
    fast = planner.simulate_plan(served, batch)
    slow = planner.simulate_plan(lean, batch)
    assert planner.fits_memory(fast)
    assert fast.makespan_ms < 0.7 * slow.makespan_ms


def _record_fallback_caps(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """The `cap_scale` of every fallback plan the planner builds from now on (None: the lean one), in order."""
    tries: list[float | None] = []
    real = planner_module.build_fallback_plan

    def counting(*args: object, **kwargs: object) -> object:
        tries.append(kwargs.get("cap_scale"))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(planner_module, "build_fallback_plan", counting)
    return tries


def test_a_memory_bound_job_stops_trying_looser_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    w = workload("tiny-vlm")
    planner = Planner(w.model, w.parallel, w.hardware, config=FAST)
    tries = _record_fallback_caps(monkeypatch)
    monkeypatch.setattr(planner, "_fits", lambda sim: False)  # nothing loose ever fits
    batch = sample_batch(w, seed=0)
    n = planner_module.LOOSE_FALLBACK_MISSES_BEFORE_SKIP
    for _ in range(n + 2):
        validate(planner.fallback_plan(batch))
    loose = len(planner_module.LOOSE_FALLBACKS)
    # n fallbacks try every loose variant then build the lean one; later ones build the lean one directly.
    assert tries == ([c for c, _ in planner_module.LOOSE_FALLBACKS] + [None]) * n + [None, None]
    assert loose >= 1


def test_the_fallback_takes_the_loosest_rung_that_fits_and_starts_near_it_next_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = workload("tiny-vlm")
    planner = Planner(w.model, w.parallel, w.hardware, config=FAST)
    tries = _record_fallback_caps(monkeypatch)
    # Only the capped rungs at 1.0 and below "fit": the uncapped order and the looser caps overflow.
    monkeypatch.setattr(planner, "_fits", lambda sim: tries[-1] is not None and tries[-1] <= 1.0)
    batch = sample_batch(w, seed=0)
    caps = [c for c, _ in planner_module.LOOSE_FALLBACKS]
    assert caps[0] == math.inf and 1.0 in caps and caps == sorted(caps, reverse=True)
    one = caps.index(1.0)
    validate(planner.fallback_plan(batch))
    assert tries == caps[: one + 1]  # loosest first, down to the first that fits; no lean plan built
    tries.clear()
    validate(planner.fallback_plan(batch))
    assert tries == caps[one - 1 : one + 1]  # one rung looser than last time, then the rung that fit


def test_near_its_deadline_the_fallback_skips_the_looser_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fallback served after its deadline is worth nothing: the looser tries are made only while they and the
    lean build still fit before it (at the times the last ones took)."""
    w = workload("tiny-vlm")
    planner = Planner(w.model, w.parallel, w.hardware, config=FAST)
    tries = _record_fallback_caps(monkeypatch)
    monkeypatch.setattr(planner, "_fits", lambda sim: False)
    batch = sample_batch(w, seed=0)
    loose = [c for c, _ in planner_module.LOOSE_FALLBACKS]
    far = time.monotonic() + 3600.0
    validate(planner.fallback_plan(batch, deadline=far))  # time enough: every rung, then the lean one
    assert tries == [*loose, None]
    assert planner._loose_try_s > 0 and planner._lean_fallback_s > 0
    tries.clear()
    misses = planner._loose_fallback_misses
    served = planner.fallback_plan(batch, deadline=time.monotonic())  # due now: the lean one at once
    validate(served)
    assert tries == [None] and served.header.source is PlanSource.FALLBACK
    assert planner._loose_fallback_misses == misses  # nothing was tried: no miss
    # On a clock where a looser try takes 1 s and the lean build 0.5 s, a deadline 2 s away leaves room for one
    # try (1 + 1 + 0.5 > 2 after it), then the lean build; the try overflowed, so that is a miss.
    clock = [1000.0]
    built: list[float | None] = []
    real_build = planner_module.build_fallback_plan

    def timed(*args: object, **kwargs: object) -> object:
        cap = kwargs.get("cap_scale")
        built.append(cap)  # type: ignore[arg-type]
        clock[0] += 1.0 if cap is not None else 0.5
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(planner_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(planner_module, "build_fallback_plan", timed)
    misses = planner._loose_fallback_misses
    planner._fallback_rung = 0
    validate(planner.fallback_plan(batch, deadline=clock[0] + 2.0))
    assert built == [loose[0], None]
    assert planner._loose_fallback_misses == misses + 1

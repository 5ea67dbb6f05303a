"""The plan-check benchmark runs and reports every part (benchmarks/bench_plan_check.py)."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path
from types import ModuleType

from pipeweaver import presets


def _bench() -> ModuleType:
    path = Path(__file__).parents[2] / "benchmarks" / "bench_plan_check.py"
    spec = importlib.util.spec_from_file_location("bench_plan_check", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_plan_check_benchmark_times_every_part() -> None:
    out = _bench().measure(presets.tiny_t2v(), budget_ms=50.0, repeats=3)
    assert set(out["ms"]) == {"stage_graph", "validate", "transfer_shapes", "digest_repr", "digest_wire"}
    assert all(v >= 0 for v in out["ms"].values()) and len(out["actions_per_rank"]) == 4


def test_plan_check_benchmark_measures_the_collector() -> None:
    out = _bench().measure_gc(presets.tiny_t2v(), budget_ms=50.0, checks=3)
    assert out["checks"] == 3 and out["objects_tracked"] > 0
    assert out["full_pass_ms"]["after_settling"] <= out["full_pass_ms"]["before_settling"]
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the process is left as Python leaves it

"""`pipeweaver demo`, shortened to 3 iterations: every rank finishes, the plans come from the planner, and the
parameters after the planned run equal those after the 1F1B run on the same batches from the same weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeweaver.cli import build_parser
from pipeweaver.demo import DemoConfig, _wait_ranks, format_report

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 3
RANKS = 2


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    cmd = [
        sys.executable, "-m", "pipeweaver", "demo",
        "--iterations", str(ITERATIONS), "--ranks", str(RANKS), "--out", str(out), "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data: dict[str, Any] = json.loads(proc.stdout)
    data["_stderr"] = proc.stderr
    return data


def test_every_rank_finished(result: dict[str, Any]) -> None:
    assert result["ranks"] == RANKS and result["ranks_finished"] == RANKS
    assert [r["iteration"] for r in result["records"]] == list(range(ITERATIONS))
    for r in result["records"]:
        assert r["planned_ms"] > 0 and r["baseline_ms"] > 0
        assert r["planned_makespan_ms"] > 0 and r["baseline_makespan_ms"] > 0


def test_plans_came_from_the_planner(result: dict[str, Any]) -> None:
    prefetch = result["prefetch"]
    assert prefetch["local_fallbacks"] == {}, prefetch
    assert prefetch["planned"] + prefetch["served_fallbacks"] == ITERATIONS
    assert prefetch["planned"] >= 1
    sources = [r["source"] for r in result["records"]]
    assert all(s in ("search", "cache", "fallback") for s in sources), sources
    assert any(not math.isnan(r["predicted_ms"]) for r in result["records"])  # SEMU predicted the searched ones
    assert result["calibration_rows"] > 0


def test_parameters_match_the_1f1b_run(result: dict[str, Any]) -> None:
    p = result["parameters"]
    assert p["equal"], p
    assert not p["missing"] and p["count"] > 100
    assert p["max_abs_diff"] <= 1e-4


def test_the_timeline_picture_is_written(result: dict[str, Any]) -> None:
    path = Path(result["timeline"])
    assert path.is_file() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_has_one_line_per_iteration_and_a_summary(result: dict[str, Any]) -> None:
    lines = list(format_report(result))
    rows = [line for line in lines if line[:4].strip().isdigit()]
    assert len(rows) == ITERATIONS
    text = "\n".join(lines)
    for needle in ("speedup over 1F1B", "SEMU prediction error", "fallbacks:", "parameters after both runs: equal"):
        assert needle in text, text


def test_demo_flags_and_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert args.iterations == 20 and args.out == "out/demo" and not args.json
    assert 2 <= DemoConfig().ranks <= 4
    with pytest.raises(ValueError, match="iterations"):
        DemoConfig(iterations=0)


def test_a_failed_rank_gets_its_peers_killed_and_fails_the_demo() -> None:
    import multiprocessing as mp
    import time

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=os._exit, args=(3,)), ctx.Process(target=time.sleep, args=(60,))]
    for p in procs:
        p.start()
    start = time.monotonic()
    codes = _wait_ranks(procs, timeout_s=60)
    assert codes[0] == 3 and codes[1] is None  # the sleeping peer was killed, not waited for
    assert time.monotonic() - start < 30
    assert all(not p.is_alive() for p in procs)

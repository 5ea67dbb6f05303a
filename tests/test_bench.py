"""`pipeweaver bench --json` prints exactly one JSON object with the documented keys (issue: the first ten minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_json_report_has_every_key(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeweaver",
            "bench",
            "--workload",
            "vlm-s",
            "--batches",
            "5",
            "--budget-ms",
            "200",
            "--json",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=True,
    )
    report = json.loads(out.stdout)  # exactly one JSON object on stdout
    assert set(report) >= {
        "workload",
        "hardware",
        "batches",
        "systems",
        "lower_bound_mean_ms",
        "plan_latency_ms",
        "speedup_vs",
        "does_not_fit",
        "best_baseline",
        "speedup_vs_best_baseline",
        "gap_to_lower_bound",
    }
    assert report["workload"] == "vlm-s" and report["hardware"] == "h800" and report["batches"] == 5
    assert set(report["plan_latency_ms"]) == {"p50", "p99"}
    systems = report["systems"]
    # Every baseline is either compared (it fits memory on every iteration) or reported as not fitting, not both.
    compared = {"1f1b", "interleaved-1f1b", "optimus-coarse", "nnscaler-static", "zbv"}
    assert compared <= set(systems) | set(report["does_not_fit"])
    assert "pipeweaver" in systems and not set(systems) & set(report["does_not_fit"])
    for unfit in report["does_not_fit"].values():
        assert unfit["max_peak_memory_gib"] > unfit["memory_capacity_gib"] and unfit["batches_over_memory"] >= 1
    for stats in systems.values():
        # every compared system fits the H800's memory (the report rounds GiB to 3 decimals; a plan may fill it)
        assert stats["max_peak_memory_gib"] <= round(80e9 / 2**30, 3)
    for stats in systems.values():
        assert set(stats) == {
            "mean_iter_ms",
            "p50_iter_ms",
            "p99_iter_ms",
            "mean_bubble_fraction",
            "max_peak_memory_gib",
        }
        assert stats["p50_iter_ms"] <= stats["p99_iter_ms"]
    assert set(report["speedup_vs"]) == set(systems) - {"pipeweaver"}
    for name, ratio in report["speedup_vs"].items():
        assert abs(ratio - systems[name]["mean_iter_ms"] / systems["pipeweaver"]["mean_iter_ms"]) < 1e-3
    assert report["lower_bound_mean_ms"] <= systems["pipeweaver"]["mean_iter_ms"]
    best = report["best_baseline"]
    assert report["speedup_vs_best_baseline"] == min(report["speedup_vs"].values()) == report["speedup_vs"][best]
    for picture in ("timeline-vlm-s.png", "iteration-time-vlm-s.png", "plan-latency-vlm-s.png"):
        assert (tmp_path / picture).stat().st_size > 10_000


def test_bench_rejects_bad_numbers_with_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeweaver", "bench", "--workload", "vlm-s", "--batches", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--batches" in out.stderr
    assert "Traceback" not in out.stderr

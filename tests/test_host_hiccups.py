"""`benchmarks/host_hiccups.py`: the gaps a spinning thread sees, and whether the guest kernel saw them."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from host_hiccups import measure, parse_cpus, summarize, unseen_by_the_kernel


def test_cpu_lists_and_summaries() -> None:
    assert parse_cpus("0-2,5,3") == [0, 1, 2, 3, 5]
    assert parse_cpus("") == []
    out = summarize([0.15, 1.5, 3.2, 0.3])
    assert out["count"] == 4 and out["max_ms"] == 3.2
    assert out["histogram"] == {"0.1-0.25ms": 1, "0.25-0.5ms": 1, "1.0-2.0ms": 1, "3.0-5.0ms": 1}
    assert summarize([]) == {"count": 0}


def test_a_gap_is_unseen_only_when_neither_cpu_time_nor_the_run_queue_covers_it() -> None:
    assert unseen_by_the_kernel(3e-3, 0.0, 0.0)
    assert not unseen_by_the_kernel(3e-3, 0.0, 2.9e-3)  # another task had the core: the guest scheduled it
    assert not unseen_by_the_kernel(3e-3, 2e-3, 0.0)  # the thread's clock ran: it was on the core


def _burn(cpu: int, seconds: float) -> None:
    os.sched_setaffinity(0, {cpu})
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_competitor_on_the_same_core_shows_as_run_queue_gaps() -> None:
    """The guest kernel's own time sharing: the spinner loses its core for slices and waits on the run queue,
    so its gaps are seen (not steal)."""
    cpu = min(os.sched_getaffinity(0))
    rival = multiprocessing.get_context("spawn").Process(target=_burn, args=(cpu, 8.0), daemon=True)
    rival.start()
    try:
        result = measure([cpu], 1.0, 100.0)
    finally:
        rival.kill()
        rival.join()
    one = result["per_cpu"][str(cpu)]
    assert one["hiccups"]["count"] >= 5
    assert one["run_queue_ms"] > 200  # about half of the second went to the rival
    assert one["unseen_by_the_kernel"]["count"] < one["hiccups"]["count"] / 2
    assert set(one["proc_stat_ms"]) == {"steal", "irq", "softirq", "system"}

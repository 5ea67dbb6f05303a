"""`serve --delivery-trace`: every streamed answer's way through the service, joinable with the client's clock."""

from __future__ import annotations

import gc
import gzip
import itertools
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pipeweaver.server import delivery_trace
from tests.server.harness import batch, register_request, running_server, stream_requests, tiny_workload

W = tiny_workload(pp=2)
ITERATIONS = (0, 1)


def test_the_trace_follows_each_answer_from_its_take_to_its_write(tmp_path: Path) -> None:
    trace_file = tmp_path / "trace.jsonl"
    t_before = time.perf_counter()
    with running_server(tmp_path, "--budget-ms", "40", "--delivery-trace", str(trace_file)) as server:
        job_id = server.stub().RegisterJob(register_request(W), timeout=120).job_id
        batches = [batch(W, it, seed=3) for it in ITERATIONS]

        def run(rank: int) -> list[int]:
            requests = iter(stream_requests(job_id, rank, batches))
            return [r.header.iteration for r in server.stub().StreamPlans(requests, timeout=120)]

        with ThreadPoolExecutor(2) as pool:
            assert [sorted(its) for its in pool.map(run, range(2))] == [list(ITERATIONS)] * 2
        assert sorted(run(0)) == list(ITERATIONS)  # again: each plan exists, so each request is answered as taken
        assert server.stop() == 0
    t_after = time.perf_counter()

    events = [json.loads(line) for line in trace_file.read_text().splitlines()]
    by_kind: dict[str, list[dict]] = {}
    for e in events:
        by_kind.setdefault(e["event"], []).append(e)
    answers = {(e["replica"], e["iteration"], e["rank"]): e for e in by_kind["answer"]}
    takes = {(e["session"], e["replica"], e["iteration"], e["rank"]): e for e in by_kind["take"]}
    assert set(answers) == {k[1:] for k in takes} == {(0, it, r) for it in ITERATIONS for r in range(2)}
    assert sum(e["answered"] for e in by_kind["take"]) >= len(ITERATIONS)
    # Each iteration searched once (both ranks asked) and resolved once.
    assert sorted(e["iteration"] for e in by_kind["submit"]) == list(ITERATIONS)
    assert sorted(e["iteration"] for e in by_kind["searched"]) == list(ITERATIONS)
    # The worker stamps on the same clock: its task lies between the submission and the outcome's return.
    submitted = {e["iteration"]: e["t"] for e in by_kind["submit"]}
    for e in by_kind["searched"]:
        assert submitted[e["iteration"]] <= e["worker_start"] <= e["worker_end"] <= e["t"]
        assert e["worker_ms"] == pytest.approx((e["worker_end"] - e["worker_start"]) * 1e3)
    resolved = {e["iteration"]: e for e in by_kind["resolve"]}
    assert sorted(resolved) == list(ITERATIONS) and all(e["source"] == "search" for e in resolved.values())
    # The k-th answer of a stream is its k-th write, after its take and, when it waited, its entry's resolution;
    # every stamp lies within the test's own perf_counter window (one clock across processes).
    writes: dict[int, list[dict]] = {}
    for e in by_kind["write"]:
        writes.setdefault(e["session"], []).append(e)
    per_session: dict[int, int] = {}
    for e in by_kind["answer"]:
        k = per_session.get(e["session"], 0)
        per_session[e["session"]] = k + 1
        write = writes[e["session"]][k]
        take = takes[(e["session"], e["replica"], e["iteration"], e["rank"])]
        assert t_before < take["t_start"] <= take["t_end"] <= e["t"] <= write["t_start"] <= write["t_end"] < t_after
        if not take["answered"]:
            assert take["t_end"] <= resolved[e["iteration"]]["t"] <= e["t"]
    assert sum(per_session.values()) == len(by_kind["write"]) == 6
    # Each request taken, resolution, answer and write carries the event loop thread's scheduler counters, which
    # only grow (Linux: the thread's CPU clock, /proc schedstat).
    stamped = by_kind["take"] + by_kind["resolve"] + by_kind["answer"] + by_kind["write"]
    counters = sorted((e.get("t_end", e.get("t")), e["cpu_ns"], e["wait_ns"], e["process_cpu_ns"]) for e in stamped)
    assert all(process >= cpu > 0 and wait >= 0 for _, cpu, wait, process in counters)
    assert all(a[1] <= b[1] and a[2] <= b[2] and a[3] <= b[3] for a, b in itertools.pairwise(counters))
    # The loop waited for the searches in its selector: those waits are recorded, apart from the other events.
    assert by_kind["idle"] and all(t_before < e["t_start"] < e["t_end"] < t_after for e in by_kind["idle"])
    assert sum(e["t_end"] - e["t_start"] for e in by_kind["idle"]) > 0.04  # at least one search's worth


def test_garbage_collections_are_traced_and_summarized_by_whether_a_burst_waited(tmp_path: Path) -> None:
    """A collection is a pause of the event loop: traced with its generation, and counted by
    `delivery_breakdown.gc_summary` as in a burst when it overlaps an iteration's answering."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from delivery_breakdown import gc_summary, load_trace

    delivery_trace.start()
    gc.collect(1)
    path = tmp_path / "gc.jsonl"
    delivery_trace.stop(path)
    traced = [e for e in load_trace(path) if e["event"] == "gc"]
    assert [e["generation"] for e in traced] == [1] and traced[0]["t_start"] <= traced[0]["t_end"]

    # One iteration answered between t = 10 and t = 11; a pause at 10.5 delayed it, one at 20 did not.
    burst = [
        {"event": "take", "replica": 0, "iteration": 0, "rank": 0, "t_start": 9.0, "t_end": 9.001},
        {"event": "resolve", "replica": 0, "iteration": 0, "t": 10.0, "source": "search"},
        {"event": "answer", "session": 1, "replica": 0, "iteration": 0, "rank": 0, "t": 10.9},
        {"event": "write", "session": 1, "t_start": 10.95, "t_end": 11.0},
        {"event": "gc", "generation": 2, "t_start": 10.5, "t_end": 10.52},
        {"event": "gc", "generation": 2, "t_start": 20.0, "t_end": 20.01},
    ]
    summary = gc_summary(burst)["gen2"]
    assert summary["count"] == 2 and summary["during_bursts"] == 1
    assert summary["during_bursts_max_ms"] == pytest.approx(20.0)


def test_loop_stalls_are_the_longest_silence_inside_each_answer_burst(tmp_path: Path) -> None:
    """`delivery_breakdown.loop_stalls` finds, per searched iteration, the longest stretch of its answer burst with
    no event; silence after the burst's last event does not count. And `load_trace` reads a trace by its content:
    the server writes plain JSON lines whatever the file is called (a `.gz` name once broke a benchmark's report)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from delivery_breakdown import load_trace, loop_stalls

    def iteration(it: int, t0: float, gap_ms: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"event": "submit", "replica": 0, "iteration": it, "t": t0 - 0.5},
            {"event": "resolve", "replica": 0, "iteration": it, "t": t0, "source": "search"},
        ]
        t = t0
        for s in range(4):
            t += (gap_ms if s == 2 else 0.05) * 1e-3
            out.append({"event": "answer", "session": s, "replica": 0, "iteration": it, "rank": s, "t": t})
        return out

    trace = iteration(0, 10.0, 3.0) + iteration(1, 20.0, 0.1)
    stalls = loop_stalls(trace)
    assert stalls["iterations"] == 2 and stalls["over_1ms"] == 1
    assert stalls["longest_gap_ms"]["max"] == pytest.approx(3.0, abs=1e-6)
    assert "over_1ms_split" not in stalls  # writes without the scheduler's counters: nothing to split by

    # Each answer written at once, the loop thread's counters with each write. In iteration 0's stall (3 ms
    # before rank 2's answer) the thread ran 1 ms and waited 1.5 ms for a CPU; the rest it was blocked,
    # while another thread of the server ran 0.4 ms.
    cpu_ns, wait_ns, others_ns = 10**9, 10**8, 10**9
    counted: list[dict[str, Any]] = []
    for e in trace:
        counted.append(e)
        if e["event"] == "answer":
            if e["iteration"] == 0 and e["rank"] == 2:
                cpu_ns, wait_ns, others_ns = cpu_ns + 1_000_000, wait_ns + 1_500_000, others_ns + 400_000
            cpu_ns += 20_000
            t = e["t"] + 10e-6
            counted.append(
                {"event": "write", "session": e["session"], "t_start": t, "t_end": t + 10e-6, "cpu_ns": cpu_ns,
                 "wait_ns": wait_ns, "process_cpu_ns": cpu_ns + others_ns}
            )  # fmt: skip
    # The loop sat 2.5 ms of the stall in its selector, woken by one event before its 4 ms timeout.
    stall_start = next(e["t_end"] for e in counted if e["event"] == "write" and e["session"] == 1 and e["t_end"] < 15)
    counted.append({"event": "idle", "t_start": stall_start + 1e-4, "t_end": stall_start + 2.6e-3, "timeout": 4e-3,
                    "ready": 1})  # fmt: skip
    split = loop_stalls(counted)
    (idle,) = split["over_1ms_loop_idle"]
    assert idle["loop_idle_ms"] == pytest.approx(2.5, abs=1e-3) and idle["longest_wait_timeout_ms"] == 4.0
    assert idle["longest_wait_woken_by"] == 1
    assert split["over_1ms"] == 1 and split["bursts_waiting_over_1ms"] == 1
    (stall,) = split["over_1ms_split"]
    assert stall["on_cpu_ms"] == pytest.approx(1.02, abs=1e-3)
    assert stall["waiting_for_cpu_ms"] == pytest.approx(1.5, abs=1e-3)
    assert stall["blocked_ms"] == pytest.approx(3.0 - 1.02 - 1.5, abs=1e-3)
    assert stall["other_threads_on_cpu_ms"] == pytest.approx(0.4, abs=1e-3)
    assert split["runqueue_ms"]["max"] == pytest.approx(1.5, abs=1e-3)
    assert split["runqueue_ms"]["p50"] == pytest.approx(0.75, abs=1e-3)  # iteration 1 waited for nothing

    plain = tmp_path / "named.trace.jsonl.gz"
    plain.write_text("".join(json.dumps(e) + "\n" for e in trace))
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_trace(plain) == load_trace(packed) == trace

"""Where a streamed plan's delivery latency goes: the clients' send and receive times joined with the server's
delivery trace (`pipeweaver serve --delivery-trace`, `pipeweaver.server.delivery_trace`), step by step.

Both sides stamp with `time.perf_counter`, CLOCK_MONOTONIC on Linux, so on one host the timestamps of the client
processes and the server compare directly. Each answer's overhead (its latency less the worker time its answer
reports, as `bench_service.py` counts it) splits into:

- ``to_take``: client write -> the server starts taking the request (transport, and the event loop busy with the
  requests read before it);
- ``take``: checking the request and finding its entry (answered here when its plan is there);
- ``to_resolve``: a waiting request -> its entry's plan fixed, less the worker time its answer reports (the
  search's hand-over both ways for the request that started it; for a replica sharing another's search, also the
  hop that passes its plan on);
- ``to_answer``: plan fixed (or the take, for a request answered at once) -> its answer built and handed to the
  stream;
- ``to_write``: answer handed over -> its `context.write` begins (the hop to the task that writes, and the writes
  before it on the same stream);
- ``write``: `context.write` itself;
- ``to_client``: the write returned -> the client has the answer's bytes.

The server's garbage collections (`gc_summary`): per generation, their pauses, and those that fell while an
iteration's requests were taken or its answers written. Stalls of the event loop that the trace does not explain
(`loop_stalls`): the longest stretch of each answer burst in which the server recorded nothing.

For each iteration with a search, also ``search_ipc``: submit -> outcome back on the loop, less the worker's own
time (pickling, pipes, the loop's hops), split into ``to_worker`` (submit -> the task begins in the worker) and
``from_worker`` (the task ends -> its outcome is back on the loop), and ``searched_to_resolve`` (the plan's
bookkeeping before it resolves).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

STEPS = ("to_take", "take", "to_resolve", "to_answer", "to_write", "write", "to_client")


def load_trace(path: Path) -> list[dict[str, Any]]:
    """A delivery trace as the server wrote it (JSON lines), or gzipped. The content decides, not the name: the
    server writes plain JSON lines whatever the file is called."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def answer_steps(samples: list[tuple[Any, ...]], trace: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per client sample (`bench_service.Sample`) found in the trace: its overhead split into `STEPS` (ms), with
    ``overhead`` (their sum) and ``source``. Samples the trace lacks (a stream the trace did not see) are left out."""
    takes: dict[tuple[int, int, int], dict[str, Any]] = {}
    answers: dict[tuple[int, int, int], tuple[int, int, float]] = {}
    per_session: dict[int, int] = defaultdict(int)
    writes: dict[int, list[tuple[float, float]]] = defaultdict(list)
    resolved: dict[tuple[int, int], float] = {}
    for e in trace:
        kind = e["event"]
        if kind == "take":
            takes[(e["replica"], e["iteration"], e["rank"])] = e
        elif kind == "answer":
            k = (e["replica"], e["iteration"], e["rank"])
            answers[k] = (e["session"], per_session[e["session"]], e["t"])
            per_session[e["session"]] += 1
        elif kind == "write":
            writes[e["session"]].append((e["t_start"], e["t_end"]))
        elif kind == "resolve":
            resolved[(e["replica"], e["iteration"])] = e["t"]
    out = []
    for sample in samples:
        latency, search_ms, _, source, _, _, rank, replica, iteration, sent, received = sample
        key = (replica, iteration, rank)
        take, answer = takes.get(key), answers.get(key)
        if take is None or answer is None:
            continue
        session, index, t_answer = answer
        if index >= len(writes[session]):
            continue
        w_start, w_end = writes[session][index]
        if take["answered"]:
            t_ready = take["t_end"]
            to_resolve = 0.0
        else:
            t_ready = resolved.get((replica, iteration), t_answer)
            to_resolve = t_ready - take["t_end"] - search_ms / 1e3
        steps = {
            "to_take": take["t_start"] - sent,
            "take": take["t_end"] - take["t_start"],
            "to_resolve": to_resolve,
            "to_answer": t_answer - t_ready,
            "to_write": w_start - t_answer,
            "write": w_end - w_start,
            "to_client": received - w_end,
        }
        out.append({**{k: v * 1e3 for k, v in steps.items()}, "overhead": latency - search_ms, "source": source})
    return out


def search_steps(trace: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per search: ``search_ipc`` and ``searched_to_resolve`` (ms), with the worker's own ``worker_ms``."""
    submitted = {(e["replica"], e["iteration"]): e["t"] for e in trace if e["event"] == "submit"}
    resolved = {(e["replica"], e["iteration"]): e["t"] for e in trace if e["event"] == "resolve"}
    out = []
    for e in trace:
        if e["event"] != "searched":
            continue
        key = (e["replica"], e["iteration"])
        if key not in submitted:
            continue
        row = {
            "worker_ms": e["worker_ms"],
            "search_ipc": (e["t"] - submitted[key]) * 1e3 - e["worker_ms"],
            "to_worker": (e["worker_start"] - submitted[key]) * 1e3,
            "from_worker": (e["t"] - e["worker_end"]) * 1e3,
        }
        if key in resolved:
            row["searched_to_resolve"] = (resolved[key] - e["t"]) * 1e3
        out.append(row)
    return out


def _by_iteration(trace: list[dict[str, Any]]) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """The trace's events that name an iteration, by iteration and kind."""
    out: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for e in trace:
        if "iteration" in e:
            out[e["iteration"]][e["event"]].append(e)
    return out


def bursts(trace: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per iteration whose plan was searched, on the server's clock alone (ms): ``first_take_to_submit`` (the
    iteration's first request taken -> its search submitted: checking a batch seen for the first time),
    ``resolves_spread`` (the first entry resolved -> the last, the replicas that shared the search), and from the
    first resolution to the ``last_answer`` handed over, the ``last_write_start`` and the ``last_write_end``."""
    by_iteration = _by_iteration(trace)
    writes: dict[int, list[dict[str, Any]]] = defaultdict(list)
    written: dict[tuple[int, int, int], dict[str, Any]] = {}
    per_session: dict[int, int] = defaultdict(int)
    for e in trace:
        if e["event"] == "write":
            writes[e["session"]].append(e)
    for e in trace:
        if e["event"] == "answer":
            k = per_session[e["session"]]
            per_session[e["session"]] += 1
            if k < len(writes[e["session"]]):
                written[(e["replica"], e["iteration"], e["rank"])] = writes[e["session"]][k]
    out = []
    for _, events in sorted(by_iteration.items()):
        if not events["submit"] or not events["resolve"] or not events["answer"]:
            continue
        first_take = min(e["t_start"] for e in events["take"])
        # Each replica's first resolution: an entry made again after the window dropped the first (a later GetPlan
        # for the same iteration) resolves again, long after the burst.
        first: dict[int, float] = {}
        for e in events["resolve"]:
            first[e["replica"]] = min(e["t"], first.get(e["replica"], e["t"]))
        resolved = sorted(first.values())
        done = [
            written[k] for k in ((e["replica"], e["iteration"], e["rank"]) for e in events["answer"]) if k in written
        ]
        t0 = resolved[0]
        out.append(
            {
                "first_take_to_submit": (min(e["t"] for e in events["submit"]) - first_take) * 1e3,
                "resolves_spread": (resolved[-1] - t0) * 1e3,
                "last_answer": (max(e["t"] for e in events["answer"]) - t0) * 1e3,
                "last_write_start": (max(w["t_start"] for w in done) - t0) * 1e3 if done else float("nan"),
                "last_write_end": (max(w["t_end"] for w in done) - t0) * 1e3 if done else float("nan"),
            }
        )
    return out


def burst_summary(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """`bursts`, as p50 / p99 / mean over the searched iterations."""
    rows = bursts(trace)
    keys = ("first_take_to_submit", "resolves_spread", "last_answer", "last_write_start", "last_write_end")
    return {"iterations": len(rows), **{k: _stats([r[k] for r in rows]) for k in keys}}


def gc_summary(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """The server process's garbage collections: per generation, how many and how long (ms), and how many of them
    paused the event loop while an iteration's answers were going out (between its first resolution and its last
    write) or its requests were being taken: the pauses someone's answer waited for."""
    pauses = [e for e in trace if e["event"] == "gc"]
    phases: list[tuple[float, float]] = []
    writes = [e for e in trace if e["event"] == "write"]
    for events in _by_iteration(trace).values():
        if events["take"]:
            phases.append((min(e["t_start"] for e in events["take"]), max(e["t_end"] for e in events["take"])))
        if events["resolve"]:
            start = min(e["t"] for e in events["resolve"])
            last_answer = max((e["t"] for e in events["answer"]), default=start)
            # The writes of this iteration's answers end at the first write to end after its last answer.
            ends = [w["t_end"] for w in writes if w["t_start"] >= start and w["t_end"] >= last_answer]
            phases.append((start, min(ends) if ends else last_answer))
    out: dict[str, Any] = {}
    for generation in sorted({e["generation"] for e in pauses}):
        ms = [(e["t_end"] - e["t_start"]) * 1e3 for e in pauses if e["generation"] == generation]
        during = [
            (e["t_end"] - e["t_start"]) * 1e3
            for e in pauses
            if e["generation"] == generation and any(a < e["t_end"] and e["t_start"] < b for a, b in phases)
        ]
        out[f"gen{generation}"] = {
            "count": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "max_ms": round(max(ms), 3),
            "during_bursts": len(during),
            "during_bursts_max_ms": round(max(during), 3) if during else 0.0,
        }
    return out


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "max": round(float(a.max()), 3),
    }


def summarize(samples: list[tuple[Any, ...]], trace: list[dict[str, Any]]) -> dict[str, Any]:
    """Each step's p50 / p99 / mean over the answers, and its mean over the slowest 1% of answers by overhead
    (what the p99 is made of)."""
    rows = answer_steps(samples, trace)
    if not rows:
        return {"answers": 0}
    tail = sorted(rows, key=lambda r: r["overhead"])[-max(1, len(rows) // 100) :]
    return {
        "answers": len(rows),
        "of_samples": len(samples),
        "overhead_ms": _stats([r["overhead"] for r in rows]),
        "steps_ms": {s: _stats([r[s] for r in rows]) for s in STEPS},
        "slowest_1pct_mean_ms": {s: round(float(np.mean([r[s] for r in tail])), 3) for s in STEPS},
        "searches": {
            k: _stats([r[k] for r in search_steps(trace) if k in r])
            for k in ("worker_ms", "search_ipc", "to_worker", "from_worker", "searched_to_resolve")
        },
    }


class _Burst(NamedTuple):
    """A searched iteration's answer burst: its first resolution and its longest silence [start, end] (seconds,
    equal when the burst recorded fewer than two events)."""

    t0: float
    start: float
    end: float


def _bursts_longest_silence(trace: list[dict[str, Any]], window_s: float) -> list[_Burst]:
    """Per searched iteration, the longest stretch of its answer burst (`window_s` from its first resolution)
    without an event; the loop's own selector waits (``idle``) do not count as events. A burst that ends early
    leaves the rest of the window empty: only gaps between recorded events count."""
    stamps = np.sort(
        np.array(
            [e[k] for e in trace if e["event"] != "idle" for k in ("t", "t_start", "t_end") if k in e], dtype=float
        )
    )
    out = []
    for _, events in sorted(_by_iteration(trace).items()):
        if not events["submit"] or not events["resolve"]:
            continue
        t0 = min(e["t"] for e in events["resolve"])
        inside = stamps[(stamps >= t0) & (stamps <= t0 + window_s)]
        if len(inside) < 2:
            out.append(_Burst(t0, t0, t0))
            continue
        at = int(np.diff(inside).argmax())
        out.append(_Burst(t0, float(inside[at]), float(inside[at + 1])))
    return out


def _idle_within(
    idle: list[tuple[float, float, float, int]], starts: np.ndarray, a: float, b: float
) -> dict[str, float] | None:
    """How much of the stretch [a, b] the event loop spent waiting in its selector (`delivery_trace`'s ``idle``
    events), with the longest such wait's timeout (ms; -1: none) and the events that ended it."""
    first = max(0, int(np.searchsorted(starts, a, side="right")) - 1)
    overlaps = [(min(e, b) - max(s, a), timeout, ready) for s, e, timeout, ready in idle[first:] if s < b and e > a]
    if not overlaps:
        return None
    longest = max(overlaps)
    return {
        "stall_ms": round((b - a) * 1e3, 3),
        "loop_idle_ms": round(sum(o[0] for o in overlaps) * 1e3, 3),
        "longest_wait_timeout_ms": round(longest[1] * 1e3, 3) if longest[1] >= 0 else -1.0,
        "longest_wait_woken_by": longest[2],
    }


def loop_stalls(trace: list[dict[str, Any]], *, window_s: float = 0.02) -> dict[str, Any]:
    """Per searched iteration, the longest stretch of its answer burst (`window_s` from its first resolution) in
    which the server recorded nothing: no answer handed over, no write begun or returned, no collection. While a
    burst's answers wait, the loop records an event every few tens of microseconds, so a stretch of a millisecond
    or more is the event loop held up by something the events do not show. As p50 / p99 / max (ms) over the
    iterations, and how many exceed 1 ms.

    Where the events carry the loop thread's scheduler counters (`delivery_trace.sched`: requests taken,
    resolutions, answers handed over, writes), each stall over 1 ms is split by the two events around it into
    the loop thread's time on a CPU (a long call), waiting for a CPU (descheduled) and neither (blocked: the GIL
    held by another thread, a lock, a system call), with the CPU time the server's other threads took meanwhile
    (``other_threads_on_cpu_ms``: a thread that ran while the loop was blocked likely held the GIL), and every
    burst's wait for a CPU between its first and last such event is summarized (``runqueue_ms``). Where the trace
    has the loop's selector waits (``idle``), each stall over 1 ms also gets the part of it the loop spent idle,
    waiting for I/O or a timer (``over_1ms_loop_idle``): the loop had nothing ready then. An event's
    counters are read just after its timestamp, so a wait that falls between the two (rare) is counted against
    the stretch before it."""
    idle = sorted((e["t_start"], e["t_end"], e["timeout"], e["ready"]) for e in trace if e["event"] == "idle")
    idle_starts = np.array([w[0] for w in idle], dtype=float)
    counted = sorted(
        (e.get("t_end", e.get("t")), e["cpu_ns"], e["wait_ns"], e.get("process_cpu_ns", 0))
        for e in trace
        if e.get("cpu_ns")
    )
    stamped_at = np.array([w[0] for w in counted], dtype=float)
    longest = []
    split: list[dict[str, float]] = []
    idle_split: list[dict[str, float]] = []
    runqueue: list[float] = []
    for t0, a, b in _bursts_longest_silence(trace, window_s):
        longest.append((b - a) * 1e3)
        if not counted:
            continue
        lo, hi = np.searchsorted(stamped_at, [t0, t0 + window_s], side="left")
        if hi - lo >= 2:
            runqueue.append((counted[hi - 1][2] - counted[lo][2]) / 1e6)
        if b - a > 1e-3 and idle:
            waits = _idle_within(idle, idle_starts, a, b)
            if waits:
                idle_split.append(waits)
        if b - a > 1e-3:
            before = int(np.searchsorted(stamped_at, a, side="right")) - 1
            after = int(np.searchsorted(stamped_at, b, side="left"))
            if before >= 0 and after < len(counted):
                (t_a, cpu_a, wait_a, proc_a), (t_b, cpu_b, wait_b, proc_b) = counted[before], counted[after]
                on_cpu, waiting = (cpu_b - cpu_a) / 1e6, (wait_b - wait_a) / 1e6
                span = (t_b - t_a) * 1e3
                one = {
                    "stall_ms": round((b - a) * 1e3, 3),
                    "between_events_ms": round(span, 3),
                    "on_cpu_ms": round(on_cpu, 3),
                    "waiting_for_cpu_ms": round(waiting, 3),
                    "blocked_ms": round(max(0.0, span - on_cpu - waiting), 3),
                }
                if proc_a and proc_b:  # the server's other threads (gRPC's, the metrics server's)
                    one["other_threads_on_cpu_ms"] = round((proc_b - proc_a) / 1e6 - on_cpu, 3)
                split.append(one)
    if not longest:
        return {"iterations": 0}
    a = np.asarray(longest)
    out: dict[str, Any] = {
        "iterations": len(longest),
        "longest_gap_ms": {
            "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3),
            "max": round(float(a.max()), 3),
        },
        "over_1ms": int((a > 1.0).sum()),
    }
    if idle:
        out["over_1ms_loop_idle"] = idle_split
    if counted:
        out["over_1ms_split"] = split
        out["runqueue_ms"] = _stats(runqueue)
        out["bursts_waiting_over_1ms"] = sum(1 for r in runqueue if r > 1.0)
    return out


def watched_stalls(
    trace: list[dict[str, Any]], watched: list[dict[str, Any]], *, window_s: float = 0.02
) -> dict[str, Any]:
    """What the event loop thread was blocked in during each stall over 1 ms (`loop_stalls`' stretches), from
    `watch_thread.py`'s record of the same thread: per stall, the blocked time by (state, system call, wait
    channel); and over all stalls, those totals. A system call's number is x86-64's (202 futex: a lock or the GIL,
    232 epoll_wait, 46 sendmsg, 44 sendto, 0 read, 1 write)."""
    rows = sorted((w["t_start"], w["t_end"], w["state"], w["syscall"], w["wchan"]) for w in watched)
    starts = np.array([r[0] for r in rows], dtype=float)
    stalls: list[dict[str, Any]] = []
    totals: dict[str, float] = defaultdict(float)
    for _, a, b in _bursts_longest_silence(trace, window_s):
        if b - a <= 1e-3:
            continue
        blocked: dict[str, float] = defaultdict(float)
        first = max(0, int(np.searchsorted(starts, a, side="right")) - 1)
        for s, e, state, call, chan in rows[first:]:
            if s >= b:
                break
            if e > a:
                blocked[f"{state} {call} {chan}"] += (min(e, b) - max(s, a)) * 1e3
        for k, v in blocked.items():
            totals[k] += v
        stalls.append(
            {"stall_ms": round((b - a) * 1e3, 3), "blocked_in_ms": {k: round(v, 3) for k, v in blocked.items()}}
        )
    return {
        "stalls": stalls,
        "blocked_in_ms_total": {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="A delivery trace's searched bursts and searches, server side.")
    parser.add_argument(
        "trace", type=Path, help="the trace (JSON lines, or .gz) of `pipeweaver serve --delivery-trace`"
    )
    args = parser.parse_args()
    trace = load_trace(args.trace)
    searches = search_steps(trace)
    report = {
        "trace": str(args.trace),
        "bursts_ms": burst_summary(trace),
        "searches_ms": {
            k: _stats([r[k] for r in searches if k in r])
            for k in ("worker_ms", "search_ipc", "to_worker", "from_worker", "searched_to_resolve")
        },
        "gc": gc_summary(trace),
        "loop_stalls": loop_stalls(trace),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

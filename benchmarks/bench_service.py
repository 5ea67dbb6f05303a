"""Plan delivery of the real planner service to 64 concurrent rank streams (16 replicas x pp 4 of vlm-s).

Pass 1 (planning): every rank streams the metadata of iteration k+1 as soon as it has iteration k's plan, then
"trains" for --iteration-ms; a plan is on time if it arrives within that time of its metadata. All replicas send
the same batch per iteration (on 2 cores, 16 distinct searches per iteration would measure the CPU, not the
service): one replica's search runs, the other replicas share it while it is in flight or hit the plan cache.
Overhead = delivery latency minus the search time the answer reports (the search it waited for).
Pass 2 (cached): the same iterations again, paced the same way; every plan is a cache hit, so the delivery
latency is the service's own overhead (gRPC, admission, de-duplication, serialization) for a burst of 64 requests
per iteration. Each request's deadline is the end of the current iteration (--iteration-ms after sending).

Latency is measured to the arrival of the answer's bytes; parsing them (a trainer's cost, ~0.5-1 ms for a vlm-s
rank plan) is timed separately and reported, not counted.

    .venv/bin/python benchmarks/bench_service.py [--iterations 200] [--iteration-ms 700] [--budget-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def start_server(budget_ms: float) -> tuple[subprocess.Popen[bytes], int, Path]:
    ready = Path(tempfile.mkdtemp()) / "ready.json"
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeweaver",
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--ready-file",
            str(ready),
            "--budget-ms",
            str(budget_ms),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    return proc, int(info["port"]), ready


def register(port: int) -> str:
    import grpc

    from pipeweaver.presets import workload
    from pipeweaver.v1 import planner_pb2 as pb
    from pipeweaver.v1 import planner_pb2_grpc
    from pipeweaver.wire import hardware_to_proto, model_to_proto, parallel_to_proto

    w = workload("vlm-s")
    parallel = replace(w.parallel, dp=16)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = planner_pb2_grpc.PlannerServiceStub(ch)
        resp = stub.RegisterJob(
            pb.RegisterJobRequest(
                model=model_to_proto(w.model),
                parallel=parallel_to_proto(parallel),
                hardware=hardware_to_proto(w.hardware),
            ),
            timeout=120,
        )
        return str(resp.job_id)


Sample = tuple[float, float, bool, str, float]
"""(latency ms, search ms, on time, source, parse ms)."""


async def _stream(
    port: int, job_id: str, rank: int, replica: int, batches: list[bytes], iteration_ms: float, train: bool
) -> list[Sample]:
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from pipeweaver.v1 import planner_pb2 as pb

    out: list[Sample] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        # Raw bytes in: the clock stops when the answer has arrived, before the trainer parses it.
        call = ch.stream_stream(
            "/pipeweaver.v1.PlannerService/StreamPlans",
            request_serializer=pb.StreamPlansRequest.SerializeToString,
            response_deserializer=None,
        )()
        for raw in batches:
            batch = pb.BatchMetadata.FromString(raw)
            batch.dp_replica = replica
            deadline = Timestamp()
            # Due when the current iteration ends: the service must answer by then (searched or fallback).
            deadline.FromNanoseconds(int((time.time() + iteration_ms / 1e3) * 1e9))
            sent = time.perf_counter()
            await call.write(pb.StreamPlansRequest(job_id=job_id, rank=rank, batch=batch, deadline=deadline))
            data = await call.read()
            latency = (time.perf_counter() - sent) * 1e3
            t0 = time.perf_counter()
            resp = pb.StreamPlansResponse.FromString(data)
            parse_ms = (time.perf_counter() - t0) * 1e3
            if resp.fallback:
                source = "fallback"
            else:
                source = "search" if resp.header.source == pb.PLAN_SOURCE_SEARCH else "cache"
            out.append((latency, float(resp.search_ms), latency <= iteration_ms, source, parse_ms))
            if train:
                await asyncio.sleep(max(0.0, iteration_ms - latency) / 1e3)
        await call.done_writing()
    return out


def _client(args: tuple[int, str, int, list[bytes], float, bool]) -> list[Sample]:
    port, job_id, rank, batches, iteration_ms, train = args

    async def main() -> list[Sample]:
        results = await asyncio.gather(
            *(_stream(port, job_id, rank, replica, batches, iteration_ms, train) for replica in range(16))
        )
        return [r for rs in results for r in rs]

    return asyncio.run(main())


def run_pass(port: int, job_id: str, batches: list[bytes], iteration_ms: float, train: bool) -> list[Sample]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:  # one client process per pipeline rank, 16 replica streams each
        parts = pool.map(_client, [(port, job_id, rank, batches, iteration_ms, train) for rank in range(4)])
    return [r for part in parts for r in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--iteration-ms", type=float, default=700.0)
    parser.add_argument("--budget-ms", type=float, default=100.0)
    parser.add_argument("--out", default="", help="also write the report here (JSON)")
    args = parser.parse_args()
    from pipeweaver.datagen import dynamic_batch
    from pipeweaver.presets import workload
    from pipeweaver.wire import batch_to_proto

    w = workload("vlm-s")
    batches = [
        batch_to_proto(dynamic_batch(w, seed=0, iteration=i)).SerializeToString() for i in range(args.iterations)
    ]
    proc, port, _ = start_server(args.budget_ms)
    try:
        job_id = register(port)
        t0 = time.perf_counter()
        planning = run_pass(port, job_id, batches, args.iteration_ms, train=True)
        t1 = time.perf_counter()
        cached = run_pass(port, job_id, batches, args.iteration_ms, train=True)
        t2 = time.perf_counter()
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 2) if values else None

    def summary(samples: list[Sample]) -> dict[str, object]:
        overhead = [lat - search for lat, search, *_ in samples]
        return {
            "plans": len(samples),
            "sources": {s: sum(1 for x in samples if x[3] == s) for s in ("search", "cache", "fallback")},
            "on_time_fraction": round(sum(1 for x in samples if x[2]) / len(samples), 4),
            "latency_ms": {"p50": pct([x[0] for x in samples], 50), "p99": pct([x[0] for x in samples], 99)},
            "overhead_ms": {"p50": pct(overhead, 50), "p99": pct(overhead, 99), "max": pct(overhead, 100)},
            "client_parse_ms": {"p50": pct([x[4] for x in samples], 50), "p99": pct([x[4] for x in samples], 99)},
            "overhead_ms_by_source": {
                src: {
                    "n": len(part),
                    "p50": pct(part, 50),
                    "p99": pct(part, 99),
                    "on_time_fraction": round(sum(1 for x in samples if x[3] == src and x[2]) / len(part), 4)
                    if part
                    else None,
                }
                for src in ("search", "cache", "fallback")
                for part in [[x[0] - x[1] for x in samples if x[3] == src]]
            },
        }

    report = {
        "streams": 64,
        "iterations": args.iterations,
        "budget_ms": args.budget_ms,
        "iteration_ms": args.iteration_ms,
        "cpu_cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "planning_pass": {**summary(planning), "seconds": round(t1 - t0, 1)},
        "cached_pass": {**summary(cached), "seconds": round(t2 - t1, 1)},
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

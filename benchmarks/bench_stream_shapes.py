"""Does the shape of a streaming handler change plan delivery? Three do-nothing StreamPlans servers, same clients.

    .venv/bin/python benchmarks/bench_stream_shapes.py [--iterations 30] [--iteration-ms 300] [--out FILE]
        [--shapes generator ...] [--answer-kb 90 20 ...]

The clients are `bench_service.py`'s (64 streams: 16 replicas x 4 ranks in 4 processes, all ranks sending at the
same instant each iteration; since 2026-11-28 each stream on its own connection, before that the 16 streams of a
process shared one, as in `stream_shapes_h200host.json`); every answer is the same 90 KB message. The servers
differ only in how a handler
turns a request into an answer:

- ``generator``: the answer is yielded as the request is read (the transport floor of `bench_service.py`);
- ``reader+queue``: a reader task puts the answer on a queue and the handler's generator yields it (the shape of
  the planner's StreamPlans, whose answers may come later than the request, from a search);
- ``context.write``: a coroutine handler writes each answer with `context.write` as the request is read.

Latency runs from the write of a request to the arrival of its answer. With a burst of 64 requests, a handler
that needs a second event-loop step per answer may send every answer of a burst only after reading all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_service

SHAPES = ("generator", "reader+queue", "context.write")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            return bytes(out + bytes([low]))
        out.append(low | 0x80)


def answer_of(size: int) -> bytes:
    """A valid StreamPlansResponse of about `size` bytes: one unknown length-delimited field, which parsers skip."""
    return _varint((1000 << 3) | 2) + _varint(size) + bytes(size)


def _serve(shape: str, size: int, ports: Any) -> None:
    answer = answer_of(size)

    async def generator(requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield answer

    async def reader_queue(requests: Any, context: Any) -> Any:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def read() -> None:
            async for _ in requests:
                queue.put_nowait(answer)
            queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            reader.cancel()

    async def written(requests: Any, context: Any) -> None:
        async for _ in requests:
            await context.write(answer)

    handler_fn = {"generator": generator, "reader+queue": reader_queue, "context.write": written}[shape]
    bench_service.serve_stream_plans(handler_fn, ports)


def run_shape(shape: str, batches: list[list[bytes]], iteration_ms: float, size: int) -> dict[str, float]:
    """Latency percentiles (ms) and the server's CPU per answer (ms) of one shape."""
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(shape, size, ports), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        assert server.pid is not None
        cpu0 = bench_service.cpu_seconds(server.pid)
        samples, _ = bench_service.run_pass(port, "job-shapes", batches, iteration_ms)
        cpu = bench_service.cpu_seconds(server.pid) - cpu0
    finally:
        server.kill()
        server.join(10)
    latency = [s[0] for s in samples]
    out = {f"p{q}": round(float(np.percentile(latency, q)), 2) for q in (50, 90, 99)}
    out["server_cpu_ms_per_answer"] = round(cpu * 1e3 / len(samples), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--iteration-ms", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the three shapes (interleaved)")
    parser.add_argument(
        "--answer-kb", type=float, nargs="+", default=[90.0], help="answer sizes (KB; vlm-s's answers are 90)"
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from pipeweaver.datagen import dynamic_batch
    from pipeweaver.presets import workload
    from pipeweaver.wire import batch_to_proto

    w = workload("vlm-s")
    drawn = [batch_to_proto(dynamic_batch(w, seed=0, iteration=i)).SerializeToString() for i in range(args.iterations)]
    batches = [drawn for _ in range(16)]
    rounds: list[dict[str, dict[str, float]]] = []
    for _ in range(args.repeats):
        rounds.append(
            {
                f"{shape} {kb:g} KB": run_shape(shape, batches, args.iteration_ms, int(kb * 1000))
                for kb in args.answer_kb
                for shape in args.shapes
            }
        )
        print(json.dumps(rounds[-1]), flush=True)
    report = {
        "command": "python benchmarks/bench_stream_shapes.py " + " ".join(sys.argv[1:]),
        "cpu_cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "streams": 64,
        "iterations": args.iterations,
        "iteration_ms": args.iteration_ms,
        "latency_ms_by_round": rounds,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

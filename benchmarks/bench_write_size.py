"""What an answer's size costs the event loop: a grpc.aio server answers a burst of 64 streams at once (every
stream's request in, then one write each), and the time from the burst's start to its last write begun is the
loop's serial work for 64 writes of that size. The server runs on one core and the 4 client processes (16 streams
each) on another (`--server-cpu`, `--client-cpu`), so the clients' parsing does not share the loop's core.

    .venv/bin/python benchmarks/bench_write_size.py [--sizes 1000,22700,60000] [--rounds 40] [--out PATH]

Median over the rounds, per size; the sizes are measured in turn within one server and one set of clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STREAMS = 64
CLIENT_PROCESSES = 4


def _identity(data: bytes) -> bytes:
    return data


def _server(ports: Any, results: Any, sizes: list[int], rounds: int, cpu: int) -> None:
    import grpc

    os.sched_setaffinity(0, {cpu})

    async def main() -> None:
        server = grpc.aio.server()
        payloads = {size: b"x" * size for size in sizes}
        burst: dict[str, Any] = {"arrived": 0, "go": asyncio.Event(), "t0": 0.0}
        begun: list[tuple[int, float]] = []

        async def handler(request_iterator: Any, context: Any) -> None:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                go = burst["go"]
                burst["arrived"] += 1
                if burst["arrived"] == STREAMS:  # the burst starts: every stream's answer is due at once
                    burst["arrived"], burst["go"], burst["t0"] = 0, asyncio.Event(), time.perf_counter()
                    go.set()
                await go.wait()
                size = int(request.decode())
                begun.append((size, time.perf_counter() - burst["t0"]))
                await context.write(payloads[size])

        method = grpc.stream_stream_rpc_method_handler(
            handler, request_deserializer=_identity, response_serializer=_identity
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Burst", {"Answer": method}),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        while len(begun) < STREAMS * rounds * len(sizes):
            await asyncio.sleep(0.05)
        last: dict[int, list[float]] = {size: [] for size in sizes}
        for i in range(0, len(begun), STREAMS):  # one burst: one size, its writes begun in order
            burst_writes = begun[i : i + STREAMS]
            last[burst_writes[0][0]].append(max(t for _, t in burst_writes))
        results.put(last)
        await server.stop(0)

    asyncio.run(main())


def _client(port: int, sizes: list[int], rounds: int, cpu: int, barrier: Any) -> None:
    import grpc

    os.sched_setaffinity(0, {cpu})

    async def main() -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per stream, as trainers have
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(STREAMS // CLIENT_PROCESSES)
        ]
        calls = [
            ch.stream_stream("/bench.Burst/Answer", request_serializer=_identity, response_deserializer=_identity)()
            for ch in channels
        ]
        for size in sizes:
            for _ in range(rounds):
                await asyncio.to_thread(barrier.wait)  # every process's previous answers are in
                for call in calls:
                    await call.write(str(size).encode())
                for call in calls:
                    await call.read()
        for call in calls:
            await call.done_writing()
        await asyncio.gather(*(ch.close() for ch in channels))

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,22700,60000", help="answer sizes in bytes, comma-separated")
    parser.add_argument("--rounds", type=int, default=40, help="bursts per size")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ctx = mp.get_context("spawn")
    ports, results = ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(CLIENT_PROCESSES)
    server = ctx.Process(target=_server, args=(ports, results, sizes, args.rounds, args.server_cpu))
    server.start()
    port = ports.get(timeout=60)
    clients = [
        ctx.Process(target=_client, args=(port, sizes, args.rounds, args.client_cpu, barrier))
        for _ in range(CLIENT_PROCESSES)
    ]
    for c in clients:
        c.start()
    last = results.get(timeout=600)
    for c in clients:
        c.join(60)
    server.join(60)
    report = {
        "command": "python benchmarks/bench_write_size.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "streams": STREAMS,
        "last_write_begun_ms": {
            str(size): {
                "p50": round(statistics.median(values) * 1e3, 3),
                "per_write_us": round(statistics.median(values) * 1e6 / STREAMS, 1),
                "bursts": len(values),
            }
            for size, values in last.items()
        },
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

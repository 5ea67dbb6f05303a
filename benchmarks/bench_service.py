"""Plan delivery of the real planner service to 64 concurrent rank streams (16 replicas x pp 4 of vlm-s).

The ranks run in lockstep, as data-parallel training does: every rank sends iteration i's metadata at the same
instant (start + i x --iteration-ms, or at once when its previous plan came later), due by the end of that
iteration; a plan is on time if it arrives within --iteration-ms. The 64 streams live in --client-processes client
processes (default 4: one per pipeline rank, 16 replica streams each) on the same machine as the server, each
stream on its own connection, as each trainer process has its own.

Pass 1 (planning): all replicas send the same batch per iteration (on 2 cores, 16 distinct searches per iteration
would measure the CPU, not the service): one replica's search runs, the other replicas share it while it is in
flight. With --distinct-replicas (a host with cores for the searches) each replica draws its own batches, so every
iteration asks for 16 searches at once. Overhead = delivery latency minus the worker time the answer reports (the
search it waited for).
Pass 2 (cached): the same iterations again; every plan is a cache hit, so the delivery latency is the service's
own overhead (gRPC, de-duplication, the answers) for a burst of 64 requests per iteration.
Pass 3 (transport floor, --floor-iterations): the same clients against a gRPC server that does nothing but answer
each request with a real answer's bytes: what the transport and the clients cost on this machine, which no
planner can beat.

Latency is measured from the write of the (already serialized) request to the arrival of the answer's bytes;
parsing them (a trainer's cost, ~0.3-0.5 ms for a vlm-s rank plan) is timed separately, mid-iteration, and
reported, not counted. CPU per plan: the server's main process (not its workers) and the client processes.

    .venv/bin/python benchmarks/bench_service.py [--iterations 200] [--iteration-ms 2000] [--budget-ms 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import delivery_breakdown
import numpy as np
from host_hiccups import parse_cpus, proc_stat

ROOT = Path(__file__).resolve().parents[1]


def pin(cpus: set[int]) -> None:
    """Pin this process (and what it starts later) to `cpus`; nothing when empty."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def start_server(
    budget_ms: float, log: str = "", cpus: frozenset[int] = frozenset(), trace: str = "", unix_socket: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    ready = Path(tempfile.mkdtemp()) / "ready.json"
    sink = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the server holds it until it exits
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    if trace:
        env["PIPEWEAVER_DELIVERY_TRACE"] = trace
    # The sidecar's cores: a child inherits the affinity it starts with, and the server sizes its worker pools
    # from it (pipeweaver.cores), as in a pod with a CPU limit. This process takes its own mask back below.
    own = os.sched_getaffinity(0)
    pin(set(cpus))
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
            *(["--unix-socket", unix_socket] if unix_socket else []),
        ],
        env=env,
        stdout=sink,
        stderr=sink,
    )
    os.sched_setaffinity(0, own)
    deadline = time.time() + 240
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    return proc, int(info["port"])


def target(port: int | str) -> str:
    """Where clients dial: a port on loopback, or an address as it is (``unix:PATH``)."""
    return port if isinstance(port, str) else f"127.0.0.1:{port}"


def register(port: int | str) -> str:
    import grpc

    from pipeweaver.presets import workload
    from pipeweaver.v1 import planner_pb2 as pb
    from pipeweaver.v1 import planner_pb2_grpc
    from pipeweaver.wire import hardware_to_proto, model_to_proto, parallel_to_proto

    w = workload("vlm-s")
    parallel = replace(w.parallel, dp=16)
    with grpc.insecure_channel(target(port)) as ch:
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


Sample = tuple[float, float, bool, str, float, int, int, int, int, float, float]
"""(latency ms, search ms, on time, source, parse ms, iteration of the pass, rank, replica, iteration as sent,
sent and received on `time.perf_counter`, which is CLOCK_MONOTONIC on Linux as the server's delivery trace is)."""

_START: tuple[Any, Any] | None = None
"""(barrier, shared start time) of the client processes: every rank starts iteration 0 at the same instant."""


_TIMINGS = False
"""Requests ask for the predicted action times (`StreamPlansRequest.predicted_timings`)."""


def _init_client(barrier: Any, start: Any, cpus: frozenset[int] = frozenset(), timings: bool = False) -> None:
    global _START, _TIMINGS
    _START = (barrier, start)
    _TIMINGS = timings
    pin(set(cpus))


async def _stream(
    channel: Any,
    job_id: str,
    rank: int,
    replica: int,
    batches: list[bytes],
    iteration_ms: float,
    start: float,
    first_iteration: int,
) -> list[Sample]:
    from google.protobuf.timestamp_pb2 import Timestamp

    from pipeweaver.v1 import planner_pb2 as pb

    out: list[Sample] = []
    # Raw bytes both ways: the request is serialized before the clock starts and the clock stops when the answer
    # has arrived, before the trainer parses it.
    call = channel.stream_stream(
        "/pipeweaver.v1.PlannerService/StreamPlans", request_serializer=None, response_deserializer=None
    )()
    for i, raw in enumerate(batches):
        # Lockstep, as data-parallel training is: every rank sends iteration i's metadata at start + i iterations
        # (at once if its previous plan came later than that), due when that iteration ends.
        due = start + i * iteration_ms / 1e3
        batch = pb.BatchMetadata.FromString(raw)
        batch.dp_replica = replica
        batch.iteration = first_iteration + i  # a later pass: later iterations whose batches repeat (cache hits)
        deadline = Timestamp()
        deadline.FromNanoseconds(int((due + iteration_ms / 1e3) * 1e9))
        request = pb.StreamPlansRequest(
            job_id=job_id, rank=rank, batch=batch, deadline=deadline, predicted_timings=_TIMINGS
        ).SerializeToString()
        await asyncio.sleep(max(0.0, due - time.time()))
        sent = time.perf_counter()
        await call.write(request)
        data = await call.read()
        received = time.perf_counter()
        latency = (received - sent) * 1e3
        # Parsed mid-iteration, so that parsing this answer does not delay the other answers of this process.
        await asyncio.sleep(max(0.0, due + iteration_ms / 2e3 - time.time()))
        t0 = time.perf_counter()
        resp = pb.StreamPlansResponse.FromString(data)
        parse_ms = (time.perf_counter() - t0) * 1e3
        source = "fallback" if resp.fallback else "search" if resp.header.source == pb.PLAN_SOURCE_SEARCH else "cache"
        out.append(
            (
                latency,
                float(resp.search_ms),
                latency <= iteration_ms,
                source,
                parse_ms,
                i,
                rank,
                replica,
                batch.iteration,
                sent,
                received,
            )
        )
    await call.done_writing()
    return out


ClientArgs = tuple[int | str, str, list[tuple[int, int]], list[list[bytes]], float, int]
"""(port, job id, the process's (rank, replica) streams, batches[replica][iteration], iteration ms, first
iteration)."""


def _client(args: ClientArgs) -> tuple[list[Sample], float]:
    """Some of the 64 rank streams in one process; returns the samples and the process's CPU seconds."""
    import grpc

    port, job_id, streams, batches, iteration_ms, first_iteration = args
    assert _START is not None
    barrier, shared_start = _START

    async def main() -> list[Sample]:
        # A connection per stream, as 64 trainer processes would have (channels to one address otherwise share
        # one connection per process).
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(target(port), options=options) for _ in streams]
        try:
            await asyncio.gather(*(ch.channel_ready() for ch in channels))
            if await asyncio.to_thread(barrier.wait) == 0:  # every process is connected: one of them sets the start
                shared_start.value = time.time() + 0.5
            await asyncio.to_thread(barrier.wait)
            start = float(shared_start.value)
            results = await asyncio.gather(
                *(
                    _stream(ch, job_id, rank, replica, batches[replica], iteration_ms, start, first_iteration)
                    for (rank, replica), ch in zip(streams, channels, strict=True)
                )
            )
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))
        return [r for rs in results for r in rs]

    cpu0 = time.process_time()
    samples = asyncio.run(main())
    return samples, time.process_time() - cpu0


def run_pass(
    port: int | str,
    job_id: str,
    batches: list[list[bytes]],
    iteration_ms: float,
    first_iteration: int = 0,
    processes: int = 4,
    cpus: frozenset[int] = frozenset(),
    timings: bool = False,
) -> tuple[list[Sample], float]:
    """Every stream (4 ranks x a replica per `batches[replica][iteration]`) through one pass, iterations numbered
    from `first_iteration`, in `processes` client processes (4: one per pipeline rank); returns the samples and
    the client processes' CPU seconds."""
    replicas = len(batches)
    streams = [(rank, replica) for rank in range(4) for replica in range(replicas)]
    # Contiguous shares of the rank-major list: with 4 processes, each holds one rank's streams.
    shares = [streams[len(streams) * i // processes : len(streams) * (i + 1) // processes] for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    init = (ctx.Barrier(processes), ctx.Value("d", 0.0), cpus, timings)
    with ctx.Pool(processes, initializer=_init_client, initargs=init) as pool:
        parts = pool.map(
            _client, [(port, job_id, share, batches, iteration_ms, first_iteration) for share in shares], chunksize=1
        )
    return [r for samples, _ in parts for r in samples], sum(cpu for _, cpu in parts)


def serve_stream_plans(handler_fn: Any, ports: Any) -> None:
    """A gRPC server whose only method is StreamPlans, served by `handler_fn` (bytes in, bytes out) on a loopback
    port, which is put on `ports`; runs until the process is killed."""
    import grpc

    async def main() -> None:
        handler = grpc.stream_stream_rpc_method_handler(handler_fn, request_deserializer=None, response_serializer=None)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("pipeweaver.v1.PlannerService", {"StreamPlans": handler}),)
        )
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _echo_server(answer: bytes, ports: Any, cpus: frozenset[int] = frozenset()) -> None:
    """The transport floor: StreamPlans answered with `answer`, whatever the request."""
    pin(set(cpus))

    async def stream_plans(requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield answer

    serve_stream_plans(stream_plans, ports)


def _queued_echo_server(answer: bytes, ports: Any, cpus: frozenset[int] = frozenset()) -> None:
    """The transport floor with the service's stream structure (`service.PlannerService.StreamPlans`): a reader
    task takes each request and hands the answer over an asyncio.Queue to the handler, which writes it with
    context.write; no other work."""
    pin(set(cpus))
    import grpc

    async def stream_plans(requests: Any, context: Any) -> None:
        out: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def read() -> None:
            while (await context.read()) is not grpc.aio.EOF:
                out.put_nowait(answer)
            out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                await context.write(item)
        finally:
            reader.cancel()

    serve_stream_plans(stream_plans, ports)


def one_answer(port: int | str, job_id: str, batch: bytes, timings: bool = True) -> bytes:
    """A real answer's bytes (a cache hit for rank 1 of replica 0); without `timings`, as a stream that does not
    ask for the predicted action times gets it."""
    import grpc

    from pipeweaver.v1 import planner_pb2 as pb

    with grpc.insecure_channel(target(port)) as ch:
        get_plan = ch.unary_unary(
            "/pipeweaver.v1.PlannerService/GetPlan",
            request_serializer=pb.GetPlanRequest.SerializeToString,
            response_deserializer=None,
        )
        answer = bytes(get_plan(pb.GetPlanRequest(job_id=job_id, rank=1, batch=pb.BatchMetadata.FromString(batch))))
    if timings:
        return answer
    lean = pb.StreamPlansResponse.FromString(answer)
    lean.rank_plan.ClearField("predicted_start_ms")
    lean.rank_plan.ClearField("predicted_end_ms")
    return lean.SerializeToString()


def floor_pass(
    answer: bytes,
    batches: list[list[bytes]],
    iteration_ms: float,
    processes: int = 4,
    server_cpus: frozenset[int] = frozenset(),
    client_cpus: frozenset[int] = frozenset(),
    queued: bool = False,
) -> tuple[list[Sample], float, float]:
    """The clients of `run_pass` against `_echo_server` (`queued`: `_queued_echo_server`): (samples, server CPU
    seconds, client CPU seconds)."""
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    target = _queued_echo_server if queued else _echo_server
    server = ctx.Process(target=target, args=(answer, ports, server_cpus), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=60)
        assert server.pid is not None
        cpu0 = cpu_seconds(server.pid)
        samples, client_cpu = run_pass(port, "job-floor", batches, iteration_ms, processes=processes, cpus=client_cpus)
        return samples, cpu_seconds(server.pid) - cpu0, client_cpu
    finally:
        server.kill()
        server.join(10)


def start_profiler(pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy sampling the server at 1 kHz until it exits (raw collapsed stacks in `out`). py-spy is a developer
    tool, not a dependency: `pip install py-spy` (or the GPU image's wheel from benchmarks/gpu/fetch_wheels.sh)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("--profile-server needs py-spy on PATH (pip install py-spy)")
    cmd = [spy, "record", "--pid", str(pid), "--rate", "1000", "--format", "raw", "--nonblocking", "--output", out]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_watcher(pid: int, out: str, cpus: str) -> subprocess.Popen[bytes]:
    """`watch_thread.py` on the server's main thread (its event loop) until the server exits: polling without
    pause on `cpus`, or every 100 us where no CPU is set aside for it."""
    cmd = [sys.executable, str(Path(__file__).with_name("watch_thread.py")), str(pid), "--seconds", "86400"]
    cmd = ["taskset", "-c", cpus, *cmd] if cpus else [*cmd, "--interval-us", "100"]
    return subprocess.Popen([*cmd, "--out", out], stdout=subprocess.DEVNULL)


def event_loop_profile(raw: str, top: int = 25) -> dict[str, Any]:
    """Where the server's event loop spent its busy samples: per function (file:function), the share of busy
    samples whose stack holds it. Idle samples (the loop waiting in its selector) are counted apart."""
    busy = idle = 0
    inclusive: dict[str, int] = {}
    for line in Path(raw).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "_run_once" not in stack:  # another thread, or the loop not running yet
            continue
        n = int(count)
        if "select (selectors.py" in stack:
            idle += n
            continue
        busy += n
        names = {f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" for f in stack.split(";") if " (" in f}
        for name in names:
            inclusive[name] = inclusive.get(name, 0) + n
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])
    # The frames every busy sample holds (the server's entry points, the loop itself) say nothing: left out.
    shares = {
        name: round(n / busy, 4) for name, n in ranked if n < busy and "asyncio" not in name and "runpy" not in name
    }
    return {"busy_samples": busy, "idle_samples": idle, "inclusive_share": dict(list(shares.items())[:top])}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), without its children (the worker processes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_stat_moved(
    before: dict[int, dict[str, int]], after: dict[int, dict[str, int]], cpus: frozenset[int]
) -> dict[str, Any]:
    """/proc/stat's steal, irq and softirq time (ms) on `cpus` (all where empty) between two readings: the sum,
    and the CPU with the most steal."""
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    moved = {
        c: {k: (after[c][k] - before[c][k]) * tick_ms for k in ("steal", "irq", "softirq")}
        for c in sorted(cpus or after)
        if c in before and c in after
    }
    if not moved:
        return {}
    worst = max(moved, key=lambda c: moved[c]["steal"])
    return {
        **{k: round(sum(m[k] for m in moved.values()), 1) for k in ("steal", "irq", "softirq")},
        "most_steal": {"cpu": worst, "ms": round(moved[worst]["steal"], 1)},
    }


def memory_mib(pid: int) -> dict[str, float]:
    """Resident memory of a process now and at its peak (Linux /proc), without its children, in MiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(status[field].split()[0]) / 1024, 1) for key, field in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--iteration-ms", type=float, default=2000.0)
    parser.add_argument("--budget-ms", type=float, default=300.0)
    parser.add_argument("--floor-iterations", type=int, default=50, help="iterations of the transport floor (0: skip)")
    parser.add_argument(
        "--distinct-replicas", action="store_true", help="each replica its own batches (16 searches per iteration)"
    )
    parser.add_argument(
        "--replicas", type=int, default=16, help="data-parallel replicas, 4 rank streams each (at most 16)"
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="processes the 64 streams live in (4: one per pipeline rank; 64: one per stream, as trainers are)",
    )
    parser.add_argument(
        "--queued-floor",
        action="store_true",
        help="also measure the floor with the service's stream structure (reader task, queue, context.write)",
    )
    parser.add_argument("--server-log", default="", help="write the server's log here")
    parser.add_argument(
        "--delivery-trace",
        default="",
        metavar="FILE",
        help="the server records each answer's way through it (pipeweaver serve --delivery-trace) into FILE; the "
        "report splits the overhead into steps (benchmarks/delivery_breakdown.py)",
    )
    parser.add_argument(
        "--profile-server",
        default="",
        metavar="RAW",
        help="sample the server with py-spy into this file (collapsed stacks); the report ranks the event loop's "
        "busy time by function",
    )
    parser.add_argument(
        "--unix-socket",
        default="",
        metavar="PATH",
        help="the clients dial the server on this Unix domain socket (serve --unix-socket) instead of TCP loopback",
    )
    parser.add_argument(
        "--watch-loop",
        default="",
        metavar="FILE",
        help="record from outside what the server's event loop thread is blocked in whenever it is not running "
        "(benchmarks/watch_thread.py; with --delivery-trace the report names what each stall waited on)",
    )
    parser.add_argument(
        "--watch-cpus",
        default="",
        help="CPUs of the --watch-loop process, which polls without pause (default: the client CPUs)",
    )
    parser.add_argument(
        "--predicted-timings",
        action="store_true",
        help="every request asks for the predicted action times (a third more bytes per answer)",
    )
    parser.add_argument(
        "--server-cpus",
        default="",
        help="pin the server and its workers to these CPUs (taskset syntax, e.g. 0-15): a sidecar's cores",
    )
    parser.add_argument(
        "--client-cpus",
        default="",
        help="pin the client processes to these CPUs (e.g. 16-63): trainers' cores, apart from the sidecar's",
    )
    parser.add_argument(
        "--no-cached-pass", action="store_true", help="the planning pass only (long runs within a time limit)"
    )
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU", help="recorded in the report")
    parser.add_argument("--out", default="", help="also write the report here (JSON)")
    args = parser.parse_args()
    if not 1 <= args.replicas <= 16:
        parser.error(f"--replicas must be in 1..16 (the job's data parallelism), got {args.replicas}")
    from pipeweaver.datagen import dynamic_batch
    from pipeweaver.presets import workload
    from pipeweaver.wire import batch_to_proto

    w = workload("vlm-s")
    distinct = args.replicas if args.distinct_replicas else 1
    drawn = [
        [batch_to_proto(dynamic_batch(w, seed=r, iteration=i)).SerializeToString() for i in range(args.iterations)]
        for r in range(distinct)
    ]
    batches = [drawn[r % distinct] for r in range(args.replicas)]  # [replica][iteration]
    server_cpus, client_cpus = frozenset(parse_cpus(args.server_cpus)), frozenset(parse_cpus(args.client_cpus))
    pin(set(client_cpus))  # this process registers the job and starts the clients
    proc, tcp_port = start_server(args.budget_ms, args.server_log, server_cpus, args.delivery_trace, args.unix_socket)
    port: int | str = f"unix:{args.unix_socket}" if args.unix_socket else tcp_port
    profiler = start_profiler(proc.pid, args.profile_server) if args.profile_server else None
    watcher = start_watcher(proc.pid, args.watch_loop, args.watch_cpus) if args.watch_loop else None
    try:
        job_id = register(port)
        cpu0, t0, stat0 = cpu_seconds(proc.pid), time.perf_counter(), proc_stat()
        planning, planning_client_cpu = run_pass(
            port,
            job_id,
            batches,
            args.iteration_ms,
            processes=args.client_processes,
            cpus=client_cpus,
            timings=args.predicted_timings,
        )
        cpu1, t1, stat1 = cpu_seconds(proc.pid), time.perf_counter(), proc_stat()
        cached: list[Sample] = []
        cached_client_cpu = 0.0
        if not args.no_cached_pass:
            # Iterations numbered after the first pass's: plans for them come from the plan cache, not from the
            # entries the first pass left (those would answer with the first pass's search time, a negative
            # overhead).
            cached, cached_client_cpu = run_pass(
                port,
                job_id,
                batches,
                args.iteration_ms,
                args.iterations,
                processes=args.client_processes,
                cpus=client_cpus,
                timings=args.predicted_timings,
            )
        cpu2, t2 = cpu_seconds(proc.pid), time.perf_counter()
        server_memory = memory_mib(proc.pid)
        answer = one_answer(port, job_id, batches[0][0], args.predicted_timings)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if profiler is not None:
            profiler.wait(timeout=60)  # py-spy writes its output once the server has exited
        if watcher is not None:
            watcher.wait(timeout=60)  # it stops when the server's thread is gone
    floors = {}
    for name, queued in (("transport_floor", False), ("transport_floor_queued", True)):
        if args.floor_iterations > 0 and (args.queued_floor or not queued):
            floors[name] = floor_pass(
                answer,
                [b[: args.floor_iterations] for b in batches],
                args.iteration_ms,
                args.client_processes,
                server_cpus,
                client_cpus,
                queued=queued,
            )

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 2) if values else None

    def summary(samples: list[Sample], server_cpu_s: float, client_cpu_s: float) -> dict[str, object]:
        overhead = [lat - search for lat, search, *_ in samples]
        return {
            "plans": len(samples),
            # Where a burst's CPU goes: the server's main process (gRPC and the service; not its workers) and the
            # 4 client processes (gRPC, building requests, parsing answers), per plan delivered.
            "server_cpu_ms_per_plan": round(server_cpu_s * 1e3 / len(samples), 3),
            "client_cpu_ms_per_plan": round(client_cpu_s * 1e3 / len(samples), 3),
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
            # Which iterations had late plans, and from where: a late first iteration (a cold job) is not a late
            # steady state.
            "late_by_iteration": {
                str(i): {
                    "plans": len(late),
                    "sources": sorted({x[3] for x in late}),
                    "latency_ms_max": round(max(x[0] for x in late), 1),
                }
                for i in sorted({x[5] for x in samples if not x[2]})
                for late in [[x for x in samples if x[5] == i and not x[2]]]
            },
        }

    report = {
        "command": "python benchmarks/bench_service.py " + " ".join(sys.argv[1:]),
        "machine": args.machine,
        "streams": 4 * args.replicas,
        "client_processes": args.client_processes,
        "transport": f"unix:{args.unix_socket}" if args.unix_socket else "tcp loopback",
        "distinct_replicas": args.distinct_replicas,
        "iterations": args.iterations,
        "budget_ms": args.budget_ms,
        "iteration_ms": args.iteration_ms,
        "cpu_cores": os.cpu_count(),
        "server_cpus": args.server_cpus or "all",
        "client_cpus": args.client_cpus or "all",
        "predicted_timings": args.predicted_timings,
        "server_environment": {k: v for k, v in os.environ.items() if k.startswith("PIPEWEAVER_")},
        "date": time.strftime("%Y-%m-%d"),
        "planning_pass": {**summary(planning, cpu1 - cpu0, planning_client_cpu), "seconds": round(t1 - t0, 1)},
        **(
            {"cached_pass": {**summary(cached, cpu2 - cpu1, cached_client_cpu), "seconds": round(t2 - t1, 1)}}
            if cached
            else {}
        ),
        "answer_bytes": len(answer),
        "server_memory_mib": server_memory,
        # Time the server's CPUs spent on interrupts and, on a virtual machine, running someone else (steal):
        # neither shows in the server's threads' own counters, so a loop stall it covers looks "blocked".
        "server_cpus_stat_ms": cpu_stat_moved(stat0, stat1, server_cpus),
    }
    what = {
        "transport_floor": "the same clients and answers against a gRPC server that does no work",
        "transport_floor_queued": "the floor with the service's stream structure: a reader task, a queue, "
        "context.write",
    }
    for name, (samples, server_cpu, client_cpu) in floors.items():
        report[name] = {
            "what": what[name],
            "iterations": args.floor_iterations,
            **{
                k: v
                for k, v in summary(samples, server_cpu, client_cpu).items()
                if k not in ("sources", "overhead_ms", "overhead_ms_by_source")  # latency is all overhead here
            },
        }
    if args.delivery_trace:
        trace = delivery_breakdown.load_trace(Path(args.delivery_trace))
        report["planning_pass"]["delivery_steps"] = delivery_breakdown.summarize(planning, trace)
        if cached:
            report["cached_pass"]["delivery_steps"] = delivery_breakdown.summarize(cached, trace)
        report["planning_pass"]["delivery_bursts"] = delivery_breakdown.burst_summary(trace)
        report["server_gc"] = delivery_breakdown.gc_summary(trace)
        report["server_loop_stalls"] = delivery_breakdown.loop_stalls(trace)
        if args.watch_loop:
            watched = delivery_breakdown.load_trace(Path(args.watch_loop))
            report["server_loop_stalls"]["watched"] = delivery_breakdown.watched_stalls(trace, watched)
    if args.profile_server:
        report["server_profile"] = {"raw": args.profile_server, **event_loop_profile(args.profile_server)}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

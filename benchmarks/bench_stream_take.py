"""The service's own Python per streamed request, without gRPC: `StreamSession.take` on cache hits.

A real `PlannerServer` (its worker pool included) registers vlm-s with 16 replicas, plans one batch, then takes
the 64 requests (4 ranks x 16 replicas) of 20 later iterations that repeat it: every one a cache hit or a rank
after the first, answered inside `take`. Prints the mean time per request.

    .venv/bin/python benchmarks/bench_stream_take.py [--iterations 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import replace
from typing import Any


class _Sink:
    def __init__(self) -> None:
        self.answers = 0

    def answer(self, data: bytes) -> None:
        self.answers += 1

    def end(self) -> None:
        pass

    def fail(self, error: Any) -> None:
        pass  # the server's shutdown drains the session at the end


def _requests(job_id: str, batch: bytes, iteration: int, deadline_s: float) -> list[bytes]:
    from google.protobuf.timestamp_pb2 import Timestamp

    from pipeweaver.v1 import planner_pb2 as pb

    out = []
    for rank in range(4):
        for replica in range(16):
            b = pb.BatchMetadata.FromString(batch)
            b.dp_replica, b.iteration = replica, iteration
            deadline = Timestamp()
            deadline.FromNanoseconds(int(deadline_s * 1e9))
            req = pb.StreamPlansRequest(job_id=job_id, rank=rank, batch=b, deadline=deadline)
            out.append(req.SerializeToString())
    return out


async def _run(iterations: int) -> dict[str, Any]:
    from pipeweaver.datagen import dynamic_batch
    from pipeweaver.presets import workload
    from pipeweaver.server.app import PlannerServer
    from pipeweaver.server.config import ServerConfig
    from pipeweaver.server.service import PlannerService
    from pipeweaver.v1 import planner_pb2 as pb
    from pipeweaver.wire import batch_to_proto, hardware_to_proto, model_to_proto, parallel_to_proto

    server = PlannerServer(ServerConfig(port=0, metrics_port=0, search_workers=1, control_workers=1, budget_ms=100))
    await server.start()
    try:
        service = server._service
        assert isinstance(service, PlannerService)
        w = workload("vlm-s")
        register = pb.RegisterJobRequest(
            model=model_to_proto(w.model),
            parallel=parallel_to_proto(replace(w.parallel, dp=16)),
            hardware=hardware_to_proto(w.hardware),
        )
        job_id = (await service.RegisterJob(register, None)).job_id  # type: ignore[arg-type]
        batch = batch_to_proto(dynamic_batch(w, seed=0, iteration=0)).SerializeToString()
        sink = _Sink()
        session = service._open_session(sink)
        for request in _requests(job_id, batch, 0, time.time() + 60):
            session.take(request)
        while sink.answers < 64:  # the search
            await asyncio.sleep(0.02)
        later = [_requests(job_id, batch, i, time.time() + 60) for i in range(1, iterations + 1)]
        t0 = time.perf_counter()
        for requests in later:
            for request in requests:
                session.take(request)
            await asyncio.sleep(0)
        seconds = time.perf_counter() - t0
        assert sink.answers == 64 * (iterations + 1)
        return {"requests": 64 * iterations, "us_per_request": round(seconds / (64 * iterations) * 1e6, 1)}
    finally:
        await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_run(args.iterations))))


if __name__ == "__main__":
    main()

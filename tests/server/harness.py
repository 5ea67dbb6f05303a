"""The real planner server in a subprocess on a loopback port, and small synchronous gRPC helpers for the tests.

Servers bind port 0 and report their ports (and worker pids) through `--ready-file`; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from pipeweaver import presets
from pipeweaver.datagen import sample_batch
from pipeweaver.spec import BatchMetadata, Workload
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.v1 import planner_pb2_grpc
from pipeweaver.wire import batch_to_proto, hardware_to_proto, model_to_proto, parallel_to_proto

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "pipeweaver.v1.PlannerService"
START_TIMEOUT_S = 240.0
"""A first start on a fresh machine compiles the numba kernels; later starts load them from the cache."""
_counter = itertools.count()


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".cache" / "numba"))
    for key in [k for k in env if k.startswith("PIPEWEAVER_")]:
        del env[key]  # the tests say what they mean with flags
    env.update(extra or {})
    return env


def serve_until_exit(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    """`pipeweaver serve ARGS` run to its exit (a start that must fail), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "pipeweaver", "serve", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env=server_env(),
        check=False,
    )


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    metrics_port: int
    search_worker_pids: list[int]
    control_worker_pids: list[int]
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.channels.append(ch)
        return ch

    def stub(self) -> planner_pb2_grpc.PlannerServiceStub:
        return planner_pb2_grpc.PlannerServiceStub(self.channel())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    def sample(self, name: str, **labels: str) -> float:
        """The summed value of the samples called `name` whose labels include `labels` (0 when none)."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def health(self, service: str = SERVICE) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel())
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        for ch in self.channels:
            ch.close()
        self.channels.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


def start_server(
    tmp_path: Path,
    *args: str,
    workers: int = 1,
    control_workers: int = 1,
    env: dict[str, str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> ServerProcess:
    n = next(_counter)
    ready = tmp_path / f"ready-{n}.json"
    log_path = tmp_path / f"server-{n}.log"
    cmd = [
        sys.executable,
        "-m",
        "pipeweaver",
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--workers",
        str(workers),
        "--control-workers",  # not the default, which depends on the machine's cores
        str(control_workers),
        "--ready-file",
        str(ready),
        *args,
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=server_env(env))
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not become ready in {timeout_s} s:\n{log_path.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return ServerProcess(
        proc=proc,
        log_path=log_path,
        port=info["port"],
        metrics_port=info["metrics_port"],
        search_worker_pids=info["search_worker_pids"],
        control_worker_pids=info["control_worker_pids"],
    )


@contextlib.contextmanager
def running_server(tmp_path: Path, *args: str, **kwargs: Any) -> Iterator[ServerProcess]:
    server = start_server(tmp_path, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# ---- requests ------------------------------------------------------------------------------------------------


def tiny_workload(pp: int = 2) -> Workload:
    return presets.tiny_vlm(pp=pp)


def register_request(w: Workload, **fields: Any) -> Any:
    return pb.RegisterJobRequest(
        model=model_to_proto(w.model),
        parallel=parallel_to_proto(w.parallel),
        hardware=hardware_to_proto(w.hardware),
        **fields,
    )


def batch(w: Workload, iteration: int, *, seed: int = 0, dp_replica: int = 0) -> Any:
    b: BatchMetadata = sample_batch(w, seed=seed, iteration=iteration, dp_replica=dp_replica)
    return batch_to_proto(b)


def bad_request(err: grpc.RpcError) -> list[tuple[str, str]]:
    """The (field, description) pairs of a status's google.rpc.BadRequest detail."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {err}"
    out = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out += [(v.field, v.description) for v in br.field_violations]
    return out


def error_reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def stream_requests(job_id: str, rank: int, batches: Sequence[Any], **fields: Any) -> list[Any]:
    return [pb.StreamPlansRequest(job_id=job_id, rank=rank, batch=b, **fields) for b in batches]


def stream_client(address: str, job_id: str, rank: int, batches: list[bytes]) -> dict[int, tuple[bytes, int, bool]]:
    """One trainer rank in its own process: stream `batches`, return {iteration: (header, rank, fallback)}."""
    with grpc.insecure_channel(address) as channel:
        stub = planner_pb2_grpc.PlannerServiceStub(channel)
        requests = [
            pb.StreamPlansRequest(job_id=job_id, rank=rank, batch=pb.BatchMetadata.FromString(b)) for b in batches
        ]
        out = {}
        for r in stub.StreamPlans(iter(requests), timeout=180):
            out[r.header.iteration] = (r.header.SerializeToString(deterministic=True), r.rank_plan.rank, r.fallback)
        return out


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"

"""`serve --unix-socket`: the planner also listens on a Unix domain socket, for trainers in the same pod."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeweaver.server.config import ConfigError, ServerConfig
from pipeweaver.v1 import planner_pb2 as pb
from pipeweaver.v1 import planner_pb2_grpc
from tests.server.harness import batch, register_request, running_server, serve_until_exit, tiny_workload

W = tiny_workload()


def test_a_client_plans_over_the_unix_socket_and_tcp_stays(tmp_path: Path) -> None:
    """A plan asked for over the socket is the one a TCP client gets for the same batch; a socket file a previous
    server left behind (bound, never removed) is replaced; the ready file names the socket."""
    path = tmp_path / "planner.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, as after a crash
    with running_server(tmp_path, "--unix-socket", str(path), "--budget-ms", "40") as server:
        with grpc.insecure_channel(f"unix:{path}") as ch:
            stub = planner_pb2_grpc.PlannerServiceStub(ch)
            job_id = stub.RegisterJob(register_request(W), timeout=120).job_id
            over_socket = stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=batch(W, 3)), timeout=60)
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        over_tcp = server.stub().GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=batch(W, 3)), timeout=60)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert over_socket.rank_plan == over_tcp.rank_plan and over_socket.header == over_tcp.header
        ready = json.loads(next(tmp_path.glob("ready-*.json")).read_text())
        assert ready["unix_socket"] == str(path)


def test_a_file_that_is_not_a_socket_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "planner.sock"
    path.write_text("not a socket")
    result = serve_until_exit("--port", "0", "--metrics-port", "0", "--workers", "1", "--unix-socket", str(path))
    assert result.returncode == 1
    assert f"cannot bind unix:{path}: a file that is not a socket is there" in result.stderr
    assert path.read_text() == "not a socket"  # refused, not removed


def test_bad_socket_paths_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unix socket: no such directory"):
        ServerConfig(unix_socket=tmp_path / "missing" / "planner.sock")
    with pytest.raises(ConfigError, match="unix socket path longer than 107 bytes"):
        ServerConfig(unix_socket=tmp_path / ("x" * 120))

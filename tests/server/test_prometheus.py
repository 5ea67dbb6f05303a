"""A real Prometheus scrapes the planner's metrics endpoint; the test reads the series back from its HTTP API.

Needs Debian's `prometheus` package (scripts/install_prometheus.sh, run by `make install`).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeweaver.v1 import planner_pb2 as pb
from tests.server.harness import ServerProcess, batch, tiny_workload, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus is not installed (run scripts/install_prometheus.sh)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read().decode()) if "/api/" in url else r.status


def test_prometheus_scrapes_the_planner(planner: ServerProcess, job_id: str, tmp_path: Path) -> None:
    planner.stub().GetPlan(pb.GetPlanRequest(job_id=job_id, rank=0, batch=batch(tiny_workload(), 7000)), timeout=30)
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: pipeweaver\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{planner.metrics_port}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def query(q: str) -> list[dict[str, Any]]:
        data = _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': q})}")
        assert data["status"] == "success", data
        return list(data["data"]["result"])

    def ready() -> bool:
        try:
            return bool(_get(f"{base}/-/ready") == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_until(ready, 60, "Prometheus to start")
        wait_until(lambda: query('up{job="pipeweaver"} == 1'), 60, "a successful scrape", interval_s=0.5)
        plans = query("pipeweaver_plans_total")
        assert {s["metric"]["source"] for s in plans} == {"search", "cache", "fallback"}
        assert float(query('sum(pipeweaver_plans_total{source="search"})')[0]["value"][1]) >= 1
        ok = query('pipeweaver_grpc_server_handled_total{grpc_method="GetPlan",grpc_code="OK"}')
        assert ok and float(ok[0]["value"][1]) >= 1
        assert query("pipeweaver_grpc_server_handling_seconds_bucket")
        for name in (
            "pipeweaver_search_seconds_count",
            "pipeweaver_predicted_speedup_ratio_count",
            "pipeweaver_predicted_bubble_ratio_count",
            "pipeweaver_semu_cache_hit_ratio_count",
            "pipeweaver_queue_depth",
            "pipeweaver_worker_restarts_total",
            "pipeweaver_prediction_error_ratio_count",
            "pipeweaver_build_info",
        ):
            assert query(name), f"no {name} series"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_metric_names(planner: ServerProcess) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=planner.metrics_text(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr

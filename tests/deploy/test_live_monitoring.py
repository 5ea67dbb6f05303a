"""The dashboard and the alerts against a live planner and a real Prometheus scraping it.

The planner (a real `pipeweaver serve` subprocess, tests/server/harness.py) gets a little traffic first (a tiny
job registered, a few iterations planned for both ranks and their timings reported), so that the series that
only appear with traffic exist. Then: every metric name in the dashboard and the alerts is on its /metrics;
a Prometheus (Debian's package, scripts/install_prometheus.sh) that scrapes it with the PodMonitor's job name and
loads the PrometheusRule evaluates every panel query to numbers, finds series for every selector and every
dashboard variable, and evaluates every rule without error.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeweaver import wire
from pipeweaver.v1 import planner_pb2 as pb
from tests.deploy.kube import ROOT, objects, rule_file, tool
from tests.deploy.promql import (
    Query,
    dashboard_queries,
    label_values,
    recorded_names,
    rule_queries,
    selectors,
)
from tests.server.harness import ServerProcess, batch, register_request, start_server, tiny_workload, wait_until

DASHBOARD = ROOT / "deploy/monitoring/dashboards/pipeweaver-planner.json"
((_, RULE),) = [(k, obj) for k, obj in objects("PrometheusRule") if k == "deploy/monitoring"]
JOB = "pipeweaver-planner"  # the job label the PodMonitor sets
NAMESPACE, POD = "training", "vlm-train-0"  # the target labels the Prometheus Operator would add
GRAFANA_VARIABLES = {
    "$namespace": NAMESPACE,
    "$pod": POD,
    "$__rate_interval": "1m",
    "$__range": "5m",
}
SCRAPED_BY_PROMETHEUS = {"up"}
"""Series Prometheus makes itself for every target, never on the planner's endpoint."""


def _queries() -> list[Query]:
    return [*dashboard_queries(DASHBOARD), *rule_queries(RULE)]


def _grafana(expr: str) -> str:
    """An expression as Grafana sends it, with this test's values for the dashboard's variables."""
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


# ---- the planner --------------------------------------------------------------------------------------------------


def _plan_and_report(server: ServerProcess, job_id: str, iterations: range) -> None:
    """Plan `iterations` for every rank of the tiny job, and report each rank's timings (20% slower than predicted)."""
    w = tiny_workload()
    stub = server.stub()
    for it in iterations:
        b = batch(w, it, seed=it)
        for rank in range(w.parallel.pp):
            plan = stub.GetPlan(pb.GetPlanRequest(job_id=job_id, rank=rank, batch=b), timeout=60)
            n, measured = wire.action_count(plan.rank_plan), 1.2 * plan.header.predicted_makespan_ms
            report = pb.ReportTimingsRequest(
                job_id=job_id,
                iteration=it,
                rank=rank,
                measured_start_ms=[0.0] * n,
                measured_end_ms=[measured] * n,
                measured_iteration_ms=measured,
            )
            stub.ReportTimings(report, timeout=10)


@dataclass
class Planner:
    server: ServerProcess
    job_id: str


@pytest.fixture(scope="module")
def planner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Planner]:
    server = start_server(tmp_path_factory.mktemp("planner"), "--budget-ms", "50")
    try:
        job_id = str(server.stub().RegisterJob(register_request(tiny_workload()), timeout=120).job_id)
        _plan_and_report(server, job_id, range(0, 3))
        assert server.sample("pipeweaver_prediction_error_ratio_count") >= 1, server.log()
        yield Planner(server, job_id)
    finally:
        code = server.stop()
    assert code == 0, server.log()


def test_every_metric_named_exists_on_the_live_endpoint(planner: Planner) -> None:
    exposed = {s.name for f in text_string_to_metric_families(planner.server.metrics_text()) for s in f.samples}
    recorded = recorded_names(RULE)
    missing = {
        f"{sel.metric} ({q.where})"
        for q in _queries()
        for sel in selectors(q.expr)
        if sel.metric not in exposed | recorded | SCRAPED_BY_PROMETHEUS
    }
    assert not missing, "not on the planner's /metrics:\n" + "\n".join(sorted(missing))


# ---- Prometheus ---------------------------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read().decode())
        except urllib.error.HTTPError as e:  # a bad query is a 400 with a JSON body that says why
            return json.loads(e.read().decode())

    def query(self, expr: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.get("/api/v1/query", query=expr)
        return answer

    def values(self, expr: str) -> list[float]:
        answer = self.query(expr)
        assert answer["status"] == "success", answer
        return [float(r["value"][1]) for r in answer["data"]["result"]]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp: Path, metrics_port: int) -> Path:
    """Scrape the planner as the PodMonitor would (its job name, a namespace and pod label), load the rules."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file(RULE, tmp / "rules.yaml"))],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}
                ],
            }
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def prometheus(planner: Planner, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = _free_port()
    with (tmp / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={_config(tmp, planner.server.metrics_port)}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(port)
    try:
        wait_until(prom.ready, 60, "Prometheus to start")
        wait_until(lambda: prom.values(f'up{{job="{JOB}"}} == 1'), 30, "a first scrape", interval_s=0.2)
        # More traffic once Prometheus has seen the counters, so rates and quantiles over it are numbers.
        _plan_and_report(planner.server, planner.job_id, range(3, 6))
        reports = planner.server.sample("pipeweaver_prediction_error_ratio_count")
        scraped = f'pipeweaver_prediction_error_ratio_count{{job="{JOB}"}} >= {reports}'
        wait_until(lambda: prom.values(scraped), 30, "a scrape after the traffic", interval_s=0.2)
        time.sleep(2.5)  # a rule evaluation or two after that scrape
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_every_panel_query_evaluates_to_numbers(prometheus: Prometheus) -> None:
    problems = []
    for q in dashboard_queries(DASHBOARD):
        if q.where.startswith("variable"):
            continue
        answer = prometheus.query(_grafana(q.expr))
        if answer["status"] != "success":
            problems.append(f"{q.where}: {answer.get('error')}")
        elif not answer["data"]["result"]:
            problems.append(f"{q.where}: no data")
        elif not all(math.isfinite(float(r["value"][1])) for r in answer["data"]["result"]):
            problems.append(f"{q.where}: {[r['value'][1] for r in answer['data']['result']]}")
    assert not problems, "\n".join(problems)


def test_every_rule_expression_evaluates(prometheus: Prometheus) -> None:
    """Alert expressions are quiet on a healthy planner; they must still parse and evaluate."""
    for q in rule_queries(RULE):
        answer = prometheus.query(q.expr)
        assert answer["status"] == "success", f"{q.where}: {answer.get('error')}"


def test_every_selector_finds_series(prometheus: Prometheus) -> None:
    """No selector matches nothing: a misspelt label or label value would leave a panel or an alert blind."""
    empty = sorted(
        f"{sel.text} ({q.where})"
        for q in _queries()
        for sel in selectors(q.expr)
        if not prometheus.values(f"count({_grafana(sel.text)})")
    )
    assert not empty, "selects no series:\n" + "\n".join(empty)


def test_dashboard_variables_list_the_planner(prometheus: Prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        selector, label = label_values(variable["query"]["query"])
        answer = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": _grafana(selector)})
        assert answer["status"] == "success", answer
        assert GRAFANA_VARIABLES[f"${label}"] in answer["data"], (variable["name"], answer["data"])


def test_prometheus_evaluates_every_rule_without_error(prometheus: Prometheus) -> None:
    rules = [r for g in prometheus.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    expected = {r.get("alert") or r.get("record") for g in RULE["spec"]["groups"] for r in g["rules"]}
    assert {r["name"] for r in rules} == expected
    for r in rules:
        assert r["health"] == "ok" and not r.get("lastError"), r
        assert not r["lastEvaluation"].startswith("0001-"), f"{r['name']} never evaluated"
    assert prometheus.values("pipeweaver:iteration_time_seconds") == [2.0]

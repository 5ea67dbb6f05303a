"""The alerts pass promtool (check and unit tests); the dashboard is well-formed Grafana JSON.

Whether their queries name real metrics and evaluate on a live planner is tests/deploy/test_live_monitoring.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.kube import ROOT, objects, rule_file, tool

DASHBOARD = ROOT / "deploy/monitoring/dashboards/pipeweaver-planner.json"
RULES = [(k, obj) for k, obj in objects("PrometheusRule")]


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("kustomization,rule", RULES, ids=[k for k, _ in RULES])
def test_promtool_accepts_the_rules(kustomization: str, rule: dict[str, Any], tmp_path: Path) -> None:
    result = _promtool("check", "rules", str(rule_file(rule, tmp_path / "rules.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """tests/deploy/alerts_test.yaml: each alert fires on a planner in trouble and not on a healthy one."""
    (rule,) = [obj for k, obj in RULES if k == "deploy/monitoring"]
    rule_file(rule, tmp_path / "rules.yaml")
    shutil.copy(Path(__file__).with_name("alerts_test.yaml"), tmp_path)
    result = _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested() -> None:
    tests = yaml.safe_load(Path(__file__).with_name("alerts_test.yaml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    (rule,) = [obj for k, obj in RULES if k == "deploy/monitoring"]
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == tested


def test_overlay_sets_the_iteration_time() -> None:
    (rule,) = [obj for k, obj in RULES if k == "deploy/overlays/kube-prometheus-stack"]
    (setting,) = [
        r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("record", "").startswith("pipeweaver:")
    ]
    assert setting == {"record": "pipeweaver:iteration_time_seconds", "expr": "vector(4)"}
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# ---- the dashboard ----------------------------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data (rows and their nested panels flattened, rows themselves left out)."""
    out = []
    for panel in dashboard["panels"]:
        out += [p for p in panel.get("panels", []) if p["type"] != "row"]
        if panel["type"] != "row":
            out.append(panel)
    return out


def test_dashboard_is_portable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "pipeweaver-planner" and dashboard["id"] is None
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in rows + panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(dashboard):
        title = panel["title"]
        # The data source comes from the variable, never a UID of one Grafana install.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), title
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title


def test_dashboard_has_the_panels_operators_ask_for() -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels(json.loads(DASHBOARD.read_text()))}
    wanted = {
        "plan latency": "pipeweaver_grpc_server_handling_seconds_bucket",
        "plans by source": "pipeweaver_plans_total",
        "predicted speedup": "pipeweaver_predicted_speedup_ratio_bucket",
        "bubble fraction": "pipeweaver_predicted_bubble_ratio_bucket",
        "prediction error": "pipeweaver_prediction_error_ratio",
        "queue depth": "pipeweaver_queue_depth",
        "worker restarts": "pipeweaver_worker_restarts_total",
    }
    for what, metric in wanted.items():
        assert any(metric in expr for expr in exprs.values()), f"no panel shows {what} ({metric})"

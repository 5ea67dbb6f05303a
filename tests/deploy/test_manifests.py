"""deploy/ renders, validates against Kubernetes' schemas, and says what the planner needs to run as a sidecar.

Every kustomization renders with `kubectl kustomize`; every built-in object passes kubernetes-validate --strict
for Kubernetes 1.29 (the first with native sidecars on by default) and the newest version it knows; the custom
resources pass the schemas in tests/deploy/schemas/ (a PyTorchJob's pod templates pass Kubernetes' own). Then
the planner sidecar of every pod template is held to the server's real options, the image and the monitoring.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from pipeweaver.server.config import OPTIONS, ServerConfig
from pipeweaver.server.service import SERVICE_NAME
from tests.deploy import image
from tests.deploy.kube import (
    KUSTOMIZATIONS,
    ROOT,
    all_pod_templates,
    container,
    crd_schema,
    env,
    name,
    objects,
    pod_templates,
    render,
    render_warnings,
    workloads,
)

K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
DEFAULTS = ServerConfig()
KNOWN_VARIABLES = {o.env for o in OPTIONS}
KNOWN_FLAGS = {o.flag for o in OPTIONS}
WORKLOAD_KINDS = {"Job", "PyTorchJob"}
TEMPLATES = dict(all_pod_templates())
"""Every pod template of every workload in every kustomization, by where it is."""


def test_there_is_something_to_check() -> None:
    assert {"deploy/base", "deploy/monitoring", "deploy/overlays/pytorchjob"} <= set(KUSTOMIZATIONS)
    assert {obj["kind"] for _, obj in workloads()} == WORKLOAD_KINDS
    assert len(TEMPLATES) >= 3


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders_without_warnings(kustomization: str) -> None:
    assert render(kustomization), f"{kustomization} renders nothing"
    assert not render_warnings(kustomization).strip(), render_warnings(kustomization)


def _validate_builtin(obj: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name(obj)}: {'.'.join(map(str, e.path))}: {e.message}"]
    return []


def _pod_template_object(template: dict[str, Any]) -> dict[str, Any]:
    """A pod template embedded in a custom resource, as the built-in PodTemplate object Kubernetes validates."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "embedded"}, "template": template}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_objects_pass_strict_schemas(kustomization: str, version: str) -> None:
    errors: list[str] = []
    for obj in render(kustomization):
        try:
            errors += _validate_builtin(obj, version)
            continue
        except kubernetes_validate.SchemaNotFoundError:
            pass
        # A custom resource: its schema from tests/deploy/schemas, its metadata as any object's, its pod templates
        # as Kubernetes' own. A custom resource without a schema here fails: nothing goes unchecked.
        schema = crd_schema(obj["apiVersion"], obj["kind"])
        if schema is None:
            errors.append(f"{name(obj)} ({obj['apiVersion']}): no schema in tests/deploy/schemas")
            continue
        errors += [
            f"{name(obj)}: {'.'.join(map(str, e.path))}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(obj)
        ]
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        errors += _validate_builtin(meta, version)
        for _, template in pod_templates(obj):
            errors += _validate_builtin(_pod_template_object(template), version)
    assert not errors, "\n".join(errors)


def test_the_schemas_catch_mistakes() -> None:
    """The checks above can fail: a misspelt field, on a built-in object and on each kind of custom resource."""
    job = next(obj for _, obj in objects("Job"))
    bad_job = {**job, "spec": {**job["spec"], "completion": 3}}
    assert _validate_builtin(bad_job, K8S_VERSIONS[0])
    for kind, path in [("PodMonitor", ["spec", "podMetricsEndpoints", 0]), ("PrometheusRule", ["spec", "groups", 0])]:
        obj = next(obj for _, obj in objects(kind))
        node: Any = obj
        for key in path:
            node = node[key]
        node["intervall"] = "15s"
        schema = crd_schema(obj["apiVersion"], kind)
        assert schema is not None
        assert list(jsonschema.Draft202012Validator(schema).iter_errors(obj)), kind
        del node["intervall"]
    pytorchjob = next(obj for _, obj in objects("PyTorchJob"))
    (_, template), *_ = pod_templates(pytorchjob)
    broken = {**template, "spec": {**template["spec"], "initContainer": []}}
    assert _validate_builtin(_pod_template_object(broken), K8S_VERSIONS[0])


# ---- the planner sidecar ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", TEMPLATES)
def test_planner_is_a_native_sidecar_with_grpc_probes(where: str) -> None:
    template = TEMPLATES[where]
    spec = template["spec"]
    init = [c["name"] for c in spec.get("initContainers", [])]
    assert "planner" in init, f"{where}: the planner must be an init container (a native sidecar)"
    planner = container(template, "planner")
    assert planner.get("restartPolicy") == "Always", f"{where}: a native sidecar has restartPolicy: Always"

    ports = {p["name"]: p["containerPort"] for p in planner["ports"]}
    assert ports == {"grpc": DEFAULTS.port, "metrics": DEFAULTS.metrics_port}
    variables = env(planner)
    assert int(variables.get("PIPEWEAVER_PORT", DEFAULTS.port)) == ports["grpc"]
    assert int(variables.get("PIPEWEAVER_METRICS_PORT", DEFAULTS.metrics_port)) == ports["metrics"]
    assert variables.get("PIPEWEAVER_HOST", image.runtime().env.get("PIPEWEAVER_HOST")) == "0.0.0.0", (
        "kubelet's probes dial the pod IP: the planner must not bind loopback only"
    )

    # Startup and readiness: the planner service (SERVING after warm-up); liveness: the server as a whole.
    for probe in ("startupProbe", "readinessProbe"):
        assert planner[probe]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}, f"{where}: {probe}"
    assert planner["livenessProbe"]["grpc"].get("service", "") == ""
    assert planner["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    startup = planner["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "a first start compiles numba kernels"


@pytest.mark.parametrize("where", TEMPLATES)
def test_planner_configuration_uses_real_server_options(where: str) -> None:
    template = TEMPLATES[where]
    planner = container(template, "planner")
    unknown = {v for v in env(planner) if v.startswith("PIPEWEAVER_")} - KNOWN_VARIABLES
    assert not unknown, f"{where}: not variables of `pipeweaver serve`: {unknown}"
    flags = {a.partition("=")[0] for a in planner.get("args", []) if a.startswith("--")}
    assert flags <= KNOWN_FLAGS, f"{where}: not flags of `pipeweaver serve`: {flags - KNOWN_FLAGS}"

    # The worker counts follow the CPU limit (the defaults would count the node's cores).
    limits, requests = planner["resources"]["limits"], planner["resources"]["requests"]
    assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests)
    workers = int(env(planner)["PIPEWEAVER_WORKERS"])
    control = int(env(planner)["PIPEWEAVER_CONTROL_WORKERS"])
    assert workers + control <= float(limits["cpu"]), "search and control workers within the CPU limit"


@pytest.mark.parametrize("where", TEMPLATES)
def test_pods_run_restricted(where: str) -> None:
    """The pod meets the "restricted" Pod Security Standard, as the image's numeric user on a read-only root."""
    template = TEMPLATES[where]
    spec = template["spec"]
    pod = spec.get("securityContext", {})
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    assert str(pod.get("runAsUser")) == image.runtime().user.split(":")[0], "the image's numeric user"
    assert spec.get("automountServiceAccountToken") is False, "neither container talks to the API server"
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{where} {c['name']}"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where} {c['name']}"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where} {c['name']}"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where} {c['name']}"
        assert not sc.get("capabilities", {}).get("add"), f"{where} {c['name']}"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert all(set(v) <= {"name", "emptyDir"} for v in volumes.values()), "only emptyDir volumes"


@pytest.mark.parametrize("where", TEMPLATES)
def test_planner_can_write_its_caches_on_a_read_only_root(where: str) -> None:
    """The image's NUMBA_CACHE_DIR and MPLCONFIGDIR lie on writable volumes."""
    template = TEMPLATES[where]
    planner = container(template, "planner")
    mounts = [m["mountPath"] for m in planner["volumeMounts"] if not m.get("readOnly")]
    image_env = {**image.runtime().env, **env(planner)}
    for variable in ("NUMBA_CACHE_DIR", "MPLCONFIGDIR"):
        path = Path(image_env[variable])
        assert any(path.is_relative_to(m) for m in mounts), f"{where}: {variable}={path} is not on a volume"


@pytest.mark.parametrize("where", TEMPLATES)
def test_trainer_dials_its_own_sidecar(where: str) -> None:
    template = TEMPLATES[where]
    trainers = template["spec"]["containers"]
    assert len(trainers) == 1
    assert env(trainers[0])["PIPEWEAVER_PLANNER_ADDRESS"] == f"127.0.0.1:{DEFAULTS.port}"


def _without_role(planner: dict[str, Any]) -> dict[str, Any]:
    """A planner container without what makes it the leader or a follower."""
    role_variables = {"PIPEWEAVER_LEADER", "NODE_RANK"}
    rest = {k: v for k, v in planner.items() if k not in ("command", "args", "env")}
    rest["env"] = [e for e in planner.get("env", []) if e["name"] not in role_variables]
    return rest


def test_every_planner_sidecar_is_the_same_apart_from_its_role() -> None:
    """The sidecar is written out in each workload's manifest: they must not drift apart."""
    (first_where, first), *others = TEMPLATES.items()
    reference = _without_role(container(first, "planner"))
    for where, template in others:
        assert _without_role(container(template, "planner")) == reference, f"{where} differs from {first_where}"


def _run_planner_command(planner: dict[str, Any], node_rank: str, tmp_path: Path) -> list[str]:
    """Run a planner container's command with a stand-in `pipeweaver` that prints its arguments and leader."""
    fake = tmp_path / "pipeweaver"
    fake.write_text('#!/bin/sh\necho "$@" "leader=${PIPEWEAVER_LEADER:-}"\n')
    fake.chmod(0o755)
    command = planner.get("command", image.runtime().entrypoint) + planner.get("args", [])
    variables = {**env(planner), "NODE_RANK": node_rank, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(command, env=variables, capture_output=True, text=True, timeout=10, check=True)
    return result.stdout.split()


def test_indexed_job_pod_zero_plans_and_the_others_forward_to_it(tmp_path: Path) -> None:
    for kustomization, job in objects("Job"):
        template = job["spec"]["template"]
        planner = container(template, "planner")
        subdomain = template["spec"]["subdomain"]
        leader_address = f"{job['metadata']['name']}-0.{subdomain}:{DEFAULTS.port}"
        assert env(planner)["PIPEWEAVER_LEADER"] == leader_address, kustomization
        assert _run_planner_command(planner, "0", tmp_path) == ["serve", "leader="], "pod 0: the leader"
        for rank in ("1", "3"):
            out = _run_planner_command(planner, rank, tmp_path)
            assert out == ["serve", f"leader={leader_address}"], f"pod {rank}: a follower of pod 0"

        # The names resolve through a headless Service over the job's pods, before the pods are ready.
        (service,) = [s for s in render(kustomization) if s["kind"] == "Service" and s["metadata"]["name"] == subdomain]
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
        assert DEFAULTS.port in {p["port"] for p in service["spec"]["ports"]}
        assert job["spec"]["completionMode"] == "Indexed"
        trainer_args = template["spec"]["containers"][0]["args"]
        assert f"--nnodes={job['spec']['completions']}" in trainer_args, "torchrun's node count is the Job's size"


def test_pytorchjob_master_plans_and_workers_forward_to_it(tmp_path: Path) -> None:
    for _, job in objects("PyTorchJob"):
        specs = job["spec"]["pytorchReplicaSpecs"]
        master = container(specs["Master"]["template"], "planner")
        worker = container(specs["Worker"]["template"], "planner")
        assert specs["Master"]["replicas"] == 1
        assert _run_planner_command(master, "", tmp_path) == ["serve", "leader="]
        leader = f"{job['metadata']['name']}-master-0:{DEFAULTS.port}"  # the training operator's Service
        assert _run_planner_command(worker, "", tmp_path) == ["serve", "--leader", leader, "leader="]
        for role in ("Master", "Worker"):
            assert [c["name"] for c in specs[role]["template"]["spec"]["containers"]] == ["pytorch"]


# ---- monitoring and network ---------------------------------------------------------------------------------------


def test_podmonitor_selects_every_planner_pod_by_its_metrics_port() -> None:
    monitors = [obj for _, obj in objects("PodMonitor")]
    assert monitors
    for monitor in monitors:
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"any": True}, "planners run in the training jobs' namespaces"
        assert set(spec["selector"]) == {"matchLabels"}
        (endpoint,) = spec["podMetricsEndpoints"]
        job_label = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        assert [r["replacement"] for r in job_label] == ["pipeweaver-planner"], "the job the alerts select"
        for where, template in TEMPLATES.items():
            labels = template["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items(), f"{name(monitor)} misses {where}"
            ports = {p["name"]: p["containerPort"] for p in container(template, "planner")["ports"]}
            assert ports.get(endpoint["port"]) == DEFAULTS.metrics_port, where


def test_network_policies_admit_the_job_and_the_metrics_scrape() -> None:
    for kustomization, workload in workloads():
        (policy,) = [p for p in render(kustomization) if p["kind"] == "NetworkPolicy"]
        job_label = {"Job": "batch.kubernetes.io/job-name", "PyTorchJob": "training.kubeflow.org/job-name"}
        selector = {job_label[workload["kind"]]: workload["metadata"]["name"]}
        assert policy["spec"]["podSelector"]["matchLabels"] == selector, kustomization
        same_job, scrape = policy["spec"]["ingress"]
        assert same_job == {"from": [{"podSelector": {"matchLabels": selector}}]}
        assert scrape["ports"] == [{"protocol": "TCP", "port": DEFAULTS.metrics_port}]


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    maps = [obj for _, obj in objects("ConfigMap") if "grafana_dashboard" in obj["metadata"].get("labels", {})]
    assert maps
    source = ROOT / "deploy/monitoring/dashboards/pipeweaver-planner.json"
    for configmap in maps:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert re.fullmatch(r"[a-z0-9-]+", configmap["metadata"]["name"]), "no name suffix hash"
        assert configmap["data"] == {source.name: source.read_text()}

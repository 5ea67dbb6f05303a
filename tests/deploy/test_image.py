"""The server image's Dockerfile: hadolint-clean, and what it promises (no Docker engine here, so not built).

Multi-stage on one slim Python base, the `server` extra installed from pinned requirements (no torch), a numeric
non-root user, a writable numba cache, exec-form `pipeweaver serve`, the gRPC and metrics ports exposed.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeweaver.server.config import ServerConfig
from tests.deploy import image
from tests.deploy.kube import ROOT, tool

REQUIREMENTS = ROOT / "deploy/docker/requirements.txt"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes() -> None:
    result = _hadolint(image.DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_the_usual_mistakes(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install numba\nCMD pipeweaver serve\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3042", "DL3025"):  # untagged base, unpinned pip, pip cache, shell-form CMD
        assert rule in result.stdout, result.stdout


def test_two_stages_on_the_same_slim_python() -> None:
    builder, runtime = image.stages()
    assert builder.base == runtime.base, "the venv's interpreter path must exist in the runtime stage"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", runtime.base), runtime.base
    assert builder.name == "builder"
    assert any("--from=builder /opt/venv /opt/venv" in c for c in runtime.all("COPY"))


def test_runtime_runs_pipeweaver_serve_as_a_numeric_non_root_user() -> None:
    runtime = image.runtime()
    user, _, group = runtime.user.partition(":")
    assert user.isdigit() and int(user) > 0 and (not group or group.isdigit()), runtime.user
    assert runtime.entrypoint == ["pipeweaver", "serve"]
    assert not runtime.all("CMD") and not runtime.all("HEALTHCHECK")
    defaults = ServerConfig()
    assert runtime.exposed_ports == {defaults.port, defaults.metrics_port}
    assert runtime.env["PATH"].startswith("/opt/venv/bin:")


def test_numba_cache_is_writable_by_the_image_user() -> None:
    runtime = image.runtime()
    cache = runtime.env["NUMBA_CACHE_DIR"]
    user, _, group = runtime.user.partition(":")
    assert any(f"-o {user} -g {group or user}" in run and cache in run.split() for run in runtime.all("RUN")), (
        f"no RUN creates {cache} for user {runtime.user}"
    )


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in REQUIREMENTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line.strip())
            assert match, f"not an exact pin: {line!r}"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_requirements_pin_the_server_extra_without_torch() -> None:
    """deploy/docker/requirements.txt (scripts/lock_server_image.sh) satisfies pyproject.toml's base and server
    requirements, each at one exact version; torch stays out of the planner image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    assert "torch" not in pins and "pipeweaver" not in pins
    for spec in project["dependencies"] + project["optional-dependencies"]["server"]:
        req = Requirement(spec)
        pinned = pins.get(canonicalize_name(req.name))
        assert pinned is not None, f"{req.name} is not pinned; rerun scripts/lock_server_image.sh"
        assert req.specifier.contains(pinned, prereleases=True), f"{req.name}=={pinned} does not satisfy {req}"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore lets through every local source COPY names (it ignores everything else)."""
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"]
    for stage in image.stages():
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert any(source == a or source.startswith(f"{a}/") for a in allowed), f"{source} is dockerignored"

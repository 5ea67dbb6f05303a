"""Usable cores: the affinity mask capped by the cgroup CPU quota (v1 and v2, limits on ancestors too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeweaver import cores
from pipeweaver.server.config import default_control_workers, default_search_workers


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_quota_of_the_container(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "400000 100000")  # a pod with limits.cpu: 4, cgroup namespace: path "/"
    assert cores.cgroup_cpu_limit(tmp_path, "0::/\n") == 4.0


def test_cgroup_v2_unlimited_and_missing(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "max 100000")
    assert cores.cgroup_cpu_limit(tmp_path, "0::/\n") is None
    assert cores.cgroup_cpu_limit(tmp_path / "absent", "0::/\n") is None
    assert cores.cgroup_cpu_limit(tmp_path, "") is None


def test_cgroup_v2_a_parent_limit_binds_the_child(tmp_path: Path) -> None:
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "250000 100000")
    _write(tmp_path / "kubepods" / "pod1" / "c1" / "cpu.max", "max 100000")
    _write(tmp_path / "cpu.max", "max 100000")
    assert cores.cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1/c1\n") == 2.5


def test_cgroup_v2_the_tightest_of_child_and_parent(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "cpu.max", "800000 100000")
    _write(tmp_path / "a" / "b" / "cpu.max", "300000 100000")
    assert cores.cgroup_cpu_limit(tmp_path, "0::/a/b\n") == 3.0


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    base = tmp_path / "cpu,cpuacct"
    _write(base / "docker" / "x" / "cpu.cfs_quota_us", "150000")
    _write(base / "docker" / "x" / "cpu.cfs_period_us", "100000")
    proc = "12:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n"
    assert cores.cgroup_cpu_limit(tmp_path, proc) == 1.5
    _write(base / "docker" / "x" / "cpu.cfs_quota_us", "-1")  # no limit
    assert cores.cgroup_cpu_limit(tmp_path, proc) is None


def test_garbage_in_the_files_is_no_limit(tmp_path: Path) -> None:
    _write(tmp_path / "cpu.max", "lots 100000")
    assert cores.cgroup_cpu_limit(tmp_path, "0::/\n") is None


@pytest.mark.parametrize(
    ("quota", "expected"),
    [("100000 100000", 1), ("50000 100000", 1), ("150000 100000", 1), ("200000 100000", 2), (None, None)],
)
def test_usable_cores_rounds_the_quota_down_and_never_exceeds_the_affinity(
    tmp_path: Path, quota: str | None, expected: int | None
) -> None:
    if quota is not None:
        _write(tmp_path / "cpu.max", quota)
    affinity = cores.affinity_cores()
    got = cores.usable_cores(tmp_path, "0::/\n")
    assert got == (affinity if expected is None else min(affinity, expected))


def test_affinity_counts_the_mask() -> None:
    assert cores.affinity_cores() == len(os.sched_getaffinity(0))


def test_worker_defaults_follow_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 4-core pod limit on a 128-core node: 3 search workers and 1 control worker, not 126 and 8.
    monkeypatch.setattr("pipeweaver.server.config.usable_cores", lambda: 4)
    assert (default_search_workers(), default_control_workers()) == (3, 1)
    monkeypatch.setattr("pipeweaver.server.config.usable_cores", lambda: 64)
    assert (default_search_workers(), default_control_workers()) == (59, 4)

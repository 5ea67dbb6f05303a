"""How many CPU cores this process may really use: its CPU affinity, capped by its cgroup's CPU quota.

`os.cpu_count()` counts the host's cores. A planner sidecar in a Kubernetes pod with `limits.cpu: 4` on a
128-core node sees 128 there, and sizing its worker pools from that would start 126 search processes that the
kernel throttles to 4 cores' worth of time: every search then runs ~30x slower than its budget assumes and plans
come late. The quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`) is what the pod may use;
`taskset`/cpusets show up in the affinity mask. The smaller of the two wins; a fractional quota rounds down (a
worker more than the quota pays in throttled latency), never below one core.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cores() -> int:
    """Cores in this process's affinity mask (`taskset`, cpusets), or the host's count where there is no mask."""
    getter = getattr(os, "sched_getaffinity", None)
    if getter is not None:
        return max(1, len(getter(0)))
    return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(directory: Path) -> float | None:
    """`cpu.max` of one cgroup v2 directory: "max 100000" (no limit) or "<quota> <period>" in microseconds."""
    text = _read(directory / "cpu.max")
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # -1: no limit


def _own_cgroup_dirs(root: Path, proc_cgroup: str) -> list[Path]:
    """The process's cgroup directories, innermost first, then each ancestor up to the root: a limit set on a
    parent (the pod's cgroup around the container's) binds the child too."""
    dirs: list[Path] = []
    for line in proc_cgroup.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":  # cgroup v2's unified hierarchy: "0::/path"
            base = root
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            base = root / controllers
            if not base.is_dir():
                base = root / "cpu"
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            dirs.append(here)
            if here == base or base not in here.parents:
                break
            here = here.parent
    if not dirs:
        dirs.append(root)
    return dirs


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota, in cores, over this process's cgroup and its ancestors; None when unlimited or
    unknown (not Linux, no cgroup filesystem)."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    limits = [q for d in _own_cgroup_dirs(root, proc_cgroup) for q in (_v2_quota(d), _v1_quota(d)) if q is not None]
    return min(limits) if limits else None


def usable_cores(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """Cores this process can keep busy: the affinity mask, capped by the cgroup quota rounded down, at least 1."""
    cores = affinity_cores()
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota + 1e-9)))
    return cores

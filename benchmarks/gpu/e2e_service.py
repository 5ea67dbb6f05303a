"""The planner side of `e2e_compare.py`: the `pipeweaver serve` sidecar, a client that stamps plan arrivals, and
the time-boxed layer profile that calibrates SEMU to the executor's blocks on the actual device.

Imports no grpc at module level (`StampedClient` loads it on first use), so the torch-only parts of the benchmark
do not need it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIDECAR_START_TIMEOUT_S = 300.0
"""A fresh machine compiles the planner's numba kernels in every search worker before the service is ready."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the sidecar when the rank that started it dies (a crash must not leave it running)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Sidecar:
    """`python -m pipeweaver serve` on a loopback port, started by rank 0."""

    proc: subprocess.Popen[bytes]
    ready_file: Path
    log_path: Path
    started: float
    address: str = ""
    ready_s: float = float("nan")
    """Seconds from launch to SERVING (numba warm-up in every search worker)."""
    metrics_port: int = 0
    """The Prometheus endpoint (loopback): why the service fell back, counted by reason."""

    @staticmethod
    def launch(work: Path, *, workers: int, budget_ms: float, baselines: str, nice: int = 0) -> Sidecar:
        work.mkdir(parents=True, exist_ok=True)
        ready = work / "sidecar-ready.json"
        log_path = work / "sidecar.log"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "pipeweaver", "serve", "--port", "0", "--metrics-port", "0",
            "--workers", str(workers), "--budget-ms", str(budget_ms), "--compare-baselines", baselines,
            "--ready-file", str(ready), "--log-level", "WARNING",
        ]  # fmt: skip
        if nice > 0:  # the CPU smoke test shares 2 cores between the ranks and the planner
            cmd = ["nice", "-n", str(nice), *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEWEAVER_")}
        env["CUDA_VISIBLE_DEVICES"] = ""  # the planner never touches a GPU
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent, start_new_session=True
            )
        return Sidecar(proc, ready, log_path, time.monotonic())

    def poll_ready(self) -> bool:
        """Whether `wait_ready` would return (or raise) at once: the service is up, or its process has ended."""
        return bool(self.address) or self.ready_file.exists() or self.proc.poll() is not None

    def wait_ready(self, timeout_s: float = SIDECAR_START_TIMEOUT_S) -> str:
        """The gRPC address once the service is SERVING; raises with the log's tail if it exits or times out."""
        if self.address:
            return self.address
        deadline = self.started + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar was not ready {timeout_s:.0f} s after launch: {self.log_tail()}")
            time.sleep(0.1)
        info = json.loads(self.ready_file.read_text())
        self.address = f"127.0.0.1:{info['port']}"
        self.metrics_port = int(info.get("metrics_port") or 0)
        self.ready_s = time.monotonic() - self.started
        return self.address

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 8.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


METRICS = (
    "pipeweaver_fallback_plans_total",
    "pipeweaver_plans_total",
    "pipeweaver_plan_cache_lookups_total",
    "pipeweaver_job_warmup_seconds_sum",
    "pipeweaver_job_warmup_seconds_count",
    "pipeweaver_worker_task_seconds_sum",
    "pipeweaver_worker_task_seconds_count",
)
"""Series worth keeping: fallbacks by reason (the plan reply itself only carries a flag), plans by source, cache;
the workers' warm-up for the job and their time per task (search and fallback: what the deadline reserve is
learnt from; warm_job: each worker's cold first plan for the job)."""


def scrape_metrics(port: int, prefixes: tuple[str, ...] = METRICS, timeout_s: float = 1.0) -> dict[str, float]:
    """The sidecar's counters whose names start with one of `prefixes`, as {'name{labels}': value}; {} when the
    endpoint does not answer (the benchmark never fails on it)."""
    import urllib.request

    if not port:
        return {}
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with direct.open(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return {}
    return parse_metrics(text, prefixes)


def parse_metrics(text: str, prefixes: tuple[str, ...] = METRICS) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefixes):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


def counter_delta(now: dict[str, float], before: dict[str, float], prefix: str) -> dict[str, float]:
    """The increase of each `prefix{label="x"}` counter, by label value ('x'), zero increases left out."""
    out: dict[str, float] = {}
    for key, value in now.items():
        if key.startswith(prefix + "{") and value > before.get(key, 0.0):
            label = key[len(prefix) + 1 : -1].partition("=")[2].strip('"')
            out[label] = value - before.get(key, 0.0)
    return out


def stamped_client(address: str, timeout_s: float = 60.0) -> Any:
    """A `PlannerClient` whose plan streams record when each (iteration, rank) reply became usable.

    `client.arrivals[(iteration, rank)]` is the `time.monotonic` instant the stream's reader thread had decoded
    the reply, i.e. when the prefetcher could hand it out: the margin of an iteration's plan is the end of the
    previous iteration minus the latest of its ranks' arrivals. (The client has no such hook; this wraps the
    stream's reply store.)
    """
    from pipeweaver.client.planner_client import PlannerClient, PlanStream

    class _Stamped(dict):  # type: ignore[type-arg]
        def __init__(self, at: dict[Any, float]) -> None:
            super().__init__()
            self.at = at

        def __setitem__(self, key: Any, value: Any) -> None:
            self.at.setdefault(key, time.monotonic())
            super().__setitem__(key, value)

    class StampedClient(PlannerClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.arrivals: dict[tuple[int, int], float] = {}

        def stream(self, job_id: str) -> PlanStream:
            s = PlanStream(self, job_id)
            s._replies = _Stamped(self.arrivals)  # type: ignore[assignment]
            return s

    return StampedClient(address, timeout_s=timeout_s)


def profile_calibration(model: Any, parallel: Any, *, device: Any, dtype: Any, budget_s: float) -> dict[str, Any]:
    """`profile_layers` at each module's default token counts, smallest first, stopping once `budget_s` is spent.

    The service fits SEMU's efficiency factors per (layer kind, pass) and needs at least three token counts per
    module and pass; with fewer, the rows are dropped (the job then registers uncalibrated; `rows` is empty).
    """
    from pipeweaver.client.profiler import default_token_counts, profile_layers

    counts = default_token_counts(model, parallel)
    t0 = time.monotonic()
    rows: list[Any] = []
    rounds = 0
    for i in range(max(len(c) for c in counts.values())):
        if time.monotonic() - t0 > budget_s:
            break
        tokens = {m: (c[i],) for m, c in counts.items() if i < len(c)}
        rows += profile_layers(model, parallel, tokens=tokens, device=device, dtype=dtype, repeats=5, warmup=2)
        rounds += 1
    return {
        "rows": rows if rounds >= 3 else [],
        "rounds": rounds,
        "seconds": time.monotonic() - t0,
        "token_counts": {m: list(c[:rounds]) for m, c in counts.items()},
        "dropped": rounds < 3,
    }

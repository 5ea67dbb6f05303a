"""Configuration of `pipeweaver serve`: one keyword-only dataclass, filled from flags, then PIPEWEAVER_* variables.

Every option has a flag and an environment variable (flag wins); `add_arguments` and `from_args` are the only
places that know about either, so the server itself takes a plain `ServerConfig`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeweaver.cores import usable_cores
from pipeweaver.errors import PipeWeaverError
from pipeweaver.search.baselines.registry import BASELINES
from pipeweaver.spec.batch import BatchLimits

MiB = 1 << 20


class ConfigError(PipeWeaverError, ValueError):
    """A server option is invalid; the message names the flag or variable, the value and the fix."""


def default_control_workers() -> int:
    """One control worker per 16 cores (registrations, fallbacks, simulations), at least one. With distinct
    batches per data-parallel replica, an iteration that misses its deadlines needs one fallback per replica, and a
    single control worker builds them one after another (~150 ms each for vlm-s: docs/benchmarks.md)."""
    return max(1, usable_cores() // 16)


def default_search_workers() -> int:
    """One search worker per usable core (the affinity mask capped by the pod's CPU limit: `pipeweaver.cores`), less
    the control workers' cores and, from 16 cores, one for the event loop."""
    cores = usable_cores()
    return max(1, cores - default_control_workers() - (1 if cores >= 16 else 0))


@dataclass(frozen=True, kw_only=True, slots=True)
class TLSConfig:
    """Server certificate, and a client CA when clients must present certificates too (mutual TLS)."""

    cert_file: Path
    """PEM certificate chain of the server."""
    key_file: Path
    """PEM private key of the server."""
    client_ca_file: Path | None = None
    """PEM CA bundle that client certificates must chain to; set: mutual TLS (clients without one are refused)."""

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"tls {name.removesuffix('_file')}: no such file '{path}'")

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Everything `pipeweaver serve` needs; defaults suit a sidecar on a training pod."""

    host: str = "127.0.0.1"
    """Address the gRPC port binds. A sidecar only talks to its own pod; a leader that other pods dial
    (see `leader`) binds 0.0.0.0 or the pod IP, preferably with TLS."""
    port: int = 50051
    """gRPC port; 0 picks a free one (tests; see `ready_file`)."""
    unix_socket: Path | None = None
    """Also listen on this Unix domain socket (clients dial ``unix:PATH``): for trainers in the same pod, through a
    shared volume. The TCP port stays, for probes and other pods."""
    metrics_host: str | None = None
    """Address of the Prometheus endpoint; None: the same as `host`."""
    metrics_port: int = 9464
    """Port of the Prometheus /metrics endpoint; 0 picks a free one."""
    search_workers: int = field(default_factory=default_search_workers)
    """Processes that run searches (spawned, never forked)."""
    control_workers: int = field(default_factory=default_control_workers)
    """Processes that run registrations, fallback plans and simulations."""
    search_nice: int = 0
    """Added to the search workers' nice value (0..19): a search then yields its core to the event loop, to the
    control workers and, on a shared node, to the trainer's own processes, and takes what they leave idle. But
    the worker's own work after the search (encoding the plan, sending it back) is on the answer's path and
    yields too (docs/benchmarks.md, the planner service)."""
    queue_size: int = 64
    """Searches that may wait for a worker; past it, requests get RESOURCE_EXHAUSTED."""
    budget_ms: float = 500.0
    """Default planning budget per batch (a job's own budget, set at registration, takes precedence)."""
    max_budget_ms: float = 60_000.0
    """Largest budget a job or request may ask for."""
    compare_baselines: tuple[str, ...] = ("1f1b",)
    """Baselines simulated on every batch for the predicted-speedup metric and the plan header."""
    grace_s: float = 10.0
    """On SIGTERM, how long in-flight requests may take before they are cancelled."""
    max_message_bytes: int = 16 * MiB
    """Largest request the service accepts (INVALID_ARGUMENT past it); the transport refuses twice this size
    with RESOURCE_EXHAUSTED before the service sees it."""
    max_jobs: int = 64
    """Registered jobs kept; the least recently used beyond this are forgotten."""
    plan_cache_size: int = 256
    """Searched plans kept per job for repeated batch signatures (temporal reuse)."""
    plan_window: int = 16
    """Iterations per (job, data-parallel replica) whose plans are kept so every rank gets the same one (the
    ranks of a pipeline run in lockstep, so a few iterations of prefetch is all a window must cover)."""
    limits: BatchLimits = field(default_factory=BatchLimits)
    """Largest batches accepted."""
    tls: TLSConfig | None = None
    """None: plaintext (the sidecar default: loopback only)."""
    reflection: bool = True
    """Register gRPC server reflection (grpcurl and friends)."""
    stage_refit: bool = False
    """Also refit per-(module, pass) stage costs from ReportTimings' per-action times (`jobs.JobState.
    fold_stage_timings`). Off by default: replayed on the measured 4-GPU runs, factors learnt from one iteration
    helped some schedules' predictions and hurt others' (`benchmarks/gpu/semu_replay.py`, docs/gpu.md section 6);
    the makespan refit runs either way."""
    leader: str | None = None
    """host:port of the sidecar that plans for this job; set: this sidecar forwards every PlannerService call
    there (follower), so every rank of a pipeline runs the plan one planner made."""
    leader_ca_file: Path | None = None
    """PEM CA of the leader's certificate; set: dial the leader over TLS (with this server's certificate as
    the client identity when `tls` is set, for a leader that requires mutual TLS)."""
    ready_file: Path | None = None
    """Written (JSON: pid, ports, worker pids) once the service is SERVING; removed on exit."""
    delivery_trace: Path | None = None
    """Record each streamed answer's way through the service and write it here on stop (`delivery_trace`)."""
    idle_gc: bool = True
    """Collect garbage when requests and answers pause, not when allocations pass a threshold (`idle_gc`)."""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")
        _check(0 <= self.metrics_port <= 65535, f"metrics port must be in 0..65535, got {self.metrics_port}")
        _check(self.search_workers >= 1, f"search workers must be at least 1, got {self.search_workers}")
        _check(self.control_workers >= 1, f"control workers must be at least 1, got {self.control_workers}")
        _check(0 <= self.search_nice <= 19, f"search nice must be in 0..19, got {self.search_nice}")
        _check(self.queue_size >= 0, f"queue size must not be negative, got {self.queue_size}")
        _check(self.budget_ms > 0, f"budget must be positive, got {self.budget_ms} ms")
        _check(
            self.budget_ms <= self.max_budget_ms,
            f"budget ({self.budget_ms} ms) must not exceed the largest budget ({self.max_budget_ms} ms)",
        )
        _check(self.grace_s >= 0, f"grace period must not be negative, got {self.grace_s} s")
        _check(
            self.max_message_bytes >= 64 * 1024,
            f"max message bytes must be at least 65536, got {self.max_message_bytes}",
        )
        _check(self.max_jobs >= 1, f"max jobs must be at least 1, got {self.max_jobs}")
        _check(self.plan_cache_size >= 0, f"plan cache size must not be negative, got {self.plan_cache_size}")
        _check(self.plan_window >= 1, f"plan window must be at least 1, got {self.plan_window}")
        unknown = [b for b in self.compare_baselines if b not in BASELINES]
        _check(not unknown, f"unknown baseline(s) {unknown}; choose from {sorted(BASELINES)}")
        _check(
            self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            f"log level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}",
        )
        if self.unix_socket is not None:
            parent = Path(self.unix_socket).parent
            _check(parent.is_dir(), f"unix socket: no such directory '{parent}'")
            # sun_path holds 107 bytes and a terminating zero
            _check(
                len(str(self.unix_socket).encode()) <= 107,
                f"unix socket path longer than 107 bytes: '{self.unix_socket}'",
            )
        if self.leader is not None:
            _check(":" in self.leader, f"leader must be host:port, got {self.leader!r}")
        if self.leader_ca_file is not None:
            _check(self.leader is not None, "leader CA given without a leader")
            _check(Path(self.leader_ca_file).is_file(), f"leader CA: no such file '{self.leader_ca_file}'")

    @property
    def address(self) -> str:
        return _join(self.host, self.port)

    @property
    def metrics_address(self) -> str:
        return self.metrics_host if self.metrics_host is not None else self.host

    @property
    def follower(self) -> bool:
        return self.leader is not None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# ---- flags and environment -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Option:
    flag: str
    env: str
    dest: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


OPTIONS: tuple[_Option, ...] = (
    _Option("--host", "PIPEWEAVER_HOST", "host", str, "address to bind (default 127.0.0.1: a sidecar)"),
    _Option("--port", "PIPEWEAVER_PORT", "port", int, "gRPC port (default 50051; 0: any free port)"),
    _Option(
        "--unix-socket",
        "PIPEWEAVER_UNIX_SOCKET",
        "unix_socket",
        Path,
        "also listen on this Unix domain socket (clients dial unix:PATH)",
        "PATH",
    ),
    _Option("--metrics-host", "PIPEWEAVER_METRICS_HOST", "metrics_host", str, "metrics address (default: --host)"),
    _Option("--metrics-port", "PIPEWEAVER_METRICS_PORT", "metrics_port", int, "Prometheus port (default 9464)"),
    _Option(
        "--workers",
        "PIPEWEAVER_WORKERS",
        "search_workers",
        int,
        "search worker processes (default: usable cores - control workers, less one from 16 cores; usable: the "
        "CPU affinity capped by the cgroup CPU limit)",
    ),
    _Option(
        "--control-workers",
        "PIPEWEAVER_CONTROL_WORKERS",
        "control_workers",
        int,
        "worker processes for registrations, fallbacks and simulations (default: 1 per 16 usable cores)",
    ),
    _Option(
        "--search-nice",
        "PIPEWEAVER_SEARCH_NICE",
        "search_nice",
        int,
        "added to the search workers' nice value, 0..19 (default 0; higher: searches yield their cores)",
    ),
    _Option("--queue-size", "PIPEWEAVER_QUEUE_SIZE", "queue_size", int, "searches that may wait (default 64)"),
    _Option("--budget-ms", "PIPEWEAVER_BUDGET_MS", "budget_ms", float, "default planning budget per batch"),
    _Option("--max-budget-ms", "PIPEWEAVER_MAX_BUDGET_MS", "max_budget_ms", float, "largest budget accepted"),
    _Option(
        "--compare-baselines",
        "PIPEWEAVER_COMPARE_BASELINES",
        "compare_baselines",
        _names,
        "comma-separated baselines simulated per batch (default 1f1b)",
        "NAMES",
    ),
    _Option("--grace-s", "PIPEWEAVER_GRACE_S", "grace_s", float, "shutdown grace period in seconds (default 10)"),
    _Option(
        "--max-message-bytes",
        "PIPEWEAVER_MAX_MESSAGE_BYTES",
        "max_message_bytes",
        int,
        "largest request accepted (default 16 MiB)",
    ),
    _Option("--max-jobs", "PIPEWEAVER_MAX_JOBS", "max_jobs", int, "registered jobs kept (default 64)"),
    _Option("--plan-cache-size", "PIPEWEAVER_PLAN_CACHE_SIZE", "plan_cache_size", int, "plans cached per job"),
    _Option("--plan-window", "PIPEWEAVER_PLAN_WINDOW", "plan_window", int, "iterations kept per replica"),
    _Option("--max-microbatches", "PIPEWEAVER_MAX_MICROBATCHES", "max_microbatches", int, "microbatches per batch"),
    _Option(
        "--max-documents",
        "PIPEWEAVER_MAX_DOCUMENTS",
        "max_documents_per_microbatch",
        int,
        "documents per microbatch",
    ),
    _Option("--max-media", "PIPEWEAVER_MAX_MEDIA", "max_media_per_microbatch", int, "media items per microbatch"),
    _Option(
        "--max-tokens-per-media", "PIPEWEAVER_MAX_TOKENS_PER_MEDIA", "max_tokens_per_media", int, "tokens per item"
    ),
    _Option("--tls-cert", "PIPEWEAVER_TLS_CERT", "tls_cert", Path, "PEM server certificate (enables TLS)", "FILE"),
    _Option("--tls-key", "PIPEWEAVER_TLS_KEY", "tls_key", Path, "PEM server private key", "FILE"),
    _Option(
        "--tls-client-ca",
        "PIPEWEAVER_TLS_CLIENT_CA",
        "tls_client_ca",
        Path,
        "PEM CA that client certificates must chain to (enables mutual TLS)",
        "FILE",
    ),
    _Option("--reflection", "PIPEWEAVER_REFLECTION", "reflection", _bool, "server reflection (default true)"),
    _Option(
        "--stage-refit",
        "PIPEWEAVER_STAGE_REFIT",
        "stage_refit",
        _bool,
        "refit per-stage costs from reported action times (default false)",
    ),
    _Option(
        "--leader",
        "PIPEWEAVER_LEADER",
        "leader",
        str,
        "host:port of the job's planning sidecar; forward every call there (follower mode)",
        "ADDR",
    ),
    _Option("--leader-ca", "PIPEWEAVER_LEADER_CA", "leader_ca_file", Path, "PEM CA of the leader (TLS)", "FILE"),
    _Option(
        "--ready-file", "PIPEWEAVER_READY_FILE", "ready_file", Path, "write ports and pids here once SERVING", "FILE"
    ),
    _Option(
        "--delivery-trace",
        "PIPEWEAVER_DELIVERY_TRACE",
        "delivery_trace",
        Path,
        "record per-answer timestamps of streamed plans; written here on stop (latency studies)",
        "FILE",
    ),
    _Option(
        "--idle-gc",
        "PIPEWEAVER_IDLE_GC",
        "idle_gc",
        _bool,
        "collect garbage between bursts of requests instead of inside them (default true)",
    ),
    _Option("--log-level", "PIPEWEAVER_LOG_LEVEL", "log_level", str, "DEBUG, INFO, WARNING or ERROR"),
)

_LIMIT_FIELDS = (
    "max_microbatches",
    "max_documents_per_microbatch",
    "max_media_per_microbatch",
    "max_tokens_per_media",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` flags; each also reads its PIPEWEAVER_* variable (the flag wins)."""
    for o in OPTIONS:
        metavar = o.metavar or o.flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(o.flag, dest=o.dest, default=None, metavar=metavar, help=f"{o.help} [env {o.env}]")


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """A `ServerConfig` from parsed flags, falling back to `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for o in OPTIONS:
        raw: str | None = getattr(args, o.dest, None)
        source = o.flag
        if raw is None and o.env in env:
            raw, source = env[o.env], o.env
        if raw is None:
            continue
        try:
            values[o.dest] = o.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return config_from_values(values)


def config_from_values(values: Mapping[str, Any]) -> ServerConfig:
    """A `ServerConfig` from the flat option names of `OPTIONS` (TLS and batch limits grouped here)."""
    flat = dict(values)
    limits = BatchLimits(**{k: flat.pop(k) for k in _LIMIT_FIELDS if k in flat})
    cert, key, client_ca = flat.pop("tls_cert", None), flat.pop("tls_key", None), flat.pop("tls_client_ca", None)
    tls = None
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        tls = TLSConfig(cert_file=cert, key_file=key, client_ca_file=client_ca)
    elif client_ca is not None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS plus client certificates)")
    for name in _LIMIT_FIELDS:
        if getattr(limits, name) < 1:
            raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(limits, name)}")
    return ServerConfig(**flat, limits=limits, tls=tls)

"""Startup, readiness and shutdown of `pipeweaver serve`.

Order matters: the worker pool is spawned before any gRPC object exists; the port opens with liveness ("")
SERVING and readiness (pipeweaver.v1.PlannerService) NOT_SERVING; readiness turns SERVING once every worker has
warmed up (and goes back to NOT_SERVING while a crashed pool is replaced). On SIGTERM or SIGINT: readiness goes
NOT_SERVING for good, open streams stop taking requests, in-flight requests get `grace_s` to finish, then the
pool shuts down and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import disable_created_metrics, start_http_server

from pipeweaver.cores import affinity_cores, cgroup_cpu_limit, usable_cores
from pipeweaver.server import delivery_trace, heap
from pipeweaver.server.config import ServerConfig
from pipeweaver.server.forward import ForwardingService, leader_channel
from pipeweaver.server.idle_gc import IdleCollector
from pipeweaver.server.loop_lag import LoopLagMonitor
from pipeweaver.server.metrics import Metrics, MetricsInterceptor
from pipeweaver.server.planning import Planning
from pipeweaver.server.pool import Lane, WorkerPool
from pipeweaver.server.service import SERVICE_NAME, PlannerService, add_planner_service

log = logging.getLogger("pipeweaver.server")

WARM_UP_TIMEOUT_S = 600.0
"""First start on a machine compiles the numba kernels (cached on disk afterwards)."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(Exception):
    """The server could not start (port in use, bad certificate, worker warm-up failed)."""


def grpc_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return [
        # The service refuses requests over max_message_bytes itself (INVALID_ARGUMENT with a field violation);
        # the transport only stops what is far beyond it.
        ("grpc.max_receive_message_length", 2 * config.max_message_bytes),
        ("grpc.max_send_message_length", 4 * config.max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # A second server on a busy port must fail, not share it.
        ("grpc.so_reuseport", 0),
    ]


def _bind_unix(path: Path, add: Callable[[str], int]) -> None:
    """Listen on the Unix socket `path` too (`add`: the server's add-port call), replacing a socket file a previous
    server left (a file that is not a socket is refused, not removed)."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise StartupError(f"cannot bind unix:{path}: a file that is not a socket is there")
        path.unlink()
    if add(f"unix:{path}") == 0:
        raise StartupError(f"cannot bind unix:{path}")


class PlannerServer:
    """One planner (or follower) service: its pool, gRPC server, health, metrics endpoint."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.port = 0
        self.metrics_port = 0
        self.pool: WorkerPool | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # untyped submodule
        self._service: PlannerService | ForwardingService | None = None
        self._leader: grpc.aio.Channel | None = None
        self._metrics_http: Any = None
        self._serving = False
        self._stopping = False
        self._readiness: asyncio.Task[None] | None = None
        self._ready_reported: bool | None = None
        """The readiness PlannerService's health last reported (None: not yet)."""
        self._planning: Planning | None = None
        self._collector: IdleCollector | None = None
        self._loop_lag: LoopLagMonitor | None = None

    # ---- startup ----
    async def start(self) -> None:
        cfg = self.config
        if not cfg.follower:
            # Spawned before any gRPC object exists (spawn is safe anyway; fork would not be).
            self.pool = WorkerPool(
                cfg.search_workers,
                cfg.queue_size,
                control_workers=cfg.control_workers,
                search_nice=cfg.search_nice,
                on_change=self._lane_changed,
                on_restart=self._lane_restarted,
            )
            self.pool.spawn()
        server = grpc.aio.server(interceptors=[MetricsInterceptor(self.metrics)], options=grpc_options(cfg))
        self._server = server
        if self.pool is not None:
            self._planning = Planning(cfg, self.pool, self.metrics)
            service: PlannerService | ForwardingService = PlannerService(cfg, self._planning)
        else:
            self._leader = leader_channel(cfg)
            service = ForwardingService(self._leader)
        self._service = service
        add_planner_service(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if cfg.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = self._bind(server)
        await self._health.set(health.OVERALL_HEALTH, SERVING)
        await self._health.set(SERVICE_NAME, NOT_SERVING)
        await server.start()
        try:
            http, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_address, registry=self.metrics.registry)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {cfg.metrics_address}:{cfg.metrics_port}: {exc}") from exc
        self._metrics_http = http
        self.metrics_port = int(http.server_port)
        log.info(
            "listening on %s:%d%s (%s), metrics on %s:%d; %s",
            cfg.host,
            self.port,
            f" and unix:{cfg.unix_socket}" if cfg.unix_socket is not None else "",
            "mutual TLS" if cfg.tls and cfg.tls.mutual else "TLS" if cfg.tls else "plaintext",
            cfg.metrics_address,
            self.metrics_port,
            f"forwarding to the leader at {cfg.leader}"
            if cfg.follower
            else f"warming up {cfg.search_workers} search and {cfg.control_workers} control workers "
            f"({usable_cores()} usable cores: affinity {affinity_cores()}, CPU limit {cgroup_cpu_limit() or 'none'})",
        )
        if self.pool is not None:
            try:
                await self.pool.warmed(WARM_UP_TIMEOUT_S)
            except Exception as exc:
                raise StartupError(f"worker warm-up failed: {type(exc).__name__}: {exc}") from exc
        else:
            assert self._leader is not None
            await self._leader_ready()
        # What exists now (modules, gRPC, protobuf descriptors) lives as long as the server: keep it out of the
        # collector's full passes (one took 23 ms of the event loop, which may be in the middle of a burst).
        gc.collect()
        gc.freeze()
        if cfg.idle_gc:
            self._collector = IdleCollector()
            self._collector.start()
        self._loop_lag = LoopLagMonitor(self.metrics.loop_lag)
        self._loop_lag.start()
        self._serving = True
        if cfg.delivery_trace is not None:
            delivery_trace.start()
        await self._health.set(SERVICE_NAME, SERVING)
        self._ready_reported = True
        self._write_ready_file()
        log.info("serving %s", SERVICE_NAME)

    def _bind(self, server: grpc.aio.Server) -> int:
        cfg = self.config
        try:
            if cfg.tls is None:
                port = server.add_insecure_port(cfg.address)
                if cfg.unix_socket is not None:
                    _bind_unix(Path(cfg.unix_socket), server.add_insecure_port)
            else:
                creds = grpc.ssl_server_credentials(
                    [(Path(cfg.tls.key_file).read_bytes(), Path(cfg.tls.cert_file).read_bytes())],
                    root_certificates=(
                        Path(cfg.tls.client_ca_file).read_bytes() if cfg.tls.client_ca_file is not None else None
                    ),
                    require_client_auth=cfg.tls.mutual,
                )
                port = server.add_secure_port(cfg.address, creds)
                if cfg.unix_socket is not None:
                    _bind_unix(Path(cfg.unix_socket), lambda address: server.add_secure_port(address, creds))
        except RuntimeError as exc:
            raise StartupError(f"cannot bind {cfg.address}: {exc}") from exc
        if port == 0:
            raise StartupError(f"cannot bind {cfg.address}")
        return port

    async def _leader_ready(self) -> None:
        assert self._leader is not None
        while True:
            try:
                await asyncio.wait_for(self._leader.channel_ready(), 5.0)
                return
            except TimeoutError:
                log.info("waiting for the leader at %s", self.config.leader)

    def _write_ready_file(self) -> None:
        path = self.config.ready_file
        if path is None:
            return
        data = {
            "pid": os.getpid(),
            "port": self.port,
            "unix_socket": str(self.config.unix_socket) if self.config.unix_socket is not None else None,
            "metrics_port": self.metrics_port,
            "follower": self.config.follower,
            "search_worker_pids": list(self.pool.search.pids) if self.pool else [],
            "control_worker_pids": list(self.pool.control.pids) if self.pool else [],
        }
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)

    # ---- readiness after a worker crash ----
    def _lane_changed(self, lane: Lane) -> None:
        self.metrics.queue_depth.labels(lane=lane.name).set(lane.waiting)
        self.metrics.workers_busy.labels(lane=lane.name).set(lane.running)
        if not self._serving or self._stopping or self.pool is None:
            return
        # A task only when readiness changed (a pool broke, its replacement warmed): this runs at every search's
        # submission and end, and a task each time cost the event loop in the middle of a burst of requests.
        idle = self._readiness is None or self._readiness.done()
        if idle and self.pool.ready != self._ready_reported:
            self._readiness = asyncio.get_running_loop().create_task(self._sync_readiness())

    def _lane_restarted(self, lane: Lane) -> None:
        self.metrics.worker_restarts.labels(lane=lane.name).inc()
        if self._planning is not None and not self._stopping:
            self._planning.rewarm(lane.name)

    async def _sync_readiness(self) -> None:
        # Until what is reported is true: readiness may change again while the health service is told.
        while self.pool is not None and not self._stopping and self.pool.ready != self._ready_reported:
            ready = self.pool.ready
            await self._health.set(SERVICE_NAME, SERVING if ready else NOT_SERVING)
            self._ready_reported = ready

    # ---- shutdown ----
    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.config.grace_s if grace_s is None else grace_s
        self._stopping = True
        log.info("shutting down (grace %.1f s)", grace)
        await self._health.enter_graceful_shutdown()
        if self._service is not None:
            self._service.drain()
        if self._server is not None:
            await self._server.stop(grace)
        if self.pool is not None:
            await self.pool.close(timeout_s=max(grace, 1.0))
        if self._leader is not None:
            await self._leader.close(None)
        if self._collector is not None:
            await self._collector.stop()
        if self._loop_lag is not None:
            await self._loop_lag.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self.config.delivery_trace is not None and delivery_trace.events is not None:
            written = delivery_trace.stop(self.config.delivery_trace)
            log.info("delivery trace: %d events in %s", written, self.config.delivery_trace)
        if self.config.ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                Path(self.config.ready_file).unlink()
        log.info("stopped")


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT; 0 after a clean shutdown, 1 when startup failed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = PlannerServer(config)
    try:
        starting = asyncio.create_task(server.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while warming up
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()
            await stopping
    except StartupError as exc:
        log.error("%s", exc)
        await server.stop(0)
        return 1
    except Exception:
        log.exception("the server failed to start")
        await server.stop(0)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    await server.stop()
    return 0


def run(config: ServerConfig) -> int:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series: noise here
    # Numba threads per worker: one (workers are the parallelism); inherited by the spawned workers.
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    heap.keep_heap_pages()  # each search result arrives in a fresh ~330 KB buffer
    return asyncio.run(serve(config))

"""The core's front-end processes (`pipeweaver serve --frontends N`): the public port, their start, their
replacement when one dies, their stop. What they do is in `frontend.py`; how they talk to the core in `relay.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

from pipeweaver.server.config import ServerConfig
from pipeweaver.server.frontend import run_frontend
from pipeweaver.server.relay import CoreRelay

log = logging.getLogger("pipeweaver.server")

START_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5


class FrontendStartError(Exception):
    """A front-end did not come up (its port, its certificate, its link)."""


def free_port(host: str, port: int) -> int:
    """`port` if nothing holds it (0: one the kernel picks), checked by binding without SO_REUSEPORT: front-ends
    share the port with each other, and must not join another server's."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise FrontendStartError(f"cannot bind {host}:{port}: {exc.strerror}") from None
        return int(probe.getsockname()[1])


class FrontendGroup:
    """N spawned front-end processes on one public port, linked to this core's Unix socket."""

    def __init__(self, config: ServerConfig, relay: CoreRelay, on_restart: Callable[[], None]) -> None:
        self._config = config
        self._relay = relay
        self._on_restart = on_restart
        self._dir = Path(tempfile.mkdtemp(prefix="pipeweaver-"))  # 0700: only this user reaches the core
        self.core_address = f"unix:{self._dir / 'core.sock'}"
        self.port = 0
        self._procs: list[BaseProcess] = []
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def _spawn(self, index: int) -> BaseProcess:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
        proc = ctx.Process(
            target=run_frontend,
            args=(self._config, self.core_address, self.port, index),
            name=f"pipeweaver-frontend-{index}",
            daemon=True,
        )
        proc.start()
        return proc

    async def start(self) -> None:
        """Spawn them and wait until each has bound the port and linked to the core."""
        self.port = free_port(self._config.host, self._config.port)
        self._procs = [self._spawn(i) for i in range(self._config.frontends)]
        until = time.monotonic() + START_TIMEOUT_S
        while len(self._relay.links) < len(self._procs):
            dead = [p for p in self._procs if p.exitcode is not None]
            if dead:
                raise FrontendStartError(f"front-end {dead[0].name} exited with {dead[0].exitcode} (see its log)")
            if time.monotonic() > until:
                raise FrontendStartError(f"front-ends did not link to the core in {START_TIMEOUT_S:.0f} s")
            self._relay.connected.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._relay.connected.wait(), 0.2)
        self._watch = asyncio.get_running_loop().create_task(self._replace_dead())

    async def _replace_dead(self) -> None:
        """A front-end that dies takes its connections with it (their clients reconnect to the others); a new
        one takes its place."""
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for i, proc in enumerate(self._procs):
                if proc.exitcode is not None and not self._stopping:
                    log.error("front-end %s exited with %s; starting a new one", proc.name, proc.exitcode)
                    self._procs[i] = self._spawn(i)
                    self._on_restart()

    async def stop(self, grace_s: float) -> None:
        """After the core drained: wait for the front-ends' streams to end (up to `grace_s`), end the links, and
        give the processes a few seconds to stop their servers."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        until = time.monotonic() + grace_s
        while self._relay.busy() and time.monotonic() < until:
            await asyncio.sleep(0.05)
        self._relay.close()
        for proc in self._procs:
            await asyncio.to_thread(proc.join, max(until - time.monotonic(), 0.0) + 5.0)
            if proc.exitcode is None:
                log.warning("front-end %s did not stop; killing it", proc.name)
                proc.kill()
                await asyncio.to_thread(proc.join, 5.0)
        shutil.rmtree(self._dir, ignore_errors=True)

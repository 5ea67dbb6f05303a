"""A task of the server's event loop that runs until stopped (the idle collector, the loop-lag monitor)."""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod


class LoopTask(ABC):
    """`start` on the running loop, `stop` cancels the task and waits for it (idempotent); subclasses write `_run`."""

    task_name = "loop-task"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @abstractmethod
    async def _run(self) -> None:
        """The task's body: runs until `stop` cancels it."""

"""Heartbeat: extends the leases of running jobs well before they expire.

Every ``lease_duration / 3`` the leases of all running jobs are extended, one call per queue,
pipelined. A lease that Redis reports lost (recovered by another server while this one
stalled) is abandoned at once: the handler is cancelled (async) or told through its context
(sync), and its result is never committed. A lease that could not be extended before it
surely expired is abandoned the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from .. import _faults, _ops
from .._ops import Call
from ..errors import QsyncError
from ._jobs import Job
from .config import ServerConfig

if TYPE_CHECKING:
    from ..aio import AsyncQueue

__all__ = ["Heartbeat"]

log = logging.getLogger("qsync.server")


class Heartbeat:
    """Extends the leases of the jobs in ``running``."""

    def __init__(self, queue: AsyncQueue, config: ServerConfig, running: dict[Job, Job]) -> None:
        self._queue = queue
        self._config = config
        self._running = running

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until ``stop`` is set."""
        interval = self._config.heartbeat_interval
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
                return
            except TimeoutError:
                pass
            await self.beat()

    async def beat(self) -> None:
        """Extend every running job's lease once."""
        jobs = [job for job in self._running.values() if not job.abandoned]
        if not jobs:
            return
        _faults.hit("during_heartbeat")
        by_queue: dict[str, list[Job]] = defaultdict(list)
        for job in jobs:
            by_queue[job.task.queue].append(job)
        lease_ms = int(self._config.lease_duration * 1000)
        calls: list[Call[Any]] = [
            _ops.extend(self._queue.keys(q), group, lease_ms) for q, group in by_queue.items()
        ]
        sent_at = time.monotonic()
        try:
            results = await self._queue.run_calls(calls)
        except QsyncError as exc:
            results = [exc] * len(calls)
        for group, result in zip(by_queue.values(), results, strict=True):
            if isinstance(result, QsyncError):
                log.warning("heartbeat failed for %d tasks: %s", len(group), result)
                continue
            for job, held in zip(group, result, strict=True):
                if held:
                    job.lease_expiry = sent_at + self._config.lease_duration
                    job.ctx._lease_expiry = job.lease_expiry
                elif job.outcome is None:
                    log.warning("lease on task %s was lost; cancelling its handler", job.id)
                    job.abandon("lease lost")
        now = time.monotonic()
        for job in jobs:
            if job.lease_expiry <= now and job.outcome is None:
                log.warning("lease on task %s could not be extended in time; cancelling its handler", job.id)
                job.abandon("lease expired")

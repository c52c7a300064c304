"""Sweeper: the periodic per-queue upkeep every server does, pipelined across queues.

- promote: due scheduled and retrying tasks -> pending (every ``poll_interval``, or sooner
  when the next due time is nearer);
- recover: expired leases -> retry or archived (every ``recover_interval``);
- trim: completed tasks past retention and old archived tasks are forgotten (every minute).

Each script is bounded and safe to run from many servers at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import _ops
from .._ops import Call, PromoteResult, RecoverResult
from ..errors import QsyncError
from .config import ServerConfig

if TYPE_CHECKING:
    from ..aio import AsyncQueue

__all__ = ["Sweeper"]

log = logging.getLogger("qsync.server")
TRIM_INTERVAL = 60.0
BATCH = 1000


class Sweeper:
    """Runs promote, recover and trim for the server's queues."""

    def __init__(self, queue: AsyncQueue, config: ServerConfig) -> None:
        self._queue = queue
        self._config = config
        self.stats = {"promoted": 0, "recovered": 0, "archived": 0}

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep until ``stop`` is set."""
        next_recover = next_trim = 0.0
        backoff = 0.0
        while not stop.is_set():
            now = time.monotonic()
            do_recover, do_trim = now >= next_recover, now >= next_trim
            try:
                more = await self.sweep(recover=do_recover, trim=do_trim)
                backoff = 0.0
            except QsyncError as exc:
                backoff = min(5.0, backoff * 2 or 0.1)
                log.warning("queue upkeep failed, retrying in %.1fs: %s", backoff, exc)
                more = False
            if do_recover:
                next_recover = now + (self._config.recover_interval or 1.0)
            if do_trim:
                next_trim = now + TRIM_INTERVAL
            wait = backoff or (0.0 if more else self._config.poll_interval)
            try:
                await asyncio.wait_for(stop.wait(), min(wait, max(0.0, next_recover - time.monotonic())))
            except TimeoutError:
                pass

    async def sweep(self, *, recover: bool = True, trim: bool = False) -> bool:
        """One round for every queue; True when a batch came back full (more to do now)."""
        config = self._config
        calls: list[Call[Any]] = []
        for name in config.queues:
            keys = self._queue.keys(name)
            calls.append(_ops.promote(keys, BATCH))
            if recover:
                calls.append(_ops.recover(keys, BATCH, config.max_recoveries, 0))
            if trim:
                max_age = int(config.archived_max_age * 1000)
                calls.append(_ops.trim(keys, BATCH, max_age, config.archived_max_count))
        more = False
        for result in await self._queue.run_calls(calls):
            if isinstance(result, QsyncError):
                raise result
            if isinstance(result, PromoteResult):
                self.stats["promoted"] += result.promoted
                more |= result.promoted >= BATCH
            elif isinstance(result, RecoverResult):
                self.stats["recovered"] += result.retried + result.archived
                self.stats["archived"] += result.archived
                more |= result.retried + result.archived >= BATCH
                if result.retried or result.archived:
                    log.info("recovered %d expired leases (%d archived)", result.retried + result.archived,
                             result.archived)  # fmt: skip
        return more

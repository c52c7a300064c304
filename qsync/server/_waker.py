"""Waker: wakes an idle processor within milliseconds of new work, without polling.

Scripts that make work ready (enqueue, promote, requeue, and lease when it leaves work behind)
push a token onto the queue's wake list ``{<prefix>:<queue>}:wake`` (capped at one entry).
While the processor is idle, one blocking ``BRPOP`` per queue waits on its own wake list (one
key per command, so it works unchanged on Redis Cluster). While the processor is busy nobody
listens, so a busy fleet pays nothing for wake-ups.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis
import redis.asyncio as aioredis

__all__ = ["Waker"]

log = logging.getLogger("qsync.server")


class Waker:
    """Per-queue blocking listeners, active only while :attr:`idle` is set."""

    def __init__(
        self, client: aioredis.Redis | aioredis.RedisCluster, wake_keys: list[str], block_s: float
    ) -> None:
        self._client = client
        self._wake_keys = wake_keys
        self._block_s = max(0.1, block_s)
        self.idle = asyncio.Event()
        self.work = asyncio.Event()
        self._listeners: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start one listener per queue."""
        loop = asyncio.get_running_loop()
        self._listeners = [loop.create_task(self._listen(key)) for key in self._wake_keys]

    async def stop(self) -> None:
        """Stop the listeners and close their connections."""
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        if isinstance(self._client, aioredis.Redis):
            await self._client.aclose()

    async def wait(self, timeout: float) -> None:
        """Wait (idle) until a wake-up arrives or ``timeout`` seconds pass."""
        self.work.clear()
        self.idle.set()
        try:
            await asyncio.wait_for(self.work.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.idle.clear()

    async def _listen(self, key: str) -> None:
        backoff = 0.0
        while True:
            await self.idle.wait()
            try:
                reply: Any = await self._client.execute_command("BRPOP", key, self._block_s)
                backoff = 0.0
            except (redis.ConnectionError, redis.TimeoutError, OSError, redis.ResponseError) as exc:
                backoff = min(5.0, backoff * 2 or 0.1)
                log.debug("wake-up listener on %s failed, retrying in %.1fs: %s", key, backoff, exc)
                await asyncio.sleep(backoff)
                continue
            if reply:
                self.work.set()

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
        self._closing = False

    def start(self) -> None:
        """Start one listener per queue."""
        loop = asyncio.get_running_loop()
        self._listeners = [loop.create_task(self._listen(key)) for key in self._wake_keys]

    async def stop(self) -> None:
        """Stop the listeners and close their connections."""
        # redis-py may turn the cancellation of a blocked BRPOP into a connection error, which
        # the listener's retry loop would swallow: the flag ends the loop whatever it sees.
        self._closing = True
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        if isinstance(self._client, aioredis.Redis):
            await self._client.aclose()

    async def wait(self, timeout: float) -> None:
        """Wait (idle) until a wake-up arrives or ``timeout`` seconds pass.

        A wake-up that arrived since the last wait (say, during the lease round that found
        nothing) returns at once: ``work`` is cleared only here, right before the caller looks
        again, so no signal falls between a look and the next wait.
        """
        self.idle.set()
        try:
            await asyncio.wait_for(self.work.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.work.clear()
            self.idle.clear()

    def poke(self) -> None:
        """Wake the waiting processor now (used to stop an idle server at once)."""
        self.work.set()

    async def _listen(self, key: str) -> None:
        backoff = 0.0
        while not self._closing:
            await self.idle.wait()
            try:
                reply: Any = await self._client.execute_command("BRPOP", key, self._block_s)
                backoff = 0.0
            except (redis.ConnectionError, redis.TimeoutError, OSError, redis.ResponseError) as exc:
                if self._closing:
                    return
                backoff = min(5.0, backoff * 2 or 0.1)
                log.debug("wake-up listener on %s failed, retrying in %.1fs: %s", key, backoff, exc)
                await asyncio.sleep(backoff)
                continue
            if reply:
                self.work.set()

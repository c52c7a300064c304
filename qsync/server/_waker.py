"""Waker: wakes an idle processor within milliseconds of new work, without polling.

Scripts that make work ready (enqueue, promote, requeue, and lease when it leaves work behind)
push a token onto the queue's wake list ``{<prefix>:<queue>}:wake`` (capped at one entry).
While the processor is idle, one blocking ``BRPOP`` per queue waits on its own wake list (one
key per command, so it works unchanged on Redis Cluster). A listener that delivered a wake-up
listens again only once the processor is idle again, so a busy server does not take the tokens
that would wake an idle one; tokens stay in Redis until popped, so none is lost meanwhile.

This is the idle pick-up path, so each hop counts: a listener keeps one connection of its own
(no pool checkout per BRPOP) and wakes the processor by resolving the future it awaits.
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
        self._woken = False  # a wake-up arrived since the processor last looked
        self._waiter: asyncio.Future[None] | None = None
        self._listeners: list[asyncio.Task[None]] = []
        self._connections: dict[str, Any] = {}  # wake key -> the listener's own connection
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
        nothing) returns at once: the flag is cleared only here, right before the caller looks
        again, so no signal falls between a look and the next wait.
        """
        if not self._woken:
            loop = asyncio.get_running_loop()
            # A bare future and a timer, not asyncio.wait_for: a wake-up resumes the processor
            # in one event-loop step, with no task created per wait.
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _resolve, waiter)
            self.idle.set()
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
                self.idle.clear()
        self._woken = False

    def poke(self) -> None:
        """Wake the waiting processor now (also used to stop an idle server at once)."""
        self._woken = True
        # Not idle from now on: no listener re-arms before the processor has looked and waits.
        self.idle.clear()
        if self._waiter is not None:
            _resolve(self._waiter)

    async def _listen(self, key: str) -> None:
        pop = self._pop if isinstance(self._client, aioredis.Redis) else self._pop_cluster
        backoff = 0.0
        while not self._closing:
            await self.idle.wait()
            try:
                reply = await pop(key)
                backoff = 0.0
            except (redis.ConnectionError, redis.TimeoutError, OSError, redis.ResponseError) as exc:
                if self._closing:
                    return
                backoff = min(5.0, backoff * 2 or 0.1)
                log.debug("wake-up listener on %s failed, retrying in %.1fs: %s", key, backoff, exc)
                await asyncio.sleep(backoff)
                continue
            if reply:
                self.poke()

    async def _pop(self, key: str) -> Any:
        """BRPOP on a connection this listener keeps: taken from the listener client's pool
        once and never given back, so closing the client closes it. A connection error leaves
        it disconnected; the next send reconnects."""
        conn = self._connections.get(key)
        if conn is None:
            assert isinstance(self._client, aioredis.Redis)
            pool = self._client.connection_pool
            conn = self._connections[key] = await pool.get_connection()  # type: ignore[no-untyped-call]
        await conn.send_command("BRPOP", key, self._block_s)
        return await conn.read_response()

    async def _pop_cluster(self, key: str) -> Any:
        return await self._client.execute_command("BRPOP", key, self._block_s)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)

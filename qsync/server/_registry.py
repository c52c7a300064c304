"""Registry: each live server says who it is, with a TTL, for inspection tools.

``{<prefix>}:servers`` is a zset of server ids scored by when their entry expires (ms), and
``{<prefix>}:server:<id>`` a JSON string with host, pid, queues, concurrency, start time and
tasks in flight, with a TTL of three intervals. Both are only an index, never the truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from .._keys import registry_key
from .._ops import Call
from ..errors import QsyncError
from .config import ServerConfig

if TYPE_CHECKING:
    from ..aio import AsyncQueue

__all__ = ["Registry"]

log = logging.getLogger("qsync.server")


class Registry:
    """Writes and removes this server's registry entry."""

    def __init__(self, queue: AsyncQueue, config: ServerConfig, in_flight: Callable[[], int]) -> None:
        self._queue = queue
        self._config = config
        self._in_flight = in_flight
        self.server_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._started = time.time()
        self._index = registry_key(queue.prefix, "servers")
        self._entry = registry_key(queue.prefix, "server:" + self.server_id)

    def _calls(self, alive: bool) -> list[Call[None]]:
        ttl = self._config.registry_interval * 3
        if not alive:
            return [
                Call("registry", "", (self._index,), ("ZREM", self._index, self.server_id), _ignore),
                Call("registry", "", (self._entry,), ("DEL", self._entry), _ignore),
            ]
        config = self._config
        info = {
            "id": self.server_id, "host": socket.gethostname(), "pid": os.getpid(), "queues": config.queues,
            "concurrency": config.concurrency, "strict": config.strict, "started": self._started,
            "in_flight": self._in_flight(),
        }  # fmt: skip
        expires = int((time.time() + ttl) * 1000)
        entry = ("SET", self._entry, json.dumps(info), "PX", int(ttl * 1000))
        return [
            Call("registry", "", (self._index,), ("ZADD", self._index, expires, self.server_id), _ignore),
            Call("registry", "", (self._entry,), entry, _ignore),
        ]

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh the entry until ``stop``; then remove it."""
        while not stop.is_set():
            await self._write(alive=True)
            try:
                await asyncio.wait_for(stop.wait(), self._config.registry_interval)
            except TimeoutError:
                pass
        await self._write(alive=False)

    async def _write(self, *, alive: bool) -> None:
        try:
            results = await self._queue.run_calls(self._calls(alive))
        except (QsyncError, redis.RedisError) as exc:
            results = [exc]
        for result in results:
            if isinstance(result, Exception):
                log.debug("server registry update failed: %s", result)


def _ignore(reply: object) -> None:
    return None

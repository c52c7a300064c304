"""Workers of the peer queues for ``make bench-peers``: SAQ and arq, each with a no-op job and
a probe that reports its enqueue-to-start latency the way ``bench_app.py`` does for qsync.

Usage: ``python peer_apps.py saq|arq REDIS_URL CONCURRENCY``; runs until terminated. Each
peer runs with its own defaults apart from concurrency (arq's ``max_jobs``): arq finds new jobs
by polling every ``poll_delay`` (0.5 s by default), which is its design, not a setting chosen
against it here.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import redis.asyncio as aioredis

SAQ_QUEUE = "peers"
_client: aioredis.Redis | None = None
_latency_key = ""


def latency_key(system: str) -> str:
    """Where the probe of ``system`` pushes its latencies (seconds, as text)."""
    return f"peers:latency:{system}"


async def noop(ctx: Any) -> None:
    """Does nothing: the queue's own cost is what is measured."""


async def probe(ctx: Any, *, stamp: str) -> None:
    """Records the enqueue-to-start latency: ``stamp`` is the producer's time.time()."""
    started = time.time()
    assert _client is not None
    await _client.rpush(_latency_key, repr(started - float(stamp)))


def run_saq(url: str, concurrency: int) -> None:
    from saq import Queue, Worker

    async def main() -> None:
        queue = Queue.from_url(url, name=SAQ_QUEUE)
        await Worker(queue, functions=[noop, probe], concurrency=concurrency).start()

    asyncio.run(main())


def run_arq(url: str, concurrency: int) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker

    Worker(functions=[noop, probe], redis_settings=RedisSettings.from_dsn(url), max_jobs=concurrency).run()


if __name__ == "__main__":
    system, url, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    _client, _latency_key = aioredis.Redis.from_url(url), latency_key(system)
    {"saq": run_saq, "arq": run_arq}[system](url, concurrency)
    os._exit(0)

"""Handlers for ``make bench``: a no-op task, and a probe that reports when its handler started.

The probe's payload is the producer's ``time.time()`` taken just before ``enqueue``; the handler
pushes the difference to a list under the benchmark's own prefix, so the runner can read the
enqueue-to-start latency (producer and worker share this machine's clock)."""

from __future__ import annotations

import os
import time

import redis.asyncio as aioredis

import qsync

mux = qsync.Mux()
_client = aioredis.Redis.from_url(os.environ["QSYNC_REDIS_URL"])
LATENCY_KEY = "{" + os.environ["QSYNC_PREFIX"] + ":bench}:latency"


@mux.handle("bench:noop")
async def noop(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """Does nothing: the queue's own cost is what is measured."""


@mux.handle("bench:probe")
async def probe(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """Records the enqueue-to-start latency in seconds."""
    started = time.time()
    await _client.rpush(LATENCY_KEY, repr(started - float(task.payload)))

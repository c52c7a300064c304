"""Handlers for the demo fleet (``make demo``): each records its execution in Redis under the
demo's own keys, so the producer can check that nothing was lost."""

from __future__ import annotations

import asyncio
import os
import random

import redis.asyncio as aioredis

import qsync

mux = qsync.Mux()
_client = aioredis.Redis.from_url(os.environ["QSYNC_REDIS_URL"])
_book = "{" + os.environ["QSYNC_PREFIX"] + ":demo}"


async def _record(task: qsync.LeasedTask) -> None:
    pipe = _client.pipeline(transaction=False)
    pipe.hincrby(_book + ":runs", task.id, 1)
    pipe.rpush(_book + ":order", task.queue)
    await pipe.execute()


@mux.handle("demo:work")
async def work(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """A short task."""
    await asyncio.sleep(random.uniform(0.002, 0.02))
    await _record(task)


@mux.handle("demo:slow")
async def slow(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """A long task: the killed worker is sure to hold some of these."""
    await asyncio.sleep(random.uniform(0.8, 1.5))
    await _record(task)


@mux.handle("demo:flaky")
async def flaky(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """Fails its first attempt, then succeeds on retry."""
    if task.retried == 0:
        raise ConnectionError("flaky upstream (first attempt fails on purpose)")
    await _record(task)


@mux.handle("demo:doomed")
def doomed(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """Always fails (a plain def, so it runs in the thread pool): archived when out of retries."""
    raise ValueError("this task always fails (on purpose)")

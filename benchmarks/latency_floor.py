"""The floor for ``make bench``'s latency figures: the idle pick-up path with nothing else.

One asyncio process makes only the hops an idle qsync worker makes: a ``BRPOP`` on the queue's
wake list with one ``EVALSHA`` of qsync's lease script sent right behind it on the same
connection (no pool; Redis runs the lease as soon as the BRPOP returns), read as the server's
listeners read it (``qsync.server._link``), then one coroutine per leased task that reports its
latency as ``bench_app``'s probe does and acks its task. No heartbeats, timeouts, weights,
reservations or registry. ``run.py`` measures it with the same producer as the worker server,
in turns with it, so the difference is what the server's machinery costs.

Usage: ``python latency_floor.py REDIS_URL PREFIX``; prints ``ready`` once it listens and runs
until terminated.
"""

from __future__ import annotations

import asyncio
import sys
import time

import redis.asyncio as aioredis

import qsync
from qsync import _ops
from qsync._protocol import Exchange
from qsync.server._link import Link

LEASE_BATCH = 100
LEASE_MS = 60_000


async def main(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    queue = qsync.new(client, prefix=prefix)
    keys = queue.keys("default")
    latency_key = "{" + prefix + ":bench}:latency"
    script = _ops.lease(keys, LEASE_BATCH, LEASE_MS).script
    assert script is not None
    await client.script_load(script.source)
    await queue.run_calls([])  # the server check, before listening
    listen = Link(await client.connection_pool.get_connection())  # kept, never released
    await listen.connect()
    assert listen.taken_over
    loop = asyncio.get_running_loop()

    async def probe(task: qsync.LeasedTask) -> None:
        started = time.time()
        await client.rpush(latency_key, repr(started - float(task.payload)))
        await queue.ack("default", [task])

    print("ready", flush=True)
    while True:
        call = _ops.lease(keys, LEASE_BATCH, LEASE_MS)
        # Blocks 1 s at most: well inside the connection's socket timeout (redis-py's default, 5 s).
        replies = await listen.roundtrip(Exchange([("BRPOP", keys.wake, 1), call.command()], keys.wake))
        batch = call.decode(replies[1])
        for task in batch.tasks:
            loop.create_task(probe(task))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

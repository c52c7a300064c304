"""The floor for ``make bench``'s latency figures: the idle pick-up path with nothing else.

One asyncio process makes only the hops an idle qsync worker makes: a ``BRPOP`` on the queue's
wake list with one ``EVALSHA`` of qsync's lease script sent right behind it on the same
connection (no pool; Redis runs the lease as soon as the BRPOP returns), then one coroutine per
leased task that reports its latency as ``bench_app``'s probe does and acks its task. No
heartbeats, timeouts, weights, reservations or registry. ``run.py`` measures it with the same
producer as the worker server, so the difference is what the server's machinery costs.

Usage: ``python latency_floor.py REDIS_URL PREFIX``; prints ``ready`` once it listens and runs
until terminated.
"""

from __future__ import annotations

import asyncio
import sys
import time

import hiredis
import redis.asyncio as aioredis

import qsync
from qsync import _ops

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
    listen = await client.connection_pool.get_connection()  # kept, never released
    loop = asyncio.get_running_loop()

    async def probe(task: qsync.LeasedTask) -> None:
        started = time.time()
        await client.rpush(latency_key, repr(started - float(task.payload)))
        await queue.ack("default", [task])

    print("ready", flush=True)
    while True:
        call = _ops.lease(keys, LEASE_BATCH, LEASE_MS)
        await listen.send_packed_command(
            [hiredis.pack_command(("BRPOP", keys.wake, 5)), hiredis.pack_command(call.command())]
        )
        await listen.read_response()
        batch = call.decode(await listen.read_response(disable_decoding=True))
        for task in batch.tasks:
            loop.create_task(probe(task))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

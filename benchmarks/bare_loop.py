"""The Python ceiling for draining: a bare asyncio loop on qsync's core calls.

It leases a batch with one script call, runs a no-op coroutine per task and acks the batch
with one script call, with none of the server's features (no heartbeats, timeouts, weights,
wake-ups, registry). The full server is judged against this loop's rate, measured in the same
run. Usage: ``python bare_loop.py REDIS_URL PREFIX QUEUE BATCH``; it stops when the queue is
empty and prints the number of tasks it acked, the seconds it took (from its first lease) and
the CPU seconds this process spent meanwhile."""

from __future__ import annotations

import asyncio
import sys
import time

import redis.asyncio as aioredis

import qsync


async def _noop(task: qsync.LeasedTask) -> None:
    return None


async def main(url: str, prefix: str, queue_name: str, batch: int) -> tuple[int, float, float]:
    client = aioredis.Redis.from_url(url)
    queue = qsync.new(client, prefix=prefix)
    await queue.run_calls([])  # connect and check the server before the clock starts
    done = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        while True:
            leased = await queue.lease(queue_name, count=batch, lease_duration=60)
            if not leased.tasks:
                return done, time.perf_counter() - started, time.process_time() - cpu_started
            for task in leased.tasks:
                await _noop(task)
            done += sum(await queue.ack(queue_name, leased.tasks))
    finally:
        await client.aclose()


if __name__ == "__main__":
    url, prefix, queue_name, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    done, elapsed, cpu = asyncio.run(main(url, prefix, queue_name, batch))
    print(done, elapsed, cpu)

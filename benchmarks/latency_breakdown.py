"""Where an idle pick-up's time goes: the hops of ``latency_floor.py``, each stamped.

A probe's payload is the producer's ``time.time()``; the producer also stamps the moment its
enqueue reaches the socket, and the worker (the floor's path: a ``BRPOP`` with the lease behind
it, on a taken-over connection) stamps the moment the reply's bytes arrive, the moment its
round trip returns and the handler's start. Probes run 2 ms apart (the machine warm) and ~50 ms
apart (its cores idle), in turns with the machine floor (``peers/machine_floor.py``: a raw
socket in ``BRPOP``, no queue). Medians in ms, from the probe's stamp:

    producer -> send | send -> bytes at the worker | -> round trip done | -> handler | floor

Diagnostic only (it patches two methods to stamp them); ``make bench`` is the judge.
Usage: ``python benchmarks/latency_breakdown.py [PROBES]``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

import qsync
from qsync import _ops, _takeover
from qsync._protocol import Exchange
from qsync.server._link import Link

HERE = Path(__file__).resolve().parent
LEASE_MS = 60_000


async def worker(url: str, prefix: str) -> None:
    """The floor's pick-up path, stamping each step; pushes "data done handler" per probe."""
    arrived = [0.0]
    data_received = _takeover.Replies.data_received

    def stamped(self: _takeover.Replies, data: bytes) -> None:
        arrived[0] = time.time()
        data_received(self, data)

    _takeover.Replies.data_received = stamped  # type: ignore[method-assign]
    client = aioredis.Redis.from_url(url)
    queue = qsync.new(client, prefix=prefix)
    keys = queue.keys("default")
    script = _ops.lease(keys, 100, LEASE_MS).script
    assert script is not None
    await client.script_load(script.source)  # the lease rides behind BRPOP as an EVALSHA
    await queue.run_calls([])
    link = Link(await client.connection_pool.get_connection())
    await link.connect()
    loop = asyncio.get_running_loop()

    async def probe(task: qsync.LeasedTask, data_at: float, done_at: float) -> None:
        started = time.time()
        stamp = float(task.payload)
        await client.rpush(
            f"{prefix}:breakdown", f"{data_at - stamp!r} {done_at - stamp!r} {started - stamp!r}"
        )
        await queue.ack("default", [task])

    print("ready", flush=True)
    while True:
        call = _ops.lease(keys, 100, LEASE_MS)
        replies = await link.roundtrip(Exchange([("BRPOP", keys.wake, 1), call.command()], keys.wake))
        done_at = time.time()
        for task in call.decode(replies[1]).tasks:
            loop.create_task(probe(task, arrived[0], done_at))


def main(probes: int) -> None:
    sys.path.insert(0, str(HERE))
    from run import PrivateRedis

    bench = PrivateRedis()
    prefix = f"breakdown-{uuid.uuid4().hex[:6]}"
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", bench.url, prefix], stdout=subprocess.PIPE, text=True
        ),
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "peers" / "machine_floor.py"),
                str(bench.port),
                "floor:wake",
                "floor:lat",
            ],
            stdout=subprocess.PIPE,
            text=True,
        ),
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("latency_breakdown: a helper process did not start")
        client = redis.Redis(port=bench.port)
        queue = qsync.new(client, prefix=prefix)
        sent = [0.0]
        conn = client.connection_pool.get_connection()
        client.connection_pool.release(conn)
        send = type(conn).send_packed_command

        def stamped(self: Any, *args: Any, **kwargs: Any) -> None:
            sent[0] = sent[0] or time.time()  # the enqueue's send, not the BLPOP's after it
            send(self, *args, **kwargs)

        type(conn).send_packed_command = stamped  # type: ignore[method-assign]
        for label, gap in (("warm (2 ms apart)", 0.002), ("idle (~50 ms apart)", 0.05)):
            rows = []
            for _ in range(probes):
                sent[0], stamp = 0.0, time.time()
                queue.enqueue(qsync.Task("bench:probe", repr(stamp).encode()))
                reply = client.blpop([f"{prefix}:breakdown"], timeout=10)
                assert reply is not None, "a probe was not picked up within 10 s"
                steps = [float(x) * 1000 for x in reply[1].split()]
                time.sleep(random.uniform(gap * 0.8, gap * 1.2))
                client.lpush("floor:wake", repr(time.time()))
                floor = client.blpop(["floor:lat"], timeout=10)
                assert floor is not None, "the machine floor did not answer within 10 s"
                rows.append([(sent[0] - stamp) * 1000, *steps, float(floor[1]) * 1000])
                time.sleep(random.uniform(gap * 0.8, gap * 1.2))
            m = [statistics.median(column) for column in zip(*rows, strict=True)]
            print(
                f"{label:20} producer->send {m[0]:.3f}  ->bytes at worker {m[1]:.3f}  ->round trip done "
                f"{m[2]:.3f}  ->handler {m[3]:.3f}  | machine floor {m[4]:.3f} ms"
            )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        bench.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        asyncio.run(worker(sys.argv[2], sys.argv[3]))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)

"""``python -m tests.chaos.runner``: a worker server like ``qsync worker tests.chaos.app:mux``, for
the server options the command line does not expose (``recover_interval``, ``max_recoveries``...).

Reads ``QSYNC_REDIS_URL``, ``QSYNC_PREFIX`` and ``QSYNC_CHAOS_SERVER`` (a JSON object of
:class:`qsync.ServerConfig` fields) from the environment, runs
``qsync.new(redis.asyncio.Redis.from_url(url)).run(mux, **options)`` and stops gracefully on
SIGTERM/SIGINT, as the command line does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal

import redis.asyncio as aioredis

import qsync
from tests.chaos.app import mux


async def main() -> None:
    options = json.loads(os.environ.get("QSYNC_CHAOS_SERVER", "{}"))
    client = aioredis.Redis.from_url(os.environ["QSYNC_REDIS_URL"])
    queue = qsync.new(client, prefix=os.environ["QSYNC_PREFIX"])
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        logging.getLogger("qsync").info("received %s, stopping gracefully", signal.Signals(signum).name)
        if not stopping:
            stopping.append(loop.create_task(queue.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await queue.run(mux, **options)
    finally:
        await client.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main())

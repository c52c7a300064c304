"""Server: wires the worker's components (processor, committer, heartbeat, sweeper, waker,
registry) around one AsyncQueue and runs them until stopped. It has no Redis logic of its own:
every Redis operation is a call built by the core (``qsync._ops``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from .. import _ops
from .._ops import LeasedTask
from .._protocol import raise_first
from ..errors import InvalidArgumentType, QsyncError
from ..mux import Handler, Mux
from ._committer import Committer
from ._heartbeat import Heartbeat
from ._jobs import Job
from ._processor import Processor
from ._registry import Registry
from ._sweeper import Sweeper
from ._waker import Waker
from .config import ServerConfig

if TYPE_CHECKING:
    from ..aio import AsyncQueue

__all__ = ["Server"]

log = logging.getLogger("qsync.server")

# Once the jobs are settled, the upkeep still under way at a stop (a registry write, the entry's
# removal, a sweep) gets this long: against an unresponsive Redis each call would wait out its
# socket timeout and retries (a minute in all). An entry left behind expires with its TTL, and a
# sweep is only housekeeping that the next server repeats.
UPKEEP_STOP_S = 2.0


def as_mux(handler: Mux | Handler) -> Mux:
    """A Mux for ``handler``: a Mux as is, or one routing every task type to one callable."""
    if isinstance(handler, Mux):
        return handler
    if not callable(handler):
        raise InvalidArgumentType(f"pass a qsync.Mux or a handler callable, not {type(handler).__name__}")
    mux = Mux()
    mux.not_found(handler)
    return mux


class Server:
    """A worker server on one AsyncQueue. Use ``AsyncQueue.run`` or ``Queue.start`` rather
    than this class directly."""

    def __init__(self, queue: AsyncQueue, handler: Mux | Handler, config: ServerConfig) -> None:
        self.queue = queue
        self.config = config
        self.mux = as_mux(handler)
        self._stop = asyncio.Event()
        # Heartbeats, sweeping and the registry outlive the stop request: running jobs keep
        # their leases through the grace period, so these stop only once the jobs are settled.
        self._background_stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix="qsync-handler"
        )
        self.mux.bind(self._executor)
        self.waker = Waker(
            queue,
            _listener_client(queue.client, config.poll_interval),
            list(config.queues),
            config.poll_interval,
            config.lease_duration,
        )
        self.committer = Committer(queue, self._settle)
        self.processor = Processor(queue, self.mux, config, self.committer.submit, self.waker)
        self.heartbeat = Heartbeat(queue, config, self.processor.running)
        self.sweeper = Sweeper(queue, config)
        self.registry = Registry(queue, config, lambda: len(self.processor.running))

    def _settle(self, job: Job, committed: bool) -> None:
        self.processor.settle(job, committed)

    @property
    def stats(self) -> dict[str, int]:
        """Counters: leased, succeeded, failed, lost, promoted, recovered, archived."""
        return {**self.processor.stats, **self.sweeper.stats}

    def request_stop(self) -> None:
        """Begin a graceful stop (call from the server's event loop)."""
        self._stop.set()
        self.processor.stop_leasing()
        self.waker.poke()

    async def wait_stopped(self) -> None:
        """Wait until :meth:`run` has finished its graceful stop."""
        await self._stopped.wait()

    async def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Check the Redis server, then run until :meth:`request_stop` (or cancellation), then
        stop gracefully. ``on_started`` is called once the components run. A stop requested
        before that is honoured: the server then starts nothing."""
        keys = [self.queue.keys(q) for q in self.config.queues]
        try:
            # The first call of a queue also checks the server (version, eviction policy).
            raise_first(
                await self.queue.run_calls([_ops.register_queue(self.queue.prefix, k.queue) for k in keys])
            )
        except BaseException:
            await self._release()
            raise
        if self._stop.is_set():
            await self._release()
            return
        log.info("qsync server %s: queues %s, concurrency %d", self.registry.server_id,
                 self.config.queues, self.config.concurrency)  # fmt: skip
        loop = asyncio.get_running_loop()
        self.waker.start(self.processor.arm, self.processor.deliver)
        background = [
            loop.create_task(self.heartbeat.run(self._background_stop)),
            loop.create_task(self.sweeper.run(self._background_stop)),
            loop.create_task(self.registry.run(self._background_stop)),
        ]
        processor = loop.create_task(self.processor.run())
        if on_started is not None:
            on_started()
        try:
            await self._stop.wait()
        finally:
            self.request_stop()
            await asyncio.shield(self._shutdown(processor, background))

    async def _shutdown(self, processor: asyncio.Task[None], background: list[asyncio.Task[None]]) -> None:
        try:
            await processor
        except (QsyncError, asyncio.CancelledError):
            pass
        # Listeners that carry a lease return it first; what it brought in goes straight back.
        await self.waker.stop()
        if self.processor.handback:
            await self._hand_back(self.processor.handback)
        await self._finish_running()
        self._background_stop.set()
        _, late = await asyncio.wait(background, timeout=UPKEEP_STOP_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self._release()
        log.info("qsync server %s stopped: %s", self.registry.server_id, self.stats)

    async def _release(self) -> None:
        """Close the listener connections and the handler threads; mark the server stopped."""
        await self.waker.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    async def _finish_running(self) -> None:
        """Let running jobs finish within the grace period; hand the rest back at once."""
        running = self.processor.running
        grace = self.config.shutdown_timeout
        deadline = asyncio.get_running_loop().time() + grace
        while running and asyncio.get_running_loop().time() < deadline:
            runners = [j.runner for j in running.values() if j.runner is not None and not j.runner.done()]
            if runners:
                await asyncio.wait(runners, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
            await self.committer.drain(max(0.0, deadline - asyncio.get_running_loop().time()))
            if not runners and running:
                await asyncio.sleep(0.01)
        unfinished = [job for job in running.values() if job.outcome is None]
        for job in unfinished:
            job.abandon("worker shutting down")
        if unfinished:
            await self._requeue(unfinished)
        await self.committer.drain(min(2.0, self.config.lease_duration))

    async def _requeue(self, jobs: list[Job]) -> None:
        await self._hand_back([job.task for job in jobs])
        for job in jobs:
            self.processor.settle(job, False)

    async def _hand_back(self, tasks: list[LeasedTask]) -> None:
        """Put leased tasks back at the front of their queues without counting an attempt."""
        by_queue: dict[str, list[LeasedTask]] = {}
        for task in tasks:
            by_queue.setdefault(task.queue, []).append(task)
        calls = [_ops.requeue(self.queue.keys(q), group) for q, group in by_queue.items()]
        try:
            results: list[Any] = await self.queue.run_calls(calls)
        except QsyncError as exc:
            results = [exc] * len(calls)
        for group, result in zip(by_queue.values(), results, strict=True):
            if isinstance(result, QsyncError):
                log.warning("could not hand %d tasks back (%s); they return when their leases expire",
                            len(group), result)  # fmt: skip
            else:
                log.info("handed %d unfinished tasks back to queue %s", sum(result), group[0].queue)


def _listener_client(client: Any, block_s: float) -> Any:
    """A client for the blocking wake-up listeners: its own connections, so a BRPOP never holds
    one the queue needs, with a socket timeout longer than the block."""
    if isinstance(client, aioredis.Redis):
        pool = client.connection_pool
        kwargs = {**pool.connection_kwargs, "socket_timeout": block_s + 5}
        # from_pool: the client owns the pool, so closing the client closes its connections.
        return aioredis.Redis.from_pool(
            aioredis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
        )
    return client

"""The worker entry points on the queue classes: ``await AsyncQueue.run(...)`` and the sync
``Queue.start(...)`` / ``Queue.stop()`` (a server on its own thread and event loop)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.retry
from redis import connection as sync_conn
from redis.asyncio import connection as async_conn

from ..errors import InvalidArgument, InvalidArgumentType, QsyncError
from ..mux import Handler, Mux
from .config import ServerConfig
from .server import Server

if TYPE_CHECKING:
    from ..aio import AsyncQueue
    from ..client import Queue

__all__ = ["AsyncServing", "SyncServing"]


class AsyncServing:
    """``run`` and ``stop`` for :class:`~qsync.AsyncQueue`."""

    _server: Server | None = None

    async def run(self, handler: Mux | Handler, **options: Any) -> None:
        """Process tasks until :meth:`stop` is awaited (or this coroutine is cancelled), then
        stop gracefully: lease nothing more, let running tasks finish within
        ``shutdown_timeout``, and hand the rest back to their queues at once.

        Args:
            handler: a :class:`~qsync.Mux`, or one callable for every task type.
            **options: :class:`~qsync.ServerConfig` fields, e.g. ``queues={"critical": 6,
                "default": 3, "low": 1}``, ``concurrency=50``, ``lease_duration=30``.

        Raises:
            InvalidArgument, InvalidArgumentType: bad options (before anything starts).
            ConfigurationError: the Redis server is unsafe for qsync.
        """
        queue: AsyncQueue = self  # type: ignore[assignment]
        config = ServerConfig(**options)
        if self._server is not None:
            raise InvalidArgument("this queue is already running a server")
        # Set before the first await, so a stop() that races the start is never lost.
        self._server = server = Server(queue, handler, config)
        try:
            await server.run()
        finally:
            self._server = None

    async def stop(self) -> None:
        """Stop the server started by :meth:`run` gracefully and wait until it has stopped."""
        server = self._server
        if server is not None:
            server.request_stop()
            await server.wait_stopped()


class SyncServing:
    """``start``, ``stop`` and ``run`` for the sync :class:`~qsync.Queue`."""

    _thread: _ServerThread | None = None

    def start(self, handler: Mux | Handler, **options: Any) -> None:
        """Start a worker server in the background and return once it runs.

        The server runs on its own thread and event loop with its own asyncio Redis client
        (made from this client's connection settings); plain ``def`` handlers run in a thread
        pool of ``concurrency`` threads, ``async def`` handlers on the server's loop.

        Args:
            handler: a :class:`~qsync.Mux`, or one callable for every task type.
            **options: :class:`~qsync.ServerConfig` fields (queues, concurrency, ...).

        Raises:
            InvalidArgument, InvalidArgumentType: bad options.
            ConfigurationError, RedisUnavailable: Redis is unsafe or unreachable.
        """
        queue: Queue = self  # type: ignore[assignment]
        if self._thread is not None and self._thread.is_alive():
            raise InvalidArgument("this queue is already running a server; call stop() first")
        config = ServerConfig(**options)
        from ..aio import AsyncQueue

        aqueue = AsyncQueue(
            _async_twin(queue.client), prefix=queue.prefix, max_payload_bytes=queue.max_payload_bytes,
            check_server=not queue._server_checked,
        )  # fmt: skip
        thread = _ServerThread(aqueue, handler, config)
        thread.start()
        thread.started.wait()
        if thread.error is not None:
            thread.join()
            raise thread.error
        self._thread = thread

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background server gracefully; block until it has stopped (or ``timeout``)."""
        thread = self._thread
        if thread is not None:
            thread.request_stop()
            thread.join(timeout)
            if not thread.is_alive():
                self._thread = None

    def run(self, handler: Mux | Handler, **options: Any) -> None:
        """Run a worker server in this thread until :meth:`stop` is called from another thread
        or KeyboardInterrupt, then stop gracefully."""
        self.start(handler, **options)
        thread = self._thread
        assert thread is not None
        try:
            while thread.is_alive():
                thread.join(0.5)
        finally:
            self.stop()

    @property
    def server_stats(self) -> dict[str, int]:
        """The running server's counters (empty when none runs)."""
        thread = self._thread
        return dict(thread.server.stats) if thread is not None and thread.server is not None else {}


class _ServerThread(threading.Thread):
    def __init__(self, queue: AsyncQueue, handler: Mux | Handler, config: ServerConfig) -> None:
        super().__init__(name="qsync-server", daemon=True)
        self.queue = queue
        self.handler = handler
        self.config = config
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.server: Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            self.server = Server(self.queue, self.handler, self.config)
            await self.server.run(on_started=self.started.set)
        except (QsyncError, redis.RedisError, OSError) as exc:
            if self.started.is_set():
                raise
            self.error = exc
        finally:
            self.started.set()
            await _close(self.queue.client)

    def request_stop(self) -> None:
        loop, server = self.loop, self.server
        if loop is not None and server is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(server.request_stop)
            except RuntimeError:  # the loop already finished
                pass


async def _close(client: Any) -> None:
    await client.aclose()


_CONNECTION_TWINS: dict[type, type] = {
    sync_conn.Connection: async_conn.Connection,
    sync_conn.SSLConnection: async_conn.SSLConnection,
    sync_conn.UnixDomainSocketConnection: async_conn.UnixDomainSocketConnection,
}


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= set(inspect.signature(init).parameters)
    return {k: v for k, v in kwargs.items() if k in names}


def _async_twin(client: Any) -> aioredis.Redis | aioredis.RedisCluster:
    """An asyncio client with the same connection settings as a sync one (host, password,
    TLS, database, timeouts), for the server's own event loop."""
    if isinstance(client, redis.RedisCluster):
        node = client.get_default_node()  # type: ignore[no-untyped-call]
        # The async cluster client takes connection settings as its own keyword arguments.
        kwargs = _accepted(aioredis.RedisCluster, dict(client.nodes_manager.connection_kwargs))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("host", "port", "startup_nodes")}
        return aioredis.RedisCluster(host=node.host, port=node.port, **kwargs)
    if not isinstance(client, redis.Redis):
        raise InvalidArgumentType(f"cannot start a server on {type(client).__name__}")
    pool = client.connection_pool
    twin = getattr(pool, "async_twin", None)
    if callable(twin):  # a test double (e.g. qsync.testing) can provide its own
        return twin()  # type: ignore[no-any-return]
    cls = _CONNECTION_TWINS.get(pool.connection_class)
    if cls is None:
        raise InvalidArgumentType(
            f"cannot start a server on a client with {pool.connection_class.__name__}; "
            "use qsync.new(redis.asyncio.Redis(...)) and await queue.run(...) instead"
        )
    kwargs = _accepted(cls, dict(pool.connection_kwargs))
    if isinstance(kwargs.get("retry"), redis.retry.Retry):
        # The same policy in its asyncio form (redis-py >= 8.2 converts a sync one itself, with
        # a UserWarning at every server start).
        sync_retry = kwargs["retry"]
        predicate = getattr(sync_retry, "_is_retryable", None)  # newer redis-py only
        kwargs["retry"] = aioredis.retry.Retry(
            sync_retry._backoff, sync_retry._retries, sync_retry._supported_errors,
            **({"is_retryable": predicate} if predicate is not None else {}),
        )  # fmt: skip
    # from_pool: the twin owns its pool, so closing the twin closes its connections.
    return aioredis.Redis.from_pool(aioredis.ConnectionPool(connection_class=cls, **kwargs))

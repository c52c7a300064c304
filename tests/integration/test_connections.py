"""How a queue borrows connections: it keeps one idle connection of the client's pool as a spare
(a single call then skips the pool's checkout), and must give it back on ``close()`` and when
the queue is dropped without it, never use a socket the server closed, and never touch a
parent's socket after a fork. Pools with a small ``max_connections`` show any leak as an error.
Private Redis servers, stopped by pid; no sleeps, no timing."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import qsync
from qsync import Task, TaskState
from qsync.errors import TaskIdConflict, TaskNotFound
from tests.polling import wait_until
from tests.redis_procs import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    started = RedisServer().start()
    yield started
    started.cleanup()


def sync_client(server: RedisServer, max_connections: int) -> redis.Redis:
    # from_pool: the client owns the pool, so closing the client closes every connection.
    return redis.Redis.from_pool(redis.ConnectionPool(port=server.port, max_connections=max_connections))


def async_client(server: RedisServer, max_connections: int) -> aioredis.Redis:
    return aioredis.Redis.from_pool(
        aioredis.ConnectionPool(port=server.port, max_connections=max_connections)
    )


def every_connection_is_free(pool: redis.ConnectionPool) -> None:
    """All max_connections connections can be taken at once: the queues hold none."""
    taken = [pool.get_connection() for _ in range(pool.max_connections)]
    for conn in taken:
        pool.release(conn)


async def every_connection_is_free_async(pool: aioredis.ConnectionPool) -> None:
    taken = [await pool.get_connection() for _ in range(pool.max_connections)]  # type: ignore[no-untyped-call]
    for conn in taken:
        await pool.release(conn)


def test_queues_dropped_without_close_give_their_connection_back(server: RedisServer) -> None:
    client = sync_client(server, max_connections=1)
    try:
        for i in range(50):  # a queue per web request, never closed
            info = qsync.new(client, prefix="drop").enqueue(Task("t", b"x", task_id=f"d-{i}"))
            assert info.state is TaskState.PENDING
        every_connection_is_free(client.connection_pool)
        assert client.llen("{drop:default}:pending") == 50
    finally:
        client.close()


def test_queues_dropped_after_errors_give_their_connection_back_at_once(server: RedisServer) -> None:
    # An error's traceback must not hold the queue in a reference cycle: that would keep the
    # connection until the next garbage collection, and this pool has only one.
    client = sync_client(server, max_connections=1)
    try:
        for i in range(30):
            queue = qsync.new(client, prefix="errors")
            if i % 10 == 0:
                client.script_flush()  # NOSCRIPT replies on the way too
            queue.enqueue(Task("t", b"x", task_id=f"e-{i}"))
            try:
                queue.enqueue(Task("t", b"other content", task_id=f"e-{i}"))
            except TaskIdConflict:
                pass
            try:
                queue.info("missing")
            except TaskNotFound:
                pass
            del queue
        every_connection_is_free(client.connection_pool)
    finally:
        client.close()


def can_take_every_connection(pool: redis.ConnectionPool) -> bool:
    """every_connection_is_free as a predicate to poll (what was taken is given back)."""
    taken = []
    try:
        for _ in range(pool.max_connections):
            taken.append(pool.get_connection())
        return True
    except redis.ConnectionError:
        return False
    finally:
        for conn in taken:
            pool.release(conn)


class GuardedPool(redis.ConnectionPool):
    """A pool guarded as redis-py before 6 guards its pools: a plain Lock, which another thread
    waits for and the thread holding it cannot take again, held while the cyclic GC runs (as any
    allocation in the pool's code may run it). A release by the thread holding it is recorded
    instead of waiting for itself forever."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = threading.Lock()
        self.holder: int | None = None
        self.released_inside: list[Any] = []

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        with self.guard:
            self.holder = threading.get_ident()
            try:
                gc.collect()
                return super().get_connection(*args, **kwargs)
            finally:
                self.holder = None

    def release(self, connection: Any) -> None:
        if self.holder == threading.get_ident():
            self.released_inside.append(connection)
            super().release(connection)
            return
        with self.guard:
            super().release(connection)


class ClosesOnDel:
    """An application object in a reference cycle that closes its queue when collected."""

    def __init__(self, queue: qsync.Queue) -> None:
        self.queue = queue
        self.cycle = self

    def __del__(self) -> None:
        self.queue.close()


@pytest.mark.parametrize("ending", ["dropped", "closed by __del__"])
def test_a_queue_the_gc_ends_inside_the_pool_gives_its_connection_back_from_another_thread(
    server: RedisServer, ending: str
) -> None:
    pool = GuardedPool(port=server.port, max_connections=2)
    client = redis.Redis.from_pool(pool)
    gc.disable()  # the collections of this test are the pool's
    try:
        ended = qsync.new(client, prefix="gc")
        ended.enqueue(Task("t", b"x", task_id="g-1"))  # it keeps a spare
        if ending == "dropped":
            ended.cycle = ended  # type: ignore[attr-defined]  # only the cyclic GC frees it now
        else:
            ClosesOnDel(ended)
        del ended
        queue = qsync.new(client, prefix="gc")
        # Its checkout runs the GC inside the guard, which collects the ended queue.
        assert queue.info("g-1").state is TaskState.PENDING
        assert pool.released_inside == [], "a release inside the pool's lock, by the thread holding it"
        queue.close()
        wait_until(lambda: can_take_every_connection(pool), "the ended queue's spare back in the pool")
    finally:
        gc.enable()
        client.close()


def test_a_queue_the_gc_collects_gives_its_connection_back_without_another_call(server: RedisServer) -> None:
    client = sync_client(server, max_connections=1)
    try:
        dropped = qsync.new(client, prefix="gc1")
        dropped.enqueue(Task("t", b"x", task_id="g-1"))  # the pool's one connection is its spare
        dropped.cycle = dropped  # type: ignore[attr-defined]
        del dropped
        gc.collect()
        # No qsync call follows: the application's own commands need the connection back.
        wait_until(lambda: can_take_every_connection(client.connection_pool), "the spare back in the pool")
        assert client.llen("{gc1:default}:pending") == 1
    finally:
        client.close()


def test_a_live_queue_holds_at_most_one_connection_and_close_gives_it_back(server: RedisServer) -> None:
    client = sync_client(server, max_connections=2)
    try:
        queue = qsync.new(client, prefix="hold")
        for i in range(20):
            queue.enqueue(Task("t", b"x", task_id=f"h-{i}"))
            assert client.ping()  # the application still gets the pool's other connection
        queue.close()
        every_connection_is_free(client.connection_pool)
    finally:
        client.close()


def test_many_threads_share_one_queue_and_leave_every_connection_in_the_pool(server: RedisServer) -> None:
    client = redis.Redis.from_pool(redis.BlockingConnectionPool(port=server.port, max_connections=4))
    try:
        queue = qsync.new(client, prefix="threads")

        def produce(worker: int) -> list[TaskState]:
            return [queue.enqueue(Task("t", b"x", task_id=f"w{worker}-{i}")).state for i in range(100)]

        with ThreadPoolExecutor(8) as pool:
            states = [s for batch in pool.map(produce, range(8)) for s in batch]
        assert states == [TaskState.PENDING] * 800
        assert client.llen("{threads:default}:pending") == 800
        queue.close()
        every_connection_is_free(client.connection_pool)
    finally:
        client.close()


def test_a_spare_the_server_closed_is_replaced_before_anything_is_sent(server: RedisServer) -> None:
    client = sync_client(server, max_connections=2)
    admin = server.client()
    try:
        queue = qsync.new(client, prefix="killed")
        queue.enqueue(Task("t", b"x", task_id="k-1"))
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        # lease is never re-sent after a broken connection: had it gone out on the closed
        # socket, its reply would be lost and it would raise OutcomeUnknown.
        [leased] = queue.lease("default").tasks
        assert leased.id == "k-1"
        queue.close()
    finally:
        admin.close()
        client.close()


def _fork_with_python() -> int:
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking while other threads run; this child leaves at once.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _fork_in_c() -> int:
    # uWSGI (by default) and other C-level forkers run no os.register_at_fork hooks: the child
    # must still take its own connection, or two processes share one socket and read each
    # other's replies. PyDLL: the GIL stays held across fork().
    return int(ctypes.PyDLL(None).fork())


@pytest.mark.parametrize("fork", [_fork_with_python, _fork_in_c], ids=["os.fork", "libc-fork"])
def test_a_forked_child_never_uses_or_shuts_down_the_parents_spare(
    server: RedisServer, fork: Callable[[], int]
) -> None:
    client = sync_client(server, max_connections=4)
    admin = server.client()
    prefix = "fork" + fork.__name__  # one per way of forking: the server is the module's
    try:
        queue = qsync.new(client, prefix=prefix)
        queue.enqueue(Task("t", b"x", task_id="parent-1"))  # the parent's spare
        before = int(admin.info("stats")["total_connections_received"])
        pid = fork()
        if pid == 0:  # the child: leaves at once, whatever happens
            code = 1
            try:
                code = 0 if queue.enqueue(Task("t", b"x", task_id="child-1")).id == "child-1" else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert queue.enqueue(Task("t", b"x", task_id="parent-2")).id == "parent-2"
        # One new connection, the child's: the parent's spare was neither used nor shut down
        # by the child (a shut-down socket would have made the parent reconnect).
        assert int(admin.info("stats")["total_connections_received"]) - before == 1
        pending = admin.lrange(queue.keys("default").pending, 0, -1)
        assert sorted(pending) == [b"child-1", b"parent-1", b"parent-2"]
        queue.close()
    finally:
        admin.close()
        client.close()


async def test_async_queues_dropped_without_close_give_their_connection_back(server: RedisServer) -> None:
    client = async_client(server, max_connections=1)
    try:
        for i in range(50):
            info = await qsync.new(client, prefix="adrop").enqueue(Task("t", b"x", task_id=f"d-{i}"))
            assert info.state is TaskState.PENDING
        # A dropped queue's spare goes back to the pool in a task on the loop (a pool is
        # released by awaiting it); with one connection allowed, a new queue gets it only so.
        last = qsync.new(client, prefix="adrop")
        assert (await last.info("d-49")).state is TaskState.PENDING
        await last.close()
        await every_connection_is_free_async(client.connection_pool)
        assert await client.llen("{adrop:default}:pending") == 50
    finally:
        await client.aclose()


async def test_a_live_async_queue_holds_at_most_one_connection_and_close_gives_it_back(
    server: RedisServer,
) -> None:
    client = async_client(server, max_connections=2)
    try:
        queue = qsync.new(client, prefix="ahold")

        async def produce(worker: int) -> None:
            for i in range(20):
                await queue.enqueue(Task("t", b"x", task_id=f"w{worker}-{i}"))

        await produce(0)
        assert await client.ping()
        # Concurrent calls: one uses the spare, the other the pool's last connection.
        await asyncio.gather(produce(1), produce(2))
        assert await client.llen("{ahold:default}:pending") == 60
        await queue.close()
        await every_connection_is_free_async(client.connection_pool)
    finally:
        await client.aclose()


async def test_an_async_spare_the_server_closed_is_replaced_before_anything_is_sent(
    server: RedisServer,
) -> None:
    client = async_client(server, max_connections=2)
    admin = aioredis.Redis(port=server.port)
    try:
        queue = qsync.new(client, prefix="akilled")
        await queue.enqueue(Task("t", b"x", task_id="ak-1"))
        # Killed from this event loop (an asyncio socket learns of the close only when its
        # loop runs, as a live worker's loop does; a blocking kill would hide it).
        assert await admin.client_kill_filter(_type="normal", skipme=True) >= 1
        # As in the sync test: a lease sent on the closed socket would raise OutcomeUnknown.
        [leased] = (await queue.lease("default")).tasks
        assert leased.id == "ak-1"
        await queue.close()
    finally:
        await admin.aclose()
        await client.aclose()

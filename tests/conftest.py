"""Shared fixtures: real Redis servers started by this session, clients, queues and worker
servers on them.

Fixtures are factories or yield-and-clean-up (arq's habit), and every Redis here was started by
the test session on a free port in a temporary folder."""

from __future__ import annotations

import asyncio
import faulthandler
import itertools
import os
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import fakeredis
import pytest
import redis

import qsync
from tests.integration.test_server import Worker, worker_on
from tests.redis_procs import RedisCluster, RedisServer, require_redis_server


def pytest_configure(config: pytest.Config) -> None:
    require_redis_server()
    # The terminal's stderr, taken while capture is off: a dump written to the fd that capture
    # swaps in during a test would vanish with the process.
    config.stash[_TERMINAL_STDERR] = os.dup(2)


# pytest-timeout fails a test after its limit with one SIGALRM, which ends most hangs. Some it
# cannot end: a wait inside a finalizer the GC runs (what the alarm raises there is swallowed;
# CI once stalled on one until it was killed, without a word), a call into C that never returns
# to Python (a Lua loop under lupa), and Hypothesis replaying a failing example after the one
# alarm. Past this margin, faulthandler's own C thread prints every thread's traceback and
# ends the session.
HANG_MARGIN = 180.0
_TERMINAL_STDERR = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
    stderr = item.config.stash[_TERMINAL_STDERR]
    faulthandler.dump_traceback_later(limit + HANG_MARGIN, exit=True, file=stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session (flushed before each test that uses ``r``)."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A local three-master Redis Cluster, started on first use."""
    cluster = RedisCluster().start()
    yield cluster
    cluster.cleanup()


@pytest.fixture
def sync_worker(redis_server: RedisServer) -> Iterator[Worker]:
    """A ``Queue.start()`` worker server (the sync flavour)."""
    yield from worker_on("sync", redis_server)


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on the session's real Redis, flushed first."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


_counter = itertools.count()


@pytest.fixture(params=["redis", "fake"])
def backend(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client on real Redis, then on fakeredis (with lupa): the same test on both."""
    if request.param == "redis":
        client = redis_server.client()
        client.flushall()
    else:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


class Driven:
    """Calls an AsyncQueue's coroutine methods synchronously, so one test body covers both the
    sync Queue and the AsyncQueue (the saq contract-suite idea, with a parameter)."""

    def __init__(self, queue: qsync.AsyncQueue, loop: asyncio.AbstractEventLoop) -> None:
        self._queue = queue
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._queue, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if isinstance(result, Coroutine):
                return self._loop.run_until_complete(result)
            return result

        return call


@pytest.fixture(params=["sync", "async"])
def make_queue(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Callable[..., Any]]:
    """A factory of queues on the real Redis: a qsync.Queue, then an AsyncQueue driven
    synchronously. Same test body, both shells. The database is flushed once per test."""
    redis_server.client().flushall()
    made: list[Callable[[], None]] = []
    loop = asyncio.new_event_loop() if request.param == "async" else None

    def factory(**options: Any) -> Any:
        options.setdefault("prefix", f"t{next(_counter)}")
        client_kwargs = options.pop("client_kwargs", {})
        if loop is None:
            client = redis.Redis(port=redis_server.port, **client_kwargs)
            made.append(client.close)
            return qsync.new(client, **options)
        import redis.asyncio as aioredis

        aclient = aioredis.Redis(port=redis_server.port, **client_kwargs)
        made.append(lambda: loop.run_until_complete(aclient.aclose()))
        return Driven(qsync.new(aclient, **options), loop)

    factory.flavour = request.param  # type: ignore[attr-defined]
    yield factory
    for close in made:
        close()
    if loop is not None:
        loop.close()

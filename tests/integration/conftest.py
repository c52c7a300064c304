"""Fixtures shared by integration modules: the worker server and knobs of its waker
(test_server, test_waker, test_waker_faults), the client shells of either flavour (test_client,
test_enqueue_paths) and a Redis with a TLS port and an ACL user (test_link, test_link_attack)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from qsync._priority import allocate
from qsync.server import _processor, _waker
from tests.integration.test_client import Shell
from tests.integration.test_link import TlsRedis, next_name
from tests.integration.test_server import Worker, worker_on
from tests.redis_procs import RedisServer


@pytest.fixture(params=["sync", "async"])
def worker(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Worker]:
    yield from worker_on(request.param, redis_server)


@pytest.fixture
def aworker(redis_server: RedisServer) -> Iterator[Worker]:
    """An AsyncQueue.run worker (the server code is the same for both flavours)."""
    yield from worker_on("async", redis_server)


@pytest.fixture
def long_armed_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Armed waits block for a quarter of a SLOW lease (30 s) instead of the library's cap of
    2 s: a slot that comes back within a few seconds then came back because its wait was
    ended, not because the wait ran out."""
    monkeypatch.setattr(_waker, "MAX_LEASE_BLOCK_S", 30.0)


class _FirstInterval(random.Random):
    """A draw that always lands at the start of the first queue's interval."""

    def randrange(self, *args: Any, **kwargs: Any) -> int:
        return 0


@pytest.fixture
def first_queue_wins_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """The slot left over after the weighted split goes to the first queue with a fraction, not
    by a random draw: with weights 1000:1 the second queue would win one draw in 1001, so a test
    expecting the first to hold the idle lease would wait for a state that never came."""
    first = _FirstInterval()
    monkeypatch.setattr(_processor, "allocate", lambda free, weights, rng: allocate(free, weights, first))


@pytest.fixture
def shell(make_queue: Any) -> Iterator[Shell]:
    """Queues of the flavour (sync/async) of this run of the test, on any Redis."""
    made = Shell(make_queue.flavour)
    yield made
    made.close()


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(tmp_path_factory.mktemp("tls"))
    try:
        yield server
    finally:
        server.server.cleanup()


@pytest.fixture
def admin(tls_redis: TlsRedis) -> Iterator[redis.Redis]:
    """A plain client of ``tls_redis`` (default user, plain port), to inspect and poke it."""
    with tls_redis.server.client() as client:
        yield client


@pytest.fixture(params=["plain", "tls"])
def kind(request: pytest.FixtureRequest) -> str:
    """How a test reaches ``tls_redis``: ``plain`` (TCP, default user) or ``tls`` (TLS, ACL user)."""
    return str(request.param)


@pytest.fixture
async def named_client(tls_redis: TlsRedis, kind: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    """An asyncio client of ``tls_redis`` (TLS with the ACL user, or plain TCP) with a client
    name of its own, which tests find it by in CLIENT LIST; closed at the end."""
    name = next_name()
    client = tls_redis.client(kind, client_name=name)
    try:
        yield client, name
    finally:
        await client.aclose()

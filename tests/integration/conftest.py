"""Fixtures shared by integration modules: the worker server (test_server, test_waker,
test_waker_faults) and the client shells of either flavour (test_client, test_enqueue_paths)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_client import Shell
from tests.integration.test_server import Worker
from tests.redis_procs import RedisServer


@pytest.fixture(params=["sync", "async"])
def worker(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Worker]:
    redis_server.client().flushall()
    w = Worker(request.param, redis_server)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def shell(make_queue: Any) -> Iterator[Shell]:
    """Queues of the flavour (sync/async) of this run of the test, on any Redis."""
    made = Shell(make_queue.flavour)
    yield made
    made.close()

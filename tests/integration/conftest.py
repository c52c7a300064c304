"""Fixtures shared by the worker-server tests (test_server, test_waker, test_waker_faults)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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

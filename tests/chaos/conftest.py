"""Fixtures of the chaos tests: ``chaos`` is one test's queue (a unique prefix on the session's
``redis_server``), its worker fleet (every process stopped by pid at teardown) and its checker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Chaos
from tests.redis_procs import RedisServer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture
def chaos(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path) -> Iterator[Chaos]:
    env = Chaos(request.node.name, redis_server.url, redis_server.port, tmp_path)
    try:
        yield env
    finally:
        call = getattr(request.node, "rep_call", None)
        if call is not None and call.failed:
            print(f"\n[chaos {env.name}] prefix {env.prefix}, records in {tmp_path}" + env.diagnostics())
        env.close()


# Each chaos test waits on worker processes with deadlines of its own (start-up, drain,
# graceful stop) that add up past the suite's 120 s: its own failure, with the fleet's
# diagnostics, must come before pytest-timeout's bare one.
CHAOS_TIMEOUT = 300


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("chaos") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(CHAOS_TIMEOUT))

"""Fixtures of the Lua script tests: a queue on the session's real Redis (``env``), and the same
test on real Redis then on fakeredis (``benv``). ``Env`` and its helpers are in test_scripts."""

from __future__ import annotations

import pytest
import redis

from tests.lua.test_scripts import Env, _env


@pytest.fixture
def env(r: redis.Redis) -> Env:
    """A queue on the session's real Redis."""
    return _env(r)


@pytest.fixture
def benv(backend: redis.Redis) -> Env:
    """A queue on real Redis, then on fakeredis."""
    return _env(backend)

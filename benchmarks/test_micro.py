"""Micro-benchmarks (pytest-benchmark): each script call on a private Redis, and the sans-I/O core.

Run with ``make bench-micro``. Not part of ``make test``: speed is judged here, never asserted
in the test suite. Each script benchmark sets up its own state outside the timed call."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qsync
from qsync import _ops
from qsync._scripts import script
from tests.redis_procs import RedisServer

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    node = RedisServer().start()
    yield node
    node.cleanup()


@pytest.fixture
def queue(server: RedisServer) -> Iterator[qsync.Queue]:
    client = server.client()
    client.flushall()
    yield qsync.new(client, prefix=f"m{next(_prefixes)}")
    client.close()


def _tasks(n: int, payload_bytes: int = 16) -> list[qsync.Task]:
    return [qsync.Task("bench:noop", b"x" * payload_bytes) for _ in range(n)]


# 16: one field of a compact hash; 200: in pieces (format 3, lua/lib/payload.lua); 513: one
# field of a full hash table.
PAYLOAD_SIZES = pytest.mark.parametrize("payload_bytes", [16, 200, 513])


# --- script calls on real Redis -----------------------------------------------------------------


def test_enqueue_one(benchmark: Any, queue: qsync.Queue) -> None:
    benchmark.pedantic(queue.enqueue, setup=lambda: ((_tasks(1)[0],), {}), rounds=2000)


@PAYLOAD_SIZES
def test_enqueue_many_1000(benchmark: Any, queue: qsync.Queue, payload_bytes: int) -> None:
    benchmark.pedantic(queue.enqueue_many, setup=lambda: ((_tasks(1000, payload_bytes),), {}), rounds=50)


@PAYLOAD_SIZES
def test_lease_100(benchmark: Any, queue: qsync.Queue, payload_bytes: int) -> None:
    queue.enqueue_many(_tasks(20_000, payload_bytes))
    benchmark.pedantic(queue.lease, args=("default",), kwargs={"count": 100}, rounds=150)


def test_ack_100(benchmark: Any, queue: qsync.Queue) -> None:
    queue.enqueue_many(_tasks(20_000))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ("default", queue.lease("default", count=100).tasks), {}

    benchmark.pedantic(queue.ack, setup=setup, rounds=150)


def test_extend_100(benchmark: Any, queue: qsync.Queue) -> None:
    queue.enqueue_many(_tasks(100))
    leased = queue.lease("default", count=100).tasks
    benchmark.pedantic(queue.extend, args=("default", leased), rounds=500)


def test_fail_100(benchmark: Any, queue: qsync.Queue) -> None:
    queue.enqueue_many(_tasks(20_000))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        leased = queue.lease("default", count=100).tasks
        return ("default", [qsync.Failure(t.id, t.token, "boom", 60_000) for t in leased]), {}

    benchmark.pedantic(queue.fail, setup=setup, rounds=150)


def test_promote_nothing_due(benchmark: Any, queue: qsync.Queue) -> None:
    queue.enqueue_many([qsync.Task("bench:noop", b"x", delay=3600) for _ in range(10_000)])
    benchmark.pedantic(queue.promote, args=("default",), rounds=1000)


def test_recover_nothing_expired(benchmark: Any, queue: qsync.Queue) -> None:
    queue.enqueue_many(_tasks(1000))
    queue.lease("default", count=1000, lease_duration=3600)
    benchmark.pedantic(queue.recover, args=("default",), rounds=1000)


def test_promote_1000_due(benchmark: Any, queue: qsync.Queue) -> None:
    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        queue.enqueue_many([qsync.Task("bench:noop", b"x", delay=0.001) for _ in range(1000)])
        time.sleep(0.002)  # they are due (1 ms ahead, Redis clock)
        return ("default",), {}

    benchmark.pedantic(queue.promote, setup=setup, rounds=50)


def test_recover_1000_expired(benchmark: Any, queue: qsync.Queue) -> None:
    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        queue.enqueue_many(_tasks(1000))
        queue.lease("default", count=1000, lease_duration=0.001)
        time.sleep(0.002)  # the leases have expired
        return ("default",), {}

    benchmark.pedantic(queue.recover, setup=setup, rounds=50)


def test_requeue_100(benchmark: Any, queue: qsync.Queue) -> None:
    queue.enqueue_many(_tasks(100))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ("default", queue.lease("default", count=100).tasks), {}

    benchmark.pedantic(queue.requeue, setup=setup, rounds=150)


def test_trim_100_completed(benchmark: Any, queue: qsync.Queue) -> None:
    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        queue.enqueue_many([qsync.Task("bench:noop", b"x", retention=0.001) for _ in range(100)])
        queue.ack("default", queue.lease("default", count=100).tasks)
        time.sleep(0.002)  # their retention has ended
        return ("default",), {}

    benchmark.pedantic(queue.trim, setup=setup, rounds=150)


def test_info_one(benchmark: Any, queue: qsync.Queue) -> None:
    task_id = queue.enqueue(_tasks(1)[0]).id
    benchmark.pedantic(queue.info, args=(task_id,), rounds=2000)


def test_resume(benchmark: Any, queue: qsync.Queue) -> None:
    queue.enqueue_many(_tasks(10))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        queue.pause("default")
        return ("default",), {}

    benchmark.pedantic(queue.resume, setup=setup, rounds=1000)


def test_unblock(benchmark: Any, queue: qsync.Queue) -> None:
    call = _ops.unblock(queue.keys("default"), "bench-listener")
    benchmark.pedantic(queue.run_calls, args=([call],), rounds=1000)


# --- the sans-I/O core ----------------------------------------------------------------------------


def test_build_task(benchmark: Any) -> None:
    benchmark(qsync.Task, "bench:noop", b"x" * 16)


def test_build_enqueue_call_1000(benchmark: Any) -> None:
    keys = qsync.new(redis.Redis(port=1), check_server=False).keys("default")
    tasks = _tasks(1000)
    benchmark(lambda: _ops.enqueue_many(keys, tasks)[0].command())


def test_decode_lease_reply_100(benchmark: Any, queue: qsync.Queue) -> None:
    queue.enqueue_many(_tasks(100))
    call = _ops.lease(queue.keys("default"), 100, 30_000)
    queue.client.script_load(script("lease").source)
    reply = queue.client.execute_command(*call.command(), NEVER_DECODE=True)
    benchmark(call.decode, reply)

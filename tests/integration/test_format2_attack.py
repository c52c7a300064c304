"""The worker server with leases that share one token per lease call (commit a73b91d) and task
hashes of both formats (format 1: "v" = "1", no "o"; format 2: "o" names the options).

Nothing in the server may treat a token as naming one task: the heartbeat, the committer and the
processor key a job by its lease, the pair (id, token). One task of a call losing its lease must
cancel that task alone, and each sibling must commit its own outcome (ack, fail, retention,
unique lock) whatever format its hash has."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

import qsync
from qsync import Context, LeasedTask, Task, TaskState
from tests.integration.test_attempts import server_of, where
from tests.integration.test_server import Calls, Worker, collect_quietly
from tests.polling import wait_until


@pytest.fixture(autouse=True)
def _contain_leaked_connections() -> Iterator[None]:
    yield
    collect_quietly()


def as_format_1(w: Worker, task_id: str) -> None:
    key = w.queue.keys("default").task(task_id)
    w.client.hdel(key, "o")
    w.client.hset(key, "v", "1")


def test_one_lost_lease_of_a_shared_token_call_cancels_that_task_alone(aworker: Worker) -> None:
    started, cancelled = Calls(), Calls()
    release = threading.Event()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        started.add((task.id, task.token, task.timeout_ms, task.retry_delay_ms))
        try:
            while not release.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.add(task.id)
            raise
        if task.type == "boom":
            raise RuntimeError("boom")

    w = aworker
    lock_b = Task("t", b"b", task_id="b", unique=60, retry_delay=30)
    lock_c = Task("t", b"c", task_id="c", unique=60, retention=60, timeout=30)
    tasks = [
        Task("t", b"a", task_id="a"),
        lock_b,
        lock_c,
        Task("t", b"d", task_id="d", timeout=20),
        Task("boom", b"e", task_id="e", retry=3, retry_delay=60),
    ]
    w.queue.enqueue_many(tasks)
    as_format_1(w, "b")
    as_format_1(w, "d")
    keys = w.queue.keys("default")
    w.start(handler, concurrency=10)
    started.wait(lambda items: len(items) == 5, "all five handlers to start")
    got = {item[0]: item[1:] for item in started.items}
    # (The server may split the five over two lease calls; b must share its call's token.)
    siblings = {i for i, (token, _, _) in got.items() if token == got["b"][0]} - {"b"}
    assert len(siblings) >= 2, f"b shares its token with no more than one task: {got}"
    assert {i: (t, d) for i, (_, t, d) in got.items()} == {
        "a": (0, -1), "b": (0, 30_000), "c": (30_000, -1), "d": (20_000, -1), "e": (0, 60_000),
    }  # fmt: skip

    # Another worker took b over: only b's extend is refused, only b is abandoned.
    w.client.hset(keys.task("b"), "token", "taken-over")
    cancelled.wait(lambda items: "b" in items, "b's handler to be cancelled")
    server = server_of(w)
    # Two more heartbeats: the siblings' leases keep being extended with the shared token.
    wait_until(lambda: server.processor.stats["lost"] == 1, "b to be counted as lost")
    assert cancelled.items == ["b"]
    release.set()

    assert w.wait_state("a", None) is None
    assert w.wait_state("d", None) is None
    done = w.wait_state("c", TaskState.COMPLETED)
    assert done is not None
    retrying = w.wait_state("e", TaskState.RETRY)
    assert retrying is not None and retrying.retried == 1
    wait_until(lambda: not server.processor.running, "every job to settle")
    stats = server.processor.stats
    assert (stats["leased"], stats["lost"], stats["succeeded"], stats["failed"]) == (5, 1, 3, 1)

    assert where(w, "b") == ["active"], "b's new holder keeps it"
    assert w.client.hget(keys.task("b"), "token") == b"taken-over"
    assert w.client.get(keys.unique(lock_b.options.unique_key or "")) == b"b", "b's lock stays with b"
    assert not w.client.exists(keys.unique(lock_c.options.unique_key or "")), "c's lock is released"
    assert started.count(("b", *got["b"])) == 1 and len(started.items) == 5, "nothing ran twice"


def test_a_worker_drains_mixed_formats_once_each(aworker: Worker) -> None:
    seen = Calls()

    def handler(ctx: Context, task: LeasedTask) -> None:
        seen.add(task.id)

    w = aworker
    tasks = []
    for i in range(60):
        options: dict[str, object] = {}
        if i % 3 == 1:
            options["unique"] = 60
        if i % 4 == 2:
            options["retention"] = 60
        if i % 5 == 3:
            options["timeout"] = 30
        tasks.append(Task("t", b"%d" % i, task_id=f"t{i}", **options))  # type: ignore[arg-type]
    w.queue.enqueue_many(tasks)
    for t in tasks[::2]:
        as_format_1(w, t.id)
    w.start(handler, concurrency=7)
    seen.wait(lambda items: len(items) >= 60, "every task to run")
    keys = w.queue.keys("default")

    def settled() -> bool:
        return w.client.zcard(keys.active) == 0 and w.client.llen(keys.pending) == 0

    wait_until(settled, "the queue to drain")
    assert sorted(seen.items) == sorted(t.id for t in tasks), "each task ran exactly once"
    kept = {x.decode() for x in w.client.zrange(keys.completed, 0, -1)}  # type: ignore[union-attr]
    assert kept == {t.id for t in tasks if t.options.retention_ms}
    for t in tasks:
        if t.options.unique_key is not None:
            assert not w.client.exists(keys.unique(t.options.unique_key)), f"{t.id} left its lock"
        info = w.info(t.id)
        assert (info is None) == (not t.options.retention_ms), t.id
        assert info is None or info.state is TaskState.COMPLETED
    assert qsync.TaskState.ARCHIVED not in {i.state for i in (w.info(t.id) for t in tasks) if i is not None}

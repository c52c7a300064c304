"""The worker server on a real Redis, through the public entry points: the sync
``Queue.start``/``Queue.stop`` and the asyncio ``AsyncQueue.run``/``AsyncQueue.stop``.

Synchronisation is by events set in handlers and by polling Redis with deadlines; nothing here
asserts on timing. Two measurements (idle wake-up latency, idle command rate) are printed with
``-s`` and kept in ``MEASURED`` for the report."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import re
import socket
import statistics
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import qsync
from qsync import Context, LeasedTask, Mux, Task, TaskState
from qsync.errors import InvalidArgument, TaskNotFound
from qsync.mux import AsyncHandler
from tests.polling import wait_until
from tests.redis_procs import RedisServer

FAST = {"lease_duration": 1, "poll_interval": 0.2}
MEASURED: dict[str, Any] = {}
_prefixes = itertools.count()


def wait_event(event: threading.Event, what: str, timeout: float = 15.0) -> None:
    assert event.wait(timeout), f"timed out after {timeout} s waiting for {what}"


class Worker:
    """A worker server on the session's Redis, in one of two flavours:

    - ``sync``: ``qsync.new(redis.Redis(...)).start(handler, ...)`` and ``.stop()``;
    - ``async``: ``await qsync.new(redis.asyncio.Redis(...)).run(handler, ...)`` on an event loop
      in a thread of the test, stopped with ``await aqueue.stop()`` on that loop.

    ``queue`` is a sync client queue on the same prefix for enqueueing and inspecting."""

    def __init__(self, flavour: str, server: RedisServer) -> None:
        self.flavour = flavour
        self.server = server
        self.prefix = f"srv{next(_prefixes)}"
        self.client = redis.Redis(port=server.port)
        self.queue = qsync.new(self.client, prefix=self.prefix)
        self._server_queue: qsync.Queue | None = None
        self._server_client: redis.Redis | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: qsync.AsyncQueue | None = None
        self.error: BaseException | None = None

    @property
    def running(self) -> bool:
        if self.flavour == "sync":
            return self._server_queue is not None
        return self._thread is not None and self._thread.is_alive()

    def start(self, handler: Any, **options: Any) -> None:
        options = {**FAST, **options}
        if self.flavour == "sync":
            client = redis.Redis(port=self.server.port)
            queue = qsync.new(client, prefix=self.prefix)
            try:
                queue.start(handler, **options)
            except BaseException:
                client.close()
                raise
            self._server_queue, self._server_client = queue, client
            return
        ready = threading.Event()

        async def main() -> None:
            client = aioredis.Redis(port=self.server.port)
            self._aqueue = qsync.new(client, prefix=self.prefix)
            self._loop = asyncio.get_running_loop()
            ready.set()
            try:
                await self._aqueue.run(handler, **options)
            except BaseException as exc:  # handed to the test thread
                self.error = exc
            finally:
                await client.aclose()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="test-async-worker")
        self._thread.start()
        wait_event(ready, "the async worker's loop")
        # run() has passed its checks once the server object exists (or it failed).
        wait_until(
            lambda: self.error is not None or getattr(self._aqueue, "_server", None) is not None,
            "AsyncQueue.run to start",
        )
        if self.error is not None:
            self._thread.join(10)
            error, self.error, self._thread = self.error, None, None
            raise error

    def stop(self, timeout: float = 20.0, *, collect: bool = True) -> None:
        """Stop gracefully and fail if the server still runs after ``timeout`` seconds (then
        wait longer for it, so that it cannot disturb the next tests)."""
        try:
            if self.flavour == "sync":
                self._stop_sync(timeout)
            else:
                self._stop_async(timeout)
        finally:
            if collect:
                collect_quietly()

    def _stop_sync(self, timeout: float) -> None:
        queue, client = self._server_queue, self._server_client
        if queue is None:
            return
        try:
            queue.stop(timeout=timeout)
            thread = queue._thread
            if thread is not None:
                thread.join(60)
                raise AssertionError(f"Queue.stop(timeout={timeout}) returned while the server still ran")
        finally:
            self._server_queue = None
            if client is not None:
                client.close()

    def _stop_async(self, timeout: float) -> None:
        thread, loop, aqueue = self._thread, self._loop, self._aqueue
        if thread is None or loop is None or aqueue is None:
            return
        try:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(aqueue.stop(), loop).result(timeout)
            thread.join(timeout)
            if thread.is_alive():
                thread.join(60)
                raise AssertionError(f"AsyncQueue.run() had not returned {timeout} s after stop()")
        finally:
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    # --- inspection helpers -----------------------------------------------------------------

    def info(self, task_id: str, queue: str = "default") -> qsync.TaskInfo | None:
        try:
            return self.queue.info(task_id, queue=queue)
        except TaskNotFound:
            return None

    def wait_state(
        self, task_id: str, state: TaskState | None, queue: str = "default", timeout: float = 15.0
    ) -> qsync.TaskInfo | None:
        """Wait until the task is in ``state`` (None: deleted); return its info."""
        found: list[qsync.TaskInfo | None] = []

        def check() -> bool:
            info = self.info(task_id, queue)
            if (info is None and state is None) or (info is not None and info.state is state):
                found.append(info)
                return True
            return False

        wait_until(check, f"task {task_id} to be {state}", timeout)
        return found[0]

    def pending_ids(self, queue: str = "default") -> list[str]:
        return [x.decode() for x in self.client.lrange(self.queue.keys(queue).pending, 0, -1)]

    def active_count(self, queue: str = "default") -> int:
        return int(self.client.zcard(self.queue.keys(queue).active))

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.client.close()


def collect_quietly() -> None:
    """Queue.start()/stop() leaks the server's Redis connections (see
    test_stopped_server_closes_its_redis_connections). Collect them as soon as a server stops,
    without their ResourceWarnings, so that the leak fails that one test and not whichever test
    the garbage collector happens to run in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(autouse=True)
def _contain_leaked_connections() -> Iterator[None]:
    yield
    collect_quietly()


def worker_on(flavour: str, redis_server: RedisServer) -> Iterator[Worker]:
    """A worker server of ``flavour`` ("sync" or "async") on the session's Redis, flushed first;
    closed after the test."""
    redis_server.client().flushall()
    w = Worker(flavour, redis_server)
    try:
        yield w
    finally:
        w.close()


class Calls:
    """Thread-safe record of handler calls, with an event per expected count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[Any] = []
        self._waiters: list[tuple[Callable[[list[Any]], bool], threading.Event]] = []

    def add(self, item: Any) -> None:
        with self._lock:
            self.items.append(item)
            for predicate, event in self._waiters:
                if predicate(self.items):
                    event.set()

    def wait(self, predicate: Callable[[list[Any]], bool], what: str, timeout: float = 15.0) -> None:
        event = threading.Event()
        with self._lock:
            self._waiters.append((predicate, event))
            if predicate(self.items):
                event.set()
        wait_event(event, what, timeout)

    def count(self, item: Any) -> int:
        with self._lock:
            return self.items.count(item)


# --- handlers run and ack -----------------------------------------------------------------------


def test_sync_and_async_handlers_run_and_ack(worker: Worker) -> None:
    calls = Calls()
    mux = Mux()

    @mux.handle("job:sync")
    def sync_job(ctx: Context, task: LeasedTask) -> None:
        calls.add(("sync", task.id, task.payload, threading.current_thread().name))

    @mux.handle("job:async")
    async def async_job(ctx: Context, task: LeasedTask) -> None:
        calls.add(("async", task.id, task.payload, threading.current_thread().name))

    types = ("job:sync", "job:async")
    kept = [worker.queue.enqueue(Task(t, b"p%d" % i, retention=60)) for i in range(4) for t in types]
    dropped = worker.queue.enqueue(Task("job:sync", b"gone"))
    worker.start(mux, concurrency=4)

    for info in kept:
        done = worker.wait_state(info.id, TaskState.COMPLETED)
        assert done is not None and done.finished_at is not None and done.retried == 0
    worker.wait_state(dropped.id, None)  # no retention: deleted once acked
    assert worker.pending_ids() == [] and worker.active_count() == 0

    by_id = Counter(c[1] for c in calls.items)
    assert by_id == Counter({i.id: 1 for i in [*kept, dropped]}), "each task runs exactly once"
    sync_threads = {c[3] for c in calls.items if c[0] == "sync"}
    async_threads = {c[3] for c in calls.items if c[0] == "async"}
    assert len(async_threads) == 1, "async handlers all run on the server's loop thread"
    assert not sync_threads & async_threads, "sync handlers run in a thread pool, not on the loop"
    payloads = {c[1]: c[2] for c in calls.items}
    assert payloads[dropped.id] == b"gone"


def test_one_callable_handles_every_type(worker: Worker) -> None:
    calls = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        calls.add(task.type)

    for t in ("a", "b:c", "anything"):
        worker.queue.enqueue(Task(t))
    worker.start(handler)
    calls.wait(lambda items: len(items) == 3, "three tasks")
    assert sorted(calls.items) == ["a", "anything", "b:c"]


def test_an_async_handler_runs_in_its_own_asyncio_task_named_after_the_task(worker: Worker) -> None:
    """Each attempt has an asyncio task of its own (so asyncio.timeout and contextvars work in
    handlers), and asyncio.all_tasks() shows which qsync task each one runs."""
    calls = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        runner = asyncio.current_task()
        assert runner is not None
        calls.add((task.id, runner.get_name()))

    ids = [worker.queue.enqueue(Task("named")).id for _ in range(3)]
    worker.start(handler)
    calls.wait(lambda items: len(items) == 3, "three tasks")
    assert sorted(calls.items) == sorted((task_id, task_id) for task_id in ids)


def test_a_concurrency_above_one_lease_call_still_leases(sync_worker: Worker) -> None:
    """lease.lua takes at most 1,000 tasks per call; a server may run more at once (every
    lease round of a 1,500-slot server used to be refused, so it ran nothing)."""
    calls = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        calls.add(task.id)

    sync_worker.queue.enqueue_many([Task("t") for _ in range(50)])
    sync_worker.start(handler, concurrency=1500)
    calls.wait(lambda items: len(items) == 50, "every task to run")
    wait_until(lambda: sync_worker.active_count() == 0, "every task to be acked")


# --- failures -------------------------------------------------------------------------------------


def test_failing_handler_retries_with_task_retry_delay_then_archives(worker: Worker) -> None:
    attempts = Calls()
    mux = Mux()

    @mux.handle("fail:always")
    def fail(ctx: Context, task: LeasedTask) -> None:
        attempts.add(task.id)
        raise ValueError(f"boom {attempts.count(task.id)}")

    quick = worker.queue.enqueue(Task("fail:always", retry=2, retry_delay=0.05))
    slow = worker.queue.enqueue(Task("fail:always", retry=1, retry_delay=3600))
    by_policy = worker.queue.enqueue(Task("fail:always", retry=1))
    worker.start(mux, retry_policy=qsync.backoff.fixed(1800))

    archived = worker.wait_state(quick.id, TaskState.ARCHIVED)
    assert archived is not None
    assert attempts.count(quick.id) == 3
    assert archived.retried == 2
    assert archived.last_error is not None and "ValueError" in archived.last_error
    assert "boom 3" in archived.last_error

    # The task's own retry_delay decides when it retries (not the server's policy) ...
    waiting = worker.wait_state(slow.id, TaskState.RETRY)
    assert waiting is not None and waiting.retried == 1 and attempts.count(slow.id) == 1
    assert waiting.next_process_at is not None and waiting.last_failed_at is not None
    assert waiting.next_process_at - waiting.last_failed_at == timedelta(seconds=3600)
    assert waiting.last_error is not None and "boom 1" in waiting.last_error
    # ... and without one, the server's retry_policy does.
    policy = worker.wait_state(by_policy.id, TaskState.RETRY)
    assert policy is not None and policy.next_process_at is not None and policy.last_failed_at is not None
    assert policy.next_process_at - policy.last_failed_at == timedelta(seconds=1800)


def test_skip_retry_archives_at_once(worker: Worker) -> None:
    attempts = Calls()
    mux = Mux()

    @mux.handle("email:send")
    async def send(ctx: Context, task: LeasedTask) -> None:
        attempts.add(task.id)
        raise qsync.SkipRetry("invalid address")

    info = worker.queue.enqueue(Task("email:send", retry=5, retry_delay=0.01))
    worker.start(mux)
    archived = worker.wait_state(info.id, TaskState.ARCHIVED)
    assert archived is not None and archived.retried == 0
    assert archived.last_error is not None and "invalid address" in archived.last_error
    assert attempts.items == [info.id]


def test_retry_in_and_retry_at_reschedule(worker: Worker) -> None:
    attempts = Calls()
    mux = Mux()
    far = datetime.now(UTC) + timedelta(hours=2)

    @mux.handle("retry:in")
    async def retry_in(ctx: Context, task: LeasedTask) -> None:
        attempts.add(task.id)
        if task.retried == 0:
            raise qsync.RetryIn(0.2)

    @mux.handle("retry:later")
    def retry_later(ctx: Context, task: LeasedTask) -> None:
        attempts.add(task.id)
        raise qsync.RetryIn(3600, "rate limited")

    @mux.handle("retry:at")
    def retry_at(ctx: Context, task: LeasedTask) -> None:
        attempts.add(task.id)
        raise qsync.RetryAt(far)

    soon = worker.queue.enqueue(Task("retry:in", retry=3, retention=60))
    later = worker.queue.enqueue(Task("retry:later", retry=3))
    at = worker.queue.enqueue(Task("retry:at", retry=3))
    last = worker.queue.enqueue(Task("retry:later", retry=0))
    worker.start(mux)

    done = worker.wait_state(soon.id, TaskState.COMPLETED)
    assert done is not None and done.retried == 1 and attempts.count(soon.id) == 2

    waiting = worker.wait_state(later.id, TaskState.RETRY)
    assert waiting is not None and waiting.next_process_at and waiting.last_failed_at
    assert waiting.next_process_at - waiting.last_failed_at == timedelta(seconds=3600)
    assert waiting.last_error is not None and "rate limited" in waiting.last_error

    waiting_at = worker.wait_state(at.id, TaskState.RETRY)
    assert waiting_at is not None and waiting_at.next_process_at is not None
    # Same host: the worker's and Redis's clocks agree to well within a minute.
    assert abs(waiting_at.next_process_at - far) < timedelta(minutes=1)

    # RetryIn counts as a failed attempt: with no retries left the task is archived.
    archived = worker.wait_state(last.id, TaskState.ARCHIVED)
    assert archived is not None and attempts.count(last.id) == 1


def test_unknown_task_type_is_retried_then_archived_never_dropped(worker: Worker) -> None:
    mux = Mux()
    mux.handle_func("known", lambda ctx, task: None)
    info = worker.queue.enqueue(Task("nobody:handles", b"keep me", retry=1, retry_delay=0.05))
    worker.start(mux)
    archived = worker.wait_state(info.id, TaskState.ARCHIVED)
    assert archived is not None
    assert archived.retried == 1
    assert archived.payload == b"keep me"
    assert archived.last_error is not None and "UnknownTaskType" in archived.last_error
    assert "nobody:handles" in archived.last_error


# --- middleware ------------------------------------------------------------------------------------


def test_middleware_runs_in_order_and_its_errors_fail_only_the_attempt(worker: Worker) -> None:
    log = Calls()

    def recorder(name: str) -> Callable[[AsyncHandler], AsyncHandler]:
        def middleware(next_: AsyncHandler) -> AsyncHandler:
            async def wrapped(ctx: Context, task: LeasedTask) -> None:
                log.add((task.id, f"{name} before"))
                try:
                    await next_(ctx, task)
                finally:
                    log.add((task.id, f"{name} after"))

            return wrapped

        return middleware

    def exploding(next_: AsyncHandler) -> AsyncHandler:
        async def wrapped(ctx: Context, task: LeasedTask) -> None:
            if task.payload == b"explode":
                raise RuntimeError("middleware broke")
            await next_(ctx, task)

        return wrapped

    mux = Mux()

    @mux.handle("mw")
    def handler(ctx: Context, task: LeasedTask) -> None:
        log.add((task.id, "handler"))

    mux.use(recorder("outer"), recorder("inner"))
    mux.use(exploding)

    first = worker.queue.enqueue(Task("mw", b"ok", retention=60))
    bad = worker.queue.enqueue(Task("mw", b"explode", retry=0))
    worker.start(mux, concurrency=1)

    assert worker.wait_state(first.id, TaskState.COMPLETED) is not None
    archived = worker.wait_state(bad.id, TaskState.ARCHIVED)
    assert archived is not None and archived.last_error is not None
    assert "RuntimeError: middleware broke" in archived.last_error

    # The server is still alive after the middleware error.
    second = worker.queue.enqueue(Task("mw", b"ok again", retention=60))
    assert worker.wait_state(second.id, TaskState.COMPLETED) is not None

    def steps(task_id: str) -> list[str]:
        return [step for tid, step in log.items if tid == task_id]

    expected = ["outer before", "inner before", "handler", "inner after", "outer after"]
    assert steps(first.id) == expected
    assert steps(second.id) == expected
    assert steps(bad.id) == ["outer before", "inner before", "inner after", "outer after"]


# --- weighted and strict priority ------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 7])
def test_weighted_shares_without_starvation(sync_worker: Worker, concurrency: int) -> None:
    per_queue, wanted = 1500, 2000  # the first 2,000 completions: no queue runs dry before
    weights = {"high": 6, "mid": 3, "low": 1}
    for name in weights:
        results = sync_worker.queue.enqueue_many([Task("noop") for _ in range(per_queue)], queue=name)
        assert all(isinstance(r, qsync.TaskInfo) for r in results)
    order: list[str] = []
    enough = threading.Event()

    async def noop(ctx: Context, task: LeasedTask) -> None:
        order.append(ctx.queue)
        if len(order) >= wanted:
            enough.set()

    sync_worker.start(noop, queues=weights, concurrency=concurrency)
    wait_event(enough, f"{wanted} completions", timeout=60)
    sync_worker.stop()

    first = order[:wanted]
    shares = {name: first.count(name) / wanted for name in weights}
    MEASURED[f"weighted_shares_concurrency_{concurrency}"] = shares
    print(f"\nweighted shares of the first {wanted} tasks (6/3/1), concurrency {concurrency}: {shares}")
    # Binomial standard deviations are 1.1, 1.0 and 0.7 points: these bounds are > 5 of them.
    assert abs(shares["high"] - 0.6) < 0.06, shares
    assert abs(shares["mid"] - 0.3) < 0.05, shares
    assert abs(shares["low"] - 0.1) < 0.04, shares
    # No starvation: the weight-1 queue is served early and all through the busy period.
    assert "low" in first[:200]
    for start in range(0, wanted, 500):
        assert "low" in first[start : start + 500], f"low starved in completions {start}..{start + 500}"


@pytest.mark.parametrize("concurrency", [1, 4])
def test_strict_priority_drains_the_highest_weight_first(sync_worker: Worker, concurrency: int) -> None:
    n = 30
    weights = {"low": 1, "high": 3, "mid": 2}  # given out of order on purpose
    for name in weights:
        sync_worker.queue.enqueue_many([Task("noop") for _ in range(n)], queue=name)
    events = Calls()

    async def noop(ctx: Context, task: LeasedTask) -> None:
        events.add(("start", ctx.queue))
        await asyncio.sleep(0)
        events.add(("end", ctx.queue))

    sync_worker.start(noop, queues=weights, concurrency=concurrency, strict=True)
    events.wait(lambda items: len(items) == 6 * n, "every task to run")
    starts = [q for kind, q in events.items if kind == "start"]
    if concurrency == 1:
        assert starts == ["high"] * n + ["mid"] * n + ["low"] * n
    last_high_end = max(i for i, e in enumerate(events.items) if e == ("end", "high"))
    first_low_start = events.items.index(("start", "low"))
    assert last_high_end < first_low_start, "every high task completes before any low task starts"
    assert starts.index("mid") > starts.index("high")


# --- graceful shutdown -----------------------------------------------------------------------------


async def test_graceful_stop_hands_a_long_async_task_back_to_pending(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    client = aioredis.Redis(port=redis_server.port)
    queue = qsync.new(client, prefix=f"srv{next(_prefixes)}")
    started, cancelled = asyncio.Event(), asyncio.Event()
    mux = Mux()

    @mux.handle("slow")
    async def slow(ctx: Context, task: LeasedTask) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    info = await queue.enqueue(Task("slow", b"long", retry=3))
    runner = asyncio.create_task(queue.run(mux, shutdown_timeout=0.2, **FAST))
    try:
        await asyncio.wait_for(started.wait(), 15)
        assert (await queue.info(info.id)).state is TaskState.ACTIVE
        await asyncio.wait_for(queue.stop(), 15)
        await asyncio.wait_for(runner, 15)  # run() returns after stop()
        assert cancelled.is_set(), "the async handler is cancelled on shutdown"

        after = await queue.info(info.id)
        assert after.state is TaskState.PENDING
        assert after.retried == 0, "a shutdown is not a failed attempt"
        assert after.payload == b"long"
        keys = queue.keys("default")
        assert await client.lrange(keys.pending, 0, -1) == [info.id.encode()]
        assert await client.zcard(keys.active) == 0

        # The next server picks it up.
        done = asyncio.Event()

        async def quick(ctx: Context, task: LeasedTask) -> None:
            done.set()

        runner = asyncio.create_task(queue.run(quick, **FAST))
        await asyncio.wait_for(done.wait(), 15)
        await asyncio.wait_for(queue.stop(), 15)
        await asyncio.wait_for(runner, 15)
    finally:
        if not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await client.aclose()


async def test_running_task_may_finish_within_the_grace_period(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    client = aioredis.Redis(port=redis_server.port)
    queue = qsync.new(client, prefix=f"srv{next(_prefixes)}")
    started, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def handler(ctx: Context, task: LeasedTask) -> None:
        ran.append(task.id)
        started.set()
        await release.wait()

    first = await queue.enqueue(Task("t", retention=60))
    runner = asyncio.create_task(queue.run(handler, concurrency=1, shutdown_timeout=15, **FAST))
    try:
        await asyncio.wait_for(started.wait(), 15)
        second = await queue.enqueue(Task("t", retention=60))
        stopping = asyncio.create_task(queue.stop())
        await asyncio.sleep(0)  # stop() has asked the server to stop; now let the task finish
        release.set()
        await asyncio.wait_for(stopping, 15)
        await asyncio.wait_for(runner, 15)
        assert (await queue.info(first.id)).state is TaskState.COMPLETED
        assert (await queue.info(second.id)).state is TaskState.PENDING
        assert ran == [first.id], "nothing new is leased once stopping"
    finally:
        if not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await client.aclose()


@pytest.mark.parametrize("kind", ["async-swallows-cancel", "sync-polls-context"])
def test_handler_returning_after_cancel_is_not_acked(worker: Worker, kind: str) -> None:
    started, returned = threading.Event(), threading.Event()
    mux = Mux()

    if kind == "async-swallows-cancel":

        @mux.handle("stubborn")
        async def stubborn(ctx: Context, task: LeasedTask) -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # returns normally after being cancelled
            returned.set()

    else:

        @mux.handle("stubborn")
        def stubborn_sync(ctx: Context, task: LeasedTask) -> None:
            started.set()
            assert ctx.wait_cancelled(60), "the context tells a sync handler to stop"
            assert ctx.cancel_reason
            returned.set()

    info = worker.queue.enqueue(Task("stubborn", retry=3, retention=60))
    worker.start(mux, shutdown_timeout=0.2)
    wait_event(started, "the handler to start")
    worker.stop()
    wait_event(returned, "the handler to return")
    after = worker.info(info.id)
    assert after is not None
    assert after.state is TaskState.PENDING, "a handed-back task must not be acked by the old run"
    assert after.retried == 0
    assert worker.pending_ids() == [info.id]

    # It runs again, and completes once.
    runs = Calls()
    worker.start(lambda ctx, task: runs.add(task.id))
    assert worker.wait_state(info.id, TaskState.COMPLETED) is not None
    worker.stop()
    assert runs.items == [info.id]


async def test_stop_while_run_is_starting_still_stops_it(redis_server: RedisServer) -> None:
    # `await aqueue.run(...)` returns after `await aqueue.stop()`: also when stop() comes while
    # run() is still on its first round trip (e.g. a SIGTERM right after the worker starts).
    redis_server.client().flushall()
    client = aioredis.Redis(port=redis_server.port)
    queue = qsync.new(client, prefix=f"srv{next(_prefixes)}")
    runner = asyncio.create_task(queue.run(lambda ctx, task: None, **FAST))
    try:
        await asyncio.sleep(0)  # run() is now awaiting its first Redis reply
        assert not runner.done()
        await asyncio.wait_for(queue.stop(), 15)
        try:
            await asyncio.wait_for(asyncio.shield(runner), 3)
        except TimeoutError:
            pytest.fail("AsyncQueue.run() kept running after stop() was awaited during its start-up")
    finally:
        if not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await client.aclose()


def test_bad_options_fail_before_anything_starts(worker: Worker) -> None:
    with pytest.raises(InvalidArgument):
        worker.start(lambda ctx, task: None, concurrency=0)
    with pytest.raises(InvalidArgument):
        worker.start(lambda ctx, task: None, queues="a=x")
    assert not worker.running
    assert worker.client.zcard("{" + worker.prefix + "}:servers") == 0


def _connections_from_here(client: redis.Redis) -> int:
    """Connections to the test Redis from this process, except the inspecting client's own."""
    own = client.client_id()
    return sum(1 for c in client.client_list() if int(c["id"]) != own and c["cmd"] != "client|list")


def test_stopped_server_closes_its_redis_connections(worker: Worker) -> None:
    gc.collect()
    gc.disable()  # the leak must be seen as a leak, not closed by a lucky collection
    try:
        # The test's own queue keeps a spare connection once used: count it in the baseline.
        with contextlib.suppress(TaskNotFound):
            worker.queue.info("warm-up")
        baseline = _connections_from_here(worker.client)
        done = threading.Event()
        worker.start(lambda ctx, task: done.set(), queues=["a", "b"])
        worker.queue.enqueue(Task("t"), queue="a")
        wait_event(done, "a task to run")
        wait_until(lambda: _blocked_listeners(worker.client) >= 2, "the server to be idle")
        worker.stop(collect=False)
        leftover: list[int] = []

        def closed() -> bool:
            leftover.append(_connections_from_here(worker.client) - baseline)
            return leftover[-1] <= 0

        try:
            wait_until(closed, "the stopped server's connections to close", timeout=3)
        except AssertionError:
            pytest.fail(f"{leftover[-1]} Redis connections are left open after the server stopped")
    finally:
        collect_quietly()
        gc.enable()


# --- registry ---------------------------------------------------------------------------------------


def test_server_registry_lists_the_server_while_it_runs(worker: Worker) -> None:
    index = "{" + worker.prefix + "}:servers"
    worker.start(lambda ctx, task: None, queues={"a": 2, "b": 1}, concurrency=3)
    members = wait_until(lambda: worker.client.zrange(index, 0, -1), "the server in the registry")
    assert len(members) == 1
    server_id = members[0].decode()
    assert f":{os.getpid()}:" in server_id
    entry = worker.client.get("{" + worker.prefix + "}:server:" + server_id)
    assert entry is not None
    data = json.loads(entry)
    assert data["queues"] == {"a": 2, "b": 1}
    assert data["concurrency"] == 3
    assert data["pid"] == os.getpid()
    score = worker.client.zscore(index, server_id)
    assert score is not None and score > time.time() * 1000  # scored by when it expires

    worker.stop()
    assert worker.client.zcard(index) == 0
    assert worker.client.get("{" + worker.prefix + "}:server:" + server_id) is None


# --- idle behaviour: wake-ups, prompt stop, command rate -------------------------------------------


def _blocked_listeners(client: redis.Redis) -> int:
    """How many connections are blocked in BRPOP (the idle server's wake-up listeners)."""
    clients = client.client_list()
    return sum(1 for c in clients if c.get("cmd") == "brpop" and "b" in c.get("flags", ""))


def test_scripts_that_make_work_ready_push_a_wake_token(redis_server: RedisServer) -> None:
    # The Waker (qsync/server/_waker.py) sleeps in BRPOP on {<prefix>:<queue>}:wake and relies
    # on enqueue, promote and requeue pushing a token there (capped at one entry).
    client = redis_server.client()
    client.flushall()
    queue = qsync.new(client, prefix=f"srv{next(_prefixes)}")
    wake = queue.keys("default").wake
    try:
        queue.enqueue(Task("t"))
        assert client.llen(wake) == 1, "enqueue must push a wake-up token"
        queue.enqueue_many([Task("t") for _ in range(5)])
        assert client.llen(wake) == 1, "the wake list is capped at one entry"

        client.delete(wake)
        batch = queue.lease("default", count=1)
        client.delete(wake)
        assert queue.requeue("default", batch.tasks) == [True]
        assert client.llen(wake) == 1, "requeue must push a wake-up token"

        client.delete(wake)
        queue.enqueue(Task("later", delay=0.05), queue="default")
        client.delete(wake)
        wait_until(lambda: queue.promote("default").promoted, "the delayed task to be due")
        assert client.llen(wake) == 1, "promote must push a wake-up token"

        queue.pause("default")
        client.delete(wake)
        queue.resume("default")
        assert client.llen(wake) == 1, "resume of a queue with pending tasks must push a wake-up token"
        client.delete(queue.keys("default").pending, wake)
        queue.pause("default")
        queue.resume("default")
        assert client.llen(wake) == 0, "resume of an empty queue has nothing to wake workers for"
    finally:
        client.close()


def test_resume_wakes_an_idle_server_at_once(sync_worker: Worker) -> None:
    ran = threading.Event()
    # A poll interval far beyond the wait below: the task runs only if resume wakes the server.
    sync_worker.queue.pause("default")
    sync_worker.start(lambda ctx, task: ran.set(), poll_interval=60)
    sync_worker.queue.enqueue(Task("after-resume"))
    wait_until(lambda: _blocked_listeners(sync_worker.client) >= 1, "the server to be idle")
    assert not ran.is_set(), "a paused queue must not be leased from"
    sync_worker.queue.resume("default")
    wait_event(ran, "the handler to start after resume", timeout=10)


def test_wake_ups_that_arrive_while_the_server_looks_are_not_lost(sync_worker: Worker) -> None:
    # Each task is enqueued by the previous one's handler, so the wake-ups land while the
    # server is leasing, starting the handler or going idle. A poll interval far beyond the
    # wait below: the chain completes only if every one of those wake-ups is acted on.
    links = 20
    done = threading.Event()

    def handler(ctx: Context, task: LeasedTask) -> None:
        n = int(task.payload)
        if n == links:
            done.set()
        else:
            sync_worker.queue.enqueue(Task("link", str(n + 1).encode()))

    sync_worker.start(handler, poll_interval=60)
    wait_until(lambda: _blocked_listeners(sync_worker.client) >= 1, "the server to be idle")
    sync_worker.queue.enqueue(Task("link", b"1"))
    wait_event(done, "the whole chain to run")


def test_a_busy_server_leaves_wake_ups_to_idle_servers(sync_worker: Worker) -> None:
    # A server with no free slot must not pop the wake-up token: another, idle, server may be
    # waiting for it (the token would otherwise wake nobody who can take the task).
    started, release, second = threading.Event(), threading.Event(), threading.Event()

    def handler(ctx: Context, task: LeasedTask) -> None:
        if task.payload == b"first":
            started.set()
            release.wait(15)
        else:
            second.set()

    wake = sync_worker.queue.keys("default").wake
    sync_worker.start(handler, concurrency=1, poll_interval=60)
    wait_until(lambda: _blocked_listeners(sync_worker.client) >= 1, "the server to be idle")
    sync_worker.queue.enqueue(Task("t", b"first"))
    wait_event(started, "the first task to start")
    sync_worker.queue.enqueue(Task("t", b"second"))
    try:
        assert sync_worker.client.llen(wake) == 1, "a busy server took the wake-up token"
        assert _blocked_listeners(sync_worker.client) == 0, "a busy server listens for wake-ups"
    finally:
        release.set()
    wait_event(second, "the second task to run once a slot is free")


def test_idle_wake_up_latency(sync_worker: Worker) -> None:
    started: list[float] = []
    ran = threading.Event()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        started.append(time.perf_counter())
        ran.set()

    # The default poll interval: a task is picked up at once only if the wake-up works;
    # otherwise the latency is up to a poll interval.
    sync_worker.start(handler, poll_interval=1.0)
    latencies = []
    for _ in range(7):
        wait_until(lambda: _blocked_listeners(sync_worker.client) >= 1, "the server to be idle")
        ran.clear()
        before = time.perf_counter()
        sync_worker.queue.enqueue(Task("wake"))
        wait_event(ran, "the handler to start")
        latencies.append(started[-1] - before)
    MEASURED["wake_latency_ms"] = {
        "median": round(statistics.median(latencies) * 1000, 2),
        "min": round(min(latencies) * 1000, 2),
        "max": round(max(latencies) * 1000, 2),
        "runs": len(latencies),
    }
    print(f"\nidle wake-up latency (enqueue -> handler start): {MEASURED['wake_latency_ms']} ms")


def test_stop_of_an_idle_server_does_not_wait_for_the_poll_interval(sync_worker: Worker) -> None:
    # A bounded wait, not a timing assert: 8 s of poll interval, 4 s to stop.
    sync_worker.start(lambda ctx, task: None, poll_interval=8)
    wait_until(lambda: _blocked_listeners(sync_worker.client) >= 1, "the server to be idle")
    sync_worker.stop(timeout=4)


def _top_level_commands(port: int, seconds: float) -> Counter[str]:
    """Commands sent by clients during ``seconds``, read from MONITOR (commands run inside
    scripts, shown as "[db lua]", are left out)."""
    counts: Counter[str] = Counter()
    entry = re.compile(rb'\[\d+ ([^\]]+)\] "([^"]*)"')
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
        sock.sendall(b"MONITOR\r\n")
        buffer = b""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                match = entry.search(line)
                if match and match.group(1) != b"lua":
                    counts[match.group(2).decode().lower()] += 1
    return counts


def _command_stats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


@pytest.mark.parametrize("poll_interval", [0.2, 1.0])
def test_idle_server_does_not_spin(sync_worker: Worker, poll_interval: float) -> None:
    queues = {"a": 3, "b": 2, "c": 1}
    sync_worker.start(lambda ctx, task: None, queues=queues, poll_interval=poll_interval)
    wait_until(lambda: _blocked_listeners(sync_worker.client) >= len(queues), "every queue's listener")
    own = {"info", "client|list", "monitor"}  # this test's own commands
    before = _command_stats(sync_worker.client)
    t0 = time.monotonic()
    sent = _top_level_commands(sync_worker.server.port, 3.0)  # a measurement window
    after = _command_stats(sync_worker.client)
    elapsed = time.monotonic() - t0
    sent = Counter({k: v for k, v in sent.items() if k not in own})
    executed = {k: after[k] - before[k] for k in after if after[k] - before[k] > 0 and k not in own}
    rate = sum(sent.values()) / elapsed / len(queues)
    MEASURED[f"idle_poll_{poll_interval}"] = {
        "sent_per_s_per_queue": round(rate, 1),
        "sent_per_s": {k: round(v / elapsed, 1) for k, v in sorted(sent.items())},
        "commandstats_per_s_per_queue_incl_in_script": round(
            sum(executed.values()) / elapsed / len(queues), 1
        ),
        "commandstats_per_s": {k: round(v / elapsed, 1) for k, v in sorted(executed.items())},
    }
    print(f"\nidle server, 3 queues, poll_interval={poll_interval}: {MEASURED[f'idle_poll_{poll_interval}']}")
    assert sent, "MONITOR saw nothing: the measurement is broken"
    assert rate < 50, f"an idle server must not spin: {sent}"

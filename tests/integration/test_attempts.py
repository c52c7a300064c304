"""Attempts under attack: timeouts in 5 ms buckets, deadlines, handlers that fight cancellation,
the lazily made context event, hiredis-packed commands with awkward bytes and names, lease.lua's
one-pcall orphan check, and resume's wake-up.

Workers are the ``Worker`` helper of test_server.py (fast profile: lease 1 s, poll 0.2 s).
Synchronisation is by events and by polling Redis with deadlines. The only time comparisons
are lower bounds ("not cancelled before its timeout"), which no slow machine can break."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

import qsync
from qsync import Context, Failure, LeasedTask, Mux, Task, TaskState
from qsync.errors import CorruptState
from qsync.server.server import Server
from tests.integration.test_server import (
    Calls,
    Worker,
    _blocked_listeners,
    collect_quietly,
    wait_event,
    wait_until,
)
from tests.redis_procs import RedisServer

_prefixes = itertools.count()
ZSETS = ("active", "scheduled", "retry", "archived", "completed")


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _contain_leaked_connections() -> Iterator[None]:
    yield
    collect_quietly()


def server_of(w: Worker) -> Server:
    if w.flavour == "sync":
        assert w._server_queue is not None and w._server_queue._thread is not None
        server = w._server_queue._thread.server
    else:
        assert w._aqueue is not None
        server = w._aqueue._server
    assert server is not None
    return server


def where(w: Worker, task_id: str, queue: str = "default") -> list[str]:
    """Every container holding the id (pending once per occurrence)."""
    k = w.queue.keys(queue)
    found = ["pending"] * [x.decode() for x in w.client.lrange(k.pending, 0, -1)].count(task_id)
    return found + [z for z in ZSETS if w.client.zscore(getattr(k, z), task_id) is not None]


def archived(w: Worker, task_id: str) -> qsync.TaskInfo:
    info = w.wait_state(task_id, TaskState.ARCHIVED)
    assert info is not None
    return info


# === 1. attempt timeouts (5 ms buckets) ===========================================================


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_an_attempt_past_its_timeout_fails_with_task_timeout_and_retries_then_archives(
    worker: Worker, kind: str
) -> None:
    seen = Calls()
    mux = Mux()

    if kind == "async":

        @mux.handle("slow")
        async def slow(ctx: Context, task: LeasedTask) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                seen.add(("cancelled", task.retried))
                raise

    else:

        @mux.handle("slow")
        def slow_sync(ctx: Context, task: LeasedTask) -> None:
            # A thread cannot be interrupted: the context must tell it, and wake its wait.
            woke = ctx.wait_cancelled(30)
            seen.add((woke, ctx.is_cancelled(), ctx.cancel_reason, task.retried))

    info = worker.queue.enqueue(Task("slow", retry=1, retry_delay=0, timeout=0.2))
    worker.start(mux)
    dead = archived(worker, info.id)
    seen.wait(lambda items: len(items) == 2, "both attempts to end")
    assert dead.retried == 1, "the timed-out attempt counts, then the retry"
    assert dead.last_error is not None
    assert dead.last_error.startswith("TaskTimeout"), dead.last_error
    assert "0.2 s" in dead.last_error
    if kind == "async":
        assert sorted(seen.items) == [("cancelled", 0), ("cancelled", 1)]
    else:
        assert sorted(seen.items) == [(True, True, "timeout", 0), (True, True, "timeout", 1)]


def test_should_retry_and_the_retry_policy_are_asked_about_the_task_timeout(aworker: Worker) -> None:
    asked = Calls()

    def should_retry(exc: BaseException) -> bool:
        asked.add(("should_retry", type(exc).__name__))
        return not str(exc).endswith("0.15 s")

    def policy(retried: int, exc: BaseException) -> float:
        asked.add(("policy", type(exc).__name__))
        return 3600

    async def handler(ctx: Context, task: LeasedTask) -> None:
        await asyncio.sleep(3600)

    cut = aworker.queue.enqueue(Task("t", retry=5, timeout=0.15))
    later = aworker.queue.enqueue(Task("t", retry=5, timeout=0.2))
    aworker.start(handler, should_retry=should_retry, retry_policy=policy)
    dead = archived(aworker, cut.id)
    assert dead.last_error is not None and dead.last_error.startswith("TaskTimeout")
    waiting = aworker.wait_state(later.id, TaskState.RETRY)
    assert waiting is not None and waiting.retried == 1
    assert waiting.next_process_at is not None and waiting.last_failed_at is not None
    assert waiting.next_process_at - waiting.last_failed_at == timedelta(seconds=3600)
    assert sorted(asked.items) == [
        ("policy", "TaskTimeout"),
        ("should_retry", "TaskTimeout"),
        ("should_retry", "TaskTimeout"),
    ]


def test_a_batch_with_different_timeouts_cancels_each_at_its_own_and_none_early(aworker: Worker) -> None:
    """One lease round takes every task: the short ones share timer buckets with each other and
    with tasks that must not be cancelled (a long one, one that returns just in time)."""
    release = threading.Event()
    cancelled = Calls()
    mux = Mux()

    @mux.handle("short")
    async def short(ctx: Context, task: LeasedTask) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            # Time left on the attempt's own clock, which starts before the handler does.
            cancelled.add((task.id, ctx.remaining()))
            raise

    @mux.handle("long")
    async def long(ctx: Context, task: LeasedTask) -> None:
        while not release.is_set():
            await asyncio.sleep(0.01)

    @mux.handle("just-in-time")
    async def just_in_time(ctx: Context, task: LeasedTask) -> None:
        # Returns a hair before its timeout without ever yielding to the loop: its bucket's
        # timer cannot have fired, so the attempt must be acked (and its bucket-mate still cut).
        while ctx.remaining() > 0.003:
            pass

    timeouts = [0.15, 0.3, 0.3, 0.45, 0.6, 0.75]
    shorts = [Task("short", retry=0, timeout=t, task_id=f"short-{i}") for i, t in enumerate(timeouts)]
    longs = [Task("long", retry=0, timeout=30, retention=60, task_id=f"long-{i}") for i in range(3)]
    edge = Task("just-in-time", retry=0, timeout=0.3, retention=60, task_id="edge")
    for result in aworker.queue.enqueue_many([*shorts, *longs, edge]):
        assert isinstance(result, qsync.TaskInfo), result
    aworker.start(mux, concurrency=20)

    for task, timeout in zip(shorts, timeouts, strict=True):
        dead = archived(aworker, task.id)
        assert dead.last_error == f"TaskTimeout: the attempt ran past its timeout of {timeout:g} s"
    cancelled.wait(lambda items: len(items) == len(shorts), "every short task to be cancelled")
    for task_id, left in cancelled.items:
        # The bucket rounds up, never down (a little slack for the float clock only).
        assert left <= 0.002, f"{task_id} was cancelled {left:.3f} s before its timeout"

    edge_info = aworker.wait_state("edge", TaskState.COMPLETED)
    assert edge_info is not None and edge_info.retried == 0 and edge_info.last_error is None
    for task in longs:
        assert where(aworker, task.id) == ["active"], "a long task must not be cut by another's bucket"
    release.set()
    for task in longs:
        done = aworker.wait_state(task.id, TaskState.COMPLETED)
        assert done is not None and done.last_error is None
    server = server_of(aworker)
    wait_until(lambda: not server.processor.running, "every job to be settled")
    assert (server.stats["succeeded"], server.stats["failed"]) == (4, len(shorts))


def test_finished_attempts_leave_no_timeout_timers_behind(aworker: Worker) -> None:
    """Each attempt's timeout bucket must go away with the attempt. A bucket left armed until
    its time (the default timeout is 30 minutes) keeps an empty set and a loop timer per 5 ms
    of work: at a few hundred tasks a second or more, hundreds of thousands of them."""
    mux = Mux()

    @mux.handle("quick")
    async def quick(ctx: Context, task: LeasedTask) -> None:
        await asyncio.sleep(0.003)  # spread the attempts over many 5 ms buckets

    for result in aworker.queue.enqueue_many([Task("quick") for _ in range(200)]):
        assert isinstance(result, qsync.TaskInfo), result
    aworker.start(mux, concurrency=4)  # default_timeout: 30 minutes
    server = server_of(aworker)
    wait_until(lambda: server.stats["succeeded"] == 200, "200 quick tasks to be acked")
    buckets = dict(server.processor._timeouts)
    assert sum(len(jobs) for jobs in buckets.values()) == 0, "finished jobs stay in their buckets"
    assert len(buckets) == 0, (
        f"{len(buckets)} empty timeout buckets (each with a loop timer due in ~30 min) are left "
        "armed after every attempt finished"
    )


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_deadline_before_the_timeout_archives_with_deadline_exceeded(aworker: Worker, kind: str) -> None:
    seen = Calls()
    mux = Mux()

    if kind == "async":

        @mux.handle("late")
        async def late(ctx: Context, task: LeasedTask) -> None:
            seen.add(ctx.deadline)
            await asyncio.sleep(3600)

    else:

        @mux.handle("late")
        def late_sync(ctx: Context, task: LeasedTask) -> None:
            seen.add(ctx.deadline)
            seen.add((ctx.wait_cancelled(30), ctx.cancel_reason))

    aworker.start(mux)
    deadline = datetime.now(UTC) + timedelta(seconds=1.5)
    info = aworker.queue.enqueue(Task("late", retry=5, timeout=60, deadline=deadline))
    dead = archived(aworker, info.id)
    assert dead.last_error is not None and dead.last_error.startswith("DeadlineExceeded"), dead.last_error
    ctx_deadline = seen.items[0]
    assert isinstance(ctx_deadline, datetime) and ctx_deadline.tzinfo is not None
    assert ctx_deadline < datetime.now(UTC) + timedelta(seconds=30), "ctx.deadline is the task's deadline"
    if kind == "sync":
        seen.wait(lambda items: len(items) == 2, "the sync handler to wake")
        assert seen.items[1] == (True, "deadline exceeded")
    assert len([x for x in seen.items if isinstance(x, datetime)]) == 1, "never retried past its deadline"


def test_the_context_says_cancelled_when_a_timeout_cancels_an_async_handler(aworker: Worker) -> None:
    """is_cancelled(): "True once the attempt must stop (timeout, deadline, ...)". A handler's
    cleanup (or a middleware) that looks at its context on CancelledError must see why."""
    seen = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.add((ctx.is_cancelled(), ctx.cancel_reason, ctx.wait_cancelled(0)))
            raise

    info = aworker.queue.enqueue(Task("t", retry=0, timeout=0.2))
    aworker.start(handler)
    archived(aworker, info.id)
    seen.wait(lambda items: len(items) == 1, "the handler's cleanup")
    assert seen.items == [(True, "timeout", True)]


@pytest.mark.parametrize("how", ["raises-another-error", "keeps-running-then-raises", "returns-normally"])
def test_an_async_handler_fighting_its_timeout_still_fails_with_task_timeout(
    aworker: Worker, how: str
) -> None:
    """The attempt timed out whatever the handler does with the CancelledError, as for a sync
    handler (whose late return is never looked at): TaskTimeout, retried per policy."""
    caught = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            caught.add(task.id)
            if how == "keeps-running-then-raises":
                await asyncio.sleep(0.3)
            if how != "returns-normally":
                raise ValueError("cleanup failed") from None

    info = aworker.queue.enqueue(Task("stubborn", retry=0, timeout=0.2, retention=60))
    aworker.start(handler)
    caught.wait(lambda items: len(items) == 1, "the handler to catch its cancellation")

    def settled() -> qsync.TaskInfo | None:
        now = aworker.info(info.id)
        return now if now is not None and now.state is not TaskState.ACTIVE else None

    final = wait_until(settled, "the attempt to be settled")
    assert final.state is TaskState.ARCHIVED, f"a timed-out attempt ended {final.state}"
    assert final.last_error is not None and final.last_error.startswith("TaskTimeout"), final.last_error


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_handler_raising_cancelled_error_itself_fails_the_attempt(aworker: Worker, kind: str) -> None:
    """Nobody cancelled the attempt: the handler's own CancelledError (an inner task it awaited
    was cancelled) is a failure like any other. It must not leave the job in ``running`` with
    its lease extended by every heartbeat forever."""
    mux = Mux()

    if kind == "async":

        @mux.handle("self-cancel")
        async def self_cancel(ctx: Context, task: LeasedTask) -> None:
            inner = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
            await asyncio.sleep(0)
            inner.cancel()
            await inner

    else:

        @mux.handle("self-cancel")
        def self_cancel_sync(ctx: Context, task: LeasedTask) -> None:
            raise asyncio.CancelledError

    info = aworker.queue.enqueue(Task("self-cancel", retry=0, timeout=60))
    aworker.start(mux, shutdown_timeout=0.3)  # (a stuck job also holds up stop for this long)
    dead = aworker.wait_state(info.id, TaskState.ARCHIVED, timeout=4)
    assert dead is not None and dead.last_error is not None and "Cancelled" in dead.last_error
    wait_until(lambda: not server_of(aworker).processor.running, "the job to free its slot", timeout=4)


def test_a_timed_out_handler_that_then_loses_its_lease_is_settled_once(aworker: Worker) -> None:
    caught, finished = Calls(), threading.Event()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            caught.add(task.token)
            try:
                await asyncio.sleep(3600)  # ignores the timeout and keeps going
            finally:
                finished.set()

    info = aworker.queue.enqueue(Task("t", retry=3, timeout=0.2))
    aworker.start(handler)
    caught.wait(lambda items: len(items) == 1, "the timeout to reach the handler")
    server = server_of(aworker)
    assert len(server.processor.running) == 1, "a handler still running keeps its slot"
    # Another worker took the task over: the heartbeat's extend is refused, the job abandoned.
    aworker.client.hset(aworker.queue.keys("default").task(info.id), "token", "taken-over")
    wait_event(finished, "the abandoned handler to be cancelled")
    wait_until(lambda: not server.processor.running, "the job to leave running")
    stats = server.stats
    assert (stats["leased"], stats["lost"], stats["failed"], stats["succeeded"]) == (1, 1, 0, 0)
    assert server.processor._timeouts == {} or all(not j for j in server.processor._timeouts.values())
    now = aworker.info(info.id)
    assert now is not None and now.state is TaskState.ACTIVE and now.retried == 0, "nothing committed"
    assert where(aworker, info.id) == ["active"]


def test_a_timed_out_handler_still_running_at_shutdown_is_handed_back_once(sync_worker: Worker) -> None:
    caught = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            caught.add(task.id)
            await asyncio.sleep(3600)  # swallows the timeout; only shutdown ends it

    info = sync_worker.queue.enqueue(Task("t", retry=3, timeout=0.2))
    sync_worker.start(handler, shutdown_timeout=0.2)
    caught.wait(lambda items: len(items) == 1, "the timeout to reach the handler")
    server = server_of(sync_worker)
    sync_worker.stop()
    stats = server.stats
    assert (stats["leased"], stats["lost"], stats["failed"], stats["succeeded"]) == (1, 1, 0, 0)
    assert not server.processor.running
    assert where(sync_worker, info.id) in (["pending"], ["retry"]), where(sync_worker, info.id)


def test_sync_handlers_see_the_timeout_through_their_context(aworker: Worker) -> None:
    """Three sync handlers time out: one blocked in wait_cancelled (made before the timeout),
    one polling is_cancelled and then asking wait_cancelled (made after it: True at once), one
    that ignores its context (the attempt still fails; its late return changes nothing)."""
    seen = Calls()
    release = threading.Event()
    mux = Mux()

    @mux.handle("waits")
    def waits(ctx: Context, task: LeasedTask) -> None:
        early = ctx.wait_cancelled(0)
        seen.add(("waits", early, ctx.wait_cancelled(30), ctx.cancel_reason))

    @mux.handle("polls")
    def polls(ctx: Context, task: LeasedTask) -> None:
        end = time.monotonic() + 30
        while not ctx.is_cancelled() and time.monotonic() < end:
            time.sleep(0.005)
        start = time.monotonic()
        now = ctx.wait_cancelled(10)
        seen.add(("polls", now, time.monotonic() - start < 5, ctx.cancel_reason))

    @mux.handle("ignores")
    def ignores(ctx: Context, task: LeasedTask) -> None:
        release.wait(30)
        seen.add(("ignores", ctx.is_cancelled(), ctx.cancel_reason))

    tasks = {name: Task(name, retry=0, timeout=0.25, task_id=name) for name in ("waits", "polls", "ignores")}
    aworker.queue.enqueue_many(list(tasks.values()))
    aworker.start(mux, concurrency=3)
    for name in tasks:
        dead = archived(aworker, name)
        assert dead.last_error is not None and dead.last_error.startswith("TaskTimeout"), (name, dead)
    release.set()
    seen.wait(lambda items: len(items) == 3, "the three handler threads to return")
    assert sorted(seen.items) == [
        ("ignores", True, "timeout"),
        ("polls", True, True, "timeout"),
        ("waits", False, True, "timeout"),
    ]


# === 2. Context: the lazy event ==================================================================


def test_context_wait_cancelled_before_and_after_cancel() -> None:
    ctx = Context("id", "q", 60)
    assert ctx.wait_cancelled(0) is False and not ctx.is_cancelled() and ctx.cancel_reason == ""
    ctx._cancel("timeout")
    assert ctx.wait_cancelled(0) is True and ctx.wait_cancelled(None) is True
    ctx._cancel("lease lost")
    assert ctx.cancel_reason == "timeout", "the first reason stays"

    late = Context("id", "q", 60)
    late._cancel("worker shutting down")  # cancelled before any wait made the event
    assert late.wait_cancelled(0) is True and late.is_cancelled()
    assert late.cancel_reason == "worker shutting down"


def test_context_deadline_is_an_aware_utc_datetime_of_start_plus_timeout() -> None:
    before = datetime.now(UTC)
    ctx = Context("id", "q", 90)
    after = datetime.now(UTC)
    deadline = ctx.deadline
    assert deadline.tzinfo is not None and deadline.utcoffset() == timedelta(0)
    assert before + timedelta(seconds=90) - timedelta(milliseconds=5) <= deadline
    assert deadline <= after + timedelta(seconds=90) + timedelta(milliseconds=5)
    assert ctx.deadline == deadline, "the property is stable"
    assert 0 < ctx.remaining() <= 90


def test_a_thread_blocked_in_wait_cancelled_is_woken_by_cancel() -> None:
    ctx = Context("id", "q", 60)
    waiting, result = threading.Event(), []

    def wait() -> None:
        waiting.set()
        result.append(ctx.wait_cancelled(30))

    thread = threading.Thread(target=wait)
    thread.start()
    wait_event(waiting, "the waiter to start")
    wait_until(lambda: ctx._event is not None, "the waiter to make its event")
    ctx._cancel("lease lost")
    thread.join(10)
    assert not thread.is_alive() and result == [True]


def _race_one_context(round_: int, waiters: int = 12) -> None:
    ctx = Context(f"id{round_}", "q", 60)
    barrier = threading.Barrier(waiters + 1)
    results: list[bool] = []
    lock = threading.Lock()

    def wait() -> None:
        barrier.wait(10)
        woke = ctx.wait_cancelled(20)
        with lock:
            results.append(woke)

    threads = [threading.Thread(target=wait) for _ in range(waiters)]
    for t in threads:
        t.start()
    reasons = [f"r{i}" for i in range(4)]
    cancellers = [threading.Thread(target=ctx._cancel, args=(r,)) for r in reasons]
    barrier.wait(10)
    for c in cancellers:
        c.start()
    for t in [*threads, *cancellers]:
        t.join(30)
    assert results == [True] * waiters, f"round {round_}: {results}"
    assert ctx.is_cancelled() and ctx.cancel_reason in reasons
    assert ctx.wait_cancelled(0) is True


def test_many_threads_racing_wait_cancelled_against_cancel_all_wake() -> None:
    """The event is made lazily by whichever waiter comes first, while the loop cancels: no
    waiter may miss the cancellation, whatever the interleaving."""
    for round_ in range(40):
        _race_one_context(round_)


# === 3. pack (hiredis) on both shells, with decode_responses clients =============================


EVERY_BYTE = bytes(range(256))
RESP_LOOKALIKE = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$-1\r\n\r\n"
QUEUE = "очередь-キュー"


CLIENT_KWARGS = [{}, {"decode_responses": True}, {"encoding": "latin-1", "decode_responses": True}]


@pytest.mark.parametrize("client_kwargs", CLIENT_KWARGS, ids=["bytes", "decoded", "latin1-decoded"])
def test_binary_payloads_and_non_ascii_names_round_trip(
    make_queue: Any, client_kwargs: dict[str, Any]
) -> None:
    """Names are UTF-8 on the wire whatever the client's own encoding (hiredis packs them)."""
    q = make_queue(client_kwargs=client_kwargs)
    payloads = {
        "every-byte": EVERY_BYTE * 3,
        "empty": b"",
        "resp": RESP_LOOKALIKE,
        "nul": b"\x00" * 17,
        "high": bytes(range(255, -1, -1)),
        "crlf": b"\r\n" * 100,
    }
    types = {name: f"отчёт:生成:{name}:🚀" for name in payloads}
    tasks = [Task(types[n], p, task_id=f"задача-{n}", retention=60) for n, p in payloads.items()]
    results = q.enqueue_many(tasks, queue=QUEUE)
    for task, result in zip(tasks, results, strict=True):
        assert isinstance(result, qsync.TaskInfo), result
        assert (result.id, result.type, result.payload, result.queue) == (
            task.id,
            task.type,
            task.payload,
            QUEUE,
        )
    # The same id and content again: an idempotent success (the fingerprint matched bytes for bytes).
    same = Task(types["every-byte"], payloads["every-byte"], task_id="задача-every-byte", retention=60)
    again = q.enqueue(same, queue=QUEUE)
    assert again.payload == payloads["every-byte"]

    for task in tasks:
        info = q.info(task.id, queue=QUEUE)
        assert (info.type, info.payload, info.state) == (task.type, task.payload, TaskState.PENDING)

    batch = q.lease(QUEUE, count=len(tasks))
    by_id = {t.id: t for t in batch.tasks}
    assert set(by_id) == {t.id for t in tasks}
    for task in tasks:
        leased = by_id[task.id]
        assert (leased.type, leased.payload, leased.queue) == (task.type, task.payload, QUEUE)
        assert isinstance(leased.payload, bytes)

    error = "ошибка: 失败 🚫 \r\n$-1\r\n"
    failing = by_id["задача-resp"]
    assert q.fail(QUEUE, [Failure(failing.id, failing.token, error, None)]) == [TaskState.ARCHIVED]
    assert q.info(failing.id, queue=QUEUE).last_error == error
    rest = [t for t in batch.tasks if t.id != failing.id]
    assert q.ack(QUEUE, rest) == [True] * len(rest)
    for task in rest:
        done = q.info(task.id, queue=QUEUE)
        assert (done.state, done.payload) == (TaskState.COMPLETED, task.payload)


@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "decoded"])
def test_a_five_megabyte_payload_round_trips(make_queue: Any, decode: bool) -> None:
    q = make_queue(client_kwargs={"decode_responses": decode}, max_payload_bytes=8 * 1024 * 1024)
    payload = os.urandom(5 * 1024 * 1024 - 256) + EVERY_BYTE
    info = q.enqueue(Task("big:ё", payload, retention=60))
    assert info.payload == payload
    assert q.info(info.id).payload == payload
    (leased,) = q.lease("default", count=5).tasks
    assert leased.id == info.id and leased.payload == payload and leased.type == "big:ё"
    assert q.ack("default", [leased]) == [True]
    assert q.info(info.id).state is TaskState.COMPLETED


def test_payloads_and_names_reach_handlers_intact(worker: Worker) -> None:
    seen = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        seen.add((ctx.queue, task.queue, task.id, task.type, task.payload))

    payloads = [EVERY_BYTE, b"", RESP_LOOKALIKE, os.urandom(300_000)]
    tasks = [Task(f"тип-{i}-型", p, task_id=f"ид-{i}") for i, p in enumerate(payloads)]
    for result in worker.queue.enqueue_many(tasks, queue=QUEUE):
        assert isinstance(result, qsync.TaskInfo), result
    worker.start(handler, queues=[QUEUE])
    seen.wait(lambda items: len(items) == len(tasks), "every task to reach the handler")
    assert sorted(seen.items) == sorted((QUEUE, QUEUE, t.id, t.type, t.payload) for t in tasks)


def test_a_worker_on_decode_responses_clients_hands_handlers_exact_bytes(redis_server: RedisServer) -> None:
    """Queue.start on a decode_responses=True client (its asyncio twin decodes too), and
    AsyncQueue.run on one: payloads reach the handler as the exact bytes enqueued."""
    redis_server.client().flushall()
    payloads = [EVERY_BYTE, b"\xff\xfe\x00", b"", RESP_LOOKALIKE]
    seen = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        seen.add((task.type, task.payload))

    client = redis.Redis(port=redis_server.port, decode_responses=True)
    queue = qsync.new(client, prefix=f"dr{next(_prefixes)}")
    try:
        queue.enqueue_many([Task(f"s-{i}-ж", p) for i, p in enumerate(payloads)])
        queue.start(handler, **{"lease_duration": 1, "poll_interval": 0.2})
        try:
            seen.wait(lambda items: len(items) == len(payloads), "the sync-started worker's tasks")
        finally:
            queue.stop(timeout=20)
    finally:
        client.close()
        collect_quietly()
    assert sorted(seen.items) == sorted((f"s-{i}-ж", p) for i, p in enumerate(payloads))

    async def run_async() -> None:
        aclient = aioredis.Redis(port=redis_server.port, decode_responses=True)
        aqueue = qsync.new(aclient, prefix=f"dr{next(_prefixes)}")
        try:
            await aqueue.enqueue_many([Task(f"a-{i}-ж", p) for i, p in enumerate(payloads)])
            runner = asyncio.get_running_loop().create_task(
                aqueue.run(handler, lease_duration=1, poll_interval=0.2)
            )
            try:
                end = time.monotonic() + 15
                while len(seen.items) < 2 * len(payloads) and time.monotonic() < end and not runner.done():
                    await asyncio.sleep(0.01)
            finally:
                await aqueue.stop()
                await asyncio.wait_for(runner, 20)
        finally:
            await aclient.aclose()

    asyncio.run(run_async())
    assert sorted(x for x in seen.items if x[0].startswith("a-")) == sorted(
        (f"a-{i}-ж", p) for i, p in enumerate(payloads)
    )


@pytest.mark.parametrize("op", ["ack", "fail"])
def test_a_lease_naming_an_unencodable_str_is_a_typed_error(make_queue: Any, op: str) -> None:
    """hiredis.pack_command encodes str as strict UTF-8: a lone surrogate in a lease id or token
    must be refused as a bad argument (a QsyncError), like every other bad argument, and not
    escape as a bare UnicodeEncodeError from the transport."""
    q = make_queue()
    q.enqueue(Task("x", task_id="real"))
    (leased,) = q.lease("default").tasks
    bad = qsync.Lease("real", "\udcff")
    with pytest.raises(qsync.errors.QsyncError) as caught:
        if op == "fail":
            q.fail("default", [Failure(bad.id, bad.token, "e", None)])
        else:
            getattr(q, op)("default", [bad])
    assert isinstance(caught.value, ValueError)
    # Nothing happened to the real lease, and the queue still works.
    assert q.ack("default", [leased]) == [True]


# === 4. lease.lua: one pcall HMGET per task =====================================================


def _env(client: redis.Redis) -> tuple[qsync.Queue, Any]:
    fake = isinstance(client, fakeredis.FakeRedis)
    q = qsync.new(client, prefix=f"la{next(_prefixes)}", check_server=not fake)
    return q, q.keys("q")


@pytest.mark.parametrize("kind", ["string", "list", "set", "zset", "stream", "none"])
def test_lease_drops_an_id_whose_task_key_is_not_a_hash_as_an_orphan(backend: redis.Redis, kind: str) -> None:
    q, k = _env(backend)
    q.enqueue(Task("job", b"a", task_id="before"), queue="q")
    key = k.task("odd")
    if kind == "string":
        backend.set(key, "not a hash")
    elif kind == "list":
        backend.rpush(key, "x", "y")
    elif kind == "set":
        backend.sadd(key, "x")
    elif kind == "zset":
        backend.zadd(key, {"x": 1})
    elif kind == "stream":
        backend.xadd(key, {"f": "v"})
    backend.lpush(k.pending, "odd")
    q.enqueue(Task("job", b"b", task_id="after"), queue="q")
    dumped = backend.dump(key) if kind != "none" else None

    batch = q.lease("q", count=10)

    assert [t.id for t in batch.tasks] == ["before", "after"]
    assert (batch.orphans, batch.corrupt_archived, batch.deadline_archived) == (1, 0, 0)
    assert backend.lrange(k.pending, 0, -1) == []
    for z in ZSETS:
        assert backend.zscore(getattr(k, z), "odd") is None, z
    if kind == "none":
        assert not backend.exists(key), "no hash is invented for an orphan id"
    else:
        assert backend.dump(key) == dumped, "a key of another type is left exactly as it was"
    # The script went on normally after the pcall error: the leased tasks are fenced.
    assert q.ack("q", batch.tasks) == [True, True]


@pytest.mark.parametrize(
    ("fields", "missing"),
    [
        ({"s": "pending", "r": "0", "m": "3"}, "v (format version)"),  # v, t, p all gone
        ({"s": "pending"}, "v (format version)"),
        ({"v": "1", "t": "job", "r": "0", "m": "3"}, "p (payload)"),
        ({"t": "job", "p": "p", "r": "0", "m": "3"}, "v (format version)"),
        ({"v": "1", "p": "p", "r": "0", "m": "3"}, "t (type)"),
    ],
)
def test_lease_archives_a_partial_hash_as_corrupt_keeping_its_fields(
    backend: redis.Redis, fields: dict[str, str], missing: str
) -> None:
    q, k = _env(backend)
    backend.hset(k.task("partial"), mapping=fields)
    backend.lpush(k.pending, "partial")
    q.enqueue(Task("job", b"ok", task_id="ok"), queue="q")

    batch = q.lease("q", count=5)

    assert [t.id for t in batch.tasks] == ["ok"]
    assert (batch.orphans, batch.corrupt_archived) == (0, 1)
    assert backend.zscore(k.archived, "partial") is not None
    h = {a.decode(): b.decode() for a, b in backend.hgetall(k.task("partial")).items()}
    assert h["s"] == "archived"
    assert h["error"] == f"corrupt: field {missing} missing or malformed"
    assert {f: h[f] for f in fields if f != "s"} == {f: v for f, v in fields.items() if f != "s"}
    info = q.info("partial", queue="q")
    assert info.state is TaskState.ARCHIVED


def test_a_worker_gets_past_orphans_and_wrong_type_keys(aworker: Worker) -> None:
    ran = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        ran.add(task.id)

    k = aworker.queue.keys("default")
    aworker.client.set(k.task("str"), "x")
    aworker.client.rpush(k.task("lst"), "x")
    aworker.client.lpush(k.pending, "str", "ghost", "lst")
    aworker.queue.enqueue_many([Task("job", task_id=f"ok-{i}") for i in range(5)])
    aworker.start(handler)
    ran.wait(lambda items: len(items) == 5, "the real tasks to run")
    wait_until(lambda: aworker.client.llen(k.pending) == 0, "pending to drain")
    assert sorted(ran.items) == [f"ok-{i}" for i in range(5)]
    assert aworker.client.get(k.task("str")) == b"x"


# === 5. resume ================================================================================


def test_async_resume_wakes_an_idle_server_listening_on_several_queues(aworker: Worker) -> None:
    ran = Calls()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        ran.add((task.queue, task.id))

    aworker.queue.pause("b")
    aworker.queue.enqueue(Task("x", task_id="in-b"), queue="b")
    aworker.start(handler, queues=["a", "b"], poll_interval=60)
    wait_until(lambda: _blocked_listeners(aworker.client) >= 2, "the server to be idle on both queues")
    assert ran.items == [], "a paused queue must not be leased from"

    async def resume() -> None:
        client = aioredis.Redis(port=aworker.server.port)
        try:
            await qsync.new(client, prefix=aworker.prefix).resume("b")
        finally:
            await client.aclose()

    asyncio.run(resume())
    ran.wait(lambda items: len(items) == 1, "the task of the resumed queue to run", timeout=10)
    assert ran.items == [("b", "in-b")]


def test_resume_of_a_queue_that_is_not_paused_or_empty(make_queue: Any) -> None:
    q = make_queue(client_kwargs={"decode_responses": True})
    k = q.keys("default")
    raw = redis.Redis(port=int(q.client.connection_pool.connection_kwargs["port"]))
    try:
        q.resume("default")  # never paused, nothing waits: a no-op
        assert not raw.exists(k.paused) and not raw.exists(k.wake)
        q.enqueue(Task("x"))
        raw.delete(k.wake)
        q.resume("default")  # not paused but tasks wait: a harmless wake-up
        assert raw.lrange(k.wake, 0, -1) == [b"1"]
        q.pause("default")
        q.resume("default")
        assert not raw.exists(k.paused) and raw.lrange(k.wake, 0, -1) == [b"1"]
    finally:
        raw.close()


@pytest.mark.parametrize("which", ["pending", "wake"])
def test_resume_with_a_wrong_type_key_is_corrupt_state_and_stays_paused(make_queue: Any, which: str) -> None:
    q = make_queue()
    k = q.keys("default")
    raw = redis.Redis(port=int(q.client.connection_pool.connection_kwargs["port"]))
    try:
        q.pause("default")
        raw.hset(getattr(k, which), "f", "v")
        with pytest.raises(CorruptState):
            q.resume("default")
        assert raw.exists(k.paused), "nothing written: the queue stays paused"
        assert raw.hgetall(getattr(k, which)) == {b"f": b"v"}
    finally:
        raw.close()

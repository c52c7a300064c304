"""The idle pick-up path of the worker server on a real Redis: the lease each idle wake-up
listener sends right behind its BRPOP (qsync/server/_waker.py), the slots the processor keeps
reserved for those leases, and how a server that gets busy or stops ends those waits at once.

Synchronisation is by events set in handlers and by polling Redis with deadlines; nothing here
asserts on timing. Bounded waits (a stop within a few seconds while the block time is far
longer) show that a wait was ended, not that it was fast."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from qsync import Context, LeasedTask, Task, TaskState
from tests.integration.test_server import Worker, wait_event
from tests.polling import wait_until

# A block time far beyond every wait below: whatever happens in time happened because a wait
# was ended or woken, never because a listener's BRPOP timed out.
SLOW = {"poll_interval": 60, "lease_duration": 120}


def _listeners(client: redis.Redis) -> list[dict[str, Any]]:
    return [c for c in client.client_list() if c.get("cmd") == "brpop" and "b" in c.get("flags", "")]


def _armed(client: redis.Redis) -> int:
    """Listeners blocked with a command queued behind their BRPOP (CLIENT LIST's ``qbuf``):
    the lease that runs the moment the BRPOP returns."""
    return sum(1 for c in _listeners(client) if int(c.get("qbuf", 0)) > 0)


class Gate:
    """Handlers that hold their slot until released, counting how many run at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.release = threading.Event()
        self.running = 0
        self.most = 0
        self.done: list[str] = []

    def handler(self, ctx: Context, task: LeasedTask) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.release.wait(30)
        finally:
            with self._lock:
                self.running -= 1
                self.done.append(task.id)


def test_an_idle_server_carries_a_lease_behind_each_wait(worker: Worker) -> None:
    ran = threading.Event()
    worker.start(lambda ctx, task: ran.set(), queues={"a": 1, "b": 1}, concurrency=4, **SLOW)
    wait_until(lambda: _armed(worker.client) == 2, "both listeners to wait with a lease behind")
    worker.queue.enqueue(Task("t"), queue="b")
    wait_event(ran, "the task to run, leased by the lease behind the wait")


def test_reserved_slots_never_let_more_than_concurrency_run(worker: Worker) -> None:
    # Three queues share two slots while idle; each wake-up brings its own lease. However the
    # wake-ups and the server's own lease rounds interleave, at most two handlers run at once.
    gate = Gate()
    queues = {"a": 1, "b": 1, "c": 1}
    worker.start(gate.handler, queues=queues, concurrency=2, **SLOW)
    for round_ in range(3):
        wait_until(lambda: _listeners(worker.client), "the server to be idle")
        ids = [worker.queue.enqueue(Task("t"), queue=q).id for q in queues for _ in range(2)]
        wait_until(lambda: gate.running == 2, f"round {round_}: two handlers to run")
        gate.release.set()
        wanted = set(ids)
        wait_until(lambda: wanted <= set(gate.done), f"round {round_}: every task to run")  # noqa: B023
        gate.release.clear()
    assert gate.most == 2


@pytest.mark.usefixtures("long_armed_waits")
def test_a_server_that_gets_busy_takes_back_the_slots_other_listeners_reserved(worker: Worker) -> None:
    # Idle, each of two queues' listeners holds half of the four slots. Work on queue a only:
    # the server must end b's wait (its BRPOP would block for far longer than this test) and
    # run four of a's tasks at once.
    gate = Gate()
    worker.start(gate.handler, queues={"a": 1, "b": 1}, concurrency=4, **SLOW)
    wait_until(lambda: _armed(worker.client) == 2, "both listeners to wait with a lease behind")
    worker.queue.enqueue_many([Task("t") for _ in range(8)], queue="a")
    try:
        wait_until(lambda: gate.running == 4, "four handlers to run at once", timeout=10)
    finally:
        gate.release.set()
    wait_until(lambda: len(gate.done) == 8, "all eight tasks to run")
    assert gate.most == 4


@pytest.mark.usefixtures("long_armed_waits")
def test_stop_of_an_armed_server_returns_its_leases_at_once(worker: Worker) -> None:
    worker.start(lambda ctx, task: None, queues={"a": 1, "b": 1}, **SLOW)
    wait_until(lambda: _armed(worker.client) == 2, "both listeners to wait with a lease behind")
    worker.stop(timeout=5)  # a bounded wait: the BRPOPs would block for 30 s
    assert _listeners(worker.client) == []
    listener_keys = list(worker.client.scan_iter(match="*:wake:*"))
    for key in listener_keys:  # a token that raced its listener's return must expire
        assert 0 < worker.client.pttl(key) <= 60_000


@pytest.mark.parametrize("attempt", range(8))
def test_a_task_enqueued_while_the_server_stops_is_run_or_handed_back(worker: Worker, attempt: int) -> None:
    # The enqueue races the stop: the lease behind the wait may take the task just as the stop
    # begins. Whatever the interleaving, the task ends up run once or pending with no attempt
    # counted, never active (stuck until its lease expires) and never lost.
    runs: list[str] = []
    worker.start(lambda ctx, task: runs.append(task.id), **SLOW)
    wait_until(lambda: _armed(worker.client) == 1, "the listener to wait with a lease behind")
    info = worker.queue.enqueue(Task("t"))
    worker.stop(timeout=10)
    assert worker.active_count() == 0
    if runs:
        assert runs == [info.id]
        assert worker.info(info.id) is None, "a task that ran is acked"
    else:
        after = worker.info(info.id)
        assert after is not None and after.state is TaskState.PENDING and after.retried == 0


def test_a_flushed_script_cache_does_not_lose_a_wake_up(worker: Worker) -> None:
    # The lease queued behind the BRPOP meets NOSCRIPT when the wait returns: the server still
    # picks the task up (its own lease round reloads the script), and the next wait works too.
    ran: list[bytes] = []
    both = threading.Event()

    def handler(ctx: Context, task: LeasedTask) -> None:
        ran.append(task.payload)
        if len(ran) == 2:
            both.set()

    worker.start(handler, **SLOW)
    wait_until(lambda: _armed(worker.client) == 1, "the listener to wait with a lease behind")
    worker.client.script_flush()
    worker.queue.enqueue(Task("t", b"1"))
    wait_until(lambda: ran == [b"1"], "the first task to run after SCRIPT FLUSH")
    wait_until(lambda: _listeners(worker.client), "the server to be idle again")
    worker.queue.enqueue(Task("t", b"2"))
    wait_event(both, "the second task to run")


def test_a_task_leased_behind_a_long_wait_keeps_its_lease(worker: Worker) -> None:
    # The lease runs when the BRPOP returns, up to the block time after it was sent; the
    # server counts its expiry from the send. With a lease far shorter than the poll interval,
    # a task that runs for several leases must still be heartbeated, not given up or recovered.
    cancelled: list[bool] = []
    done = threading.Event()

    def handler(ctx: Context, task: LeasedTask) -> None:
        cancelled.append(ctx.wait_cancelled(3.0))
        done.set()

    worker.start(handler, poll_interval=30, lease_duration=1.0)
    wait_until(lambda: _armed(worker.client) == 1, "the listener to wait with a lease behind")
    info = worker.queue.enqueue(Task("t"))
    wait_event(done, "the handler to finish")
    worker.wait_state(info.id, None)  # acked
    assert cancelled == [False], "the attempt was cancelled, or the task ran twice"

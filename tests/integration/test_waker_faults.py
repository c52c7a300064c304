"""Faults and corner cases of the idle pick-up path (qsync/server/_waker.py): the lease each
idle wake-up listener sends behind its BRPOP, the slots the processor reserves for it, and the
unblock token that ends an armed wait (lua/unblock.lua).

Each test names the invariant it guards (docs reliability.md: I1-I10, or the module's own
promises). Synchronisation is by events set in handlers and by polling Redis with deadlines;
nothing here asserts on timing. Bounded waits ("within 5 s while the block time is 30 s") show
that a wait was ended or woken, not that it was fast."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import qsync
from qsync import Context, LeasedTask, Task, TaskState, _ops
from tests.integration.test_server import Worker, wait_event
from tests.integration.test_waker import SLOW, Gate, _armed, _listeners
from tests.polling import wait_until
from tests.redis_procs import RedisServer, out_of_memory

# With SLOW and long_armed_waits, an armed wait blocks for a quarter of the lease (30 s), an
# unarmed one for the poll interval (60 s): anything that happens within BOUND happened because
# a wait was ended. (Without long_armed_waits the library caps an armed wait at 2 s.)
BOUND = 5.0


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, for faults that would disturb the session's (maxmemory,
    DEBUG SLEEP)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


def _peer(worker: Worker, flavour: str = "sync") -> Worker:
    """A second worker server on the same prefix (so on the same queues) as ``worker``."""
    other = Worker(flavour, worker.server)
    other.prefix = worker.prefix
    other.queue = qsync.new(other.client, prefix=worker.prefix)
    return other


def _enqueue_atomically(client: redis.Redis, queue: qsync.Queue, batches: dict[str, list[Task]]) -> None:
    """Enqueue on several queues in one MULTI/EXEC: every wake-up lands in the same instant,
    so every armed listener's lease runs before the server can react to any of them."""
    calls = [call for name, tasks in batches.items() for call in _ops.enqueue_many(queue.keys(name), tasks)]
    for call in calls:
        assert call.script is not None
        client.script_load(call.script.source)
    pipe = client.pipeline(transaction=True)
    for call in calls:
        pipe.execute_command(*call.command())
    pipe.execute()


# --- reserved slots must not hold up the server's own work --------------------------------------


@pytest.mark.usefixtures("long_armed_waits", "first_queue_wins_draws")
def test_a_wake_up_on_a_queue_without_a_share_is_not_held_up_by_reserved_slots(worker: Worker) -> None:
    # One slot, two queues: idle, the slot is reserved for the lease behind a's wait (b's share
    # of one slot by weight 1000:1 is 0, but for a 1-in-1001 draw), so b's listener only
    # listens. A task on b wakes the server, whose every slot is reserved by a's armed wait: the
    # server must end that wait and run b's task, not sit until a's BRPOP times out (30 s).
    # Guards I10 (liveness) and the Waker's promise "no slot stays reserved by a listener that
    # would otherwise wait for its block time".
    ran = threading.Event()
    worker.start(lambda ctx, task: ran.set(), queues={"a": 1000, "b": 1}, concurrency=1, **SLOW)
    wait_until(lambda: len(_listeners(worker.client)) == 2 and _armed(worker.client) == 1, "idle")
    worker.queue.enqueue(Task("t"), queue="b")
    wait_event(ran, "b's task to run while a's armed wait holds the only slot", timeout=BOUND)


@pytest.mark.usefixtures("long_armed_waits", "first_queue_wins_draws")
def test_a_partly_busy_server_runs_a_task_on_a_queue_without_a_share(worker: Worker) -> None:
    # The same with a slot held by a running task: two slots, one busy, the free one reserved
    # for a's lease; b's task must run at once, not when a's wait times out.
    gate = Gate()
    ran = threading.Event()

    def handler(ctx: Context, task: LeasedTask) -> None:
        if task.type == "hold":
            gate.handler(ctx, task)
        else:
            ran.set()

    worker.start(handler, queues={"a": 1000, "b": 1}, concurrency=2, **SLOW)
    wait_until(lambda: len(_listeners(worker.client)) == 2 and _armed(worker.client) == 1, "idle")
    worker.queue.enqueue(Task("hold"), queue="a")
    try:
        wait_until(lambda: gate.running == 1, "the holding task to run")
        wait_until(lambda: len(_listeners(worker.client)) == 2 and _armed(worker.client) == 1, "idle")
        worker.queue.enqueue(Task("t"), queue="b")
        wait_event(ran, "b's task to run beside the holding one", timeout=BOUND)
    finally:
        gate.release.set()


# --- strict priority --------------------------------------------------------------------------------


def test_strict_priority_holds_for_tasks_that_arrive_together(worker: Worker) -> None:
    # strict=True: "higher weights are always drained first". Idle, the slots are reserved by
    # weight for leases behind both queues' waits (two for high, one for low). High and low
    # tasks that arrive together must not let the low one run while high ones are pending.
    gate = Gate()
    started: list[str] = []

    def handler(ctx: Context, task: LeasedTask) -> None:
        started.append(task.type)
        gate.handler(ctx, task)

    worker.start(handler, queues={"high": 2, "low": 1}, strict=True, concurrency=3, **SLOW)
    wait_until(lambda: len(_listeners(worker.client)) == 2, "the server to be idle")
    _enqueue_atomically(
        worker.client, worker.queue, {"high": [Task("high") for _ in range(6)], "low": [Task("low")]}
    )
    try:
        wait_until(lambda: gate.running == 3, "three handlers to run")
        assert started.count("low") == 0, f"a low task ran while high ones were pending: {started}"
    finally:
        gate.release.set()
    wait_until(lambda: len(gate.done) == 7, "every task to run")
    assert started[-1] == "low"


# --- several servers on one queue -------------------------------------------------------------------


@pytest.mark.usefixtures("long_armed_waits", "first_queue_wins_draws")
def test_a_busy_server_leaves_wake_ups_to_an_idle_peer(worker: Worker) -> None:
    # Server A (one slot, queues a and b) goes idle first: its slot is reserved for a's lease,
    # b's listener only listens (for 60 s), and it blocked on b's wake list before B's did.
    # A task on a makes A busy. A task on b must then wake the idle server B at once: a busy
    # server must not keep a wait that pops the wake-up token meant for an idle one (Waker
    # docstring; test_server.py test_a_busy_server_leaves_wake_ups_to_idle_servers).
    gate = Gate()
    ran_on_b = threading.Event()
    worker.start(gate.handler, queues={"a": 1000, "b": 1}, concurrency=1, **SLOW)
    wait_until(lambda: len(_listeners(worker.client)) == 2 and _armed(worker.client) == 1, "A idle")
    peer = _peer(worker)
    try:
        peer.start(lambda ctx, task: ran_on_b.set(), queues={"b": 1}, concurrency=1, **SLOW)
        wait_until(lambda: len(_listeners(worker.client)) == 3 and _armed(worker.client) == 2, "B idle")
        worker.queue.enqueue(Task("hold"), queue="a")
        wait_until(lambda: gate.running == 1, "A to be busy")
        # Ending a wait takes a round trip: a task that lands before it is A's to hold up.
        wait_until(lambda: len(_listeners(worker.client)) == 1, "busy A to stop waiting on b", BOUND)
        worker.queue.enqueue(Task("t"), queue="b")
        wait_event(ran_on_b, "the idle server B to run b's task while A is busy", timeout=BOUND)
    finally:
        gate.release.set()
        peer.close()


# --- stop ---------------------------------------------------------------------------------------------


def test_stop_returns_promptly_when_redis_is_at_maxmemory(own_redis: RedisServer) -> None:
    # Redis full (noeviction): enqueue is refused, but leases, acks and a stop must go on (F17:
    # "Workers keep acking"). The stop ends the armed waits with an unblock token; if that is
    # refused as OOM, the stop waits for the armed BRPOPs' block time (30 s here). The stop
    # must return within BOUND (I10; test_waker.py test_stop_of_an_armed_server_...).
    w = Worker("sync", own_redis)
    try:
        w.start(lambda ctx, task: None, queues={"a": 1, "b": 1}, **SLOW)
        wait_until(lambda: _armed(w.client) == 2, "both listeners to wait with a lease behind")
        out_of_memory(w.client)
        w.stop(timeout=BOUND)
        assert _listeners(w.client) == []
    finally:
        w.client.config_set("maxmemory", 0)
        w.close()


def test_stop_returns_promptly_when_redis_is_frozen(own_redis: RedisServer) -> None:
    # Redis frozen (SIGSTOP: connections open, nothing answered). Each call of the stop waits
    # out its socket timeout, and the registry entry's removal also retried its connection for
    # a minute: the stop took 69 s. The upkeep after the jobs are settled is bounded now
    # (server.UPKEEP_STOP_S); the entry left behind expires with its TTL.
    w = Worker("sync", own_redis)
    frozen = False
    try:
        w.start(lambda ctx, task: None)
        wait_until(lambda: _listeners(w.client), "the listener to wait")
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        frozen = True
        w.stop(timeout=20)
    finally:
        if frozen:
            assert own_redis.proc is not None
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        w.close()


# --- Redis faults that must not wedge the idle pick-up (guards) ------------------------------------


def _server(worker: Worker) -> Any:
    """The running worker's Server object (to find its listener id)."""
    if worker.flavour == "sync":
        assert worker._server_queue is not None and worker._server_queue._thread is not None
        return worker._server_queue._thread.server
    assert worker._aqueue is not None
    return worker._aqueue._server


@pytest.mark.usefixtures("long_armed_waits")
def test_killed_listener_connections_give_their_slots_back(worker: Worker) -> None:
    # CLIENT KILL of every armed listener: Redis drops the lease queued behind the BRPOP with
    # the connection (it never runs), so the reserved slots must come back and the listeners
    # must arm again. Then a burst runs at full concurrency, every task once, no attempt
    # counted, nothing left active (I4, I8, I10; concurrency never exceeded).
    gate = Gate()
    retried: list[int] = []

    def handler(ctx: Context, task: LeasedTask) -> None:
        retried.append(task.retried)
        gate.handler(ctx, task)

    worker.start(handler, queues={"a": 1, "b": 1}, concurrency=4, **SLOW)
    wait_until(lambda: _armed(worker.client) == 2, "both listeners to wait with a lease behind")
    for c in _listeners(worker.client):
        worker.client.client_kill_filter(_id=c["id"])
    wait_until(lambda: _armed(worker.client) == 2, "both listeners to arm again")
    ids = [info.id for info in worker.queue.enqueue_many([Task("t") for _ in range(8)], queue="a")]
    try:
        wait_until(lambda: gate.running == 4, "four handlers to run at once", timeout=BOUND)
    finally:
        gate.release.set()
    wait_until(lambda: len(gate.done) == 8, "all eight tasks to run")
    assert sorted(gate.done) == sorted(ids) and retried == [0] * 8 and gate.most == 4
    assert worker.active_count("a") == 0


@pytest.mark.usefixtures("long_armed_waits")
def test_killing_every_connection_does_not_wedge_an_idle_server(worker: Worker) -> None:
    # CLIENT KILL TYPE normal: the listeners and the server's own pool all go at once.
    ran = threading.Event()
    worker.start(lambda ctx, task: ran.set(), **SLOW)
    wait_until(lambda: _armed(worker.client) == 1, "the listener to wait with a lease behind")
    worker.client.client_kill_filter(_type="normal", skipme=True)
    info = worker.queue.enqueue(Task("t"))
    wait_event(ran, "the task to run after every connection was killed", timeout=BOUND * 2)
    worker.wait_state(info.id, None)
    worker.stop(timeout=BOUND)


@pytest.mark.usefixtures("long_armed_waits")
def test_a_flushed_script_cache_does_not_keep_slots_reserved_or_slow_the_stop(worker: Worker) -> None:
    # SCRIPT FLUSH while armed: the unblock that ends b's wait when the server gets busy meets
    # NOSCRIPT and must be reloaded, so four of a's tasks still run at once; then the stop's
    # unblocks end the waits at once too (I10).
    gate = Gate()
    worker.start(gate.handler, queues={"a": 1, "b": 1}, concurrency=4, **SLOW)
    wait_until(lambda: _armed(worker.client) == 2, "both listeners to wait with a lease behind")
    worker.client.script_flush()
    worker.queue.enqueue_many([Task("t") for _ in range(8)], queue="a")
    try:
        wait_until(lambda: gate.running == 4, "four handlers to run at once", timeout=BOUND)
    finally:
        gate.release.set()
    wait_until(lambda: len(gate.done) == 8, "all eight tasks to run")
    # Idle again (a listener may wait without a lease: the slots were shared out while the
    # last tasks were still settling).
    wait_until(lambda: len(_listeners(worker.client)) == 2, "the server to be idle again")
    worker.client.script_flush()
    worker.stop(timeout=BOUND)


def test_a_listener_key_of_the_wrong_type_does_not_wedge_the_server(worker: Worker) -> None:
    # WRONGTYPE on the listener's own key: its BRPOP fails at once (the lease behind it still
    # runs and is delivered). The server must keep running tasks, log no error, and stop.
    ran: list[str] = []
    worker.start(lambda ctx, task: ran.append(task.id), poll_interval=1, lease_duration=4)
    wait_until(lambda: _armed(worker.client) == 1, "the listener to wait with a lease behind")
    key = worker.queue.keys("default").listener_wake(_server(worker).waker._listener_id)
    worker.client.set(key, "corrupt")
    ids = [worker.queue.enqueue(Task("t")).id for _ in range(3)]
    wait_until(lambda: sorted(ran) == sorted(ids), "the tasks to run despite the corrupt key")
    worker.stop(timeout=BOUND)
    assert worker.client.get(key) == b"corrupt", "qsync never overwrites a key it cannot read"


def test_a_redis_restart_while_armed_strands_nothing(own_redis: RedisServer) -> None:
    # kill -9 of Redis while the listener waits with a lease behind (the lease never ran: the
    # connection went with it); Redis restarts with its AOF on the same port. A task enqueued
    # then runs promptly, once, with no attempt counted, and the stop returns (I1, I8, I10).
    runs: list[int] = []
    ran = threading.Event()

    def handler(ctx: Context, task: LeasedTask) -> None:
        runs.append(task.retried)
        ran.set()

    w = Worker("sync", own_redis)
    try:
        w.start(handler, **SLOW)
        wait_until(lambda: _armed(w.client) == 1, "the listener to wait with a lease behind")
        own_redis.kill()
        own_redis.start()
        info = w.queue.enqueue(Task("t"))
        wait_event(ran, "the task to run after the restart", timeout=15)
        w.wait_state(info.id, None)
        assert runs == [0] and w.active_count() == 0
        w.stop(timeout=BOUND)
    finally:
        w.close()


# --- stop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_stop_of_a_server_with_more_queues_than_slots_returns_at_once(worker: Worker, strict: bool) -> None:
    # One slot, five queues: at most one listener is armed (30 s block), the others only
    # listen (60 s block). The stop must end every wait (I10).
    queues = {f"q{i}": i + 1 for i in range(5)}
    worker.start(lambda ctx, task: None, queues=queues, concurrency=1, strict=strict, **SLOW)
    wait_until(lambda: len(_listeners(worker.client)) == 5, "every queue's listener to wait")
    worker.stop(timeout=BOUND)
    assert _listeners(worker.client) == []


@pytest.mark.parametrize("attempt", range(4))
def test_tasks_leased_as_a_zero_grace_stop_begins_are_run_or_handed_back(
    worker: Worker, attempt: int
) -> None:
    # shutdown_timeout 0, one slot, two armed queues: tasks on both queues race the stop.
    # Each ends up acked after its one run, or pending with no attempt counted: never active
    # until its lease expires, never lost, never run twice here (I1, I3, I4, I8). A task can
    # be both run and pending: zero grace hands back a plain-def handler already in its thread,
    # which cannot be stopped (the at-least-once rerun that zero grace allows).
    runs: list[str] = []
    worker.start(
        lambda ctx, task: runs.append(task.id), queues={"a": 1, "b": 1}, concurrency=2,
        shutdown_timeout=0, **SLOW,
    )  # fmt: skip
    wait_until(lambda: _armed(worker.client) == 2, "both listeners to wait with a lease behind")
    tasks = {"a": [Task("t") for _ in range(3)], "b": [Task("t") for _ in range(3)]}
    _enqueue_atomically(worker.client, worker.queue, tasks)
    worker.stop(timeout=BOUND)
    assert len(runs) == len(set(runs)), f"a task ran twice: {runs}"
    for name, group in tasks.items():
        assert worker.active_count(name) == 0, f"tasks of {name} left active after the stop"
        for task in group:
            info = worker.info(task.id, name)
            if info is None:
                assert task.id in runs, "a task was acked without running"
            else:
                assert info.state is TaskState.PENDING and info.retried == 0, info


# --- concurrency ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_bursts_on_weighted_queues_never_exceed_concurrency(worker: Worker, strict: bool) -> None:
    # Bursts on three weighted queues, each landing while the server is idle, busy or going
    # idle: the reserved slots, the leases behind the waits and the server's own rounds
    # together never run more than concurrency handlers at once; every task runs once.
    lock = threading.Lock()
    state = {"running": 0, "most": 0}
    done: list[str] = []

    def handler(ctx: Context, task: LeasedTask) -> None:
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        ctx.wait_cancelled(0.01)  # a little work, so that handlers overlap
        with lock:
            state["running"] -= 1
            done.append(task.id)

    rng = random.Random()
    queues = {"a": 3, "b": 2, "c": 1}
    worker.start(handler, queues=queues, concurrency=2, strict=strict, **SLOW)
    ids: list[str] = []
    for round_ in range(12):
        if round_ % 3 == 0:
            wait_until(lambda: len(_listeners(worker.client)) == 3, "the server to be idle")
        burst = {q: [Task("t") for _ in range(rng.randrange(0, 4))] for q in queues}
        _enqueue_atomically(worker.client, worker.queue, {q: ts for q, ts in burst.items() if ts})
        ids += [t.id for ts in burst.values() for t in ts]
    wait_until(lambda: len(done) >= len(ids), "every task to run")
    assert sorted(done) == sorted(ids)
    assert state["most"] <= 2, f"{state['most']} handlers ran at once with concurrency 2"

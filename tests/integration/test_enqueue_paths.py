"""The enqueue paths under inputs and faults meant to break them: profiles shared by the tasks
of one script call (lua/enqueue.lua), replies decoded as they are read (``Exchange.on_reply``),
and the single-call fast path of both transports (the fork-aware spare connection, forked by
Python or in C, is tested in test_connections.py).

For every batch the check is the one reliability.md asks of a per-item result (F18, F19): a
task reported enqueued is present with its own type, options, unique lock and due time; a task
reported NotEnqueued is absent; one reported EnqueueUncertain may be either, and enqueueing it
again with the same id leaves exactly one copy (I1, I5, dup = 0).

Private Redis servers and proxies are started here, on free ports, and stopped by pid;
nothing waits on a sleep and nothing asserts on how long something took."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis

from qsync import Task, TaskInfo, TaskState
from qsync._ops import ENQUEUE_CHUNK
from qsync.errors import EnqueueUncertain, NotEnqueued, QsyncError
from tests.integration.proxy import Proxy
from tests.integration.test_client import Shell
from tests.polling import wait_until
from tests.redis_procs import RedisServer, out_of_memory

pytestmark = pytest.mark.redis

_prefixes = itertools.count()


# --- checks ----------------------------------------------------------------------------------


def payload_fields(payload: bytes) -> dict[bytes, bytes]:
    """How enqueue stores a payload (lua/lib/payload.lua): one field (format 2), or for 65 to
    512 bytes pieces of at most 63 and its length as "n" (format 3)."""
    if len(payload) <= 64 or len(payload) > 512:
        return {b"v": b"2", b"p": payload}
    pieces = [payload[start : start + 63] for start in range(0, len(payload), 63)]
    fields = {b"v": b"3", b"p": pieces[0], b"n": b"%d" % len(payload)}
    fields.update({b"%d" % number: piece for number, piece in enumerate(pieces[1:], 1)})
    return fields


def expected_fields(queue: Any, task: Task) -> dict[bytes, bytes]:
    """The task hash fields enqueue writes for ``task`` (lua/README.md), but the creation time."""
    o = task.options
    fields = {b"t": task.type.encode(), b"f": task.fingerprint, b"m": b"%d" % o.max_retry, b"r": b"0",
              **payload_fields(task.payload)}  # fmt: skip
    optional = {b"timeout": o.timeout_ms, b"deadline": o.deadline_ms, b"retention": o.retention_ms}
    fields.update({name: b"%d" % value for name, value in optional.items() if value})
    if o.retry_delay_ms != -1:
        fields[b"retry_delay"] = b"%d" % o.retry_delay_ms
    if o.unique_key is not None:
        fields[b"unique"] = queue.keys("default").unique(o.unique_key).encode()
    lease_side = bool(o.timeout_ms or o.deadline_ms or o.retry_delay_ms != -1)
    finish_side = bool(o.retention_ms or o.unique_key is not None)
    if lease_side or finish_side:
        fields[b"o"] = b"%d" % (lease_side + 2 * finish_side)
    return fields


def check_batch(r: redis.Redis, queue: Any, tasks: list[Task], results: list[Any]) -> list[Task]:
    """Check each result against Redis; return the tasks reported EnqueueUncertain."""
    keys = queue.keys("default")
    assert len(results) == len(tasks)
    uncertain = []
    for task, result in zip(tasks, results, strict=True):
        stored = r.hgetall(keys.task(task.id))
        if isinstance(result, TaskInfo):
            assert result.id == task.id
            assert {k: v for k, v in stored.items() if k not in (b"c", b"s")} == expected_fields(queue, task)
            assert stored[b"s"] == result.state.value.encode()
            if task.options.unique_key is not None:
                assert r.get(keys.unique(task.options.unique_key)) == task.id.encode()
            if result.state is TaskState.SCHEDULED and task.options.process_at_ms:
                assert r.zscore(keys.scheduled, task.id) == task.options.process_at_ms
        elif isinstance(result, NotEnqueued):
            assert stored == {}, f"{task.id} reported NotEnqueued but it is in Redis"
        else:
            assert isinstance(result, EnqueueUncertain), (task.id, result)
            uncertain.append(task)
    return uncertain


def check_one_copy_each(r: redis.Redis, queue: Any, ids: set[str]) -> None:
    """Every id is in exactly one of pending/scheduled, once, and no other task exists (I5)."""
    keys = queue.keys("default")
    pending = [x.decode() for x in r.lrange(keys.pending, 0, -1)]
    scheduled = [x.decode() for x in r.zrange(keys.scheduled, 0, -1)]
    assert len(pending) == len(set(pending)), "an id is twice in pending"
    assert sorted(pending + scheduled) == sorted(ids)
    hashes = {k.decode().removeprefix(keys.task_prefix) for k in r.scan_iter(match=keys.task_prefix + "*")}
    assert hashes == ids


def settle_uncertain(r: redis.Redis, queue: Any, uncertain: list[Task]) -> None:
    """Enqueue the uncertain tasks again with the same ids: each ends enqueued, once."""
    if uncertain:
        again = queue.enqueue_many(uncertain)
        assert all(isinstance(x, TaskInfo) for x in again), again
        check_batch(r, queue, uncertain, again)


# --- 1. profiles -------------------------------------------------------------------------------


def mixed_batch(tag: str, count: int) -> list[Task]:
    """Tasks whose type and options change from one task to the next, so the profiles of a
    script call interleave: unique and plain tasks of one type, delay and process_at, retry=0,
    non-ASCII and 255-byte types, and some ids used twice (same content, then other content)."""
    now = datetime.now(UTC)
    types = ["mail", "ü型", "t" * 255, "with space"]
    tasks = []
    for i in range(count):
        kind = i % 9
        options: dict[str, Any] = {}
        if kind == 1:
            options = {"unique": 60}
        elif kind == 2:
            options = {"retry": 0, "retry_delay": 0}
        elif kind == 3:
            options = {"delay": 30 + i % 2}
        elif kind == 4:
            options = {"process_at": now + timedelta(seconds=90 + i % 3)}
        elif kind == 5:
            options = {"process_at": now - timedelta(seconds=5)}  # due: pending
        elif kind == 6:
            options = {"timeout": 1 + i % 2, "retention": 10, "deadline": now + timedelta(hours=1 + i % 2)}
        elif kind == 7:
            options = {"unique": 30 + i % 2, "unique_key": f"{tag}-key-{i}", "retry": i % 7}
        payload = f"{tag}-{i}".encode() * (1 + i % 5)
        tasks.append(Task(types[i % len(types)], payload, task_id=f"{tag}-{i}", **options))
    return tasks


def test_mixed_profiles_across_chunks_give_each_task_its_own_fields(make_queue: Any, r: redis.Redis) -> None:
    queue = make_queue()
    tasks = mixed_batch("mix", 3 * ENQUEUE_CHUNK + 7)
    # An id used again later in the batch: the same task (idempotent) once, other content once,
    # both within one script call and across the chunk boundary.
    tasks += [tasks[3], tasks[ENQUEUE_CHUNK - 1], Task("mail", b"other", task_id=tasks[5].id)]
    tasks.insert(ENQUEUE_CHUNK, Task("mail", b"other", task_id=tasks[0].id))
    results = queue.enqueue_many(tasks)
    firsts: dict[str, Task] = {}
    for task, result in zip(tasks, results, strict=True):
        first = firsts.setdefault(task.id, task)
        if first is task:
            assert isinstance(result, TaskInfo), (task.id, result)
        elif first.fingerprint == task.fingerprint:  # idempotent: the state Redis holds
            assert isinstance(result, TaskInfo)
            assert r.hget(queue.keys("default").task(task.id), "s") == result.state.value.encode()
        else:
            assert type(result).__name__ == "TaskIdConflict", (task.id, result)
    check_batch(r, queue, list(firsts.values()), [results[tasks.index(t)] for t in firsts.values()])
    check_one_copy_each(r, queue, set(firsts))


def test_a_script_call_of_distinct_profiles_each_unique_or_not(make_queue: Any, r: redis.Redis) -> None:
    # ENQUEUE_CHUNK profiles in one call (every task its own max_retry), every other task with
    # a unique lock: the lock key follows its task's key only for the tasks that have one.
    queue = make_queue()
    tasks = [
        Task("p", b"%d" % i, task_id=f"p-{i}", retry=i, **({"unique": 1 + i} if i % 2 else {}))
        for i in range(ENQUEUE_CHUNK + 1)
    ]
    results = queue.enqueue_many(tasks)
    assert check_batch(r, queue, tasks, results) == []
    for task in tasks[1::2]:
        lock = queue.keys("default").unique(task.options.unique_key)
        assert 0 < r.pttl(lock) <= task.options.unique_ttl_ms
    # The same batch again: every task is its own idempotent success, no lock changes hands.
    assert [x.id for x in queue.enqueue_many(tasks) if isinstance(x, TaskInfo)] == [t.id for t in tasks]
    check_one_copy_each(r, queue, {t.id for t in tasks})


# --- 2. the script cache and the connection, between calls -------------------------------------


@pytest.mark.parametrize("fault", ["script-flush", "client-kill", "both"])
def test_script_flush_or_client_kill_between_calls_applies_each_call_once(
    make_queue: Any, r: redis.Redis, fault: str
) -> None:
    queue = make_queue()
    ids: set[str] = set()
    for round_ in range(6):
        if fault in ("script-flush", "both"):
            r.script_flush()
        if fault in ("client-kill", "both"):
            assert r.client_kill_filter(_type="normal", skipme=True) >= 0
        if round_ % 2:  # the single-call fast path
            task = Task("s", b"%d" % round_, task_id=f"s-{round_}", unique=60)
            assert queue.enqueue(task).state is TaskState.PENDING
            tasks = [task]
        else:
            tasks = mixed_batch(f"m{round_}", 2 * ENQUEUE_CHUNK + 1)
            assert check_batch(r, queue, tasks, queue.enqueue_many(tasks)) == []
        ids |= {t.id for t in tasks}
    check_one_copy_each(r, queue, ids)


# --- 3. a connection that breaks after some replies were read ----------------------------------


@pytest.fixture
def cutter(redis_server: RedisServer) -> Iterator[Proxy]:
    with Proxy(redis_server.port) as proxy:
        yield proxy


WARM_UP = [Task("warm-up", b"%d" % i, task_id=f"warm-up-{i}") for i in range(3)]
WARM_IDS = {t.id for t in WARM_UP}


def _warm(shell: Shell, port: int) -> Any:
    """A queue on ``port`` whose server check, queue registration and script load are done
    (it holds the WARM_UP tasks), so a batch is its script calls alone on its spare connection."""
    queue = shell.queue(port, prefix=f"cut{next(_prefixes)}")
    queue.enqueue(WARM_UP[0])
    queue.enqueue_many(WARM_UP[1:])
    return queue


def chunks(tasks: list[Task]) -> list[list[Task]]:
    return [tasks[i : i + ENQUEUE_CHUNK] for i in range(0, len(tasks), ENQUEUE_CHUNK)]


# Byte offsets into the replies of a 3-chunk batch: before any reply, inside the first, after
# one or two whole replies (each is about 4 KiB: 250 x ":1\r\n$7\r\npending\r\n").
@pytest.mark.parametrize("cut_at", [0, 1, 3000, 4400, 6000, 8800, 11000])
def test_a_cut_after_some_replies_keeps_them_and_sends_only_the_rest_again(
    shell: Shell, cutter: Proxy, r: redis.Redis, cut_at: int
) -> None:
    queue = _warm(shell, cutter.port)
    tasks = mixed_batch(f"c{cut_at}", 3 * ENQUEUE_CHUNK)
    old_links = len(cutter.links)
    cutter.cut_replies(cut_at)
    results = queue.enqueue_many(tasks)
    [complete] = cutter.replies_before_cut
    # Each call whose reply was read is a result; the others (idempotent) went out once more,
    # on a new connection.
    assert sum(link.evalsha for link in cutter.links[old_links:]) == 3 - complete
    assert check_batch(r, queue, tasks, results) == []
    check_one_copy_each(r, queue, {t.id for t in tasks} | WARM_IDS)


@pytest.mark.parametrize("cuts", [(0, 0), (4400, 0), (4400, 4400), (8800, 1), (11000, 4400)])
def test_a_cut_of_the_send_and_the_resend_leaves_uncertain_items_a_retry_settles_once(
    shell: Shell, cutter: Proxy, r: redis.Redis, cuts: tuple[int, int]
) -> None:
    queue = _warm(shell, cutter.port)
    tasks = mixed_batch(f"u{cuts[0]}-{cuts[1]}", 3 * ENQUEUE_CHUNK + 1)
    cutter.cut_replies(*cuts)
    results = queue.enqueue_many(tasks)
    uncertain = check_batch(r, queue, tasks, results)
    # The calls whose replies were read on either connection are results; the rest are not.
    first, second = cutter.replies_before_cut
    assert uncertain == [t for chunk in chunks(tasks)[first + second :] for t in chunk]
    settle_uncertain(r, queue, uncertain)
    check_one_copy_each(r, queue, {t.id for t in tasks} | WARM_IDS)


def test_a_cut_in_a_batch_of_large_payloads_keeps_every_payload_whole(
    shell: Shell, cutter: Proxy, r: redis.Redis
) -> None:
    queue = _warm(shell, cutter.port)
    tasks = [
        Task("big", bytes([i % 251]) * (64 * 1024 + i), task_id=f"big-{i}") for i in range(ENQUEUE_CHUNK + 3)
    ]
    cutter.cut_replies(4400)  # after the first reply
    results = queue.enqueue_many(tasks)
    assert check_batch(r, queue, tasks, results) == []
    check_one_copy_each(r, queue, {t.id for t in tasks} | WARM_IDS)


# --- 4. Redis refusing part of a batch -------------------------------------------------------


def test_out_of_memory_mid_batch_refuses_whole_script_calls_and_keeps_the_others(shell: Shell) -> None:
    server = RedisServer("--maxmemory-policy", "noeviction").start()
    try:
        queue = shell.queue(server.port)
        known = [Task("oom", b"%d" % i, task_id=f"known-{i}") for i in range(ENQUEUE_CHUNK + 1)]
        assert all(isinstance(x, TaskInfo) for x in queue.enqueue_many(known))
        with server.client() as r:
            out_of_memory(r)
            # Chunk 1: tasks that exist (no write, so it runs); chunk 2: new tasks (OOM at the
            # first write, nothing written); chunk 3: one that exists again.
            new = [Task("oom", b"new-%d" % i, task_id=f"new-{i}", unique=60) for i in range(ENQUEUE_CHUNK)]
            batch = known[:ENQUEUE_CHUNK] + new + [known[-1]]
            results = queue.enqueue_many(batch)
            assert [type(x) for x in results] == [TaskInfo] * ENQUEUE_CHUNK + [NotEnqueued] * len(new) + [
                TaskInfo
            ]
            assert all("OOM" in str(x) for x in results if isinstance(x, QsyncError))
            check_batch(r, queue, batch, results)
            assert r.keys(queue.keys("default").unique("*")) == []
    finally:
        server.cleanup()


# --- 5. Redis restarted between the send and the reply ---------------------------------------


class _LoadingServer(RedisServer):
    """A RedisServer whose readiness probe also accepts a server still loading its data."""

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-LOADING"))
        except OSError:
            return False


def test_a_reply_lost_to_a_restart_then_loading_is_uncertain_not_refused(shell: Shell) -> None:
    # The enqueue ran and reached the AOF, then Redis died before its reply left. The re-send
    # meets the restarted Redis still loading its AOF (with the task in it): LOADING says only
    # that the re-send did not run, so the outcome is unknown, never "not enqueued".
    server = _LoadingServer("--appendfsync", "always").start()
    try:
        with server.client() as admin:  # 100k commands in the AOF: loading takes a while
            admin.eval("for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'fill:' .. i, 'x') end", 0, 100_000)

        def restart_loading() -> None:
            server.kill()
            server.extra = ["--appendfsync", "always", "--key-load-delay", "50"]
            server.start()

        with Proxy(server.port) as cutter:
            queue = _warm(shell, cutter.port)
            task = Task("restart", b"x", task_id="restart-1", unique=60)
            cutter.on_cut = restart_loading
            cutter.cut_replies(0)
            with pytest.raises(EnqueueUncertain) as caught:
                queue.enqueue(task)
            assert "LOADING" in str(caught.value)
            with server.client() as admin:
                admin.config_set("key-load-delay", 0)
                wait_until(lambda: admin.info("persistence")["loading"] == 0, "Redis to finish loading")
                assert admin.hget(queue.keys("default").task("restart-1"), "p") == b"x"  # it had run
                assert queue.enqueue(task).state is TaskState.PENDING
                check_one_copy_each(admin, queue, {"restart-1"} | WARM_IDS)
    finally:
        server.cleanup()

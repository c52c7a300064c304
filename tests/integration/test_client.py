"""The producer side of the client (enqueue, enqueue_many, info) on real Redis servers, and how
Redis failures reach the caller (reliability.md sections 2 and 4).

Every test runs twice through ``make_queue``: on the sync ``qsync.Queue`` and on the
``qsync.AsyncQueue`` driven synchronously. Tests that need another Redis (a closed port, a full
one, a replica, one with passwords, a proxy that loses replies) build their queues with the
``shell`` fixture, which follows the flavour ``make_queue`` was given. Private servers are
started here, on free ports, and stopped by pid. Nothing waits on a sleep: conditions are
polled with a deadline, and nothing asserts on how long something took."""

from __future__ import annotations

import asyncio
import itertools
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

import qsync
from qsync import Task, TaskInfo, TaskState
from qsync._ops import ENQUEUE_CHUNK
from qsync.errors import (
    ClientClosed,
    Code,
    ConfigurationError,
    CorruptState,
    DuplicateTask,
    EnqueueUncertain,
    InvalidArgumentType,
    NotApplied,
    NotEnqueued,
    OutcomeUnknown,
    PayloadTooLarge,
    QsyncError,
    RedisUnavailable,
    TaskIdConflict,
    TaskNotFound,
)
from tests.conftest import Driven
from tests.integration.proxy import Proxy
from tests.polling import wait_until
from tests.redis_procs import RedisServer, free_port, out_of_memory

pytestmark = pytest.mark.redis

_prefixes = itertools.count()


# --- helpers ---------------------------------------------------------------------------------


def calls(r: redis.Redis) -> dict[str, int]:
    """Commands processed so far by the server, by name (INFO commandstats)."""
    stats = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def calls_since(r: redis.Redis, before: dict[str, int]) -> dict[str, int]:
    """Commands processed since ``before``, leaving out the INFO calls that measure it. The
    commands a script runs are counted too (under their own names)."""
    after = calls(r)
    delta = {name: n - before.get(name, 0) for name, n in after.items() if name != "info"}
    return {name: n for name, n in delta.items() if n}


def script_calls(delta: dict[str, int]) -> dict[str, int]:
    """The script calls (and script loads) among counted commands."""
    return {name: n for name, n in delta.items() if name.startswith(("eval", "script", "fcall"))}


def task_keys(r: redis.Redis, queue: Any, name: str = "default") -> list[bytes]:
    """The task hashes of one queue."""
    return sorted(r.scan_iter(match=queue.keys(name).task_prefix + "*"))


def queue_keys(r: redis.Redis, prefix: str) -> list[bytes]:
    """Every key carrying ``prefix`` in its hash tag (queue keys and the queue registry)."""
    return sorted(r.scan_iter(match="{" + prefix + "*"))


def pending_ids(r: redis.Redis, queue: Any, name: str = "default") -> list[str]:
    return sorted(x.decode() for x in r.lrange(queue.keys(name).pending, 0, -1))


def no_secret(err: BaseException | object, *secrets: str) -> None:
    """``err``'s message, repr and (for exceptions) whole formatted traceback name no secret."""
    texts = [str(err), repr(err)]
    if isinstance(err, BaseException):
        texts.append("".join(traceback.format_exception(err)))
        texts += [str(a) for a in err.args]
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into {text!r}"


class Shell:
    """Builds clients and queues of one flavour on any Redis: ``sync`` gives ``qsync.Queue`` on
    ``redis.Redis``; ``async`` gives an ``AsyncQueue`` on ``redis.asyncio.Redis``, driven
    synchronously like ``make_queue`` does. Everything it made is closed by :meth:`close`."""

    def __init__(self, flavour: str) -> None:
        self.flavour = flavour
        self.loop = asyncio.new_event_loop() if flavour == "async" else None
        self._closers: list[Callable[[], None]] = []

    def client(self, port: int | None = None, *, url: str | None = None, **kwargs: Any) -> Any:
        if self.loop is None:
            client = redis.Redis.from_url(url, **kwargs) if url else redis.Redis(port=port or 0, **kwargs)
            self._closers.append(client.close)
            return client
        aclient = aioredis.Redis.from_url(url, **kwargs) if url else aioredis.Redis(port=port or 0, **kwargs)
        loop = self.loop
        self._closers.append(lambda: loop.run_until_complete(aclient.aclose()))
        return aclient

    def retry(self, retries: int) -> Any:
        """A redis-py Retry object for this flavour's client."""
        backoff = ExponentialBackoff() if retries else NoBackoff()
        return Retry(backoff, retries) if self.loop is None else AsyncRetry(backoff, retries)

    def queue(
        self,
        port: int | None = None,
        *,
        url: str | None = None,
        client: Any = None,
        client_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        options.setdefault("prefix", f"c{next(_prefixes)}")
        if client is None:
            client = self.client(port, url=url, **(client_kwargs or {}))
        queue = qsync.new(client, **options)
        return queue if self.loop is None else Driven(queue, self.loop)

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        if self.loop is not None:
            self.loop.close()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on the session's Redis, to look at what qsync wrote (make_queue flushes)."""
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[Proxy]:
    """A TCP proxy in front of the session's Redis."""
    with Proxy(redis_server.port, hold_timeout=5.0) as started:
        yield started


# --- private servers (module scope: started once, stopped by pid) ----------------------------


@pytest.fixture(scope="module")
def lru_server() -> Iterator[RedisServer]:
    """A Redis that may evict keys."""
    server = RedisServer("--maxmemory-policy", "allkeys-lru").start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def full_server() -> Iterator[RedisServer]:
    """A Redis with noeviction past its maxmemory: every write needing memory is OOM."""
    server = RedisServer("--maxmemory-policy", "noeviction").start()
    try:
        with server.client() as r:
            out_of_memory(r)
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def replica_pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master and a read-only replica of it, with the replication link up."""
    master = RedisServer("--repl-diskless-sync-delay", "0").start()
    replica: RedisServer | None = None
    try:
        replica = RedisServer("--replicaof", "127.0.0.1", str(master.port)).start()
        with replica.client() as rr:
            wait_until(lambda: rr.info("replication").get("master_link_status") == "up", "replica link up")
        yield master, replica
    finally:
        if replica is not None:
            replica.cleanup()
        master.cleanup()


PASSWORD = "qsync-test-PASSWORD-41"
USER, USER_PASSWORD = "qs", "qsync-test-SECRET-42"
NOSCRIPT_USER, NOSCRIPT_PASSWORD = "noscripts", "qsync-test-SECRET-43"


class _AuthServer(RedisServer):
    """A RedisServer whose readiness probe knows the default user's password."""

    def ping(self) -> bool:
        try:
            with redis.Redis(port=self.port, password=PASSWORD, socket_connect_timeout=0.2) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False


@pytest.fixture(scope="module")
def auth_server() -> Iterator[RedisServer]:
    """A Redis with requirepass and two ACL users: ``qs`` (everything) and ``noscripts``
    (everything but scripting)."""
    server = _AuthServer("--requirepass", PASSWORD).start()
    try:
        with redis.Redis(port=server.port, password=PASSWORD) as r:
            r.execute_command("ACL", "SETUSER", USER, "on", ">" + USER_PASSWORD, "~*", "&*", "+@all")
            r.execute_command(
                "ACL",
                "SETUSER",
                NOSCRIPT_USER,
                "on",
                ">" + NOSCRIPT_PASSWORD,
                "~*",
                "&*",
                "+@all",
                "-@scripting",
            )
        yield server
    finally:
        server.cleanup()


# === 1. enqueue, enqueue_many, info ==========================================================


def test_enqueue_returns_the_task_and_info_reads_every_field_back(make_queue: Any) -> None:
    queue = make_queue()
    payload = bytes(range(256)) + b"\x00tail"
    deadline = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=123000)
    task = Task(
        "report:build", payload, retry=3, timeout=30, deadline=deadline, retention=timedelta(minutes=2),
        task_id="info-1",
    )  # fmt: skip
    before = datetime.now(UTC)
    enqueued = queue.enqueue(task)
    after = datetime.now(UTC)

    assert isinstance(enqueued, TaskInfo)
    assert (enqueued.id, enqueued.queue, enqueued.state) == ("info-1", "default", TaskState.PENDING)
    info = queue.info("info-1")
    assert info.state is TaskState.PENDING
    assert info.type == "report:build"
    assert info.payload == payload and type(info.payload) is bytes
    assert (info.retried, info.max_retry, info.recoveries) == (0, 3, 0)
    assert info.timeout == timedelta(seconds=30)
    assert info.retention == timedelta(minutes=2)
    assert info.deadline == deadline
    assert info.last_error is None
    assert info.next_process_at is None and info.last_failed_at is None and info.finished_at is None
    assert info.unique_key is None
    # Server clock, same host: a sanity bound, not a timing measurement.
    assert info.created_at is not None and info.created_at.tzinfo is not None
    assert before - timedelta(seconds=5) <= info.created_at <= after + timedelta(seconds=5)
    # What enqueue returned is what info reads.
    for name in ("id", "queue", "state", "type", "payload", "max_retry", "timeout", "deadline", "created_at"):
        assert getattr(enqueued, name) == getattr(info, name), name


def test_info_after_a_failed_attempt_reports_retried_error_and_times(make_queue: Any) -> None:
    queue = make_queue()
    queue.enqueue(Task("flaky", b"p", retry=3, task_id="f-1"))
    batch = queue.lease("default", count=1, lease_duration=60)
    [leased] = batch.tasks

    active = queue.info("f-1")
    assert active.state is TaskState.ACTIVE
    assert active.next_process_at == datetime.fromtimestamp(batch.expires_ms / 1000, UTC)

    error = "ValueError: boom \u2603"
    assert queue.fail("default", [qsync.Failure(leased.id, leased.token, error, 3_600_000)]) == [
        TaskState.RETRY
    ]
    info = queue.info("f-1")
    assert info.state is TaskState.RETRY
    assert (info.retried, info.max_retry) == (1, 3)
    assert info.last_error == error
    assert info.created_at is not None and info.last_failed_at is not None
    assert info.last_failed_at >= info.created_at
    assert info.next_process_at == info.last_failed_at + timedelta(hours=1)
    assert info.finished_at is None


def test_scheduled_task_is_due_exactly_its_delay_after_creation(make_queue: Any) -> None:
    queue = make_queue()
    enqueued = queue.enqueue(Task("later", b"", delay=3600, task_id="s-1"))
    assert enqueued.state is TaskState.SCHEDULED
    info = queue.info("s-1")
    assert info.state is TaskState.SCHEDULED
    assert info.created_at is not None
    assert info.next_process_at == info.created_at + timedelta(hours=1)
    assert enqueued.next_process_at == info.next_process_at


def test_info_of_an_unknown_task_is_task_not_found(make_queue: Any) -> None:
    queue = make_queue()
    with pytest.raises(TaskNotFound) as caught:
        queue.info("never-enqueued")
    err = caught.value
    assert (err.op, err.queue, err.task_id, err.code) == ("info", "default", "never-enqueued", Code.NOT_FOUND)
    assert "never-enqueued" in str(err)


def test_enqueueing_the_same_task_again_is_an_idempotent_success(make_queue: Any, r: redis.Redis) -> None:
    queue = make_queue()
    task = Task("idem", b"same", task_id="i-1", retry=2)
    first = queue.enqueue(task)
    again = queue.enqueue(task)
    rebuilt = queue.enqueue(Task("idem", b"same", task_id="i-1", retry=2))
    assert first.state is again.state is rebuilt.state is TaskState.PENDING
    assert again.id == rebuilt.id == "i-1"
    assert pending_ids(r, queue) == ["i-1"]
    assert len(task_keys(r, queue)) == 1

    # Once leased, a re-enqueue reports the task where it is and does not put it back.
    queue.lease("default", count=5)
    assert queue.enqueue(task).state is TaskState.ACTIVE
    assert r.llen(queue.keys("default").pending) == 0
    assert r.zcard(queue.keys("default").active) == 1

    # A delayed task retried by the client is the same task (the due time is not its identity).
    queue.enqueue(Task("idem", b"later", task_id="i-2", delay=600))
    assert queue.enqueue(Task("idem", b"later", task_id="i-2", delay=600)).state is TaskState.SCHEDULED
    assert r.zcard(queue.keys("default").scheduled) == 1


@pytest.mark.parametrize(
    "other",
    [
        Task("conflict", b"other payload", task_id="c-1"),
        Task("another-type", b"original", task_id="c-1"),
        Task("conflict", b"original", task_id="c-1", retry=5),
    ],
    ids=["payload", "type", "options"],
)
def test_same_id_with_other_content_is_task_id_conflict(make_queue: Any, other: Task) -> None:
    queue = make_queue()
    queue.enqueue(Task("conflict", b"original", task_id="c-1"))
    with pytest.raises(TaskIdConflict) as caught:
        queue.enqueue(other)
    err = caught.value
    assert (err.op, err.queue, err.task_id, err.code) == ("enqueue", "default", "c-1", Code.CONFLICT)
    info = queue.info("c-1")
    assert (info.type, info.payload, info.max_retry) == (
        "conflict",
        b"original",
        qsync.task.DEFAULT_MAX_RETRY,
    )


def test_unique_task_is_refused_while_the_lock_is_held(make_queue: Any, r: redis.Redis) -> None:
    queue = make_queue()
    first = Task("unique", b"p", unique=60)
    queue.enqueue(first)
    info = queue.info(first.id)
    assert info.unique_key == first.options.unique_key
    lock = queue.keys("default").unique(first.options.unique_key)
    assert r.get(lock) == first.id.encode()
    assert 0 < r.pttl(lock) <= 60_000

    second = Task("unique", b"p", unique=60)
    with pytest.raises(DuplicateTask) as caught:
        queue.enqueue(second)
    err = caught.value
    assert (err.op, err.queue, err.task_id, err.owner_id) == ("enqueue", "default", second.id, first.id)
    assert err.code == Code.DUPLICATE
    with pytest.raises(TaskNotFound):
        queue.info(second.id)
    # The same task again is not a duplicate of itself, and another payload is another key.
    assert queue.enqueue(first).state is TaskState.PENDING
    queue.enqueue(Task("unique", b"other payload", unique=60))
    # An explicit unique key ties tasks of different types and payloads.
    keyed = Task("a", b"1", unique=30, unique_key="nightly-report")
    queue.enqueue(keyed)
    with pytest.raises(DuplicateTask) as keyed_dup:
        queue.enqueue(Task("b", b"2", unique=timedelta(seconds=30), unique_key="nightly-report"))
    assert keyed_dup.value.owner_id == keyed.id
    assert len(task_keys(r, queue)) == 3

    # When the owner finishes, the lock is released and the task can be enqueued again.
    batch = queue.lease("default", count=10)
    assert all(queue.ack("default", batch.tasks))
    assert r.exists(lock) == 0
    assert queue.enqueue(second).state is TaskState.PENDING


def test_enqueue_many_is_one_round_trip_per_batch(shell: Shell, proxy: Proxy, r: redis.Redis) -> None:
    queue = shell.queue(proxy.port)
    queue.enqueue(Task("warm-up", b""))  # server check, queue registration and script load
    connections = proxy.connections

    before = calls(r)
    results = queue.enqueue_many([Task("bulk", b"%d" % i) for i in range(50)])
    assert all(isinstance(x, TaskInfo) and x.state is TaskState.PENDING for x in results)
    assert script_calls(calls_since(r, before)) == {"evalsha": 1}

    # Over ENQUEUE_CHUNK tasks: several script calls, all sent before any reply is read (the
    # proxy holds the replies until all arrived: a client waiting for the first would stall).
    tasks = [Task("bulk", b"%d" % i) for i in range(4 * ENQUEUE_CHUNK + 1)]
    before = calls(r)
    proxy.hold_replies(5)
    results = queue.enqueue_many(iter(tasks))
    proxy.release()
    assert not proxy.hold_timed_out, "the script calls of one batch were not pipelined"
    assert script_calls(calls_since(r, before)) == {"evalsha": 5}
    assert proxy.connections == connections
    assert [x.id for x in results if isinstance(x, TaskInfo)] == [t.id for t in tasks]
    assert r.llen(queue.keys("default").pending) == 1 + 50 + len(tasks)


def test_enqueue_many_gives_one_result_per_item_with_refusals_mixed_in(
    make_queue: Any, r: redis.Redis
) -> None:
    queue = make_queue()
    queue.enqueue(Task("mix", b"a0", task_id="exists"))
    queue.enqueue(Task("mix", b"u", task_id="u-owner", unique=60))
    corrupt_key = queue.keys("default").task("corrupt")
    r.set(corrupt_key, "not a hash")

    batch = [
        Task("mix", b"n1", task_id="new-1"),
        Task("mix", b"a0", task_id="exists"),  # same content: idempotent success
        Task("mix", b"changed", task_id="exists"),  # TaskIdConflict
        Task("mix", b"u", task_id="u-2", unique=60),  # DuplicateTask (u-owner)
        Task("mix", b"c", task_id="corrupt"),  # CorruptState: a string at the task key
        Task("mix", b"n2", task_id="new-2"),
        Task("mix", b"other", task_id="new-1"),  # conflicts with an item earlier in the batch
        Task("mix", b"same", task_id="in-batch-1", unique=60),
        Task("mix", b"same", task_id="in-batch-2", unique=60),  # DuplicateTask (in-batch-1)
    ]
    results = queue.enqueue_many(batch)
    kinds = [type(x) for x in results]
    assert kinds == [
        TaskInfo, TaskInfo, TaskIdConflict, DuplicateTask, CorruptState, TaskInfo, TaskIdConflict,
        TaskInfo, DuplicateTask,
    ]  # fmt: skip
    for task, result in zip(batch, results, strict=True):
        if isinstance(result, TaskInfo):
            assert result.id == task.id and result.state is TaskState.PENDING
        else:
            assert isinstance(result, qsync.errors.TaskError)
            assert (result.op, result.queue, result.task_id) == ("enqueue", "default", task.id)
    assert results[3].owner_id == "u-owner"  # type: ignore[union-attr]
    assert results[8].owner_id == "in-batch-1"  # type: ignore[union-attr]

    assert pending_ids(r, queue) == sorted(["exists", "u-owner", "new-1", "new-2", "in-batch-1"])
    assert queue.info("exists").payload == b"a0"
    assert queue.info("new-1").payload == b"n1"
    assert r.get(corrupt_key) == b"not a hash"
    for refused in ("u-2", "in-batch-2"):
        with pytest.raises(TaskNotFound):
            queue.info(refused)


def test_enqueue_many_of_nothing_or_with_a_bad_item_sends_nothing(make_queue: Any, r: redis.Redis) -> None:
    queue = make_queue()
    assert queue.enqueue_many([]) == []
    with pytest.raises(InvalidArgumentType):
        queue.enqueue_many([Task("ok", b"1", task_id="good"), "not a task"])
    with pytest.raises(InvalidArgumentType):
        queue.enqueue_many(Task("ok", b"1"))  # a Task, not a list of them
    with pytest.raises(TaskNotFound):
        queue.info("good")
    assert queue_keys(r, queue.prefix) == []


# === 2. the server check at first use ========================================================


def test_server_check_refuses_an_evicting_redis_with_how_to_fix(
    shell: Shell, lru_server: RedisServer
) -> None:
    queue = shell.queue(lru_server.port)  # no I/O yet: the check runs at first use
    with pytest.raises(ConfigurationError) as caught:
        queue.enqueue(Task("t", b"x", task_id="lru-1"))
    message = str(caught.value)
    assert "allkeys-lru" in message
    assert "noeviction" in message and "check_server=False" in message
    with pytest.raises(ConfigurationError):
        queue.info("lru-1")
    with lru_server.client() as r:
        assert queue_keys(r, queue.prefix) == []
        # A refusal is not remembered as a pass: once fixed, the same queue works.
        r.config_set("maxmemory-policy", "noeviction")
        try:
            assert queue.enqueue(Task("t", b"x", task_id="lru-1")).state is TaskState.PENDING
        finally:
            r.config_set("maxmemory-policy", "allkeys-lru")


def test_server_check_can_be_turned_off(shell: Shell, lru_server: RedisServer) -> None:
    queue = shell.queue(lru_server.port, check_server=False)
    assert queue.enqueue(Task("t", b"x", task_id="lru-2")).state is TaskState.PENDING
    assert queue.info("lru-2").payload == b"x"


# === 3. failure mapping ======================================================================


@pytest.mark.parametrize("check_server", [True, False], ids=["checked", "unchecked"])
def test_connection_refused_is_not_enqueued(shell: Shell, check_server: bool) -> None:
    # No redis-py connect retries: they would only make each refusal slower.
    queue = shell.queue(free_port(), check_server=check_server, client_kwargs={"retry": shell.retry(0)})
    with pytest.raises(NotEnqueued) as caught:
        queue.enqueue(Task("t", b"x"))
    assert caught.value.op == "enqueue"
    assert "connect" in str(caught.value)

    results = queue.enqueue_many([Task("t", b"1"), Task("t", b"2")])
    assert [type(x) for x in results] == [NotEnqueued, NotEnqueued]

    with pytest.raises(NotApplied) as other:
        queue.info("anything")
    assert not isinstance(other.value, NotEnqueued)


def test_out_of_memory_is_not_enqueued_and_nothing_is_written(shell: Shell, full_server: RedisServer) -> None:
    queue = shell.queue(full_server.port)
    with full_server.client() as r:
        size = r.dbsize()
        secret = b"PAYLOAD-SECRET-oom"
        with pytest.raises(NotEnqueued) as caught:
            queue.enqueue(Task("t", secret, unique=60))
        assert caught.value.op == "enqueue"
        assert "OOM" in str(caught.value)
        no_secret(caught.value, secret.decode())

        results = queue.enqueue_many([Task("t", b"1"), Task("t", b"2", unique=60), Task("t", b"3", delay=60)])
        assert [type(x) for x in results] == [NotEnqueued] * 3
        assert r.dbsize() == size
        assert queue_keys(r, queue.prefix) == []


def test_readonly_replica_is_not_enqueued(
    shell: Shell, replica_pair: tuple[RedisServer, RedisServer]
) -> None:
    master, replica = replica_pair
    queue = shell.queue(replica.port)
    with pytest.raises(NotEnqueued) as caught:
        queue.enqueue(Task("t", b"x"))
    assert caught.value.op == "enqueue"
    assert "READONLY" in str(caught.value)
    results = queue.enqueue_many([Task("t", b"1"), Task("t", b"2", unique=60)])
    assert [type(x) for x in results] == [NotEnqueued, NotEnqueued]
    with replica.client() as rr:
        assert queue_keys(rr, queue.prefix) == []

    # Reads work on the replica: a task enqueued on the master is visible there.
    writer = shell.queue(master.port, prefix=queue.prefix)
    writer.enqueue(Task("t", b"replicated", task_id="rep-1"))
    with replica.client() as rr:
        key = queue.keys("default").task("rep-1")
        wait_until(lambda: rr.exists(key), "the task to reach the replica")
    assert queue.info("rep-1").payload == b"replicated"


RETRY_SETTINGS = ["redis-py-default", "no-retry", "retry-3", "retry-on-error"]


def _retry_kwargs(shell: Shell, setting: str) -> dict[str, Any]:
    return {
        "redis-py-default": {},
        "no-retry": {"retry": shell.retry(0)},
        "retry-3": {"retry": shell.retry(3)},
        "retry-on-error": {"retry_on_error": [redis.ConnectionError]},
    }[setting]


def test_a_reply_lost_once_is_absorbed_without_a_duplicate(
    shell: Shell, proxy: Proxy, r: redis.Redis
) -> None:
    queue = shell.queue(proxy.port)
    queue.enqueue(Task("warm-up", b""), queue="warm")
    base = proxy.evalsha_forwarded

    proxy.drop_replies = 1
    task = Task("lost", b"once", task_id="lost-1")
    # The connection broke after the script ran; enqueue is idempotent by id, so qsync may
    # send it once more on a new connection and report the existing task.
    info = queue.enqueue(task)
    assert (info.id, info.state) == ("lost-1", TaskState.PENDING)
    assert proxy.replies_dropped == 1
    assert proxy.evalsha_forwarded - base == 2
    assert pending_ids(r, queue) == ["lost-1"]
    assert len(task_keys(r, queue)) == 1


@pytest.mark.parametrize("setting", RETRY_SETTINGS)
def test_lost_replies_give_enqueue_uncertain_then_a_retry_is_idempotent(
    shell: Shell, proxy: Proxy, r: redis.Redis, setting: str
) -> None:
    queue = shell.queue(proxy.port, client_kwargs=_retry_kwargs(shell, setting))
    queue.enqueue(Task("warm-up", b""), queue="warm")
    base = proxy.evalsha_forwarded

    proxy.drop_replies = 1000  # every reply to a script call is lost from now on
    task = Task("lost", b"payload", task_id="lost-2", unique=60)
    with pytest.raises(EnqueueUncertain) as caught:
        queue.enqueue(task)
    err = caught.value
    assert err.op == "enqueue"
    assert "idempotent" in str(err)
    # The script ran (Redis answered before the connection was cut) ...
    key = queue.keys("default").task("lost-2")
    wait_until(lambda: r.exists(key), "the lost enqueue to be applied")
    # ... and was sent at most twice: once, and once more by qsync's idempotent re-send; never
    # by redis-py's own retry, whatever the client's retry setting.
    sent = proxy.evalsha_forwarded - base
    assert 1 <= sent <= 2, f"EVALSHA sent {sent} times"

    proxy.drop_replies = 0
    again = queue.enqueue(task)
    assert (again.id, again.state) == ("lost-2", TaskState.PENDING)
    assert pending_ids(r, queue) == ["lost-2"]
    assert len(task_keys(r, queue)) == 1


def test_lost_replies_in_a_batch_give_uncertain_items_then_a_retry_is_idempotent(
    shell: Shell, proxy: Proxy, r: redis.Redis
) -> None:
    queue = shell.queue(proxy.port)
    queue.enqueue(Task("warm-up", b""), queue="warm")
    tasks = [Task("lost", b"%d" % i, task_id=f"b-{i}") for i in range(3)]

    proxy.drop_replies = 1000
    results = queue.enqueue_many(tasks)
    assert [type(x) for x in results] == [EnqueueUncertain] * 3
    wait_until(lambda: len(task_keys(r, queue)) == 3, "the lost batch to be applied")

    proxy.drop_replies = 0
    results = queue.enqueue_many(tasks)
    assert [x.id for x in results if isinstance(x, TaskInfo)] == ["b-0", "b-1", "b-2"]
    assert pending_ids(r, queue) == ["b-0", "b-1", "b-2"]
    assert len(task_keys(r, queue)) == 3


@pytest.mark.parametrize("setting", RETRY_SETTINGS)
def test_a_lost_lease_reply_is_never_sent_again(
    shell: Shell, proxy: Proxy, r: redis.Redis, setting: str
) -> None:
    queue = shell.queue(proxy.port, client_kwargs=_retry_kwargs(shell, setting))
    queue.enqueue(Task("warm-up", b""), queue="warm")
    queue.lease("warm")  # loads the lease script
    queue.enqueue(Task("work", b"", task_id="w-1"))
    base = proxy.evalsha_forwarded

    proxy.drop_replies = 1000
    with pytest.raises(OutcomeUnknown) as caught:
        queue.lease("default", count=5)
    assert not isinstance(caught.value, EnqueueUncertain)
    assert caught.value.op == "lease"
    assert proxy.evalsha_forwarded - base == 1
    keys = queue.keys("default")
    wait_until(lambda: r.zcard(keys.active) == 1, "the lost lease to be applied")
    assert r.llen(keys.pending) == 0
    proxy.drop_replies = 0
    assert queue.lease("default", count=5).tasks == []


# === 4. NOSCRIPT =============================================================================


def test_noscript_is_handled_transparently_and_applies_once(make_queue: Any, r: redis.Redis) -> None:
    queue = make_queue()
    queue.enqueue(Task("warm-up", b""), queue="warm")
    keys = queue.keys("default")

    r.script_flush()
    before = calls(r)
    info = queue.enqueue(Task("ns", b"1", task_id="ns-1"))
    assert info.state is TaskState.PENDING
    assert calls_since(r, before).get("script|load") == 1
    assert pending_ids(r, queue) == ["ns-1"]

    r.script_flush()
    assert queue.info("ns-1").payload == b"1"

    r.script_flush()
    batch = queue.lease("default", count=10)
    assert [t.id for t in batch.tasks] == ["ns-1"]
    assert r.zcard(keys.active) == 1 and r.llen(keys.pending) == 0


def test_noscript_inside_a_batch_reloads_once_and_applies_every_item_once(
    make_queue: Any, r: redis.Redis
) -> None:
    queue = make_queue()
    queue.enqueue(Task("warm-up", b""), queue="warm")
    tasks = [Task("ns", b"%d" % i) for i in range(1200)]  # two script calls

    r.script_flush()
    before = calls(r)
    results = queue.enqueue_many(tasks)
    assert [x.id for x in results if isinstance(x, TaskInfo)] == [t.id for t in tasks]
    assert calls_since(r, before).get("script|load") == 1
    assert r.llen(queue.keys("default").pending) == 1200
    assert len(set(r.lrange(queue.keys("default").pending, 0, -1))) == 1200


# === 5. authentication, secrets ==============================================================


@pytest.mark.parametrize("how", ["password", "user", "url"])
def test_password_and_acl_user_clients_work(shell: Shell, auth_server: RedisServer, how: str) -> None:
    if how == "password":
        queue = shell.queue(auth_server.port, client_kwargs={"password": PASSWORD})
    elif how == "user":
        queue = shell.queue(auth_server.port, client_kwargs={"username": USER, "password": USER_PASSWORD})
    else:
        queue = shell.queue(url=f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{auth_server.port}/0")
    info = queue.enqueue(Task("auth", b"ok"))
    assert info.state is TaskState.PENDING
    assert queue.info(info.id).payload == b"ok"
    assert queue.enqueue_many([Task("auth", b"1"), Task("auth", b"2")])[1].state is TaskState.PENDING  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["wrong-password", "wrong-user-password", "wrong-url", "no-password"])
def test_a_wrong_password_is_a_typed_error_that_does_not_show_it(
    shell: Shell, auth_server: RedisServer, how: str
) -> None:
    wrong = f"qsync-test-WRONG-{how}-99"
    secrets = (wrong, PASSWORD, USER_PASSWORD)

    def make(**options: Any) -> Any:
        # No redis-py connect retries: they would only make each refusal slower.
        kwargs: dict[str, Any] = {"retry": shell.retry(0)}
        if how == "wrong-url":
            url = f"redis://{USER}:{wrong}@127.0.0.1:{auth_server.port}/0"
            return shell.queue(url=url, client_kwargs=kwargs, **options)
        if how == "wrong-password":
            kwargs["password"] = wrong
        elif how == "wrong-user-password":
            kwargs.update(username=USER, password=wrong)
        return shell.queue(auth_server.port, client_kwargs=kwargs, **options)

    with pytest.raises(RedisUnavailable) as checked:
        make().enqueue(Task("auth", b"x"))
    assert isinstance(checked.value, NotApplied)
    no_secret(checked.value, *secrets)

    queue = make(check_server=False)
    with pytest.raises(NotEnqueued) as caught:
        queue.enqueue(Task("auth", b"x"))
    no_secret(caught.value, *secrets)
    [item] = queue.enqueue_many([Task("auth", b"y")])
    assert isinstance(item, NotEnqueued)
    no_secret(item, *secrets)
    with pytest.raises(NotApplied) as info_err:
        queue.info("x")
    no_secret(info_err.value, *secrets)


def test_a_user_without_script_permission_is_not_enqueued(shell: Shell, auth_server: RedisServer) -> None:
    queue = shell.queue(
        auth_server.port, client_kwargs={"username": NOSCRIPT_USER, "password": NOSCRIPT_PASSWORD}
    )
    with pytest.raises(NotEnqueued) as caught:
        queue.enqueue(Task("auth", b"x"))
    assert "NOPERM" in str(caught.value)
    no_secret(caught.value, NOSCRIPT_PASSWORD)
    with redis.Redis(port=auth_server.port, password=PASSWORD) as r:
        assert [k for k in queue_keys(r, queue.prefix) if b":t:" in k] == []


def test_errors_and_reprs_never_show_payload_bytes(make_queue: Any) -> None:
    secret = "PAYLOAD-SECRET-7f3a"
    payload = secret.encode() + b"\xff"
    queue = make_queue()
    task = Task("secret", payload, task_id="sec-1", unique=60)
    no_secret(task, secret)
    info = queue.enqueue(task)
    no_secret(info, secret)
    no_secret(queue.info("sec-1"), secret)

    with pytest.raises(TaskIdConflict) as conflict:
        queue.enqueue(Task("secret", b"other " + payload, task_id="sec-1"))
    no_secret(conflict.value, secret)
    with pytest.raises(DuplicateTask) as duplicate:
        queue.enqueue(Task("secret", payload, task_id="sec-2", unique=60))
    no_secret(duplicate.value, secret)
    results = queue.enqueue_many(
        [Task("secret", payload, task_id="sec-1"), Task("secret", b"x", task_id="sec-1")]
    )
    no_secret(results, secret)
    for item in results:
        no_secret(item, secret)

    with pytest.raises(PayloadTooLarge) as too_large:
        make_queue(max_payload_bytes=8).enqueue(Task("secret", payload))
    no_secret(too_large.value, secret)
    with pytest.raises(InvalidArgumentType) as wrong_type:
        Task("secret", secret)  # type: ignore[arg-type]
    no_secret(wrong_type.value, secret)


# === 6. closed queue, decode_responses, from_url =============================================


def test_a_closed_queue_refuses_everything_and_leaves_the_client_open(
    shell: Shell, redis_server: RedisServer, r: redis.Redis
) -> None:
    client = shell.client(redis_server.port)
    queue = shell.queue(client=client)
    queue.enqueue(Task("t", b"x", task_id="cl-1"))
    queue.close()
    queue.close()  # closing twice is fine

    before = calls(r)
    with pytest.raises(ClientClosed):
        queue.enqueue(Task("t", b"y"))
    with pytest.raises(ClientClosed):
        queue.enqueue_many([Task("t", b"z")])
    with pytest.raises(ClientClosed):
        queue.info("cl-1")
    with pytest.raises(ClientClosed):
        queue.lease("default")
    assert calls_since(r, before) == {}
    assert isinstance(ClientClosed("x"), QsyncError)

    # The Redis client is the caller's: still open, usable by a new queue.
    other = shell.queue(client=client, prefix=queue.prefix)
    assert other.info("cl-1").payload == b"x"


def test_a_decode_responses_client_keeps_payloads_as_exact_bytes(make_queue: Any) -> None:
    queue = make_queue(client_kwargs={"decode_responses": True})
    payload = b"\xff\xfe\x00\x80 not utf-8 \xc3"
    info = queue.enqueue(Task("image:r\u00e9size", payload, task_id="dec-1", retry=1))
    assert info.payload == payload
    read = queue.info("dec-1")
    assert read.payload == payload and type(read.payload) is bytes
    assert read.type == "image:r\u00e9size" and read.state is TaskState.PENDING
    assert read.max_retry == 1
    [second] = queue.enqueue_many([Task("image:r\u00e9size", payload[::-1], task_id="dec-2")])
    assert isinstance(second, TaskInfo) and second.payload == payload[::-1]
    with pytest.raises(TaskIdConflict):
        queue.enqueue(Task("image:r\u00e9size", b"other", task_id="dec-1"))
    batch = queue.lease("default", count=5)
    assert {t.id: t.payload for t in batch.tasks} == {"dec-1": payload, "dec-2": payload[::-1]}
    assert all(isinstance(t.id, str) and isinstance(t.token, str) for t in batch.tasks)
    assert queue.ack("default", batch.tasks) == [True, True]


@pytest.mark.parametrize("query", ["", "?decode_responses=True"], ids=["bytes", "decoded"])
def test_a_from_url_client_works_on_the_database_it_names(
    shell: Shell, redis_server: RedisServer, query: str
) -> None:
    queue = shell.queue(url=f"redis://127.0.0.1:{redis_server.port}/3{query}")
    info = queue.enqueue(Task("url", b"\x00db3", task_id="u-1"))
    assert info.state is TaskState.PENDING
    assert queue.info("u-1").payload == b"\x00db3"
    key = queue.keys("default").task("u-1")
    with redis_server.client(db=3) as db3, redis_server.client(db=0) as db0:
        assert db3.exists(key) == 1
        assert db0.exists(key) == 0

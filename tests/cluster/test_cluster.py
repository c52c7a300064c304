"""qsync on a local Redis Cluster (three masters, started by the session's fixture).

- A full life (enqueue, enqueue_many of thousands, lease, extend, ack, fail, promote, recover,
  info, trim) on 20 queue names spread over every master, with the sync ``redis.RedisCluster``
  and the asyncio ``redis.asyncio.RedisCluster``: no CROSSSLOT or "non local key" errors, and
  ``CLUSTER KEYSLOT`` shows that every key of a queue lives in that queue's one slot (F23).
- NOSCRIPT after ``SCRIPT FLUSH`` on every node is absorbed (F11).
- Redirections while a slot moves between nodes (F24): MOVED after a completed migration, and
  TRYAGAIN / ASK while it migrates.

Nothing here sleeps: where a 1 ms delay or lease must run out, the test polls the server clock
(``TIME``) until it has passed the expiry the server reported.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import ClusterNode

import qsync
from qsync import _scripts
from qsync.errors import DuplicateTask, NotApplied, TaskNotFound
from tests.conftest import Driven
from tests.redis_procs import RedisCluster, _wait_until

pytestmark = pytest.mark.cluster

PREFIX = "cl"
QUEUES = [f"queue-{i}" for i in range(20)]
LONG = 60.0
SHORT = 0.001
CONTAINERS = ("pending", "active", "scheduled", "retry", "archived", "completed")


def tag(queue: str) -> str:
    return "{" + PREFIX + ":" + queue + "}"


def key(queue: str, name: str) -> str:
    return f"{tag(queue)}:{name}"


# --- the cluster's nodes ---------------------------------------------------------------------


class Nodes:
    """Plain clients on every node of the cluster, for checks and for moving slots."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.by_port = {n.port: n.client() for n in cluster.nodes}
        self.ids = {p: c.execute_command("CLUSTER", "MYID").decode() for p, c in self.by_port.items()}

    def any(self) -> redis.Redis:
        return next(iter(self.by_port.values()))

    def slot(self, name: str) -> int:
        return int(self.any().execute_command("CLUSTER", "KEYSLOT", name))

    def owner(self, slot: int) -> int:
        for start, end, master, *_ in self.any().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise AssertionError(f"slot {slot} is not served")

    def other(self, port: int) -> int:
        return next(p for p in self.by_port if p != port)

    def server_ms(self) -> int:
        seconds, micros = self.any().time()
        return int(seconds) * 1000 + int(micros) // 1000

    def until_server_time(self, ms: int) -> None:
        """Poll the server clock (no sleeping) until it reads later than ``ms``."""
        give_up = time.monotonic() + 5
        while self.server_ms() <= ms:
            assert time.monotonic() < give_up, "the server clock did not move"

    def migrate(self, slot: int, target: int) -> int:
        """Move ``slot`` with its keys to the node on port ``target``, telling every node the
        new owner directly (no gossip to wait for). Returns the old owner's port."""
        source = self.owner(slot)
        src, dst = self.by_port[source], self.by_port[target]
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[source])
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[target])
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        # The order of the cluster spec: the target first (it takes a new config epoch, so its
        # claim wins over stale gossip), then the source, then the others.
        order = [target, source, *(p for p in self.by_port if p not in (target, source))]
        for port in order:
            self.by_port[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.ids[target])
        dst.execute_command("CLUSTER", "BUMPEPOCH")
        # Let every node learn the new epoch before anything else moves: a node that moves the
        # slot back before it heard of the epoch keeps an older one and loses the slot again
        # to in-flight gossip (then no node serves it and each answers MOVED to the other).
        _wait_until(lambda: self._agree(slot, target), 10, f"the cluster to agree on slot {slot}")
        return source

    def _agree(self, slot: int, owner: int) -> bool:
        epochs = set()
        for client in self.by_port.values():
            info = client.execute_command("CLUSTER", "INFO").decode()
            epochs.add(info.split("cluster_current_epoch:", 1)[1].split()[0])
            if self._owner_seen_by(client, slot) != owner:
                return False
        return len(epochs) == 1

    @staticmethod
    def _owner_seen_by(client: redis.Redis, slot: int) -> int | None:
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        return None

    def keys_by_tag(self) -> dict[str, list[tuple[int, str]]]:
        """Every key on every node, as (port, key) grouped by hash tag."""
        out: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for port, client in self.by_port.items():
            for raw in client.scan_iter(count=1000):
                name = raw.decode()
                out[name[: name.index("}") + 1]].append((port, name))
        return out

    def assert_one_slot_per_queue(self) -> None:
        """F23: CLUSTER KEYSLOT of every key of a queue is the queue's slot, and the key lives
        on the node that serves that slot."""
        for tagged, found in self.keys_by_tag().items():
            pipe = self.any().pipeline(transaction=False)
            for _, name in found:
                pipe.execute_command("CLUSTER", "KEYSLOT", name)
            slots = set(pipe.execute())
            assert len(slots) == 1, f"the keys of {tagged} span slots {slots}"
            owner = self.owner(slots.pop())
            assert {port for port, _ in found} == {owner}, f"keys of {tagged} outside their node"

    def close(self) -> None:
        for client in self.by_port.values():
            client.close()


@pytest.fixture
def nodes(redis_cluster: RedisCluster) -> Iterator[Nodes]:
    """The session's cluster, emptied for this test."""
    n = Nodes(redis_cluster)
    for client in n.by_port.values():
        client.flushall()
    yield n
    n.close()


def _startup(cluster: RedisCluster) -> list[tuple[str, int]]:
    return list(cluster.startup_nodes)


@pytest.fixture(params=["sync", "async"])
def cluster_queue(request: pytest.FixtureRequest, nodes: Nodes) -> Iterator[Callable[[], Any]]:
    """A factory of queues on the cluster: a Queue on ``redis.RedisCluster``, then an
    AsyncQueue on ``redis.asyncio.RedisCluster`` driven synchronously (one body, both shells).

    The asyncio client is initialised here before qsync sees it: qsync does not do it itself
    (see test_async_cluster_client_is_usable_before_initialize)."""
    closers: list[Callable[[], None]] = []
    loop = asyncio.new_event_loop() if request.param == "async" else None

    def factory() -> Any:
        if loop is None:
            client = redis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in _startup(nodes.cluster)])
            closers.append(client.close)
            return qsync.new(client, prefix=PREFIX)
        aclient = aioredis.RedisCluster(
            startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in _startup(nodes.cluster)]
        )
        loop.run_until_complete(aclient.initialize())
        closers.append(lambda: loop.run_until_complete(aclient.aclose()))
        return Driven(qsync.new(aclient, prefix=PREFIX), loop)

    yield factory
    for close in closers:
        close()
    if loop is not None:
        loop.close()


# --- F23: a full life on 20 queues -----------------------------------------------------------


def _lease_all(q: Any, queue: str, expected: int, duration: float = LONG) -> list[qsync.LeasedTask]:
    leased: list[qsync.LeasedTask] = []
    while batch := q.lease(queue, count=1000, lease_duration=duration).tasks:
        leased += batch
    assert len(leased) == expected, f"{queue}: leased {len(leased)}, expected {expected}"
    return leased


def _counts(nodes: Nodes, queue: str) -> dict[str, int]:
    owner = nodes.by_port[nodes.owner(nodes.slot(key(queue, "pending")))]
    pipe = owner.pipeline(transaction=False)
    pipe.llen(key(queue, "pending"))
    for name in CONTAINERS[1:]:
        pipe.zcard(key(queue, name))
    return dict(zip(CONTAINERS, pipe.execute(), strict=True))


def test_queues_spread_over_every_master(nodes: Nodes) -> None:
    """The 20 names land on every master, so the life below crosses nodes; and every key
    name of a queue (containers, task hashes, unique locks, pause flag) hashes to one slot."""
    owners = {nodes.owner(nodes.slot(key(q, "pending"))) for q in QUEUES}
    assert owners == set(nodes.by_port), "the 20 queue names do not cover every master"
    for queue in QUEUES:
        names = [key(queue, c) for c in (*CONTAINERS, "paused", "wake")]
        names += [key(queue, "t:" + "x" * 40), key(queue, "u:email:some-unique-key")]
        assert len({nodes.slot(name) for name in names}) == 1, queue
    assert len({nodes.slot(key(q, "pending")) for q in QUEUES}) == len(QUEUES)


def test_full_life_on_twenty_queues(cluster_queue: Callable[[], Any], nodes: Nodes) -> None:
    """enqueue (unique, delayed, retained), enqueue_many (3,000 tasks on one queue in one call:
    three script calls; 100 on each other queue), lease, extend, ack, fail (retry and skip),
    promote, recover of expired leases, info, trim: every call succeeds on every node."""
    q = cluster_queue()
    sizes = {queue: 3000 if i == 0 else 100 for i, queue in enumerate(QUEUES)}
    for queue in QUEUES:
        unique = qsync.Task("report", b"u", unique=60, retention=60, task_id=f"{queue}-u")
        assert q.enqueue(unique, queue=queue).state is qsync.TaskState.PENDING
        with pytest.raises(DuplicateTask) as dup:
            q.enqueue(qsync.Task("report", b"u", unique=60, retention=60), queue=queue)
        assert dup.value.owner_id == f"{queue}-u"
        delayed = q.enqueue(qsync.Task("later", b"d", delay=SHORT, task_id=f"{queue}-d"), queue=queue)
        assert delayed.state is qsync.TaskState.SCHEDULED
        tasks = [qsync.Task("bulk", b"%d" % i, task_id=f"{queue}-{i}") for i in range(sizes[queue])]
        results = q.enqueue_many(tasks, queue=queue)
        assert [r.state for r in results] == [qsync.TaskState.PENDING] * len(tasks), queue
    assert sum(sizes.values()) > 3000
    nodes.assert_one_slot_per_queue()  # every task hash, container and lock exists now

    for queue in QUEUES:
        leased = _lease_all(q, queue, sizes[queue] + 1)
        assert leased[0].id == f"{queue}-u"  # FIFO: the first enqueued is the first leased
        assert q.extend(queue, leased, lease_duration=LONG) == [True] * len(leased)
        retry, skip, done = leased[1:11], leased[11:16], [leased[0], *leased[16:]]
        failures = [qsync.Failure(t.id, t.token, "flaky", 0) for t in retry]
        failures += [qsync.Failure(t.id, t.token, "fatal", None) for t in skip]
        states = q.fail(queue, failures)
        assert states == [qsync.TaskState.RETRY] * 10 + [qsync.TaskState.ARCHIVED] * 5
        assert q.ack(queue, done) == [True] * len(done)
        assert q.ack(queue, done[:1]) == [False]  # the token is spent

    nodes.until_server_time(nodes.server_ms() + 1)  # the 1 ms delays have run out
    for queue in QUEUES:
        assert q.promote(queue).promoted == 11  # 10 retries + the delayed task
        batch = q.lease(queue, count=1000, lease_duration=SHORT)
        assert len(batch.tasks) == 11
        nodes.until_server_time(batch.expires_ms)  # a worker that died holding them
        recovered = q.recover(queue, limit=1000, max_recoveries=5, retry_delay=0)
        assert (recovered.retried, recovered.archived, recovered.orphans) == (11, 0, 0)
        assert q.ack(queue, batch.tasks) == [False] * 11  # fenced: the leases were taken back
        assert q.promote(queue).promoted == 11
        again = _lease_all(q, queue, 11)
        assert {t.retried for t in again} == {1, 2}  # the delayed task once, the failed ones twice
        assert q.ack(queue, again) == [True] * 11

    for queue in QUEUES:
        kept = q.info(f"{queue}-u", queue=queue)
        assert kept.state is qsync.TaskState.COMPLETED
        dead = q.info(f"{queue}-11", queue=queue)
        assert (dead.state, dead.last_error, dead.retried) == (qsync.TaskState.ARCHIVED, "fatal", 0)
        with pytest.raises(TaskNotFound):
            q.info(f"{queue}-1", queue=queue)
        assert _counts(nodes, queue) == {
            "pending": 0, "active": 0, "scheduled": 0, "retry": 0, "archived": 5, "completed": 1,
        }  # fmt: skip
        # The unique lock went with its task: the same unique task can be enqueued again.
        q.enqueue(qsync.Task("report", b"u", unique=60, retention=60), queue=queue)
        assert tuple(q.trim(queue, archived_max_count=2)) == (0, 3)
    nodes.assert_one_slot_per_queue()


# --- F11: NOSCRIPT on every node -------------------------------------------------------------


def _round(q: Any, queue: str, n: int) -> None:
    """Every script once, leaving the queue empty: resume, enqueue_many, lease, extend, requeue,
    fail, promote, recover, info, ack, trim."""
    q.resume(queue)
    results = q.enqueue_many([qsync.Task("job", b"%d" % i) for i in range(n)], queue=queue)
    assert all(isinstance(r, qsync.TaskInfo) for r in results), results[:3]
    leased = _lease_all(q, queue, n)
    assert q.extend(queue, leased) == [True] * n
    assert q.requeue(queue, leased[:1]) == [True]
    leased = [*leased[1:], *_lease_all(q, queue, 1)]
    failures = [qsync.Failure(t.id, t.token, "x", 0) for t in leased[:2]]
    assert q.fail(queue, failures) == [qsync.TaskState.RETRY] * 2
    assert q.promote(queue).promoted == 2
    assert tuple(q.recover(queue))[:3] == (0, 0, 0)
    assert q.info(leased[0].id, queue=queue).state is qsync.TaskState.PENDING
    assert q.ack(queue, [*leased[2:], *_lease_all(q, queue, 2)]) == [True] * n
    assert tuple(q.trim(queue)) == (0, 0)


def test_noscript_after_script_flush_on_every_node(cluster_queue: Callable[[], Any], nodes: Nodes) -> None:
    """After SCRIPT FLUSH on every node, every script call (also three chunks of one
    enqueue_many in one pipeline) is reloaded and re-sent: NOSCRIPT never reaches the caller."""
    q = cluster_queue()
    for queue in QUEUES:
        _round(q, queue, 5)
    for client in nodes.by_port.values():
        client.script_flush()
        assert not any(client.script_exists(*[s.sha for s in _scripts.load_all().values()]))
    for queue in QUEUES:
        _round(q, queue, 2500 if queue == QUEUES[0] else 5)
    # Every script but unblock, which only a worker server's waker runs.
    used = {s.sha for name, s in _scripts.load_all().items() if name != "unblock"}
    for client in nodes.by_port.values():
        assert all(client.script_exists(*sorted(used))), "each master reloaded the scripts it ran"
    nodes.assert_one_slot_per_queue()


# --- the worker server on the cluster --------------------------------------------------------

PER_QUEUE = 10


def _worker_mux(done: Callable[[str], None]) -> qsync.Mux:
    """Handlers: "ok" succeeds; "flaky" fails its first attempt (so the server's fail, retry
    promotion and second lease run too)."""
    mux = qsync.Mux()

    @mux.handle("ok")
    def ok(ctx: qsync.Context, task: qsync.TaskInfo) -> None:
        done(task.id)

    @mux.handle("flaky")
    def flaky(ctx: qsync.Context, task: qsync.TaskInfo) -> None:
        if task.retried == 0:
            raise RuntimeError("first attempt fails")
        done(task.id)

    return mux


def _fill(q: Any) -> set[str]:
    ids: set[str] = set()
    for queue in QUEUES:
        tasks = [
            qsync.Task("flaky" if i % 5 == 0 else "ok", b"", retry_delay=0, task_id=f"{queue}-w{i}")
            for i in range(PER_QUEUE)
        ]
        assert all(isinstance(r, qsync.TaskInfo) for r in q.enqueue_many(tasks, queue=queue))
        ids |= {t.id for t in tasks}
    return ids


SERVER_OPTIONS: dict[str, Any] = {
    "queues": dict.fromkeys(QUEUES, 1),
    "concurrency": 8,
    "lease_duration": 5,
    "poll_interval": 0.05,
    "shutdown_timeout": 1,
}


def test_sync_worker_server_processes_every_queue(nodes: Nodes) -> None:
    """``Queue.start`` on a ``redis.RedisCluster``: one server leasing from 20 queues on three
    masters (its heartbeats, commits and sweeps pipeline calls of many slots) runs every task;
    the flaky ones twice."""
    client = redis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in _startup(nodes.cluster)])
    q = qsync.new(client, prefix=PREFIX)
    expected = _fill(q)
    seen: set[str] = set()
    lock = threading.Lock()
    all_done = threading.Event()

    def done(task_id: str) -> None:
        with lock:
            seen.add(task_id)
            if seen >= expected:
                all_done.set()

    try:
        q.start(_worker_mux(done), **SERVER_OPTIONS)
        try:
            assert all_done.wait(timeout=60), f"{len(expected - seen)} tasks never ran"
        finally:
            q.stop(timeout=30)
        for queue in QUEUES:
            assert _counts(nodes, queue) == dict.fromkeys(CONTAINERS, 0), queue
    finally:
        client.close()


def test_async_worker_server_processes_every_queue(nodes: Nodes) -> None:
    """``await AsyncQueue.run`` on a ``redis.asyncio.RedisCluster`` (initialised first, see
    test_async_cluster_client_is_usable_before_initialize): as above."""

    async def main() -> None:
        client = aioredis.RedisCluster(
            startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in _startup(nodes.cluster)]
        )
        await client.initialize()
        q = qsync.new(client, prefix=PREFIX)
        try:
            expected: set[str] = set()
            for queue in QUEUES:
                tasks = [
                    qsync.Task("flaky" if i % 5 == 0 else "ok", b"", retry_delay=0, task_id=f"{queue}-w{i}")
                    for i in range(PER_QUEUE)
                ]
                assert all(isinstance(r, qsync.TaskInfo) for r in await q.enqueue_many(tasks, queue=queue))
                expected |= {t.id for t in tasks}
            seen: set[str] = set()
            all_done = asyncio.Event()
            loop = asyncio.get_running_loop()

            def done(task_id: str) -> None:  # runs on the server's handler threads
                seen.add(task_id)
                if seen >= expected:
                    loop.call_soon_threadsafe(all_done.set)

            server = asyncio.create_task(q.run(_worker_mux(done), **SERVER_OPTIONS))
            try:
                await asyncio.wait_for(all_done.wait(), timeout=60)
            finally:
                await q.stop()
                await server
        finally:
            await client.aclose()

    asyncio.run(main())
    for queue in QUEUES:
        assert _counts(nodes, queue) == dict.fromkeys(CONTAINERS, 0), queue


# --- F24: redirections while a slot moves ----------------------------------------------------


def test_moved_after_slot_migration_is_followed(cluster_queue: Callable[[], Any], nodes: Nodes) -> None:
    """A queue's slot moved to another node after the client learnt the slot map (resharding,
    failover): the old node answers MOVED. qsync must refresh its routes and run the call on
    the new owner (the script did not run on the old one)."""
    q = cluster_queue()
    queue = QUEUES[0]
    q.enqueue(qsync.Task("job", b"m", task_id="moved-1"), queue=queue)
    slot = nodes.slot(key(queue, "pending"))
    source = nodes.owner(slot)
    nodes.migrate(slot, nodes.other(source))
    try:
        batch = q.lease(queue)
        assert [t.id for t in batch.tasks] == ["moved-1"]
    finally:
        nodes.migrate(slot, source)  # leave the slot map as the other tests expect it


def _migrating(nodes: Nodes, slot: int) -> tuple[redis.Redis, redis.Redis]:
    source = nodes.owner(slot)
    target = nodes.other(source)
    src, dst = nodes.by_port[source], nodes.by_port[target]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", nodes.ids[source])
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", nodes.ids[target])
    return src, dst


def test_tryagain_while_slot_migrates_is_not_applied(cluster_queue: Callable[[], Any], nodes: Nodes) -> None:
    """While a queue's slot is MIGRATING and only some of a call's keys are still on the
    source, Redis answers TRYAGAIN: the script did not run. qsync lists TRYAGAIN as "not
    applied" (NotEnqueued for enqueue, safe to retry) or may retry it; it must never report
    it as a ScriptError ("a qsync script failed ... a bug")."""
    q = cluster_queue()
    queue = QUEUES[1]
    q.enqueue(qsync.Task("job", b"a", task_id="first"), queue=queue)  # pending exists on the source
    slot = nodes.slot(key(queue, "pending"))
    src, dst = _migrating(nodes, slot)
    try:
        try:
            q.enqueue(qsync.Task("job", b"b", task_id="second"), queue=queue)
        except NotApplied:
            pass  # refused before running: the caller may enqueue again
    finally:
        for client in (src, dst):
            client.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")


def test_ask_while_slot_migrates_is_followed(cluster_queue: Callable[[], Any], nodes: Nodes) -> None:
    """While a queue's slot is MIGRATING and none of a call's keys are left on the source,
    Redis answers ASK: run it on the target after ASKING (or report it as not applied). It is
    never a ScriptError."""
    q = cluster_queue()
    queue = QUEUES[2]
    slot = nodes.slot(key(queue, "pending"))
    src, dst = _migrating(nodes, slot)
    try:
        try:
            assert q.lease(queue).tasks == []
        except NotApplied:
            pass
    finally:
        for client in (src, dst):
            client.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")


def test_async_cluster_client_is_usable_before_initialize(nodes: Nodes) -> None:
    """``qsync.new(redis.asyncio.RedisCluster(...))`` on a client nobody has used yet: the
    first call must work (redis-py initialises the slot map on first use; qsync routes
    through ``get_node_from_key`` without initialising it)."""

    async def main() -> None:
        client = aioredis.RedisCluster(
            startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in _startup(nodes.cluster)]
        )
        try:
            q = qsync.new(client, prefix=PREFIX)
            info = await q.enqueue(qsync.Task("job", b"x"), queue=QUEUES[0])
            assert info.state is qsync.TaskState.PENDING
        finally:
            await client.aclose()

    asyncio.run(main())

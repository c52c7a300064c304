"""Every Lua script on a real Redis (and, where cheap, on fakeredis too): each transition and each
refusal, fencing (a stale token writes nothing), corrupt state (a typed error and no partial
write), bounded batches, server time (Redis TIME, never the Python clock) and NOSCRIPT reloads.

"Nothing written" is checked two ways: a snapshot of every key under the queue's prefix (TYPE,
DUMP and the absolute expiry PEXPIRETIME) taken before and after, and, on real Redis, the
server's dirty counter (``rdb_changes_since_last_save``), which counts every write command,
even one that rewrites a value with itself.

Nothing sleeps: an expiry or a due time is made to pass by setting the zset score directly, and
times are checked against Redis TIME read just before and just after the call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import pytest
import redis

import qsync
from qsync import _ops, _scripts
from qsync._keys import QueueKeys
from qsync._protocol import raise_first
from qsync.errors import (
    Code,
    CorruptState,
    DuplicateTask,
    QsyncError,
    TaskIdConflict,
    TaskNotFound,
)
from qsync.task import TaskState
from tests.polling import wait_until

Q = "q"
ZSETS = ("active", "scheduled", "retry", "archived", "completed")
# How lease names a bad field of the task hash in its archive reason.
FIELD_LABELS = {"v": "v (format version)", "t": "t (type)", "p": "p (payload)", "r": "r (retried)",
                "m": "m (max_retry)", "deadline": "deadline"}  # fmt: skip
_prefixes = itertools.count()


# --- helpers ---------------------------------------------------------------------------------


def at(ms: int) -> datetime:
    """Milliseconds since the epoch as an aware datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass
class Env:
    """One queue on one client, with the reads the tests need."""

    r: redis.Redis
    q: qsync.Queue
    k: QueueKeys
    prefix: str
    fake: bool

    # clock and snapshots

    def now(self) -> int:
        """Redis TIME in ms."""
        seconds, micros = self.r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def snap(self) -> dict[bytes, tuple[Any, ...]]:
        """Every key under the prefix: type, serialized value and absolute expiry."""
        out: dict[bytes, tuple[Any, ...]] = {}
        for key in sorted(self.r.scan_iter(match="{" + self.prefix + "*", count=1000)):
            out[key] = (
                self.r.type(key),
                self.r.dump(key),
                self.r.execute_command("PEXPIRETIME", key),
            )
        return out

    def dirty(self) -> int | None:
        """The server's count of writes (None on fakeredis, which has no INFO)."""
        if self.fake:
            return None
        return int(self.r.info("persistence")["rdb_changes_since_last_save"])

    # reads

    def h(self, task_id: str) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(self.k.task(task_id)).items()}

    def pending(self) -> list[str]:
        return [x.decode() for x in self.r.lrange(self.k.pending, 0, -1)]

    def zids(self, zset: str) -> list[str]:
        return [x.decode() for x in self.r.zrange(getattr(self.k, zset), 0, -1)]

    def score(self, zset: str, task_id: str) -> int | None:
        s = self.r.zscore(getattr(self.k, zset), task_id)
        return None if s is None else int(s)

    def where(self, task_id: str) -> list[str]:
        """Every container holding the id (pending once per occurrence)."""
        found = ["pending"] * self.pending().count(task_id)
        found += [z for z in ZSETS if self.score(z, task_id) is not None]
        return found

    def assert_in(self, task_id: str, container: str) -> None:
        """The id is in exactly this container, and its hash's state names it."""
        assert self.where(task_id) == [container], (task_id, self.where(task_id))
        assert self.h(task_id)["s"] == container.encode()

    # writes that stand in for the passing of time

    def set_score(self, zset: str, task_id: str, score: int = 1) -> None:
        """Make an id due / expired by moving its score into the past (XX: it must be there)."""
        assert self.r.zadd(getattr(self.k, zset), {task_id: score}, xx=True, ch=True) == 1

    # shortcuts

    def enqueue(self, *tasks: qsync.Task) -> list[qsync.TaskInfo]:
        results = self.q.enqueue_many(list(tasks), queue=Q)
        for result in results:
            assert not isinstance(result, QsyncError), result
        return results  # type: ignore[return-value]

    def lease(self, count: int = 1, duration: float = 60.0) -> list[_ops.LeasedTask]:
        return self.q.lease(Q, count=count, lease_duration=duration).tasks

    def raw(self, call: _ops.Call[Any]) -> Any:
        """Run a call's script directly (loaded first) and return the undecoded reply."""
        assert call.script is not None
        self.r.script_load(call.script.source)
        return self.r.execute_command(*call.command())


def _env(client: redis.Redis) -> Env:
    fake = isinstance(client, fakeredis.FakeRedis)
    prefix = f"ls{next(_prefixes)}"
    q = qsync.new(client, prefix=prefix, check_server=not fake)
    return Env(client, q, q.keys(Q), prefix, fake)


@dataclass
class Frozen:
    """A snapshot and the dirty counter, to check that a call wrote nothing."""

    env: Env
    snap: dict[bytes, tuple[Any, ...]]
    dirty: int | None

    def unchanged(self) -> None:
        assert self.env.snap() == self.snap
        assert self.env.dirty() == self.dirty, "the call wrote to Redis"


def freeze(env: Env) -> Frozen:
    return Frozen(env, env.snap(), env.dirty())


def task(task_id: str, payload: bytes = b"x", **options: Any) -> qsync.Task:
    return qsync.Task("job", payload, task_id=task_id, **options)


# --- 1. transitions and refusals: enqueue ----------------------------------------------------


def test_enqueue_ready_task_is_pending(benv: Env) -> None:
    before = benv.now()
    info = benv.q.enqueue(task("a", b"pay", retry=3), queue=Q)
    after = benv.now()

    assert info.state is TaskState.PENDING
    assert benv.pending() == ["a"]
    benv.assert_in("a", "pending")
    h = benv.h("a")
    assert h["v"] == b"2"
    assert h["t"] == b"job"
    assert h["p"] == b"pay"
    assert h["m"] == b"3"
    assert h["r"] == b"0"
    assert before <= int(h["c"]) <= after
    assert "token" not in h and "o" not in h, "a plain task has no options to flag"
    assert benv.r.lrange(benv.k.wake, 0, -1) == [b"1"]
    assert benv.q.info("a", queue=Q).state is TaskState.PENDING


def test_enqueue_delayed_task_is_scheduled_by_server_time(benv: Env) -> None:
    before = benv.now()
    info = benv.q.enqueue(task("a", delay=60), queue=Q)
    after = benv.now()

    assert info.state is TaskState.SCHEDULED
    benv.assert_in("a", "scheduled")
    due = benv.score("scheduled", "a")
    assert due is not None and before + 60_000 <= due <= after + 60_000
    assert not benv.r.exists(benv.k.wake), "nothing went pending, nobody to wake"
    got = benv.q.info("a", queue=Q)
    assert got.next_process_at == at(due)


def test_enqueue_process_at(benv: Env) -> None:
    due = benv.now() + 3_600_000
    info = benv.q.enqueue(task("later", process_at=at(due)), queue=Q)
    assert info.state is TaskState.SCHEDULED
    assert benv.score("scheduled", "later") == due

    # A process_at that has passed (by the server clock) means: now.
    info = benv.q.enqueue(task("past", process_at=at(benv.now() - 5_000)), queue=Q)
    assert info.state is TaskState.PENDING
    benv.assert_in("past", "pending")


def test_enqueue_same_id_same_content_is_idempotent(benv: Env) -> None:
    t = task("a", b"same", retry=2, timeout=30)
    benv.q.enqueue(t, queue=Q)
    frozen = freeze(benv)

    again = benv.q.enqueue(task("a", b"same", retry=2, timeout=30), queue=Q)
    assert again.state is TaskState.PENDING
    assert benv.raw(_ops.enqueue_many(benv.k, [t])[0])[1:] == [Code.EXISTS, b"pending"]
    frozen.unchanged()
    assert benv.pending() == ["a"]

    # Once leased, the same enqueue reports the task's current state and still adds nothing.
    benv.lease()
    again = benv.q.enqueue(t, queue=Q)
    assert again.state is TaskState.ACTIVE
    assert benv.where("a") == ["active"]
    assert benv.pending() == []


@pytest.mark.parametrize(
    "other",
    [
        task("a", b"other payload"),
        qsync.Task("other-type", b"x", task_id="a"),
        task("a", retry=3),
        task("a", retention=60),
    ],
    ids=["payload", "type", "retry", "retention"],
)
def test_enqueue_same_id_other_content_conflicts(benv: Env, other: qsync.Task) -> None:
    benv.q.enqueue(task("a"), queue=Q)
    frozen = freeze(benv)

    with pytest.raises(TaskIdConflict) as caught:
        benv.q.enqueue(other, queue=Q)

    assert caught.value.task_id == "a"
    assert caught.value.op == "enqueue"
    assert caught.value.code is Code.CONFLICT
    frozen.unchanged()


def test_enqueue_many_items_are_independent(benv: Env) -> None:
    benv.q.enqueue(task("taken"), queue=Q)
    results = benv.q.enqueue_many([task("n1"), task("taken", b"other"), task("n2")], queue=Q)
    assert isinstance(results[0], qsync.TaskInfo)
    assert isinstance(results[1], TaskIdConflict)
    assert isinstance(results[2], qsync.TaskInfo)
    assert benv.pending() == ["n2", "n1", "taken"]


def test_enqueue_many_gives_each_task_its_own_type_and_options(benv: Env) -> None:
    # One script call, tasks of three types and five option sets interleaved: the call sends
    # each shared profile once, and each task must still get exactly its own fields.
    before = benv.now()
    due = before + 3_600_000
    tasks = [
        task("plain-1"),
        qsync.Task("mail", b"m", task_id="mail-1", timeout=30, retention=60),
        task("late-1", delay=60),
        qsync.Task("uniq", b"u1", task_id="uniq-1", unique=90, retry_delay=5),
        task("plain-2", b"y"),
        qsync.Task("mail", b"m2", task_id="mail-2", timeout=30, retention=60),
        qsync.Task("uniq", b"u2", task_id="uniq-2", unique=90, retry_delay=5),
        task("at-1", process_at=at(due), retry=0),
    ]
    infos = benv.enqueue(*tasks)
    after = benv.now()

    assert [i.state for i in infos] == [TaskState.PENDING, TaskState.PENDING, TaskState.SCHEDULED,
                                        TaskState.PENDING, TaskState.PENDING, TaskState.PENDING,
                                        TaskState.PENDING, TaskState.SCHEDULED]  # fmt: skip
    assert benv.pending() == ["uniq-2", "mail-2", "plain-2", "uniq-1", "mail-1", "plain-1"]
    assert benv.zids("scheduled") == ["late-1", "at-1"]
    late = benv.score("scheduled", "late-1")
    assert late is not None and before + 60_000 <= late <= after + 60_000
    assert benv.score("scheduled", "at-1") == due

    common = {"v", "t", "p", "f", "s", "m", "r", "c"}
    # "o": which options lease (1) and ack (2) must read; none, and no "o", on a plain task.
    expected_extra = {
        "plain-1": {}, "plain-2": {}, "late-1": {}, "at-1": {},
        "mail-1": {"timeout": b"30000", "retention": b"60000", "o": b"3"},
        "mail-2": {"timeout": b"30000", "retention": b"60000", "o": b"3"},
        "uniq-1": {"retry_delay": b"5000", "unique": lock_of(benv, tasks[3]).encode(), "o": b"3"},
        "uniq-2": {"retry_delay": b"5000", "unique": lock_of(benv, tasks[6]).encode(), "o": b"3"},
    }  # fmt: skip
    for t in tasks:
        h = benv.h(t.id)
        assert set(h) == common | set(expected_extra[t.id]), (t.id, sorted(h))
        assert {k: h[k] for k in expected_extra[t.id]} == expected_extra[t.id], t.id
        assert (h["t"], h["p"], h["f"]) == (t.type.encode(), t.payload, t.fingerprint), t.id
        assert h["m"] == str(t.options.max_retry).encode(), t.id
        assert h["v"] == b"2", t.id
        assert before <= int(h["c"]) <= after
    for t in (tasks[3], tasks[6]):
        assert benv.r.get(lock_of(benv, t)) == t.id.encode()
        assert 0 < benv.r.pttl(lock_of(benv, t)) <= 90_000
    assert benv.q.info("mail-2", queue=Q).timeout == timedelta(seconds=30)


# --- unique locks ----------------------------------------------------------------------------


def unique_task(task_id: str, **options: Any) -> qsync.Task:
    return qsync.Task("uniq", b"same payload", task_id=task_id, unique=60, **options)


def lock_of(env: Env, t: qsync.Task) -> str:
    assert t.options.unique_key is not None
    return env.k.unique(t.options.unique_key)


def test_unique_lock_rejects_duplicate_until_ack(benv: Env) -> None:
    first = unique_task("first")
    benv.q.enqueue(first, queue=Q)
    lock = lock_of(benv, first)
    assert benv.r.get(lock) == b"first"
    assert 0 < benv.r.pttl(lock) <= 60_000
    assert benv.h("first")["unique"] == lock.encode()

    def refused() -> None:
        frozen = freeze(benv)
        with pytest.raises(DuplicateTask) as caught:
            benv.q.enqueue(unique_task("second"), queue=Q)
        assert caught.value.owner_id == "first"
        assert caught.value.task_id == "second"
        frozen.unchanged()

    refused()  # pending
    (leased,) = benv.lease()
    refused()  # active
    assert benv.q.fail(Q, [qsync.Failure("first", leased.token, "boom", 0)]) == [TaskState.RETRY]
    refused()  # retry: not terminal, the lock stays
    assert benv.q.promote(Q).promoted == 1
    (leased,) = benv.lease()
    assert benv.q.requeue(Q, [leased]) == [True]
    refused()  # requeued: the lock stays
    (leased,) = benv.lease()
    assert benv.q.ack(Q, [leased]) == [True]

    assert not benv.r.exists(lock), "ack released the lock"
    assert benv.q.enqueue(unique_task("second"), queue=Q).state is TaskState.PENDING
    assert benv.r.get(lock) == b"second"


def test_ack_releases_each_lock_of_a_mixed_batch(benv: Env) -> None:
    # Tasks without a lock before and between tasks with one, acked in one call: each lock is
    # released (ack lines up what it read per held task; a task without a lock must not shift it).
    tasks = [task("plain-1"), unique_task("u-1"), task("plain-2"),
             qsync.Task("uniq", b"other", task_id="u-2", unique=60, retention=60),
             qsync.Task("uniq", b"third", task_id="u-3", unique=60, timeout=5)]  # fmt: skip
    benv.enqueue(*tasks)
    leased = benv.lease(count=5)
    assert [t.id for t in leased] == ["plain-1", "u-1", "plain-2", "u-2", "u-3"]
    assert benv.q.ack(Q, leased) == [True] * 5
    for t in tasks[1], tasks[3], tasks[4]:
        assert not benv.r.exists(lock_of(benv, t)), f"ack left {t.id}'s lock"
    assert benv.zids("completed") == ["u-2"]


@pytest.mark.parametrize("payload", [b"x", b"y" * 200], ids=["format-2", "format-3"])
@pytest.mark.parametrize("flags", ["1", "2", "3"])
def test_lease_and_ack_read_only_the_options_o_names(benv: Env, flags: str, payload: bytes) -> None:
    # "o" says which options a task has (lua/README.md): lease reads timeout, deadline and
    # retry_delay only for 1 and 3, ack reads retention and the lock only for 2 and 3. A payload
    # over 64 bytes makes the task format 3 (in pieces), which keeps "o" as format 2 does.
    first = qsync.Task("uniq", payload, task_id="a", unique=60, retention=60, timeout=7, retry_delay=3)
    benv.enqueue(first)
    benv.r.hset(benv.k.task("a"), "o", flags)
    (leased,) = benv.lease()
    lease_side, finish_side = flags in ("1", "3"), flags in ("2", "3")
    assert (leased.timeout_ms, leased.retry_delay_ms) == ((7_000, 3_000) if lease_side else (0, -1))
    assert benv.q.ack(Q, [leased]) == [True]
    assert benv.r.exists(lock_of(benv, first)) == (not finish_side)
    assert benv.zids("completed") == (["a"] if finish_side else [])


def test_lease_and_ack_read_every_option_of_a_format_1_task(benv: Env) -> None:
    # A task hash of format 1, written before "o" existed: lease and ack read every option.
    first = qsync.Task("uniq", b"x", task_id="old", unique=60, retention=60, timeout=7, retry_delay=3)
    benv.enqueue(first)
    benv.r.hdel(benv.k.task("old"), "o")
    benv.r.hset(benv.k.task("old"), "v", "1")
    (leased,) = benv.lease()
    assert (leased.timeout_ms, leased.retry_delay_ms) == (7_000, 3_000)
    assert benv.q.ack(Q, [leased]) == [True]
    assert not benv.r.exists(lock_of(benv, first))
    assert benv.zids("completed") == ["old"]


def _archive_by_fail_skip(env: Env) -> None:
    (leased,) = env.lease()
    assert env.q.fail(Q, [qsync.Failure(leased.id, leased.token, "skip", None)]) == [TaskState.ARCHIVED]


def _archive_by_fail_exhausted(env: Env) -> None:
    (leased,) = env.lease()
    assert env.q.fail(Q, [qsync.Failure(leased.id, leased.token, "boom", 0)]) == [TaskState.ARCHIVED]


def _archive_by_recover(env: Env) -> None:
    (leased,) = env.lease()
    env.set_score("active", leased.id)
    assert env.q.recover(Q).archived == 1


def _archive_by_lease_deadline(env: Env) -> None:
    # "o" = 3: the hash now has a lease-side option (lua/README.md, task hash fields).
    env.r.hset(env.k.task("first"), mapping={"deadline": env.now() - 1, "o": "3"})
    batch = env.q.lease(Q)
    assert batch.tasks == [] and batch.deadline_archived == 1


ARCHIVERS = {
    "fail-skip-retry": _archive_by_fail_skip,
    "fail-exhausted": _archive_by_fail_exhausted,
    "recover": _archive_by_recover,
    "lease-deadline": _archive_by_lease_deadline,
}


@pytest.mark.parametrize("how", ARCHIVERS)
def test_unique_lock_released_on_archive(benv: Env, how: str) -> None:
    first = unique_task("first", retry=0)
    benv.q.enqueue(first, queue=Q)
    ARCHIVERS[how](benv)

    benv.assert_in("first", "archived")
    assert not benv.r.exists(lock_of(benv, first))
    assert benv.q.enqueue(unique_task("second", retry=0), queue=Q).state is TaskState.PENDING


@pytest.mark.parametrize("how", ["ack", "ack-retention", *ARCHIVERS])
def test_unique_lock_held_by_another_id_is_not_released(benv: Env, how: str) -> None:
    """The lock's TTL ran out and another task took it: finishing the first task must not
    delete the second task's lock."""
    options: dict[str, Any] = {"retry": 0}
    if how == "ack-retention":
        options["retention"] = 60
    first = unique_task("first", **options)
    benv.q.enqueue(first, queue=Q)
    lock = lock_of(benv, first)
    benv.r.set(lock, "someone-else", px=60_000)

    if how.startswith("ack"):
        (leased,) = benv.lease()
        assert benv.q.ack(Q, [leased]) == [True]
    else:
        ARCHIVERS[how](benv)

    assert benv.r.get(lock) == b"someone-else"
    assert benv.r.pttl(lock) > 0


# --- lease -----------------------------------------------------------------------------------


def test_lease_up_to_n_in_fifo_order_with_a_fresh_token_per_call(benv: Env) -> None:
    benv.enqueue(*(task(f"t{i}") for i in range(5)))

    before = benv.now()
    batch = benv.q.lease(Q, count=3, lease_duration=30)
    after = benv.now()

    assert [t.id for t in batch.tasks] == ["t0", "t1", "t2"]
    assert before <= batch.now_ms <= after
    assert batch.expires_ms == batch.now_ms + 30_000
    assert (batch.deadline_archived, batch.corrupt_archived, batch.orphans) == (0, 0, 0)
    for leased in batch.tasks:
        benv.assert_in(leased.id, "active")
        assert benv.score("active", leased.id) == batch.expires_ms
        assert benv.h(leased.id)["token"] == leased.token.encode()
        assert (leased.type, leased.payload, leased.retried, leased.max_retry) == ("job", b"x", 0, 25)
        assert (leased.timeout_ms, leased.deadline_ms, leased.retry_delay_ms) == (0, 0, -1)
    assert benv.pending() == ["t4", "t3"]

    rest = benv.q.lease(Q, count=10, lease_duration=30)
    assert [t.id for t in rest.tasks] == ["t3", "t4"]
    # A call's tasks share its token; each (id, token) pair is a lease of its own.
    assert {t.token for t in batch.tasks} == {batch.tasks[0].token}
    assert {t.token for t in rest.tasks} == {rest.tasks[0].token} != {batch.tasks[0].token}

    empty = benv.q.lease(Q, count=10)
    assert empty.tasks == []


def test_lease_returns_task_options(benv: Env) -> None:
    deadline = benv.now() + 3_600_000
    benv.enqueue(task("a", retry=4, timeout=12, retry_delay=3, deadline=at(deadline)))
    (leased,) = benv.lease()
    assert (leased.max_retry, leased.timeout_ms, leased.retry_delay_ms) == (4, 12_000, 3_000)
    assert leased.deadline_ms == deadline


def test_lease_skips_a_paused_queue(benv: Env) -> None:
    benv.enqueue(task("a"))
    benv.q.pause(Q)
    frozen = freeze(benv)

    assert benv.q.lease(Q, count=5).tasks == []
    frozen.unchanged()

    benv.q.resume(Q)
    assert [t.id for t in benv.lease()] == ["a"]


def test_lease_archives_a_task_past_its_deadline(benv: Env) -> None:
    benv.enqueue(task("late", deadline=at(benv.now() + 3_600_000)), task("ok"))
    benv.r.hset(benv.k.task("late"), "deadline", benv.now() - 1)  # the deadline has passed

    batch = benv.q.lease(Q, count=2)

    assert [t.id for t in batch.tasks] == ["ok"]
    assert batch.deadline_archived == 1
    benv.assert_in("late", "archived")
    assert benv.score("archived", "late") == batch.now_ms
    h = benv.h("late")
    assert h["error"] == b"deadline exceeded"
    assert "token" not in h
    assert h["r"] == b"0"


def test_lease_drops_an_orphan_id(benv: Env) -> None:
    benv.r.lpush(benv.k.pending, "ghost")
    benv.enqueue(task("a"))
    batch = benv.q.lease(Q, count=2)
    assert [t.id for t in batch.tasks] == ["a"]
    assert batch.orphans == 1
    assert benv.where("ghost") == []
    assert not benv.r.exists(benv.k.task("ghost")), "no hash is invented for an orphan id"


def test_lease_leases_an_id_once_when_pending_holds_it_twice(benv: Env) -> None:
    # Pending holds each id once (I5); a second copy, from corruption, would share the call's
    # lease. It is dropped as an orphan: the task is leased once and the copy is gone.
    benv.enqueue(task("a"), task("b"))
    benv.r.lpush(benv.k.pending, "a")
    batch = benv.q.lease(Q, count=5)
    assert [t.id for t in batch.tasks] == ["a", "b"]
    assert batch.orphans == 1
    assert benv.pending() == []
    assert benv.q.ack(Q, batch.tasks) == [True, True]
    assert benv.where("a") == [] and benv.where("b") == []


@pytest.mark.parametrize(
    "fields",
    [{}, {"deadline": "soon", "o": "3"}, {"r": "abc"}, {"deadline": "1", "o": "1"}],
    ids=["plain", "unreadable-deadline", "unreadable-retried", "deadline-passed"],
)
def test_lease_leaves_a_task_of_a_newer_format_alone(benv: Env, fields: dict[str, str]) -> None:
    # A newer format may name or encode its fields otherwise: none of them is read or judged
    # (not archived as corrupt or as past its deadline), the task is put back untouched.
    benv.enqueue(task("new"))
    benv.r.hset(benv.k.task("new"), mapping={"v": 999, **fields})
    benv.r.hdel(benv.k.task("new"), "t")
    before = benv.h("new")
    batch = benv.q.lease(Q, count=5)
    assert batch.tasks == []
    assert (batch.corrupt_archived, batch.deadline_archived, batch.orphans) == (0, 0, 0)
    benv.assert_in("new", "pending")
    assert benv.h("new") == before


def test_lease_puts_back_newer_tasks_in_a_batch_and_leases_the_rest(benv: Env) -> None:
    benv.enqueue(*(task(f"t{i}") for i in range(5)))
    for newer in ("t1", "t3"):
        benv.r.hset(benv.k.task(newer), "v", 999)
    batch = benv.q.lease(Q, count=5)
    assert [t.id for t in batch.tasks] == ["t0", "t2", "t4"]
    assert benv.pending() == ["t3", "t1"], "put back at the tail, oldest nearest the head as before"
    for leased in batch.tasks:
        benv.assert_in(leased.id, "active")
        assert benv.score("active", leased.id) == batch.expires_ms
    assert all(benv.h(t.id)["token"] == t.token.encode() for t in batch.tasks)
    assert "token" not in benv.h("t1") and "token" not in benv.h("t3")


# --- pause, resume ---------------------------------------------------------------------------


def test_resume_wakes_idle_workers_only_when_tasks_wait(benv: Env) -> None:
    benv.q.pause(Q)
    assert benv.r.exists(benv.k.paused)
    benv.q.resume(Q)
    assert not benv.r.exists(benv.k.paused)
    assert not benv.r.exists(benv.k.wake), "nothing waits: no wake-up"

    benv.enqueue(task("a"))
    benv.q.pause(Q)
    benv.r.delete(benv.k.wake)
    assert benv.raw(_ops.pause(benv.k, False)) == 1
    assert benv.r.lrange(benv.k.wake, 0, -1) == [b"1"]
    assert benv.raw(_ops.pause(benv.k, False)) == 0, "not paused any more"
    assert benv.r.lrange(benv.k.wake, 0, -1) == [b"1"], "the token stays capped at one"
    benv.assert_in("a", "pending")


# --- unblock (the worker server's waker) -----------------------------------------------------


def _run_unblock(env: Env, listener: str) -> None:
    results = env.q.run_calls([_ops.unblock(env.k, listener)])
    raise_first(results)


def test_unblock_leaves_one_token_that_expires(benv: Env) -> None:
    key = benv.k.listener_wake("L1")
    assert benv.k.owns(key), "a listener's key is in the queue's slot"
    _run_unblock(benv, "L1")
    _run_unblock(benv, "L1")
    assert benv.r.lrange(key, 0, -1) == [b"1"], "capped at one token"
    assert 0 < benv.r.pttl(key) <= _ops.UNBLOCK_TTL_MS, "a token no listener pops must expire"
    assert list(benv.snap()) == [key.encode()], "nothing but the listener's key is written"


def test_unblock_ends_a_blocked_wait_on_the_listeners_key(env: Env) -> None:
    key = env.k.listener_wake("L2")
    blocked = env.r.connection_pool.get_connection()
    try:
        blocked.send_command("BRPOP", env.k.wake, key, 30)
        wait_until(lambda: _blocked_on_brpop(env.r) == 1, "the BRPOP to block")
        _run_unblock(env, "L2")
        assert blocked.read_response() == [key.encode(), b"1"]
    finally:
        env.r.connection_pool.release(blocked)
    assert not env.r.exists(key), "a popped token leaves no key behind"


def _blocked_on_brpop(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if c.get("cmd") == "brpop")


def test_unblock_refuses_a_key_of_another_type_and_writes_nothing(benv: Env) -> None:
    key = benv.k.listener_wake("L3")
    benv.r.set(key, "corrupt")
    frozen = freeze(benv)
    with pytest.raises(CorruptState) as caught:
        _run_unblock(benv, "L3")
    assert caught.value.code is Code.WRONG_TYPE and key in str(caught.value)
    frozen.unchanged()


# --- extend, ack -----------------------------------------------------------------------------


def test_extend_moves_the_expiry_by_server_time(benv: Env) -> None:
    benv.enqueue(task("a"))
    (leased,) = benv.lease(duration=1)
    before = benv.now()
    assert benv.q.extend(Q, [leased], lease_duration=60) == [True]
    after = benv.now()
    score = benv.score("active", "a")
    assert score is not None and before + 60_000 <= score <= after + 60_000
    benv.assert_in("a", "active")
    assert benv.h("a")["token"] == leased.token.encode()

    reply = benv.raw(_ops.extend(benv.k, [leased], 60_000))
    assert reply[1:] == [Code.OK]
    assert benv.score("active", "a") == reply[0]


def test_ack_deletes_the_task(benv: Env) -> None:
    benv.enqueue(task("a"))
    (leased,) = benv.lease()
    assert benv.q.ack(Q, [leased]) == [True]
    assert benv.where("a") == []
    assert not benv.r.exists(benv.k.task("a"))
    with pytest.raises(TaskNotFound):
        benv.q.info("a", queue=Q)


def test_ack_with_retention_keeps_the_task_completed(benv: Env) -> None:
    benv.enqueue(task("a", retention=60))
    (leased,) = benv.lease()
    before = benv.now()
    assert benv.raw(_ops.ack(benv.k, [leased])) == [Code.EXISTS]
    after = benv.now()

    benv.assert_in("a", "completed")
    h = benv.h("a")
    assert "token" not in h
    done = int(h["done_at"])
    assert before <= done <= after
    assert benv.score("completed", "a") == done + 60_000
    assert 0 < benv.r.pttl(benv.k.task("a")) <= 60_000
    info = benv.q.info("a", queue=Q)
    assert info.state is TaskState.COMPLETED
    assert info.finished_at == at(done)


def test_ack_of_the_same_lease_twice_in_one_batch_finishes_it_once(benv: Env) -> None:
    benv.enqueue(task("a", retention=60), task("b"))
    a, b = benv.lease(count=2)
    assert benv.raw(_ops.ack(benv.k, [a, b, a, b])) == [
        Code.EXISTS,
        Code.OK,
        Code.LEASE_LOST,
        Code.LEASE_LOST,
    ]
    benv.assert_in("a", "completed")
    assert benv.where("b") == [] and not benv.r.exists(benv.k.task("b"))


def test_ack_of_more_leases_than_one_batched_command_takes(benv: Env) -> None:
    """ack checks active and deletes in commands of at most 1,000 ids (Lua's unpack is bounded);
    a larger batch is split, with each lease's own result."""
    benv.enqueue(*(task(f"t{i}") for i in range(1300)))
    leased = benv.lease(count=1000) + benv.lease(count=300)
    stale = qsync.Lease("t5", "stale-token")
    assert benv.q.ack(Q, [*leased[:1200], stale, *leased[1200:]]) == [True] * 1200 + [False] + [True] * 100
    assert benv.r.zcard(benv.k.active) == 0
    assert not any(benv.r.exists(benv.k.task(t.id)) for t in leased[::97])


# --- fail ------------------------------------------------------------------------------------


def test_fail_sends_the_task_to_retry_at_a_server_time(benv: Env) -> None:
    benv.enqueue(task("a", retry=3))
    (leased,) = benv.lease()
    before = benv.now()
    assert benv.q.fail(Q, [qsync.Failure("a", leased.token, "boom: it broke", 5_000)]) == [TaskState.RETRY]
    after = benv.now()

    benv.assert_in("a", "retry")
    due = benv.score("retry", "a")
    assert due is not None and before + 5_000 <= due <= after + 5_000
    h = benv.h("a")
    assert h["error"] == b"boom: it broke"
    assert h["r"] == b"1"
    assert before <= int(h["failed_at"]) <= after
    assert "token" not in h
    info = benv.q.info("a", queue=Q)
    assert info.last_error == "boom: it broke"
    assert info.retried == 1
    assert info.next_process_at == at(due)


def test_fail_archives_when_retries_are_exhausted(benv: Env) -> None:
    benv.enqueue(task("a", retry=1))
    (leased,) = benv.lease()
    assert benv.q.fail(Q, [qsync.Failure("a", leased.token, "first", 0)]) == [TaskState.RETRY]
    benv.q.promote(Q)
    (leased,) = benv.lease()
    assert leased.retried == 1
    before = benv.now()
    assert benv.q.fail(Q, [qsync.Failure("a", leased.token, "second", 0)]) == [TaskState.ARCHIVED]
    after = benv.now()

    benv.assert_in("a", "archived")
    score = benv.score("archived", "a")
    assert score is not None and before <= score <= after
    h = benv.h("a")
    assert h["error"] == b"second"
    assert h["r"] == b"1", "an archived attempt does not count as a retry"
    assert "token" not in h
    assert before <= int(h["done_at"]) <= after


def test_fail_archives_on_skip_retry(benv: Env) -> None:
    benv.enqueue(task("a", retry=5))
    (leased,) = benv.lease()
    assert benv.q.fail(Q, [qsync.Failure("a", leased.token, "no", None)]) == [TaskState.ARCHIVED]
    benv.assert_in("a", "archived")
    assert benv.h("a")["error"] == b"no"


def test_fail_archives_when_the_next_attempt_is_past_the_deadline(benv: Env) -> None:
    benv.enqueue(task("a", retry=5, deadline=at(benv.now() + 3_600_000)))
    (leased,) = benv.lease()
    failure = qsync.Failure("a", leased.token, "late", 2 * 3_600_000)
    assert benv.q.fail(Q, [failure]) == [TaskState.ARCHIVED]
    benv.assert_in("a", "archived")
    assert benv.h("a")["error"] == b"late"


def test_fail_keeps_a_long_error_text_bounded(benv: Env) -> None:
    benv.enqueue(task("a"))
    (leased,) = benv.lease()
    benv.q.fail(Q, [qsync.Failure("a", leased.token, "é" * 5000, 0)])
    error = benv.h("a")["error"]
    assert len(error) == _ops.MAX_ERROR_BYTES


# --- requeue ---------------------------------------------------------------------------------


def test_requeue_puts_the_task_next_without_an_attempt(benv: Env) -> None:
    benv.enqueue(task("a", retry=2), task("b"))
    (leased,) = benv.lease()
    assert leased.id == "a"
    benv.r.delete(benv.k.wake)

    assert benv.q.requeue(Q, [leased]) == [True]

    benv.assert_in("a", "pending")
    assert benv.pending() == ["b", "a"], "a jumps the line"
    h = benv.h("a")
    assert h["r"] == b"0"
    assert "token" not in h
    assert benv.r.lrange(benv.k.wake, 0, -1) == [b"1"]
    (again,) = benv.lease()
    assert again.id == "a" and again.token != leased.token
    assert again.retried == 0


# --- promote ---------------------------------------------------------------------------------


def test_promote_moves_due_scheduled_and_retry_ids_to_pending(benv: Env) -> None:
    benv.enqueue(task("s-due", delay=60), task("s-later", delay=60), task("r-due"), task("r-later"))
    for leased in benv.lease(count=2):
        benv.q.fail(Q, [qsync.Failure(leased.id, leased.token, "boom", 3_600_000)])
    benv.set_score("scheduled", "s-due")
    benv.set_score("retry", "r-due")
    later = min(benv.score("scheduled", "s-later") or 0, benv.score("retry", "r-later") or 0)

    result = benv.q.promote(Q)

    assert result == _ops.PromoteResult(2, 0, later)
    benv.assert_in("s-due", "pending")
    benv.assert_in("r-due", "pending")
    benv.assert_in("s-later", "scheduled")
    benv.assert_in("r-later", "retry")
    assert benv.h("r-due")["error"] == b"boom", "the last error stays readable"
    assert benv.r.lrange(benv.k.wake, 0, -1) == [b"1"]


def test_promote_moves_nothing_early_and_reports_the_next_due_time(benv: Env) -> None:
    benv.enqueue(task("a", delay=60))
    due = benv.score("scheduled", "a")
    frozen = freeze(benv)
    assert benv.q.promote(Q) == _ops.PromoteResult(0, 0, due)
    frozen.unchanged()
    benv.r.delete(benv.k.scheduled, benv.k.task("a"))
    assert benv.q.promote(Q) == _ops.PromoteResult(0, 0, -1)


def test_promote_drops_orphan_ids(benv: Env) -> None:
    benv.r.zadd(benv.k.scheduled, {"ghost": 1})
    benv.r.zadd(benv.k.retry, {"ghost2": 1})
    benv.r.set(benv.k.task("ghost2"), "not a hash")
    assert benv.q.promote(Q) == _ops.PromoteResult(0, 2, -1)
    assert benv.where("ghost") == [] and benv.where("ghost2") == []
    assert not benv.r.exists(benv.k.task("ghost"))
    assert benv.r.get(benv.k.task("ghost2")) == b"not a hash", "a foreign key is left alone"


# --- recover ---------------------------------------------------------------------------------


def test_recover_sends_an_expired_lease_to_retry(benv: Env) -> None:
    benv.enqueue(task("a", retry=3), task("live"))
    leases = benv.lease(count=2)
    benv.set_score("active", "a")
    live_expiry = benv.score("active", "live")

    before = benv.now()
    result = benv.q.recover(Q, retry_delay=10)
    after = benv.now()

    assert result == _ops.RecoverResult(1, 0, 0, live_expiry)
    benv.assert_in("a", "retry")
    benv.assert_in("live", "active")
    due = benv.score("retry", "a")
    assert due is not None and before + 10_000 <= due <= after + 10_000
    h = benv.h("a")
    assert h["error"] == b"lease expired"
    assert h["r"] == b"1"
    assert h["recoveries"] == b"1"
    assert "token" not in h
    assert benv.q.ack(Q, [leases[0]]) == [False], "the old holder can no longer commit"


def test_recover_uses_the_tasks_own_retry_delay(benv: Env) -> None:
    benv.enqueue(task("a", retry_delay=7))
    benv.lease()
    benv.set_score("active", "a")
    before = benv.now()
    benv.q.recover(Q, retry_delay=1000)
    after = benv.now()
    due = benv.score("retry", "a")
    assert due is not None and before + 7_000 <= due <= after + 7_000


def test_recover_leaves_a_live_lease_alone(benv: Env) -> None:
    benv.enqueue(task("a"))
    benv.lease(duration=60)
    expiry = benv.score("active", "a")
    frozen = freeze(benv)
    assert benv.q.recover(Q) == _ops.RecoverResult(0, 0, 0, expiry)
    frozen.unchanged()


@pytest.mark.parametrize("why", ["retries-exhausted", "deadline"])
def test_recover_archives(benv: Env, why: str) -> None:
    if why == "retries-exhausted":
        benv.enqueue(task("a", retry=0))
        error = b"lease expired"
    else:
        benv.enqueue(task("a", retry=5, deadline=at(benv.now() + 3_600_000)))
        error = b"lease expired; deadline exceeded"
    benv.lease()
    benv.set_score("active", "a")

    before = benv.now()
    assert benv.q.recover(Q, retry_delay=2 * 3600) == _ops.RecoverResult(0, 1, 0, -1)
    after = benv.now()

    benv.assert_in("a", "archived")
    h = benv.h("a")
    assert h["error"] == error
    assert h["recoveries"] == b"1"
    assert "token" not in h
    score = benv.score("archived", "a")
    assert score is not None and before <= score <= after


def test_recover_archives_a_poison_task(benv: Env) -> None:
    benv.enqueue(task("a", retry=10))
    for round_ in (1, 2):
        benv.lease()
        benv.set_score("active", "a")
        result = benv.q.recover(Q, max_recoveries=2)
        if round_ == 1:
            assert result.retried == 1
            assert benv.h("a")["recoveries"] == b"1"
            assert benv.q.promote(Q).promoted == 1
    assert result == _ops.RecoverResult(0, 1, 0, -1)
    benv.assert_in("a", "archived")
    h = benv.h("a")
    assert h["recoveries"] == b"2"
    assert h["error"].startswith(b"poison: lease expired 2 times")


def test_recover_repairs_an_active_id_without_hash_or_token(benv: Env) -> None:
    benv.enqueue(task("no-token"))
    benv.lease()
    benv.r.hdel(benv.k.task("no-token"), "token")
    benv.set_score("active", "no-token")
    benv.r.zadd(benv.k.active, {"no-hash": 1})

    assert benv.q.recover(Q) == _ops.RecoverResult(1, 0, 1, -1)

    assert benv.where("no-hash") == []
    assert not benv.r.exists(benv.k.task("no-hash")), "no hash is invented for an orphan id"
    benv.assert_in("no-token", "retry")
    assert benv.h("no-token")["error"] == b"lease expired"


# --- trim, info ------------------------------------------------------------------------------


def test_trim_forgets_completed_tasks_past_their_retention(benv: Env) -> None:
    benv.enqueue(task("old", retention=60), task("new", retention=60))
    benv.q.ack(Q, benv.lease(count=2))
    benv.set_score("completed", "old")

    assert benv.q.trim(Q) == _ops.TrimResult(1, 0)

    assert benv.where("old") == []
    assert not benv.r.exists(benv.k.task("old"))
    benv.assert_in("new", "completed")


def test_trim_keeps_a_hash_that_is_no_longer_completed(benv: Env) -> None:
    benv.enqueue(task("a"))
    benv.r.zadd(benv.k.completed, {"a": 1})  # a stale entry for a task that lives again
    assert benv.q.trim(Q) == _ops.TrimResult(1, 0)
    benv.assert_in("a", "pending")


def test_trim_forgets_archived_tasks_by_age_and_by_count(benv: Env) -> None:
    benv.enqueue(*(task(f"a{i}", retry=0) for i in range(5)))
    for leased in benv.lease(count=5):
        benv.q.fail(Q, [qsync.Failure(leased.id, leased.token, "x", None)])
    now = benv.now()
    for i in range(5):
        benv.set_score("archived", f"a{i}", now - 10_000 + i)
    benv.set_score("archived", "a0", 1)  # very old

    assert benv.q.trim(Q, archived_max_age=3600) == _ops.TrimResult(0, 1)
    assert benv.where("a0") == [] and not benv.r.exists(benv.k.task("a0"))

    assert benv.q.trim(Q, archived_max_count=2) == _ops.TrimResult(0, 2)
    assert benv.zids("archived") == ["a3", "a4"], "the oldest go first"
    assert not benv.r.exists(benv.k.task("a1"))
    assert not benv.r.exists(benv.k.task("a2"))
    benv.assert_in("a4", "archived")


def test_info_reports_the_due_time_of_each_state(benv: Env) -> None:
    benv.enqueue(task("s", delay=60), task("a"))
    (leased,) = benv.lease()
    info = benv.q.info("a", queue=Q)
    assert info.state is TaskState.ACTIVE
    assert info.next_process_at == at(benv.score("active", "a") or 0)
    info = benv.q.info("s", queue=Q)
    assert info.state is TaskState.SCHEDULED
    assert info.next_process_at == at(benv.score("scheduled", "s") or 0)
    benv.q.fail(Q, [qsync.Failure("a", leased.token, "e", 0)])
    benv.q.promote(Q)
    info = benv.q.info("a", queue=Q)
    assert info.state is TaskState.PENDING
    assert info.next_process_at is None
    assert info.last_error == "e"
    with pytest.raises(TaskNotFound):
        benv.q.info("nope", queue=Q)


# --- 2. fencing: a stale token is LEASE_LOST and writes nothing ------------------------------


def test_the_no_write_check_sees_a_rewrite_of_the_same_value(env: Env) -> None:
    """The guard of the fencing and corruption tests: the dirty counter catches even a write
    that leaves every value as it was, which a snapshot alone cannot see."""
    env.enqueue(task("a"))
    frozen = freeze(env)
    env.r.hset(env.k.task("a"), "s", "pending")
    assert env.snap() == frozen.snap
    with pytest.raises(AssertionError, match="wrote to Redis"):
        frozen.unchanged()


# --- stale tokens, case by case --------------------------------------------------------------


def _stale_after_recover(env: Env) -> qsync.Lease:
    env.enqueue(task("a", retry=5))
    (first,) = env.lease()
    env.set_score("active", "a")
    assert env.q.recover(Q).retried == 1
    assert env.q.promote(Q).promoted == 1
    (second,) = env.lease()
    assert second.id == "a" and second.token != first.token
    return qsync.Lease("a", first.token)


def _stale_made_up(env: Env) -> qsync.Lease:
    env.enqueue(task("a"))
    env.lease()
    return qsync.Lease("a", "made-up-token")


def _stale_empty(env: Env) -> qsync.Lease:
    env.enqueue(task("a"))
    env.lease()
    return qsync.Lease("a", "")


def _stale_unknown_id(env: Env) -> qsync.Lease:
    env.enqueue(task("a"))
    (leased,) = env.lease()
    return qsync.Lease("ghost", leased.token)


def _stale_not_in_active(env: Env) -> qsync.Lease:
    """The hash still carries the token but the id left active (e.g. a half-restored state)."""
    env.enqueue(task("a"))
    (leased,) = env.lease()
    env.r.zrem(env.k.active, "a")
    env.r.lpush(env.k.pending, "a")
    env.r.hset(env.k.task("a"), "s", "pending")
    return qsync.Lease("a", leased.token)


def _stale_after_requeue(env: Env) -> qsync.Lease:
    env.enqueue(task("a"))
    (leased,) = env.lease()
    assert env.q.requeue(Q, [leased]) == [True]
    return qsync.Lease("a", leased.token)


def _stale_after_ack_with_retention(env: Env) -> qsync.Lease:
    env.enqueue(task("a", retention=60))
    (leased,) = env.lease()
    assert env.q.ack(Q, [leased]) == [True]
    return qsync.Lease("a", leased.token)


def _stale_after_fail(env: Env) -> qsync.Lease:
    env.enqueue(task("a"))
    (leased,) = env.lease()
    assert env.q.fail(Q, [qsync.Failure("a", leased.token, "e", 60_000)]) == [TaskState.RETRY]
    return qsync.Lease("a", leased.token)


STALE = {
    "recovered-and-leased-again": _stale_after_recover,
    "made-up-token": _stale_made_up,
    "empty-token": _stale_empty,
    "unknown-id": _stale_unknown_id,
    "not-in-active": _stale_not_in_active,
    "after-requeue": _stale_after_requeue,
    "after-ack-with-retention": _stale_after_ack_with_retention,
    "after-fail": _stale_after_fail,
}

FENCED: dict[str, tuple[Callable[[Env, qsync.Lease], Any], Any, Callable[[Env, qsync.Lease], Any], Any]] = {
    # op: (public call, its result for a lost lease, raw call, its raw reply after the time)
    "extend": (
        lambda e, lease: e.q.extend(Q, [lease], lease_duration=60),
        [False],
        lambda e, lease: e.raw(_ops.extend(e.k, [lease], 60_000))[1:],
        [Code.LEASE_LOST],
    ),
    "ack": (
        lambda e, lease: e.q.ack(Q, [lease]),
        [False],
        lambda e, lease: e.raw(_ops.ack(e.k, [lease])),
        [Code.LEASE_LOST],
    ),
    "fail": (
        lambda e, lease: e.q.fail(Q, [qsync.Failure(lease.id, lease.token, "late", 0)]),
        [None],
        lambda e, lease: e.raw(_ops.fail(e.k, [qsync.Failure(lease.id, lease.token, "late", 0)]))[1:],
        [Code.LEASE_LOST],
    ),
    "fail-archive": (
        lambda e, lease: e.q.fail(Q, [qsync.Failure(lease.id, lease.token, "late", None)]),
        [None],
        lambda e, lease: e.raw(_ops.fail(e.k, [qsync.Failure(lease.id, lease.token, "late", None)]))[1:],
        [Code.LEASE_LOST],
    ),
    "requeue": (
        lambda e, lease: e.q.requeue(Q, [lease]),
        [False],
        lambda e, lease: e.raw(_ops.requeue(e.k, [lease])),
        [Code.LEASE_LOST],
    ),
}


@pytest.mark.parametrize("op", FENCED)
@pytest.mark.parametrize("stale", STALE)
def test_stale_token_is_lease_lost_and_writes_nothing(env: Env, stale: str, op: str) -> None:
    lease = STALE[stale](env)
    call, lost, raw_call, raw_lost = FENCED[op]
    # Load every script first: SCRIPT LOAD is not a write, but keep the measured window clean.
    env.raw(_ops.promote(env.k))
    for name in ("extend", "ack", "fail", "requeue"):
        env.r.script_load(_scripts.script(name).source)
    frozen = freeze(env)

    assert call(env, lease) == lost
    assert raw_call(env, lease) == raw_lost
    frozen.unchanged()


@pytest.mark.parametrize("op", ["extend", "ack", "fail", "requeue"])
def test_a_batch_commits_only_the_current_leases(benv: Env, op: str) -> None:
    stale = _stale_after_recover(benv)
    benv.enqueue(task("b"))
    (current,) = benv.lease()
    a_hash = benv.h("a")
    a_score = benv.score("active", "a")

    if op == "extend":
        assert benv.q.extend(Q, [stale, current], lease_duration=120) == [False, True]
    elif op == "ack":
        assert benv.q.ack(Q, [stale, current]) == [False, True]
    elif op == "fail":
        failures = [qsync.Failure(x.id, x.token, "e", 1000) for x in (stale, current)]
        assert benv.q.fail(Q, failures) == [None, TaskState.RETRY]
    else:
        assert benv.q.requeue(Q, [stale, current]) == [False, True]

    assert benv.h("a") == a_hash
    assert benv.score("active", "a") == a_score
    benv.assert_in("a", "active")


# --- 3. corrupt state: a typed error and no partial write ------------------------------------


@dataclass
class Scene:
    """A queue with work for every script: due scheduled, expired lease, trimmable ids."""

    held: _ops.LeasedTask


def _scene(env: Env) -> Scene:
    env.enqueue(task("held"), task("rt"), task("ar", retry=0), task("c", retention=3600))
    held, rt, ar, c = env.lease(count=4)
    env.q.fail(Q, [qsync.Failure(rt.id, rt.token, "e", 0), qsync.Failure(ar.id, ar.token, "e", None)])
    env.q.ack(Q, [c])
    env.enqueue(task("p"), task("s", delay=3600), unique_task("u"))
    env.set_score("active", "held")
    env.set_score("scheduled", "s")
    env.set_score("completed", "c")
    env.set_score("archived", "ar")
    env.q.pause(Q)  # resume has work too (and lease must not care: it checks types first)
    return Scene(held)


CORRUPT_CALLS: dict[str, Callable[[Env, Scene], Any]] = {
    "enqueue": lambda e, s: e.q.enqueue(task("new"), queue=Q),
    "enqueue_many": lambda e, s: raise_first(e.q.enqueue_many([task("n1"), task("n2", delay=5)], queue=Q)),
    "lease": lambda e, s: e.q.lease(Q, count=10),
    "extend": lambda e, s: e.q.extend(Q, [s.held]),
    "ack": lambda e, s: e.q.ack(Q, [s.held]),
    "fail": lambda e, s: e.q.fail(Q, [qsync.Failure(s.held.id, s.held.token, "x", 1000)]),
    "requeue": lambda e, s: e.q.requeue(Q, [s.held]),
    "promote": lambda e, s: e.q.promote(Q),
    "recover": lambda e, s: e.q.recover(Q),
    "trim": lambda e, s: e.q.trim(Q, archived_max_age=1),
    "info": lambda e, s: e.q.info("p", queue=Q),
    "resume": lambda e, s: e.q.resume(Q),
}

CORRUPT_CASES = [
    ("enqueue", "pending"),
    ("enqueue", "scheduled"),
    ("enqueue", "wake"),
    ("enqueue", "completed"),
    ("enqueue_many", "pending"),
    ("enqueue_many", "scheduled"),
    ("lease", "pending"),
    ("lease", "active"),
    ("lease", "archived"),
    ("lease", "wake"),
    ("extend", "active"),
    ("ack", "active"),
    ("ack", "completed"),
    ("fail", "active"),
    ("fail", "retry"),
    ("fail", "archived"),
    ("requeue", "active"),
    ("requeue", "pending"),
    ("requeue", "wake"),
    ("promote", "scheduled"),
    ("promote", "retry"),
    ("promote", "pending"),
    ("promote", "wake"),
    ("recover", "active"),
    ("recover", "retry"),
    ("recover", "archived"),
    ("trim", "completed"),
    ("trim", "archived"),
    ("info", "task"),
    ("resume", "pending"),
    ("resume", "wake"),
]


def _corrupt(env: Env, which: str) -> str:
    """Replace a container with a key of another Redis type: a list becomes a string, a zset a
    list, the task hash a string. Returns the key."""
    key = env.k.task("p") if which == "task" else getattr(env.k, which)
    env.r.delete(key)
    if which in ("pending", "wake", "task"):
        env.r.set(key, "corrupt")
    else:
        env.r.rpush(key, "corrupt")
    return key


@pytest.mark.parametrize(("op", "which"), CORRUPT_CASES, ids=[f"{o}-{w}" for o, w in CORRUPT_CASES])
def test_wrong_type_key_is_corrupt_state_and_nothing_is_written(benv: Env, op: str, which: str) -> None:
    scene = _scene(benv)
    key = _corrupt(benv, which)
    frozen = freeze(benv)

    with pytest.raises(CorruptState) as caught:
        CORRUPT_CALLS[op](benv, scene)

    assert caught.value.code is Code.WRONG_TYPE
    assert caught.value.op == op.removesuffix("_many")
    assert key in str(caught.value)
    frozen.unchanged()


def test_wrong_type_task_or_lock_key_refuses_only_that_item(benv: Env) -> None:
    bad_lock = unique_task("locked")
    benv.r.set(benv.k.task("bad"), "not a hash")
    benv.r.rpush(lock_of(benv, bad_lock), "not a string")
    before_bad = benv.r.dump(benv.k.task("bad"))
    before_lock = benv.r.dump(lock_of(benv, bad_lock))

    results = benv.q.enqueue_many([task("ok1"), task("bad"), bad_lock, task("ok2")], queue=Q)

    assert isinstance(results[0], qsync.TaskInfo)
    assert isinstance(results[1], CorruptState) and results[1].task_id == "bad"
    assert isinstance(results[2], CorruptState) and results[2].task_id == "locked"
    assert isinstance(results[3], qsync.TaskInfo)
    assert benv.pending() == ["ok2", "ok1"]
    assert benv.r.dump(benv.k.task("bad")) == before_bad
    assert benv.r.dump(lock_of(benv, bad_lock)) == before_lock
    assert not benv.r.exists(benv.k.task("locked"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("p", None),
        ("t", None),
        ("v", None),
        ("r", None),
        ("r", "abc"),
        ("m", "-x-"),
        ("deadline", "soon"),
    ],
)
def test_lease_archives_a_task_hash_with_missing_or_malformed_fields(
    benv: Env, field: str, value: str | None
) -> None:
    benv.enqueue(unique_task("bad"), task("good"))
    if value is None:
        benv.r.hdel(benv.k.task("bad"), field)
    else:
        # "o" = 3 makes lease read the optional fields this case may set (lua/README.md).
        benv.r.hset(benv.k.task("bad"), mapping={field: value, "o": "3"})
    raw_before = benv.h("bad")

    batch = benv.q.lease(Q, count=2)

    assert [t.id for t in batch.tasks] == ["good"]
    assert batch.corrupt_archived == 1
    benv.assert_in("bad", "archived")
    h = benv.h("bad")
    assert h["error"] == f"corrupt: field {FIELD_LABELS[field]} missing or malformed".encode()
    kept = {name: v for name, v in raw_before.items() if name not in ("s",)}
    assert {name: h[name] for name in kept} == kept, "the raw fields are kept for inspection"
    assert not benv.r.exists(lock_of(benv, unique_task("bad"))), "an archived task holds no lock"


def _strip(env: Env, task_id: str) -> None:
    """Leave only the fields a leased task cannot be fenced without (state "s" and token)."""
    fields = [f for f in env.h(task_id) if f not in ("s", "token")]
    env.r.hdel(env.k.task(task_id), *fields)


@pytest.mark.parametrize("op", ["extend", "ack", "fail", "requeue", "recover"])
def test_a_stripped_task_hash_never_crashes_a_transition(benv: Env, op: str) -> None:
    """A leased task's hash lost its other fields: each transition either works or repairs,
    and the id ends in exactly one place (or nowhere, for an ack)."""
    benv.enqueue(task("a", retry=5))
    (leased,) = benv.lease()
    _strip(benv, "a")

    if op == "extend":
        assert benv.q.extend(Q, [leased]) == [True]
        benv.assert_in("a", "active")
    elif op == "ack":
        assert benv.q.ack(Q, [leased]) == [True]
        assert benv.where("a") == [] and not benv.r.exists(benv.k.task("a"))
    elif op == "fail":
        (state,) = benv.q.fail(Q, [qsync.Failure("a", leased.token, "e", 1000)])
        assert state is not None
        benv.assert_in("a", state.value)
    elif op == "requeue":
        assert benv.q.requeue(Q, [leased]) == [True]
        benv.assert_in("a", "pending")
        batch = benv.q.lease(Q)  # the stripped hash is archived as corrupt, not handed out
        assert batch.tasks == [] and batch.corrupt_archived == 1
        benv.assert_in("a", "archived")
    else:
        benv.set_score("active", "a")
        result = benv.q.recover(Q)
        assert result.retried + result.archived == 1
        benv.assert_in("a", "retry" if result.retried else "archived")


@pytest.mark.parametrize(
    ("field", "value"),
    [("s", "bogus-state"), ("s", None), ("r", "abc"), ("deadline", "9" * 20)],
)
def test_info_on_a_malformed_hash_is_a_result_or_a_typed_error(
    benv: Env, field: str, value: str | None
) -> None:
    """info reads whatever the hash holds: a state this version does not know (a newer
    worker's, or damage) or a time out of range must give a TaskInfo or a typed QsyncError,
    never a bare ValueError / OSError from the decoding."""
    benv.enqueue(task("a"))
    if value is None:
        benv.r.hdel(benv.k.task("a"), field)
    else:
        benv.r.hset(benv.k.task("a"), field, value)
    try:
        info = benv.q.info("a", queue=Q)
    except QsyncError:
        return
    assert info.id == "a"


# --- 4. bounded batches ----------------------------------------------------------------------


def test_promote_moves_at_most_limit_per_call(benv: Env) -> None:
    ids = [f"s{i}" for i in range(50)]
    benv.enqueue(*(task(i, delay=3600) for i in ids))
    benv.r.zadd(benv.k.scheduled, dict.fromkeys(ids, 1), xx=True)

    moved = [benv.q.promote(Q, limit=10).promoted for _ in range(6)]

    assert moved == [10, 10, 10, 10, 10, 0]
    assert sorted(benv.pending()) == sorted(ids)


def test_promote_from_retry_moves_at_most_limit_per_call(benv: Env) -> None:
    ids = [f"r{i}" for i in range(50)]
    benv.enqueue(*(task(i) for i in ids))
    leases = benv.lease(count=50)
    benv.q.fail(Q, [qsync.Failure(x.id, x.token, "e", 3_600_000) for x in leases])
    benv.r.zadd(benv.k.retry, dict.fromkeys(ids, 1), xx=True)

    first = benv.q.promote(Q, limit=10)
    assert first == _ops.PromoteResult(10, 0, 1), "the rest are still due"
    moved = [benv.q.promote(Q, limit=10).promoted for _ in range(5)]
    assert moved == [10, 10, 10, 10, 0]
    assert benv.zids("retry") == []


def test_recover_reclaims_at_most_limit_per_call(benv: Env) -> None:
    ids = [f"a{i}" for i in range(50)]
    benv.enqueue(*(task(i) for i in ids))
    assert len(benv.lease(count=50)) == 50
    benv.r.zadd(benv.k.active, dict.fromkeys(ids, 1), xx=True)

    first = benv.q.recover(Q, limit=10)
    assert first == _ops.RecoverResult(10, 0, 0, 1)
    moved = [benv.q.recover(Q, limit=10).retried for _ in range(5)]
    assert moved == [10, 10, 10, 10, 0]
    assert sorted(benv.zids("retry")) == sorted(ids)


def test_trim_forgets_at_most_limit_per_call(benv: Env) -> None:
    ids = [f"c{i}" for i in range(50)]
    benv.enqueue(*(task(i, retention=3600) for i in ids))
    benv.q.ack(Q, benv.lease(count=50))
    benv.r.zadd(benv.k.completed, dict.fromkeys(ids, 1), xx=True)

    removed = [benv.q.trim(Q, limit=10).completed for _ in range(6)]
    assert removed == [10, 10, 10, 10, 10, 0]


# --- 5. server time, never the Python clock --------------------------------------------------


@pytest.fixture(params=[3600, -3600], ids=["python-1h-ahead", "python-1h-behind"])
def skewed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Python's time.time (and time_ns) off by an hour for the test."""
    import time

    offset = request.param
    real_time, real_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real_time() + offset)
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + offset * 1_000_000_000)
    yield offset


def test_lease_expiry_is_redis_time_plus_duration(env: Env, skewed: int) -> None:
    env.enqueue(task("a"))
    before = env.now()
    batch = env.q.lease(Q, lease_duration=30)
    after = env.now()
    assert before <= batch.now_ms <= after
    assert env.score("active", "a") == batch.expires_ms == batch.now_ms + 30_000

    before = env.now()
    env.q.extend(Q, batch.tasks, lease_duration=45)
    after = env.now()
    score = env.score("active", "a")
    assert score is not None and before + 45_000 <= score <= after + 45_000
    # An hour of Python clock does not expire (or save) a lease.
    assert env.q.recover(Q) == _ops.RecoverResult(0, 0, 0, score)


def test_delays_and_promotion_follow_redis_time(env: Env, skewed: int) -> None:
    before = env.now()
    env.enqueue(task("d", delay=60))
    after = env.now()
    due = env.score("scheduled", "d")
    assert due is not None and before + 60_000 <= due <= after + 60_000
    assert env.q.promote(Q) == _ops.PromoteResult(0, 0, due), "a skewed client clock makes nothing due"
    env.assert_in("d", "scheduled")

    env.enqueue(task("f"))
    (leased,) = env.lease()
    before = env.now()
    env.q.fail(Q, [qsync.Failure("f", leased.token, "e", 30_000)])
    after = env.now()
    retry_due = env.score("retry", "f")
    assert retry_due is not None and before + 30_000 <= retry_due <= after + 30_000
    assert env.q.promote(Q).promoted == 0

    env.set_score("scheduled", "d", env.now())
    assert env.q.promote(Q).promoted == 1, "due by Redis time is due"


def test_process_at_is_compared_with_redis_time(env: Env, skewed: int) -> None:
    soon = env.now() + 60_000
    assert env.q.enqueue(task("later", process_at=at(soon)), queue=Q).state is TaskState.SCHEDULED
    past = env.now() - 1_000
    assert env.q.enqueue(task("now", process_at=at(past)), queue=Q).state is TaskState.PENDING
    env.assert_in("later", "scheduled")
    env.assert_in("now", "pending")


# --- 6. NOSCRIPT: reloaded once, applied once ------------------------------------------------


def test_noscript_single_calls_reload_transparently(env: Env) -> None:
    """SCRIPT FLUSH before every operation of a task's whole life."""

    def flush() -> None:
        env.r.script_flush()
        shas = [s.sha for s in _scripts.load_all().values()]
        assert env.r.script_exists(*shas) == [False] * len(shas)

    flush()
    env.q.enqueue(task("a", retry=3, retention=60), queue=Q)
    assert env.pending() == ["a"]
    flush()
    assert env.q.info("a", queue=Q).state is TaskState.PENDING
    flush()
    (leased,) = env.lease()
    flush()
    assert env.q.extend(Q, [leased]) == [True]
    flush()
    assert env.q.fail(Q, [qsync.Failure("a", leased.token, "e", 0)]) == [TaskState.RETRY]
    assert env.h("a")["r"] == b"1", "applied once"
    flush()
    assert env.q.promote(Q).promoted == 1
    assert env.pending() == ["a"], "applied once"
    (leased,) = env.lease()
    flush()
    assert env.q.requeue(Q, [leased]) == [True]
    assert env.pending() == ["a"], "applied once"
    (leased,) = env.lease()
    env.set_score("active", "a")
    flush()
    assert env.q.recover(Q).retried == 1
    assert env.h("a")["r"] == b"2", "applied once"
    env.q.promote(Q)
    (leased,) = env.lease()
    flush()
    assert env.q.ack(Q, [leased]) == [True]
    env.assert_in("a", "completed")
    env.set_score("completed", "a")
    flush()
    assert env.q.trim(Q) == _ops.TrimResult(1, 0)
    env.enqueue(task("b"))
    env.q.pause(Q)
    env.r.delete(env.k.wake)
    flush()
    env.q.resume(Q)
    assert not env.r.exists(env.k.paused)
    assert env.r.lrange(env.k.wake, 0, -1) == [b"1"]
    assert env.r.script_exists(_scripts.script("resume").sha) == [True], "reloaded"


def test_noscript_enqueue_many_in_several_chunks(env: Env) -> None:
    env.q.enqueue(task("warm"), queue=Q)
    env.r.script_flush()
    tasks = [task(f"t{i}") for i in range(2 * _ops.ENQUEUE_CHUNK + 1)]  # three script calls

    results = env.q.enqueue_many(tasks, queue=Q)

    assert all(isinstance(x, qsync.TaskInfo) for x in results)
    pending = env.pending()
    assert len(pending) == len(tasks) + 1
    assert len(set(pending)) == len(pending), "no task was enqueued twice"


def test_noscript_mixed_batch_of_calls(env: Env) -> None:
    env.enqueue(task("p0"), task("p1"))
    env.r.script_flush()
    calls: list[_ops.Call[Any]] = [
        *_ops.enqueue_many(env.k, [task("x")]),
        *_ops.enqueue_many(env.k, [task("y")]),
        _ops.lease(env.k, 1, 60_000),
        _ops.lease(env.k, 1, 60_000),
        _ops.promote(env.k),
        _ops.info(env.k, "p0"),
    ]

    results = env.q.run_calls(calls)

    assert not any(isinstance(x, QsyncError) for x in results), results
    first, second = results[2].tasks, results[3].tasks
    assert [t.id for t in first + second] == ["p0", "p1"], "each lease applied once"
    assert first[0].token != second[0].token
    assert env.pending() == ["y", "x"]
    assert sorted(env.zids("active")) == ["p0", "p1"]
    assert results[5].state is TaskState.ACTIVE

"""Attacks on task format 2 and on lease tokens shared by the tasks of one lease call
(commits a73b91d and 9f07789): lease and ack read the optional fields only when "o" names them
(or for a task of format 1), and a lease is the pair (task id, the call's token).

Format-1 tasks are made the way qsync before format 2 wrote them: "v" = "1", every option in
its own field, no "o". Every test runs on real Redis and on fakeredis (``benv``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.stateful import rule, run_state_machine_as_test

import qsync
from qsync import _ops
from qsync.task import TaskState
from tests.lua.test_properties import QueueMachine, index
from tests.lua.test_scripts import Env, Q, at, freeze, lock_of, task

__all__: list[str] = []


def as_format_1(env: Env, task_id: str) -> None:
    """Rewrite a task hash as format 1 wrote it: "v" = "1" and no "o"."""
    env.r.hdel(env.k.task(task_id), "o")
    env.r.hset(env.k.task(task_id), "v", "1")


def o_of(env: Env, task_id: str) -> bytes | None:
    return env.h(task_id).get("o")


# --- enqueue: "o" follows the options ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, None),
        ({"retry": 3}, None),
        ({"delay": 60}, None),
        ({"process_at": "past"}, None),
        ({"retention": 0}, None),  # retention 0: deleted when done, nothing stored
        ({"timeout": 5}, b"1"),
        ({"deadline": "future"}, b"1"),
        ({"retry_delay": 0}, b"1"),  # 0 is a fixed delay, not the worker's policy
        ({"retry_delay": 7}, b"1"),
        ({"retention": 60}, b"2"),
        ({"unique": 60}, b"2"),
        ({"unique": 60, "unique_key": "k"}, b"2"),
        ({"timeout": 5, "retention": 60}, b"3"),
        ({"retry_delay": 1, "unique": 60}, b"3"),
        ({"deadline": "future", "retention": 1, "unique": 60, "timeout": 1, "retry_delay": 1}, b"3"),
    ],
)
def test_enqueue_writes_o_for_exactly_the_options_set(
    benv: Env, options: dict[str, Any], expected: bytes | None
) -> None:
    options = dict(options)
    if options.get("deadline") == "future":
        options["deadline"] = at(benv.now() + 3_600_000)
    if options.get("process_at") == "past":
        options["process_at"] = at(benv.now() - 1_000)
    benv.enqueue(task("a", **options))
    h = benv.h("a")
    assert h["v"] == b"2"
    assert h.get("o") == expected
    lease_side = {"timeout", "deadline", "retry_delay"} & set(h)
    finish_side = {"retention", "unique"} & set(h)
    flags = (1 if lease_side else 0) + (2 if finish_side else 0)
    assert (str(flags).encode() if flags else None) == h.get("o"), "o says which fields exist"


def test_idempotent_enqueue_of_a_task_with_options_is_exists_and_writes_nothing(benv: Env) -> None:
    t = qsync.Task("uniq", b"x", task_id="a", unique=60, retention=60, timeout=3, retry_delay=2)
    benv.enqueue(t)
    assert o_of(benv, "a") == b"3"
    frozen = freeze(benv)
    again = qsync.Task("uniq", b"x", task_id="a", unique=60, retention=60, timeout=3, retry_delay=2)
    assert benv.q.enqueue(again, queue=Q).state is TaskState.PENDING
    frozen.unchanged()
    # Other options (so another "o") under the same id: a conflict, nothing written.
    with pytest.raises(qsync.errors.TaskIdConflict):
        benv.q.enqueue(qsync.Task("uniq", b"x", task_id="a", unique=60, retention=60), queue=Q)
    frozen.unchanged()


# --- lease and ack: mixed formats in one call ------------------------------------------------


def test_one_lease_and_one_ack_over_mixed_formats_read_each_tasks_own_options(benv: Env) -> None:
    now = benv.now()
    tasks = [
        task("v1-plain"),
        qsync.Task("u", b"1", task_id="v1-all", unique=60, retention=60, timeout=7, retry_delay=3,
                   deadline=at(now + 3_600_000)),
        task("v2-plain"),
        qsync.Task("u", b"2", task_id="v2-lock", unique=60),
        task("v2-timeout", timeout=9),
        qsync.Task("u", b"3", task_id="v1-lock", unique=60),
        qsync.Task("u", b"4", task_id="v2-all", unique=60, retention=30, timeout=4, retry_delay=0),
        task("v1-keep", retention=45),
    ]  # fmt: skip
    benv.enqueue(*tasks)
    for t in tasks:
        if t.id.startswith("v1"):
            as_format_1(benv, t.id)

    batch = benv.q.lease(Q, count=len(tasks))
    got = {t.id: (t.timeout_ms, t.deadline_ms, t.retry_delay_ms) for t in batch.tasks}
    assert got == {
        "v1-plain": (0, 0, -1),
        "v1-all": (7_000, tasks[1].options.deadline_ms, 3_000),
        "v2-plain": (0, 0, -1),
        "v2-lock": (0, 0, -1),
        "v2-timeout": (9_000, 0, -1),
        "v1-lock": (0, 0, -1),
        "v2-all": (4_000, 0, 0),
        "v1-keep": (0, 0, -1),
    }
    assert {t.token for t in batch.tasks} == {batch.tasks[0].token}
    assert all(benv.h(t.id)["token"] == batch.tasks[0].token.encode() for t in tasks)

    assert benv.q.ack(Q, batch.tasks) == [True] * len(tasks)
    for t in tasks:
        if t.options.unique_key is not None:
            assert not benv.r.exists(lock_of(benv, t)), f"ack left {t.id}'s lock"
    assert sorted(benv.zids("completed")) == ["v1-all", "v1-keep", "v2-all"]
    assert benv.zids("active") == []
    for t in tasks:
        if t.id not in ("v1-all", "v1-keep", "v2-all"):
            assert not benv.r.exists(benv.k.task(t.id)), t.id
    kept = {t.id: benv.r.pttl(benv.k.task(t.id)) for t in tasks if t.id in ("v1-all", "v1-keep", "v2-all")}
    assert 0 < kept["v2-all"] <= 30_000 < kept["v1-keep"] <= 45_000 < kept["v1-all"] <= 60_000


def test_ack_of_a_mixed_batch_with_lost_leases_between_held_ones_lines_up_locks(benv: Env) -> None:
    # Held and lost leases interleaved, locks and retentions on either side of them, format 1
    # and 2 mixed: each finished task has its own lock released and its own retention applied.
    tasks = [
        qsync.Task("u", b"a", task_id="a", unique=60),
        task("b"),
        qsync.Task("u", b"c", task_id="c", unique=60, retention=20),
        task("d", retention=40),
        qsync.Task("u", b"e", task_id="e", unique=60),
    ]
    benv.enqueue(*tasks)
    as_format_1(benv, "c")
    as_format_1(benv, "e")
    batch = benv.q.lease(Q, count=5)
    leases = {t.id: t for t in batch.tasks}
    stale: list[_ops.HasLease] = [qsync.Lease("a", "stale"), leases["b"], qsync.Lease("c", "stale"),
                                  leases["d"], leases["e"], leases["b"]]  # fmt: skip
    assert benv.q.ack(Q, stale) == [False, True, False, True, True, False]
    assert benv.r.get(lock_of(benv, tasks[0])) == b"a", "a lost lease keeps its lock"
    assert benv.r.get(lock_of(benv, tasks[2])) == b"c"
    assert not benv.r.exists(lock_of(benv, tasks[4]))
    assert benv.zids("completed") == ["d"]
    assert benv.where("a") == ["active"] and benv.where("c") == ["active"]
    assert benv.q.ack(Q, [leases["c"], leases["a"]]) == [True, True]
    assert not benv.r.exists(lock_of(benv, tasks[0])) and not benv.r.exists(lock_of(benv, tasks[2]))
    assert sorted(benv.zids("completed")) == ["c", "d"]


def test_ack_skips_a_wrong_type_or_stripped_task_between_held_ones(benv: Env) -> None:
    # A task key of another type, and a hash without "v" or "o", between tasks with locks: the
    # broken ones are lost or finished without shifting what ack read for the others.
    tasks = [qsync.Task("u", b"1", task_id="l1", unique=60), task("odd"), task("bare"),
             qsync.Task("u", b"2", task_id="l2", unique=60, retention=30)]  # fmt: skip
    benv.enqueue(*tasks)
    batch = benv.q.lease(Q, count=4)
    by = {t.id: t for t in batch.tasks}
    benv.r.delete(benv.k.task("odd"))
    benv.r.set(benv.k.task("odd"), "not a hash")
    benv.r.hdel(benv.k.task("bare"), "v", "t", "p")
    assert benv.q.ack(Q, [by["l1"], by["odd"], by["bare"], by["l2"]]) == [True, False, True, True]
    assert not benv.r.exists(lock_of(benv, tasks[0])) and not benv.r.exists(lock_of(benv, tasks[3]))
    assert benv.zids("completed") == ["l2"]
    assert benv.r.get(benv.k.task("odd")) == b"not a hash", "a foreign key is left alone"
    assert not benv.r.exists(benv.k.task("bare"))


@pytest.mark.parametrize("o", ["x", "", "7", "0", "-1", " 2", "02", "2.0", "1.5"])
def test_a_malformed_o_makes_lease_and_ack_read_every_option(benv: Env, o: str) -> None:
    # An "o" that is not one of "1", "2", "3" must not hide a field: read them all.
    first = qsync.Task("u", b"x", task_id="a", unique=60, retention=60, timeout=7, retry_delay=3,
                       deadline=at(benv.now() + 3_600_000))  # fmt: skip
    benv.enqueue(first)
    benv.r.hset(benv.k.task("a"), "o", o)
    (leased,) = benv.lease()
    assert (leased.timeout_ms, leased.deadline_ms, leased.retry_delay_ms) == (
        7_000,
        first.options.deadline_ms,
        3_000,
    )
    assert benv.q.ack(Q, [leased]) == [True]
    assert not benv.r.exists(lock_of(benv, first)), "the lock is released"
    assert benv.zids("completed") == ["a"]


@pytest.mark.parametrize("version", ["1", "01", "1.0"])
def test_a_format_1_task_past_its_deadline_is_archived_and_its_lock_released(benv: Env, version: str) -> None:
    t = qsync.Task("u", b"x", task_id="late", unique=60, deadline=at(benv.now() + 3_600_000))
    benv.enqueue(t, task("ok"))
    as_format_1(benv, "late")
    benv.r.hset(benv.k.task("late"), mapping={"v": version, "deadline": benv.now() - 1})
    batch = benv.q.lease(Q, count=2)
    assert [x.id for x in batch.tasks] == ["ok"]
    assert batch.deadline_archived == 1
    benv.assert_in("late", "archived")
    assert benv.h("late")["error"] == b"deadline exceeded"
    assert not benv.r.exists(lock_of(benv, t))


def test_a_format_2_task_past_its_deadline_is_archived_when_o_names_it(benv: Env) -> None:
    t = qsync.Task("u", b"x", task_id="late", unique=60, deadline=at(benv.now() + 3_600_000))
    benv.enqueue(t)
    assert o_of(benv, "late") == b"3"
    benv.r.hset(benv.k.task("late"), "deadline", benv.now() - 1)
    batch = benv.q.lease(Q)
    assert batch.tasks == [] and batch.deadline_archived == 1
    benv.assert_in("late", "archived")
    assert not benv.r.exists(lock_of(benv, t))


def test_a_format_1_task_with_a_malformed_deadline_is_still_archived_as_corrupt(benv: Env) -> None:
    benv.enqueue(task("bad", deadline=at(benv.now() + 3_600_000)), task("good"))
    as_format_1(benv, "bad")
    benv.r.hset(benv.k.task("bad"), "deadline", "soon")
    batch = benv.q.lease(Q, count=2)
    assert [x.id for x in batch.tasks] == ["good"]
    assert batch.corrupt_archived == 1
    assert benv.h("bad")["error"] == b"corrupt: field deadline missing or malformed"


# --- lease: one call's accounting ------------------------------------------------------------


def test_one_lease_call_over_duplicates_orphans_newer_corrupt_and_both_formats(benv: Env) -> None:
    benv.enqueue(task("v1"), task("v2"), task("newer"), task("bad"), task("late", timeout=1))
    as_format_1(benv, "v1")
    benv.r.hset(benv.k.task("newer"), "v", str(_ops.TASK_FORMAT_VERSION + 1))
    benv.r.hdel(benv.k.task("bad"), "t")
    benv.r.hset(benv.k.task("late"), "deadline", benv.now() - 1)
    # Copies in pending (oldest first at the right): v1 twice, newer twice, bad twice, a ghost.
    for extra in ("v1", "ghost", "newer", "bad", "late"):
        benv.r.lpush(benv.k.pending, extra)
    before = benv.pending()
    assert len(before) == 10

    batch = benv.q.lease(Q, count=20)
    assert sorted(t.id for t in batch.tasks) == ["v1", "v2"]
    assert (batch.deadline_archived, batch.corrupt_archived) == (1, 1)
    # Orphans: the ghost, and the second copy of each of v1, newer, bad and late.
    assert batch.orphans == 5
    assert benv.pending() == ["newer"], "a task of a newer format is put back once"
    assert benv.h("newer")["s"] == b"pending" and "token" not in benv.h("newer"), "left untouched"
    benv.assert_in("bad", "archived")
    benv.assert_in("late", "archived")
    for t in batch.tasks:
        benv.assert_in(t.id, "active")
    assert benv.q.ack(Q, batch.tasks) == [True, True]


def test_a_second_lease_call_takes_a_fresh_token_for_the_same_id(benv: Env) -> None:
    # The same id leased again (after requeue) by a later call: a new pair, the old one stale.
    benv.enqueue(task("a"), task("b"))
    first = benv.q.lease(Q, count=2)
    a1 = next(t for t in first.tasks if t.id == "a")
    assert benv.q.requeue(Q, [a1]) == [True]
    second = benv.q.lease(Q, count=2)
    (a2,) = second.tasks
    assert a2.id == "a" and a2.token != a1.token
    frozen = freeze(benv)
    assert benv.q.extend(Q, [a1]) == [False]
    assert benv.q.ack(Q, [a1]) == [False]
    assert benv.q.fail(Q, [qsync.Failure(a1.id, a1.token, "stale", 0)]) == [None]
    assert benv.q.requeue(Q, [a1]) == [False]
    frozen.unchanged()
    # b still holds the first call's token: its lease is (b, that token), and it commits.
    b1 = next(t for t in first.tasks if t.id == "b")
    assert b1.token == a1.token
    assert benv.q.ack(Q, [b1, a2]) == [True, True]


# --- fencing with a shared token -------------------------------------------------------------


@pytest.mark.parametrize("op", ["ack", "fail", "extend", "requeue"])
def test_a_stale_holder_cannot_commit_after_recovery_even_beside_its_siblings(benv: Env, op: str) -> None:
    """Worker A leases x and y in one call (one token). x's lease expires, is recovered,
    promoted and leased by worker B (with y's sibling z in B's call). A, still holding y, sends
    x with the token it shares with y: refused, nothing written; y (A) and x, z (B) commit."""
    benv.enqueue(task("x", retry=5, retry_delay=0), task("y"))
    a_batch = benv.q.lease(Q, count=2)
    ax, ay = (next(t for t in a_batch.tasks if t.id == i) for i in ("x", "y"))
    assert ax.token == ay.token
    benv.set_score("active", "x")
    assert benv.q.recover(Q).retried == 1
    benv.set_score("retry", "x")
    benv.enqueue(task("z"))
    assert benv.q.promote(Q).promoted == 1
    b_batch = benv.q.lease(Q, count=5)
    assert sorted(t.id for t in b_batch.tasks) == ["x", "z"]
    bx = next(t for t in b_batch.tasks if t.id == "x")
    assert bx.token != ax.token

    frozen = freeze(benv)
    # A's stale x, and x paired with each token A or B could mix up.
    forged: list[_ops.HasLease] = [
        ax,
        qsync.Lease("x", ay.token),
        qsync.Lease("z", ay.token),
        qsync.Lease("y", bx.token),
    ]
    if op == "ack":
        assert benv.q.ack(Q, forged) == [False] * 4
    elif op == "fail":
        assert benv.q.fail(Q, [qsync.Failure(f.id, f.token, "stale", 0) for f in forged]) == [None] * 4
    elif op == "extend":
        assert benv.q.extend(Q, forged, lease_duration=3600) == [False] * 4
    else:
        assert benv.q.requeue(Q, forged) == [False] * 4
    frozen.unchanged()

    assert benv.q.ack(Q, [ay]) == [True]
    assert benv.q.ack(Q, b_batch.tasks) == [True, True]
    assert benv.zids("active") == [] and benv.pending() == [] and benv.zids("retry") == []


def test_a_lease_lost_to_recovery_does_not_touch_the_siblings_of_its_call(benv: Env) -> None:
    benv.enqueue(task("x", retry=5), task("y"), task("w"))
    batch = benv.q.lease(Q, count=3)
    x, y, w = (next(t for t in batch.tasks if t.id == i) for i in ("x", "y", "w"))
    benv.set_score("active", "x")
    assert benv.q.recover(Q).retried == 1
    assert benv.q.extend(Q, [x, y, w], lease_duration=120) == [False, True, True]
    assert benv.q.fail(Q, [qsync.Failure("x", x.token, "e", 0), qsync.Failure("y", y.token, "e", 0)]) == [
        None,
        TaskState.RETRY,
    ]
    assert benv.q.requeue(Q, [x, w]) == [False, True]
    benv.assert_in("x", "retry")
    benv.assert_in("y", "retry")
    benv.assert_in("w", "pending")
    assert benv.h("x")["r"] == b"1" and benv.h("y")["r"] == b"1"


# --- fail, recover and info on format 2 --------------------------------------------------------


def test_fail_of_format_2_tasks_reads_their_deadline_and_releases_their_lock(benv: Env) -> None:
    near = at(benv.now() + 2_000)
    tasks = [
        qsync.Task("u", b"1", task_id="near", unique=60, deadline=near, retry=5),
        qsync.Task("u", b"2", task_id="lock", unique=60, retry=0),
        task("plain", retry=5),
    ]
    benv.enqueue(*tasks)
    batch = benv.q.lease(Q, count=3)
    by = {t.id: t for t in batch.tasks}
    got = benv.q.fail(Q, [qsync.Failure(i, by[i].token, "boom", 10_000) for i in ("near", "lock", "plain")])
    assert got == [TaskState.ARCHIVED, TaskState.ARCHIVED, TaskState.RETRY]
    assert not benv.r.exists(lock_of(benv, tasks[0])) and not benv.r.exists(lock_of(benv, tasks[1]))


def test_recover_of_format_2_tasks_uses_retry_delay_and_releases_locks(benv: Env) -> None:
    tasks = [
        task("own-delay", retry_delay=7, retry=3),
        qsync.Task("u", b"1", task_id="locked", unique=60, retry=0),
        task("plain", retry=3),
    ]
    benv.enqueue(*tasks)
    benv.lease(count=3)
    for t in tasks:
        benv.set_score("active", t.id)
    before = benv.now()
    assert benv.q.recover(Q, retry_delay=1_000) == _ops.RecoverResult(2, 1, 0, -1)
    after = benv.now()
    own = benv.score("retry", "own-delay")
    assert own is not None and before + 7_000 <= own <= after + 7_000
    plain = benv.score("retry", "plain")
    assert plain is not None and before + 1_000_000 <= plain <= after + 1_000_000
    benv.assert_in("locked", "archived")
    assert not benv.r.exists(lock_of(benv, tasks[1]))


def test_info_of_format_2_tasks_ignores_o(benv: Env) -> None:
    deadline = at(benv.now() + 3_600_000)
    benv.enqueue(
        qsync.Task("u", b"x", task_id="full", unique=60, unique_key="k", retention=60, timeout=7,
                   retry_delay=3, deadline=deadline),
        task("plain"),
    )  # fmt: skip
    full = benv.q.info("full", queue=Q)
    assert full.timeout == timedelta(seconds=7) and full.retention == timedelta(seconds=60)
    assert full.deadline is not None and abs(full.deadline - deadline) < timedelta(milliseconds=1)
    assert full.unique_key == "k"
    plain = benv.q.info("plain", queue=Q)
    assert (plain.timeout, plain.deadline, plain.retention, plain.unique_key) == (None, None, None, None)
    for o in ("x", "", "9"):
        benv.r.hset(benv.k.task("plain"), "o", o)
        assert benv.q.info("plain", queue=Q).state is TaskState.PENDING


# --- the state machine with hashes of both formats -----------------------------------------

_AS_FORMAT_1 = """
if redis.call("HGET", KEYS[1], "v") == "2" then
  redis.call("HDEL", KEYS[1], "o")
  redis.call("HSET", KEYS[1], "v", "1")
  return 1
end
return 0
"""


class MixedFormatMachine(QueueMachine):
    """The queue state machine of test_properties, with a rule that rewrites a random task's
    hash as format 1 at any point of its life (a hash left by qsync before format 2): every
    invariant must hold over both formats, in batches that mix them. A task of format 3 (its
    payload in pieces) is left as it is: format 1 never had pieces."""

    @rule(pick=index)
    def rewrite_as_format_1(self, pick: int) -> None:
        if not self.tasks:
            return
        task_id = sorted(self.tasks)[pick % len(self.tasks)]
        # One script: a completed hash whose retention runs out is not brought back by HSET.
        if self.r.eval(_AS_FORMAT_1, 1, self.k.task(task_id)):
            event("a hash rewritten as format 1")


def test_queue_state_machine_over_both_formats(backend: Any) -> None:
    fake = isinstance(backend, fakeredis.FakeRedis)
    machine = type("MixedOn" + ("Fake" if fake else "Redis"), (MixedFormatMachine,), {"client": backend})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        ),
    )

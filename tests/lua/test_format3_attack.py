"""Attacks on task format 3 (lua/lib/payload.lua): a payload of 65 to 512 bytes is stored in
pieces of at most 63 bytes ("p" the first, "1", "2", ... the rest, "n" the payload's length),
so the task hash stays a listpack.

Each test tries to lose a task, run one twice, hand a worker a cut or wrong payload, leave
stray piece fields or keys behind, make info and lease disagree, break idempotent enqueue
across formats, or make a worker that reads only format 2 touch a format-3 task. (Hashes
damaged by hand: test_payload_pieces.) Written by a reviewer told to break the format; once
run against the previous release's own scripts too (its lease puts a format-3 task back, its
enqueue, recover, promote and trim handle one whole), which a checkout need not hold.

Nothing sleeps: expiry and due times are made to pass by moving zset scores (as test_scripts
does), an expired hash is stood in for by deleting it, and the worker server is awaited by
polling Redis with a deadline.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import fakeredis
import pytest
import redis
from redis.cluster import ClusterNode

import qsync
from qsync import _ops
from qsync.errors import DuplicateTask, TaskIdConflict
from qsync.task import TaskState
from tests.integration.test_server import Worker
from tests.lua.test_scripts import Env, Q, _env, freeze, task
from tests.polling import wait_until
from tests.redis_procs import RedisCluster

__all__: list[str] = []

PIECE_BYTES, LONGEST_IN_PIECES = 63, 512
CONTAINERS = ("pending", "active", "scheduled", "retry", "archived", "completed", "wake")


# --- the model: how a payload must be stored -------------------------------------------------


def model(payload: bytes) -> dict[str, bytes]:
    """The payload's fields of the task hash, per lua/README.md: format 2 is one field "p";
    format 3 (65..512 bytes) is "p" (first 63 bytes), "1", "2", ... (the rest), "n" (length)."""
    if len(payload) <= 64 or len(payload) > LONGEST_IN_PIECES:
        return {"v": b"2", "p": payload}
    pieces = [payload[i : i + PIECE_BYTES] for i in range(0, len(payload), PIECE_BYTES)]
    fields = {"v": b"3", "p": pieces[0], "n": b"%d" % len(payload)}
    fields.update({str(i): piece for i, piece in enumerate(pieces[1:], 1)})
    return fields


PAYLOAD_NAMES = {"v", "p", "n", *(str(i) for i in range(1, 20))}


def payload_part(h: dict[str, bytes]) -> dict[str, bytes]:
    """The fields of a stored hash that hold the format and payload (any numeric name counts:
    a stray piece must show up here)."""
    return {k: v for k, v in h.items() if k in PAYLOAD_NAMES or k.isdigit()}


def mixed(size: int) -> bytes:
    """Every byte value, zero bytes included, and digit runs a listpack stores as integers."""
    pattern = bytes(range(256)) + b"1234567890" * 7 + b"-42" + b"007" + b"\x00" * 5
    return (pattern * (size // len(pattern) + 1))[:size]


def with_tail(tail: bytes, middle: bytes = b"", size: int | None = None) -> bytes:
    """A payload whose first piece is 63 bytes of 'a', then ``middle`` (whole pieces), then
    ``tail`` as the last piece (so the last stored piece is exactly ``tail``)."""
    payload = b"a" * PIECE_BYTES + middle + tail
    assert size is None or len(payload) == size
    return payload


def only_containers(env: Env) -> list[str]:
    """The keys under the queue's prefix that are not one of its containers."""
    keys = [k.decode() for k in env.r.scan_iter(match="{" + env.prefix + ":" + Q + "}*", count=1000)]
    allowed = {getattr(env.k, name) for name in CONTAINERS}
    return sorted(k for k in keys if k not in allowed)


def raw_info(env: Env, task_id: str) -> dict[bytes, bytes]:
    reply = env.raw(_ops.info(env.k, task_id))
    flat = reply[1:]
    return dict(zip(flat[::2], flat[1::2], strict=True))


# --- 1. boundaries, integer-looking pieces, zero bytes --------------------------------------

BOUNDARIES = [0, 1, 63, 64, 65, 66, 126, 127, 128, 189, 190, 504, 505, 511, 512, 513, 514, 4096]


@pytest.mark.parametrize("size", BOUNDARIES)
def test_every_boundary_is_stored_as_the_model_and_comes_back_whole(benv: Env, size: int) -> None:
    payload = mixed(size)
    benv.enqueue(task("t", payload))
    assert payload_part(benv.h("t")) == model(payload), "exactly the model's fields, no stray piece"
    assert benv.q.info("t", queue=Q).payload == payload
    (leased,) = benv.lease()
    assert leased.payload == payload
    assert payload_part(benv.h("t")) == model(payload), "lease wrote no payload field"
    assert benv.q.ack(Q, [leased]) == [True]
    assert only_containers(benv) == []


def test_every_size_from_0_to_600_in_one_batch(benv: Env) -> None:
    """Each size once, in one enqueue_many (three script calls) and one lease call: the stored
    fields are the model's and every payload comes back whole, with no id lost or doubled."""
    payloads = {f"s{n}": mixed(n)[::-1] for n in range(601)}
    benv.enqueue(*(task(i, p) for i, p in payloads.items()))
    for task_id, payload in payloads.items():
        assert payload_part(benv.h(task_id)) == model(payload), task_id
    leased = benv.lease(count=1000)
    assert len(leased) == len(payloads)
    assert {t.id: t.payload for t in leased} == payloads
    assert benv.q.ack(Q, leased) == [True] * len(leased)
    assert only_containers(benv) == []


# The last piece is the only short one: make it every string a listpack might store as an
# integer (or almost): canonical integers are kept as int64 by Redis and must read back as the
# same bytes; the others must stay strings.
INTEGER_LIKE_TAILS = [b"0", b"-5", b"123", b"007", b"00", b"-0", b"+5", b" 5", b"5 ", b"1e3", b"0x10",
                      b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808",
                      b"-9223372036854775809", b"18446744073709551616", b"\x00", b"1\x00", b"inf",
                      b"nan", b"3.0", b"1" * 20, b"1" * 21]  # fmt: skip
DIGIT_PIECES = [b"1" * PIECE_BYTES, b"0" * PIECE_BYTES, b"-" + b"9" * 62, b"9" * 19 + b"a" * 44]


@pytest.mark.parametrize("tail", INTEGER_LIKE_TAILS, ids=[repr(t) for t in INTEGER_LIKE_TAILS])
def test_pieces_that_look_like_integers_come_back_byte_for_byte(benv: Env, tail: bytes) -> None:
    payload = with_tail(tail, middle=b"".join(DIGIT_PIECES))
    assert 64 < len(payload) <= LONGEST_IN_PIECES
    benv.enqueue(task("t", payload))
    h = benv.h("t")
    assert payload_part(h) == model(payload)
    assert h[str(-(-len(payload) // PIECE_BYTES) - 1)] == tail, "the last piece is the tail, as stored"
    assert benv.q.info("t", queue=Q).payload == payload
    (leased,) = benv.lease()
    assert leased.payload == payload
    if not benv.fake:
        assert benv.r.object("encoding", benv.k.task("t")) == b"listpack"


@pytest.mark.parametrize("size", [65, 127, 505])
def test_a_last_piece_of_one_digit_and_a_payload_of_only_zero_bytes(benv: Env, size: int) -> None:
    zeros, digits = b"\x00" * size, b"7" * size  # all-digit pieces: "7" * 63 is no int64
    benv.enqueue(task("z", zeros), task("d", digits))
    assert payload_part(benv.h("z")) == model(zeros) and payload_part(benv.h("d")) == model(digits)
    got = {t.id: t.payload for t in benv.lease(count=2)}
    assert got == {"z": zeros, "d": digits}


def test_tasks_of_one_profile_share_options_but_never_pieces(benv: Env) -> None:
    """enqueue copies the profile's option list before adding a task's pieces: were it shared,
    the pieces of one task would be written into the next task of the same profile."""
    sizes = [200, 70, 512, 10, 600, 65, 513, 127, 0, 300]
    tasks = [
        task(f"t{i}", mixed(size), timeout=5, retention=60, retry_delay=2) for i, size in enumerate(sizes)
    ]
    benv.enqueue(*tasks)
    for t in tasks:
        h = benv.h(t.id)
        assert payload_part(h) == model(t.payload), t.id
        assert (h["timeout"], h["retention"], h["retry_delay"], h["o"]) == (b"5000", b"60000", b"2000", b"3")
    leased = {t.id: t.payload for t in benv.lease(count=len(tasks))}
    assert leased == {t.id: t.payload for t in tasks}


# --- 2. idempotent enqueue across formats ---------------------------------------------------


def as_previous_release(env: Env, task_id: str) -> None:
    """Rewrite a format-3 hash as the release before format 3 wrote the same task: format 2,
    the payload whole in "p", no "n" and no pieces (same fingerprint: it covers type, payload
    and options, never the format)."""
    key = env.k.task(task_id)
    h = env.h(task_id)
    count = -(-int(h["n"]) // PIECE_BYTES) - 1
    whole = h["p"] + b"".join(h[str(i)] for i in range(1, count + 1))
    env.r.hdel(key, "n", *(str(i) for i in range(1, count + 1)))
    env.r.hset(key, mapping={"v": "2", "p": whole})


def test_a_format_2_task_of_the_previous_release_is_exists_for_the_same_content(benv: Env) -> None:
    payload = mixed(300)
    benv.enqueue(task("t", payload, retention=60))
    as_previous_release(benv, "t")
    before = freeze(benv)
    again = benv.q.enqueue_many([task("t", payload, retention=60)], queue=Q)[0]
    assert isinstance(again, qsync.TaskInfo) and again.state is TaskState.PENDING
    before.unchanged()  # EXISTS writes nothing: the format-2 hash is not rewritten in pieces
    for other in (payload[:-1] + b"!", payload + b"x", payload[:64], payload[:63]):
        refused = benv.q.enqueue_many([task("t", other, retention=60)], queue=Q)[0]
        assert isinstance(refused, TaskIdConflict), len(other)
    before.unchanged()
    assert benv.q.info("t", queue=Q).payload == payload
    (leased,) = benv.lease()
    assert leased.payload == payload, "a format-2 hash of 300 bytes is read whole"


@pytest.mark.parametrize("first_size", [64, 65, 200, 512, 513])
@pytest.mark.parametrize("second_size", [64, 65, 200, 512, 513])
def test_same_id_across_sizes_is_exists_only_for_the_same_bytes(
    benv: Env, first_size: int, second_size: int
) -> None:
    first = mixed(first_size)
    second = first if first_size == second_size else b"\x01" + mixed(second_size)[1:]
    benv.enqueue(task("t", first))
    before = freeze(benv)
    result = benv.q.enqueue_many([task("t", second)], queue=Q)[0]
    if first_size == second_size:
        assert isinstance(result, qsync.TaskInfo) and result.payload == first
    else:
        assert isinstance(result, TaskIdConflict)
    before.unchanged()
    assert payload_part(benv.h("t")) == model(first)


def test_one_call_with_the_same_id_twice(benv: Env) -> None:
    payload = mixed(200)
    results = benv.q.enqueue_many(
        [task("a", payload), task("a", payload), task("b", payload), task("b", mixed(100))], queue=Q
    )
    assert [type(r).__name__ for r in results] == ["TaskInfo", "TaskInfo", "TaskInfo", "TaskIdConflict"]
    assert benv.pending() == ["b", "a"], "each id once in pending"
    assert payload_part(benv.h("a")) == model(payload) and payload_part(benv.h("b")) == model(payload)


# --- 3. a worker that reads only format 2 ---------------------------------------------------


def test_a_format_2_worker_puts_back_every_format_3_task_untouched_even_a_damaged_one(
    benv: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It must not judge what it cannot read: a format-3 task with a missing piece, or past
    its deadline, or holding a unique lock, is put back byte for byte, never archived."""
    past = benv.now() - 1
    benv.enqueue(
        task("fine", mixed(300)),
        task("damaged", mixed(200)),
        task("late", mixed(200), unique=60, deadline=datetime.fromtimestamp(past / 1000 + 3600, UTC)),
        task("small", b"x" * 64),
        task("large", mixed(513)),
    )
    benv.r.hdel(benv.k.task("damaged"), "2")
    benv.r.hset(benv.k.task("late"), "deadline", past)
    hashes = {i: benv.r.dump(benv.k.task(i)) for i in ("fine", "damaged", "late")}
    lock = benv.r.keys("{" + benv.prefix + "*:u:*")
    assert len(lock) == 1
    monkeypatch.setattr(_ops, "TASK_FORMAT_VERSION", 2)
    batch = benv.q.lease(Q, count=10)
    assert sorted(t.id for t in batch.tasks) == ["large", "small"]
    assert [t.payload for t in batch.tasks if t.id == "large"] == [mixed(513)]
    assert (batch.corrupt_archived, batch.deadline_archived, batch.orphans) == (0, 0, 0)
    assert sorted(benv.pending()) == ["damaged", "fine", "late"]
    assert {i: benv.r.dump(benv.k.task(i)) for i in hashes} == hashes
    assert benv.r.exists(*lock) == 1, "the lock of a task put back is kept"
    # A worker of format 3 then judges them.
    monkeypatch.setattr(_ops, "TASK_FORMAT_VERSION", 3)
    batch = benv.q.lease(Q, count=10)
    assert [(t.id, t.payload) for t in batch.tasks] == [("fine", mixed(300))]
    assert (batch.corrupt_archived, batch.deadline_archived) == (1, 1)
    assert benv.r.exists(*lock) == 0


def test_a_format_2_worker_that_pops_only_format_3_tasks_returns_empty_without_a_wake(
    benv: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Documents a limit of the put-back rule (not new in format 3, but format 3 makes such
    tasks common during an upgrade): a format-2 worker leasing one task pops the format-3 one
    at the head, puts it back and returns nothing, though a task it can read waits behind it;
    no wake token is left, so it finds that task only on its next poll or wake-up."""
    benv.enqueue(task("big", mixed(200)), task("small", b"s"))
    benv.r.delete(benv.k.wake)
    monkeypatch.setattr(_ops, "TASK_FORMAT_VERSION", 2)
    assert benv.lease(count=1) == []
    assert benv.pending() == ["big", "small"], "big went behind small; nothing lost"
    assert benv.r.llen(benv.k.wake) == 0
    (leased,) = benv.lease(count=1)
    assert leased.id == "small"


# --- 4. info and lease agree ----------------------------------------------------------------


def test_info_of_a_format_3_task_in_every_state_is_whole_and_shows_no_piece(benv: Env) -> None:
    payload = mixed(450)
    benv.enqueue(task("t", payload, retention=60, retry=3, delay=3600))

    def check(state: TaskState) -> None:
        info = benv.q.info("t", queue=Q)
        assert (info.state, info.payload) == (state, payload)
        fields = raw_info(benv, "t")
        assert fields[b"p"] == payload
        assert not [name for name in fields if name == b"n" or name.isdigit()], "no piece in info"

    check(TaskState.SCHEDULED)
    benv.set_score("scheduled", "t")
    benv.q.promote(Q)
    check(TaskState.PENDING)
    (leased,) = benv.lease()
    assert leased.payload == payload
    check(TaskState.ACTIVE)
    benv.q.fail(Q, [qsync.Failure("t", leased.token, "x" * 4096, 0)])  # a long error: a hash table
    check(TaskState.RETRY)
    benv.set_score("retry", "t")
    benv.q.promote(Q)
    (leased,) = benv.lease()
    assert leased.payload == payload, "whole after the hash became a hash table"
    assert benv.q.ack(Q, [leased]) == [True]
    check(TaskState.COMPLETED)


# What lease does with a "v" read as a number: 3 however spelled is read in pieces, a number
# above the worker's is put back, and one that names no format is corrupt.
VERSIONS = {"3.0": "leased", "03": "leased", " 3": "leased", "3 ": "leased", "inf": "put back",
            "nan": "corrupt", "-3": "corrupt", "2.5": "corrupt", "0": "corrupt",
            "three": "corrupt"}  # fmt: skip


@pytest.mark.parametrize(("version", "outcome"), VERSIONS.items(), ids=VERSIONS.keys())
def test_a_version_spelled_otherwise_is_never_read_as_another_format(
    benv: Env, version: str, outcome: str
) -> None:
    """Once a format-3 hash with "v" = "3.0" or "nan" passed the check for a newer format (as a
    number) and was leased as format 1, with only its first piece as the payload."""
    payload = mixed(200)
    benv.enqueue(task("t", payload), task("good", payload))
    benv.r.hset(benv.k.task("t"), "v", version)
    batch = benv.q.lease(Q, count=2)
    leased = sorted((t.id, t.payload) for t in batch.tasks)
    if outcome == "leased":
        assert leased == [("good", payload), ("t", payload)], "whole"
        assert benv.q.info("t", queue=Q).payload == payload
    elif outcome == "put back":
        assert leased == [("good", payload)]
        assert benv.pending() == ["t"], "above any version: put back for a newer worker"
    else:
        assert leased == [("good", payload)]
        assert batch.corrupt_archived == 1
        assert benv.h("t")["error"] == b"corrupt: field v (format version) missing or malformed"


# --- 5. every other script on format-3 tasks ------------------------------------------------


def test_a_full_life_in_pieces_through_every_script_leaves_nothing_behind(benv: Env) -> None:
    payload = mixed(512)
    benv.enqueue(task("t", payload, retry=5, unique=60, timeout=30))
    (first,) = benv.lease()
    assert first.payload == payload
    assert benv.q.extend(Q, [first], lease_duration=120) == [True]
    assert benv.q.requeue(Q, [first]) == [True]
    assert benv.q.ack(Q, [first]) == [False], "the old lease is fenced"
    benv.q.pause(Q)
    assert benv.lease() == []
    benv.q.resume(Q)
    benv.raw(_ops.unblock(benv.k, "listener-1"))
    benv.r.delete(benv.k.listener_wake("listener-1"))  # a token for one listener, not for the task
    (second,) = benv.lease()
    assert second.payload == payload
    benv.set_score("active", "t")
    assert benv.q.recover(Q).retried == 1
    assert benv.q.info("t", queue=Q).payload == payload
    benv.set_score("retry", "t")
    benv.q.promote(Q)
    (third,) = benv.lease()
    assert third.payload == payload and third.retried == 1
    assert benv.q.fail(Q, [qsync.Failure("t", third.token, "boom", None)]) == [TaskState.ARCHIVED]
    assert payload_part(benv.h("t")) == model(payload), "an archived task keeps its pieces"
    assert benv.q.info("t", queue=Q).payload == payload
    assert only_containers(benv) == [benv.k.task("t")], "the lock is released"
    benv.set_score("archived", "t")
    assert benv.q.trim(Q, archived_max_age=1).archived == 1
    assert only_containers(benv) == [], "trim deletes the hash and every piece with it"


def test_poison_recovery_and_a_passed_deadline_keep_the_pieces_and_release_the_lock(benv: Env) -> None:
    payload = mixed(300)
    deadline = datetime.fromtimestamp(benv.now() / 1000 + 3600, UTC)
    benv.enqueue(
        task("poison", payload, retry=5, unique=60),
        task("late", payload, deadline=deadline, unique_key="l", unique=60),
    )
    leases = {t.id: t for t in benv.lease(count=2)}
    assert {i: t.payload for i, t in leases.items()} == {"poison": payload, "late": payload}
    benv.set_score("active", "poison")
    assert benv.q.recover(Q, max_recoveries=1).archived == 1
    benv.assert_in("poison", "archived")
    assert benv.h("poison")["error"].startswith(b"poison")
    assert benv.q.info("poison", queue=Q).payload == payload
    # The deadline passes while "late" waits in retry; the next lease archives it.
    late = leases["late"]
    assert benv.q.fail(Q, [qsync.Failure("late", late.token, "x", 0)]) == [TaskState.RETRY]
    benv.r.hset(benv.k.task("late"), "deadline", benv.now() - 1)
    benv.set_score("retry", "late")
    benv.q.promote(Q)
    batch = benv.q.lease(Q, count=1)
    assert (batch.tasks, batch.deadline_archived) == ([], 1)
    assert benv.q.info("late", queue=Q).payload == payload
    assert payload_part(benv.h("late")) == model(payload)
    assert [k for k in only_containers(benv) if ":u:" in k] == [], "no lock left"
    (again,) = benv.enqueue(
        task("other", payload, unique=60), task("other2", payload, unique_key="l", unique=60)
    )[:1]
    assert again.state is TaskState.PENDING


def test_a_corrupt_format_3_task_releases_its_lock(benv: Env) -> None:
    benv.enqueue(task("bad", mixed(200), unique=60))
    benv.r.hdel(benv.k.task("bad"), "1")
    batch = benv.q.lease(Q, count=1)
    assert (batch.tasks, batch.corrupt_archived) == ([], 1)
    (again,) = benv.enqueue(task("next", mixed(200), unique=60))
    assert again.state is TaskState.PENDING


def test_a_unique_format_3_task_is_refused_as_duplicate_while_live(benv: Env) -> None:
    benv.enqueue(task("a", mixed(200), unique=60, unique_key="k"))
    dup = benv.q.enqueue_many([task("b", mixed(300), unique=60, unique_key="k")], queue=Q)[0]
    assert isinstance(dup, DuplicateTask) and dup.owner_id == "a"
    assert benv.r.exists(benv.k.task("b")) == 0, "a refused task writes no piece"


def test_an_id_reused_after_its_completed_hash_expired_gets_no_stray_piece(benv: Env) -> None:
    """A retained task's hash expires by itself (PEXPIRE) with every piece: deleting it stands
    in for the expiry. The id then takes a new task of fewer pieces or of format 2, whose
    hash must hold exactly its own fields."""
    benv.enqueue(task("t", mixed(512), retention=60))
    (leased,) = benv.lease()
    assert benv.q.ack(Q, [leased]) == [True]
    ttl = benv.r.pttl(benv.k.task("t"))
    assert 0 < ttl <= 60_000, "the pieces expire with the hash: they are its fields"
    for payload in (mixed(65), b"short", mixed(300), mixed(1000)):
        benv.r.delete(benv.k.task("t"))  # the retention ran out
        (info,) = benv.enqueue(task("t", payload, retention=60))
        assert info.state is TaskState.PENDING
        assert benv.zids("completed") == [], "a reused id leaves completed"
        assert payload_part(benv.h("t")) == model(payload)
        (leased,) = benv.lease()
        assert leased.payload == payload
        assert benv.q.ack(Q, [leased]) == [True]
    benv.set_score("completed", "t")
    benv.r.delete(benv.k.task("t"))
    assert benv.q.trim(Q).completed == 1
    assert only_containers(benv) == []


def test_a_batch_mixing_formats_duplicates_orphans_and_corrupt_pieces(benv: Env) -> None:
    payloads = {"a": mixed(64), "b": mixed(65), "c": mixed(512), "d": mixed(513), "e": mixed(200)}
    benv.enqueue(*(task(i, p) for i, p in payloads.items()))
    benv.r.hdel(benv.k.task("e"), "3")  # the last piece is gone: corrupt
    benv.r.rpush(benv.k.pending, "b", "ghost")  # a second copy of b, popped first, and an orphan
    batch = benv.q.lease(Q, count=10)
    assert sorted((t.id, t.payload) for t in batch.tasks) == sorted(
        (i, p) for i, p in payloads.items() if i != "e"
    ), "each sound task once, whole"
    assert (batch.corrupt_archived, batch.orphans) == (1, 2)
    benv.assert_in("e", "archived")
    assert benv.pending() == [], "nothing left behind, nothing put back"


# --- 6. fakeredis and Redis store and answer the same ---------------------------------------


def test_fakeredis_and_redis_agree_byte_for_byte(r: redis.Redis) -> None:
    fake = _env(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    real = _env(r)
    payloads = [mixed(n) for n in BOUNDARIES] + [
        with_tail(t, b"".join(DIGIT_PIECES)) for t in INTEGER_LIKE_TAILS
    ]
    for e in (fake, real):
        e.enqueue(*(task(f"t{i}", p, retention=60) for i, p in enumerate(payloads)))
    for i in range(len(payloads)):
        f, g = fake.h(f"t{i}"), real.h(f"t{i}")
        f.pop("c"), g.pop("c")
        assert f == g, i
        fi, gi = raw_info(fake, f"t{i}"), raw_info(real, f"t{i}")
        assert {k: v for k, v in fi.items() if k != b"c"} == {k: v for k, v in gi.items() if k != b"c"}
    leased = [{t.id: t.payload for t in e.lease(count=len(payloads))} for e in (fake, real)]
    assert leased[0] == leased[1] == {f"t{i}": p for i, p in enumerate(payloads)}
    fake.r.close()


# --- 7. the worker server end to end ---------------------------------------------------------


def test_a_handler_receives_the_exact_bytes_of_every_size(sync_worker: Worker) -> None:
    payloads = {f"s{n}": mixed(n) for n in BOUNDARIES}
    payloads.update({f"i{j}": with_tail(t, b"".join(DIGIT_PIECES)) for j, t in enumerate(INTEGER_LIKE_TAILS)})
    seen: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def handler(ctx: Any, leased: qsync.LeasedTask) -> None:
        with lock:
            seen.setdefault(leased.id, []).append(leased.payload)

    sync_worker.queue.enqueue_many([qsync.Task("job", p, task_id=i) for i, p in payloads.items()])
    sync_worker.start(handler, concurrency=8)
    wait_until(lambda: len(seen) == len(payloads), "every task to run")
    keys = sync_worker.queue.keys("default")
    wait_until(lambda: sync_worker.client.zcard(keys.active) == 0, "every task to be acked")
    sync_worker.stop()
    assert seen == {i: [p] for i, p in payloads.items()}, "each ran once, with its exact bytes"
    assert [k for k in sync_worker.client.scan_iter(match=keys.task_prefix + "*")] == []


# --- 8. Redis Cluster ------------------------------------------------------------------------


@pytest.mark.cluster
def test_format_3_on_a_cluster(redis_cluster: RedisCluster) -> None:
    client = redis.RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in redis_cluster.startup_nodes])
    try:
        client.flushall()
        queue = qsync.new(client, prefix="f3")
        payloads = {f"t{n}": mixed(n) for n in BOUNDARIES}
        for name in ("q-a", "q-b", "q-c"):
            queue.enqueue_many(
                [qsync.Task("job", p, task_id=i, retention=60) for i, p in payloads.items()], queue=name
            )
            assert queue.info("t127", queue=name).payload == payloads["t127"]
            leased = queue.lease(name, count=100).tasks
            assert {t.id: t.payload for t in leased} == payloads
            assert all(queue.ack(name, leased))
            assert queue.info("t512", queue=name).payload == payloads["t512"]
    finally:
        client.close()

"""Task format 3 (lua/lib/payload.lua): a payload of 65 to 512 bytes is stored in pieces of at
most 63 bytes, so the task hash stays a listpack (Redis turns a hash with any value over
``hash-max-listpack-value``, 64 bytes by default, into a hash table of about 2.5x the memory).

What must hold: every payload comes back byte for byte from lease and info, whatever its size
and bytes; tasks of 64 bytes or less stay format 2 (older workers read them); a worker that
knows only format 2 puts a format-3 task back untouched; a format-3 hash with a missing or
malformed piece is archived as corrupt, never leased with a cut payload. Every test runs on
real Redis and on fakeredis (``benv``), except the encoding check, which only Redis has.
"""

from __future__ import annotations

import pytest

import qsync
from qsync import _ops
from qsync.errors import TaskIdConflict
from qsync.task import TaskState
from tests.lua.test_scripts import Env, Q, task

__all__: list[str] = []

PIECE_BYTES, LONGEST_IN_PIECES = 63, 512


def payload_of(size: int) -> bytes:
    """Bytes of every value, zero bytes included, and runs a listpack stores as integers."""
    pattern = bytes(range(256)) + b"1234567890" * 7 + b"-42" + b"007"
    return (pattern * (size // len(pattern) + 1))[:size]


SIZES = [0, 1, 63, 64, 65, 126, 127, 200, 1024, LONGEST_IN_PIECES - 1, LONGEST_IN_PIECES,
         LONGEST_IN_PIECES + 1, 70_000]  # fmt: skip


def expected_format(size: int) -> bytes:
    return b"3" if 64 < size <= LONGEST_IN_PIECES else b"2"


@pytest.mark.parametrize("size", SIZES)
def test_every_payload_comes_back_whole_from_lease_and_info(benv: Env, size: int) -> None:
    payload = payload_of(size)
    benv.enqueue(task("t", payload))
    assert benv.h("t")["v"] == expected_format(size)
    assert benv.q.info("t", queue=Q).payload == payload
    (leased,) = benv.lease()
    assert leased.payload == payload
    assert benv.q.info("t", queue=Q).payload == payload, "the lease wrote no piece"
    assert benv.q.ack(Q, [leased]) == [True]
    assert benv.r.exists(benv.k.task("t")) == 0, "the pieces go with the hash"


@pytest.mark.parametrize("size", [65, 200, LONGEST_IN_PIECES])
def test_the_pieces_are_at_most_63_bytes_and_make_the_payload_in_order(benv: Env, size: int) -> None:
    payload = payload_of(size)
    benv.enqueue(task("t", payload))
    h = benv.h("t")
    assert int(h["n"]) == size, '"n" is the length'
    count = -(-size // PIECE_BYTES) - 1
    pieces = [h["p"]] + [h[str(i)] for i in range(1, count + 1)]
    assert all(len(piece) <= PIECE_BYTES for piece in pieces)
    assert b"".join(pieces) == payload
    assert str(count + 1) not in h, "no piece after the last"


@pytest.mark.parametrize("size", [65, 200, LONGEST_IN_PIECES])
def test_a_task_in_pieces_is_a_listpack_on_redis(env: Env, size: int) -> None:
    # The point of format 3. A unique lock, a retention and a timeout add fields: still compact.
    env.enqueue(task("t", payload_of(size), unique=60, retention=60, timeout=5))
    assert env.r.object("encoding", env.k.task("t")) == b"listpack"
    (leased,) = env.lease()
    env.q.fail(Q, [qsync.Failure(leased.id, leased.token, "boom", 0)])
    assert env.r.object("encoding", env.k.task("t")) == b"listpack", "and through a failed attempt"


def test_a_format_3_task_is_idempotent_by_content(benv: Env) -> None:
    payload = payload_of(300)
    benv.enqueue(task("t", payload))
    again = benv.q.enqueue_many([task("t", payload)], queue=Q)[0]
    assert isinstance(again, qsync.TaskInfo) and again.payload == payload
    other = benv.q.enqueue_many([task("t", payload[:-1] + b"!")], queue=Q)[0]
    assert isinstance(other, TaskIdConflict)
    assert benv.q.info("t", queue=Q).payload == payload


def test_a_worker_of_format_2_puts_a_format_3_task_back_untouched(
    benv: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rolling upgrade: a new producer, an old worker. The old worker would read only the first
    # piece; it must not lease the task at all. A small payload is still format 2 and is leased.
    benv.enqueue(task("big", payload_of(300)), task("small", b"x" * 64))
    before = benv.h("big")
    monkeypatch.setattr(_ops, "TASK_FORMAT_VERSION", 2)
    batch = benv.q.lease(Q, count=5)
    assert [t.id for t in batch.tasks] == ["small"]
    assert benv.pending() == ["big"] and benv.h("big") == before
    monkeypatch.setattr(_ops, "TASK_FORMAT_VERSION", 3)
    (leased,) = benv.lease()
    assert leased.payload == payload_of(300)


# A 200-byte payload: "p" and pieces "1" and "2" of 63 bytes, "3" of 11, "n" = 200. No script
# writes a damaged hash; each of these stands for one changed by hand or by another tool.
DAMAGE = {
    "no-length": (["n"], {}),
    "first-piece-missing": (["p"], {}),
    "piece-missing": (["2"], {}),
    "last-piece-missing": (["3"], {}),
    "length-not-a-number": ([], {"n": "abc"}),
    "length-zero": ([], {"n": "0"}),
    "length-of-one-field": ([], {"n": "64"}),
    "length-fraction": ([], {"n": "199.5"}),
    "length-past-pieces": ([], {"n": "513"}),
    "length-short": ([], {"n": "190"}),
    "length-short-by-a-whole-piece": ([], {"n": "189"}),  # pieces "1" and "2" make 189 bytes
    "piece-shortened": ([], {"1": "x" * 10}),
    "piece-lengthened": ([], {"3": "x" * 12}),
    "a-piece-after-the-last": ([], {"4": "x"}),
}


@pytest.mark.parametrize(("removed", "changed"), DAMAGE.values(), ids=DAMAGE.keys())
def test_a_format_3_task_with_damaged_pieces_is_archived_as_corrupt_never_leased_cut(
    benv: Env, removed: list[str], changed: dict[str, str]
) -> None:
    benv.enqueue(task("bad", payload_of(200)), task("good", payload_of(200)))
    key = benv.k.task("bad")
    if removed:
        benv.r.hdel(key, *removed)
    if changed:
        benv.r.hset(key, mapping=changed)
    batch = benv.q.lease(Q, count=5)
    assert [(t.id, t.payload) for t in batch.tasks] == [("good", payload_of(200))]
    assert batch.corrupt_archived == 1
    benv.assert_in("bad", "archived")
    assert benv.h("bad")["error"] == b"corrupt: field p (payload) missing or malformed"


def test_info_shows_a_damaged_format_3_hash_as_stored(benv: Env) -> None:
    benv.enqueue(task("bad", payload_of(200)))
    benv.r.hdel(benv.k.task("bad"), "2")
    assert benv.q.info("bad", queue=Q).payload == payload_of(200)[:PIECE_BYTES], "the first piece only"


def test_a_format_3_task_keeps_its_payload_through_retry_recovery_and_completion(benv: Env) -> None:
    payload = payload_of(500)
    benv.enqueue(task("t", payload, retention=60))
    (first,) = benv.lease()
    assert benv.q.fail(Q, [qsync.Failure("t", first.token, "boom", 0)]) == [TaskState.RETRY]
    benv.set_score("retry", "t")
    assert benv.q.promote(Q).promoted == 1
    (second,) = benv.lease()
    assert second.payload == payload
    benv.set_score("active", "t")
    assert benv.q.recover(Q).retried == 1
    benv.set_score("retry", "t")
    benv.q.promote(Q)
    (third,) = benv.lease()
    assert third.payload == payload
    assert benv.q.ack(Q, [third]) == [True]
    benv.assert_in("t", "completed")
    info = benv.q.info("t", queue=Q)
    assert (info.state, info.payload, info.retried) == (TaskState.COMPLETED, payload, 2)


def test_ack_finishes_format_3_tasks_by_their_options(benv: Env) -> None:
    # A plain task is deleted, one with retention kept, and a unique lock released. (That lease
    # and ack trust "o" for format 3: test_scripts, test_lease_and_ack_read_only_the_options_o_names.)
    plain, kept = task("plain", payload_of(200)), task("kept", payload_of(200), retention=60, unique=60)
    benv.enqueue(plain, kept)
    batch = benv.lease(count=2)
    assert benv.q.ack(Q, batch) == [True, True]
    assert benv.r.exists(benv.k.task("plain")) == 0
    benv.assert_in("kept", "completed")
    (again,) = benv.enqueue(task("again", payload_of(200), unique=60))  # the same lock key: released
    assert again.state == TaskState.PENDING

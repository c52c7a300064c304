"""Property tests: a hypothesis state machine drives one queue through random sequences of the
public operations, on the session's real Redis and on fakeredis, and after every step checks
the structural invariants of reliability.md section 3.1:

- I5: every task id the model knows is in exactly one of pending (list), active, scheduled,
  retry, archived or completed (zsets), at most once there, and its hash's ``state`` names that
  container; it has no keys left only after an ack without retention, after trim, or when a
  completed task's retention ran out (then its id may wait in completed until trim).
- I6: a unique lock names a live task that points back at it; no lock survives its task's
  terminal state; a live unique task holds its lock (the TTL outlasts an example).
- I7: an extend, ack, fail or requeue that presents only stale tokens writes nothing.
- I8: ``retried <= max_retry``, and retried/recoveries move exactly as documented.

The model predicts every reply exactly: the pending list's order, which ids a lease returns,
each fenced operation's per-lease result, the enqueue codes, the sweeps' counts. Where the
server clock decides (a due time, deadline or lease expiry that falls between the call's start
and end, both read with Redis TIME), either outcome is accepted and the model follows what Redis
did. Nothing waits for anything: time passes with the steps (and a rule that lets 2 ms go by),
so 1 ms leases, delays and retentions run out within an example.

Shrinking is off: outcomes depend on the real clock, so a replay can differ and shrinking such a
run took minutes. A failure prints the whole sequence (at most 30 steps), and each assertion
names the task, where it is and where the model expected it.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import redis
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import qsync
from qsync.errors import DuplicateTask, InvalidArgument, QsyncError, TaskIdConflict, TaskNotFound

QUEUE = "q"
ZSETS = ("active", "scheduled", "retry", "archived", "completed")
LIVE = frozenset({"pending", "active", "scheduled", "retry"})
LONG_LEASE = 60.0  # seconds: never expires within an example
SHORT = 0.001  # 1 ms: a lease, delay or retention that runs out within a step or two
KEEP = 3600.0  # a retention that outlasts the example
UNIQUE_TTL = 60  # the lock outlasts the example, so "lock held" == "owner is live"

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_prefixes = itertools.count()


@dataclass(frozen=True)
class Spec:
    """What the enqueue fingerprint covers (everything but the id and the due time)."""

    type: str
    payload: bytes
    retry: int
    retention: float | None
    unique: str | None  # None: no lock; "": the default key (type + payload); else unique_key
    deadline: int = 0  # ms since the epoch (0: none); whole ms, as the fingerprint sees it

    def task(self, task_id: str, delay: float) -> qsync.Task:
        options: dict[str, Any] = {"retry": self.retry, "task_id": task_id}
        if self.deadline:
            options["deadline"] = EPOCH + timedelta(milliseconds=self.deadline)
        if self.retention is not None:
            options["retention"] = self.retention
        if self.unique is not None:
            options["unique"] = UNIQUE_TTL
            if self.unique:
                options["unique_key"] = self.unique
        if delay:
            options["delay"] = delay
        return qsync.Task(self.type, self.payload, **options)

    def with_deadline(self, in_ms: int) -> Spec:
        """The spec with a deadline ``in_ms`` from now (client clock, as Task checks it)."""
        if not in_ms:
            return self
        return replace(self, deadline=int(time.time() * 1000) + in_ms)

    @property
    def uid(self) -> tuple[Any, ...] | None:
        """Two specs with equal uid take the same unique lock."""
        if self.unique is None:
            return None
        return ("key", self.unique) if self.unique else ("default", self.type, self.payload)


@dataclass
class TaskModel:
    spec: Spec
    state: str | None  # None: no keys left
    deadline: int = 0  # ms since the epoch, as the task hash holds it (0: none)
    retried: int = 0
    recoveries: int = 0
    lapsed: bool = False  # completed and its retention ran out: the hash expired

    def may_lapse(self) -> bool:
        return self.state == "completed" and self.spec.retention == SHORT


@dataclass
class Snapshot:
    """Everything in the database, read in one MULTI/EXEC (one instant of the server)."""

    now: int
    pending: list[str]
    z: dict[str, dict[str, int]]
    hashes: dict[str, dict[str, str]]
    pttl: dict[str, int]
    locks: dict[str, tuple[str | None, int]]
    keys: set[str]


class Keys:
    def __init__(self, prefix: str) -> None:
        tag = "{" + prefix + ":" + QUEUE + "}"
        self.tag = tag
        self.pending = tag + ":pending"
        self.z = {name: f"{tag}:{name}" for name in ZSETS}
        self.paused = tag + ":paused"
        self.wake = tag + ":wake"
        self.registry = "{" + prefix + "}:queues"

    def task(self, task_id: str) -> str:
        return f"{self.tag}:t:{task_id}"

    def is_lock(self, key: str) -> bool:
        return key.startswith(self.tag + ":u:")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _ms(seconds: float) -> int:
    return -(-int(seconds * 1_000_000) // 1000)  # ceil, as qsync rounds durations


def _order(zset: dict[str, int]) -> list[tuple[str, int]]:
    """ZRANGE order: by score, then by member."""
    return sorted(zset.items(), key=lambda kv: (kv[1], kv[0].encode()))


def _moved_prefix(order: list[tuple[str, int]], moved: list[str], limit: int, t0: int, t1: int) -> None:
    """A sweep over ``score <= now`` (now read once in the script, between t0 and t1) with
    LIMIT ``limit`` takes a prefix of the zset in ZRANGE order: everything due by t0 (up to the
    limit) and nothing not due by t1."""
    n = len(moved)
    assert moved == [member for member, _ in order[:n]], f"swept {moved}, not a prefix of {order}"
    assert n <= limit
    assert all(score <= t1 for _, score in order[:n]), f"swept {moved} before they were due: {order}"
    if n < limit and n < len(order):
        assert order[n][1] > t0, f"left {order[n]} although it was due (t0={t0}); swept {moved}"


def build(task_id: str, spec: Spec, delay: float) -> qsync.Task | None:
    """The Task, or None when Task refuses it (a deadline that passed, or that falls before
    the delay ends): nothing to send then."""
    try:
        return spec.task(task_id, delay)
    except InvalidArgument as exc:
        assert spec.deadline, exc
        return None


specs = st.builds(
    Spec,
    type=st.sampled_from(["a", "b"]),
    payload=st.sampled_from([b"", b"x", b"\x00\xff", bytes(range(200))]),  # 200: format 3, in pieces
    retry=st.integers(0, 2),
    retention=st.sampled_from([None, SHORT, KEEP]),
    unique=st.sampled_from([None, "", "k0", "k1"]),
)
delays = st.one_of(st.just(0.0), st.just(0.0), st.floats(0.0005, 0.003), st.floats(1.0, 2.0))
durations = st.sampled_from([LONG_LEASE, SHORT])
deadlines = st.sampled_from([0, 0, 5, 3_600_000])  # ms from now; 0: none
# Choices among things whose number depends on the clock (which leases a recover took back, ...)
# are drawn as plain indices, so every run of an example draws the same shape of data.
index = st.integers(0, 2**16)
lease_picks = st.lists(
    st.tuples(st.sampled_from(["current", "current", "stale"]), index), min_size=1, max_size=5
)


class QueueMachine(RuleBasedStateMachine):
    """One queue, driven through the public API, with an exact model beside it."""

    client: redis.Redis  # set per backend by the test

    def __init__(self) -> None:
        super().__init__()
        self.r = self.client
        self.r.flushall()
        prefix = f"prop{next(_prefixes)}"
        self.k = Keys(prefix)
        self.q = qsync.new(self.r, prefix=prefix, check_server=False)
        self.tasks: dict[str, TaskModel] = {}
        self.pending: list[str] = []  # the pending list, left to right (lease pops the right)
        self.held: dict[str, str] = {}  # task id -> current lease token
        self.stale: list[qsync.Lease] = []  # superseded leases, for fencing checks
        self.paused = False
        self.lock_names: set[str] = set()
        self.ids = itertools.count()
        self.snap = self.take()

    # --- reading the database -----------------------------------------------------------

    def server_ms(self) -> int:
        seconds, micros = self.r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def take(self) -> Snapshot:
        while True:
            snap = self._read(sorted(self.tasks), sorted(self.lock_names))
            found = {k for k in snap.keys if self.k.is_lock(k)}
            found |= {h["unique"] for h in snap.hashes.values() if "unique" in h}
            if found <= self.lock_names:
                return snap
            self.lock_names |= found

    def _read(self, ids: list[str], locks: list[str]) -> Snapshot:
        pipe = self.r.pipeline(transaction=True)
        pipe.time()
        pipe.lrange(self.k.pending, 0, -1)
        for name in ZSETS:
            pipe.zrange(self.k.z[name], 0, -1, withscores=True)
        pipe.keys("*")
        for task_id in ids:
            pipe.hgetall(self.k.task(task_id))
            pipe.pttl(self.k.task(task_id))
        for lock in locks:
            pipe.get(lock)
            pipe.pttl(lock)
        out = iter(pipe.execute())
        seconds, micros = next(out)
        now = int(seconds) * 1000 + int(micros) // 1000
        pending = [_text(m) for m in next(out)]
        z = {name: {_text(m): int(s) for m, s in next(out)} for name in ZSETS}
        keys = {_text(k) for k in next(out)}
        hashes, pttl = {}, {}
        for task_id in ids:
            hashes[task_id] = _hash(next(out))
            pttl[task_id] = int(next(out))
        lock_state: dict[str, tuple[str | None, int]] = {}
        for lock in locks:
            owner = next(out)
            lock_state[lock] = (None if owner is None else _text(owner), int(next(out)))
        return Snapshot(now, pending, z, hashes, pttl, lock_state, keys)

    # --- producer side -------------------------------------------------------------------

    def new_id(self) -> str:
        return f"t{next(self.ids)}"

    def live_owner(self, uid: tuple[Any, ...] | None) -> str | None:
        if uid is None:
            return None
        owners = [i for i, t in self.tasks.items() if t.state in LIVE and t.spec.uid == uid]
        assert len(owners) <= 1, f"I6: two live tasks share a unique key: {owners}"
        return owners[0] if owners else None

    def enqueue_outcomes(self, task_id: str, spec: Spec, delay: float) -> list[tuple[str, Any]]:
        """What Redis may answer: ("new", state), ("exists", state), ("conflict", None) or
        ("dup", owner id). Two outcomes only while a completed task's 1 ms retention may run out."""
        owner = self.live_owner(spec.uid)
        fresh = [("dup", owner) if owner else ("new", "scheduled" if delay > 0 else "pending")]
        current = self.tasks.get(task_id)
        if current is None or current.state is None or current.lapsed:
            return fresh
        same = [("exists", current.state)] if current.spec == spec else [("conflict", None)]
        return same + fresh if current.may_lapse() else same

    def settle_enqueue(self, task: qsync.Task, spec: Spec, delay: float, result: object) -> None:
        task_id = task.id
        allowed = self.enqueue_outcomes(task_id, spec, delay)
        if isinstance(result, TaskIdConflict):
            got: tuple[str, Any] = ("conflict", None)
        elif isinstance(result, DuplicateTask):
            got = ("dup", result.owner_id)
        elif isinstance(result, qsync.TaskInfo):
            assert result.id == task_id
            kinds = [kind for kind, state in allowed if kind in ("new", "exists") and state == result.state]
            got = (kinds[0] if kinds else "unexpected", result.state.value)
        else:
            raise AssertionError(f"enqueue of {task_id}: unexpected result {result!r}")
        assert got in allowed, f"enqueue of {task_id} ({spec}): got {got}, expected one of {allowed}"
        event(f"enqueue {got[0]}")
        if got[0] == "new":
            assert isinstance(result, qsync.TaskInfo)
            assert (result.retried, result.max_retry) == (0, spec.retry)
            self.tasks[task_id] = TaskModel(spec, got[1], task.options.deadline_ms)
            if got[1] == "pending":
                self.pending.insert(0, task_id)

    @rule(spec=specs, delay=delays, deadline=deadlines)
    def enqueue(self, spec: Spec, delay: float, deadline: int) -> None:
        self._enqueue_one(self.new_id(), spec.with_deadline(deadline), delay)

    @rule(pick=index, same=st.sampled_from([True, True, False]), other=specs, delay=delays)
    def enqueue_same_id_again(self, pick: int, same: bool, other: Spec, delay: float) -> None:
        """The same id again: the same content (a client's retry; the delay may differ) or
        other content."""
        if self.tasks:
            task_id = sorted(self.tasks)[pick % len(self.tasks)]
            self._enqueue_one(task_id, self.tasks[task_id].spec if same else other, delay)

    def _enqueue_one(self, task_id: str, spec: Spec, delay: float) -> None:
        task = build(task_id, spec, delay)
        if task is None:
            return
        try:
            result: object = self.q.enqueue(task, queue=QUEUE)
        except QsyncError as exc:
            result = exc
        self.settle_enqueue(task, spec, delay, result)

    @rule(
        items=st.lists(
            st.tuples(specs, delays, deadlines, st.sampled_from(["new", "again", "same"]), index),
            min_size=1,
            max_size=4,
        )
    )
    def enqueue_many(self, items: list[tuple[Spec, float, int, str, int]]) -> None:
        """A batch; an item may reuse an id (of the model or of this batch), with the same
        content or not, and items may share a unique key."""
        batch: list[tuple[qsync.Task, Spec, float]] = []
        for spec, delay, deadline, reuse, pick in items:
            known = sorted(self.tasks) + [task.id for task, _, _ in batch]
            task_id = self.new_id() if reuse == "new" or not known else known[pick % len(known)]
            spec = spec.with_deadline(deadline)
            if reuse == "same" and known:
                earlier = {task.id: s for task, s, _ in batch}
                spec = earlier[task_id] if task_id in earlier else self.tasks[task_id].spec
            task = build(task_id, spec, delay)
            if task is not None:
                batch.append((task, spec, delay))
        if not batch:
            return
        results = self.q.enqueue_many([task for task, _, _ in batch], queue=QUEUE)
        assert len(results) == len(batch)
        for (task, spec, delay), result in zip(batch, results, strict=True):
            self.settle_enqueue(task, spec, delay, result)  # items apply in order

    @initialize(first=st.lists(specs, min_size=1, max_size=6))
    def start_with_ready_tasks(self, first: list[Spec]) -> None:
        """Start every example with a few ready tasks, so the worker rules have work."""
        batch = [(spec.task(self.new_id(), 0), spec) for spec in first]
        results = self.q.enqueue_many([task for task, _ in batch], queue=QUEUE)
        for (task, spec), result in zip(batch, results, strict=True):
            self.settle_enqueue(task, spec, 0, result)

    # --- worker side ---------------------------------------------------------------------

    @rule(count=st.integers(1, 5), duration=durations)
    def lease(self, count: int, duration: float) -> None:
        """Pops ``count`` ids from the right of pending: each is leased, or archived when its
        deadline has passed (by the script's clock, between t0 and t1)."""
        t0 = self.server_ms()
        batch = self.q.lease(QUEUE, count=count, lease_duration=duration)
        t1 = self.server_ms()
        popped = [] if self.paused else self.pending[::-1][:count]
        leased = [t.id for t in batch.tasks]
        assert leased == [i for i in popped if i in leased], f"leased {leased}, popped {popped}"
        # One token per call, one lease per id: each (id, token) pair is a lease of its own.
        assert len({t.id for t in batch.tasks}) == len(batch.tasks)
        assert len({t.token for t in batch.tasks}) <= 1
        assert (batch.corrupt_archived, batch.orphans) == (0, 0)
        assert batch.deadline_archived == len(popped) - len(leased)
        for task_id in popped:
            model = self.tasks[task_id]
            if task_id in leased:
                assert not model.deadline or model.deadline > t0, f"{task_id} leased past its deadline"
                model.state = "active"
            else:
                assert 0 < model.deadline <= t1, f"{task_id} archived before its deadline"
                model.state = "archived"
                event("lease archived a task past its deadline")
            self.pending.pop()
        for t in batch.tasks:
            model = self.tasks[t.id]
            assert (t.type, t.payload, t.deadline_ms) == (model.spec.type, model.spec.payload, model.deadline)
            assert (t.retried, t.max_retry) == (model.retried, model.spec.retry), "I8"
            assert t.token not in {lease.token for lease in self.stale}
            self.held[t.id] = t.token

    @rule(count=st.integers(1, 3))
    def lease_briefly(self, count: int) -> None:
        """A 1 ms lease: a worker that will stall or die, so recover has work."""
        self.lease(count, SHORT)

    def is_current(self, lease: qsync.Lease) -> bool:
        return self.held.get(lease.id) == lease.token

    def pick_leases(self, picks: list[tuple[str, int]]) -> list[qsync.Lease]:
        """Current leases (maybe one twice) and stale ones, in the drawn order."""
        current = [qsync.Lease(i, t) for i, t in sorted(self.held.items())]
        stale = self.stale[-8:]
        out = []
        for kind, pick in picks:
            pool = (stale or current) if kind == "stale" else (current or stale)
            if pool:
                out.append(pool[pick % len(pool)])
        return out

    def release(self, lease: qsync.Lease) -> None:
        del self.held[lease.id]
        self.stale.append(lease)

    def frozen(self, snap: Snapshot) -> tuple[Any, ...]:
        """The state a no-op must leave unchanged (a 1 ms retention may run out meanwhile)."""
        hashes = {i: h for i, h in snap.hashes.items() if not self.tasks[i].may_lapse()}
        return snap.pending, snap.z, hashes, {k: v[0] for k, v in snap.locks.items()}

    def check_no_writes(self, op: str, leases: list[qsync.Lease], before: Snapshot) -> None:
        """I7: a call presenting only stale tokens changes nothing."""
        event(f"{op} with stale tokens only")
        assert self.frozen(self.take()) == self.frozen(before), f"I7: {op} with stale {leases} wrote"

    @rule(picks=lease_picks, duration=durations)
    def extend(self, picks: list[tuple[str, int]], duration: float) -> None:
        leases = self.pick_leases(picks)
        if not leases:
            return
        expected = [self.is_current(lease) for lease in leases]
        assert self.q.extend(QUEUE, leases, lease_duration=duration) == expected
        if not any(expected):
            self.check_no_writes("extend", leases, self.snap)

    @rule(picks=lease_picks)
    def ack(self, picks: list[tuple[str, int]]) -> None:
        leases = self.pick_leases(picks)
        if not leases:
            return
        stale_only = not any(self.is_current(lease) for lease in leases)
        got = self.q.ack(QUEUE, leases)
        expected = []
        for lease in leases:
            expected.append(self.is_current(lease))
            if expected[-1]:
                self.release(lease)
                model = self.tasks[lease.id]
                model.state = "completed" if model.spec.retention else None
        assert got == expected, f"ack {leases}: got {got}, expected {expected}"
        if stale_only:
            self.check_no_writes("ack", leases, self.snap)

    @rule(
        picks=lease_picks, retry_delays=st.lists(st.sampled_from([0, 0, None, 2000]), min_size=5, max_size=5)
    )
    def fail(self, picks: list[tuple[str, int]], retry_delays: list[int | None]) -> None:
        """Retry now (0 ms), later (2 s), or skip retrying (None, as for SkipRetry)."""
        leases = self.pick_leases(picks)
        if not leases:
            return
        delays_ms = retry_delays[: len(leases)]
        failures = [
            qsync.Failure(lease.id, lease.token, "boom", d)
            for lease, d in zip(leases, delays_ms, strict=True)
        ]
        stale_only = not any(self.is_current(lease) for lease in leases)
        t0 = self.server_ms()
        got = [None if state is None else state.value for state in self.q.fail(QUEUE, failures)]
        t1 = self.server_ms()
        assert len(got) == len(leases)
        for lease, delay, state in zip(leases, delays_ms, got, strict=True):
            if not self.is_current(lease):
                assert state is None, f"fail with stale {lease} gave {state}"
                continue
            self.release(lease)
            model = self.tasks[lease.id]
            must = delay is None or model.retried >= model.spec.retry
            window = (t0 + (delay or 0), t1 + (delay or 0))  # the script's now + delay
            must = must or (0 < model.deadline <= window[0])
            may = must or (0 < model.deadline <= window[1])
            assert state in (["archived"] if must else ["archived", "retry"] if may else ["retry"])
            model.state = state
            if state == "retry":
                model.retried += 1
        if stale_only:
            self.check_no_writes("fail", leases, self.snap)

    @rule(picks=lease_picks)
    def requeue(self, picks: list[tuple[str, int]]) -> None:
        leases = self.pick_leases(picks)
        if not leases:
            return
        stale_only = not any(self.is_current(lease) for lease in leases)
        got = self.q.requeue(QUEUE, leases)
        expected = []
        for lease in leases:
            expected.append(self.is_current(lease))
            if expected[-1]:
                self.release(lease)
                self.tasks[lease.id].state = "pending"
                self.pending.append(lease.id)  # RPUSH: the next to be leased
        assert got == expected
        if stale_only:
            self.check_no_writes("requeue", leases, self.snap)

    # --- sweeps --------------------------------------------------------------------------

    @rule(limit=st.sampled_from([1, 2, 1000]))
    def promote(self, limit: int) -> None:
        before = self.snap
        t0 = self.server_ms()
        result = self.q.promote(QUEUE, limit=limit)
        t1 = self.server_ms()
        after = self.take()
        promoted: list[str] = []
        for source in ("scheduled", "retry"):
            order = _order(before.z[source])
            moved = [member for member, _ in order if member not in after.z[source]]
            _moved_prefix(order, moved, limit, t0, t1)
            promoted += moved
        for task_id in promoted:
            self.tasks[task_id].state = "pending"
        self.pending = promoted[::-1] + self.pending  # LPUSH one by one
        event(f"promote moved {min(len(promoted), 2)}+")
        waiting = [s for name in ("scheduled", "retry") for s in after.z[name].values()]
        assert tuple(result) == (len(promoted), 0, min(waiting, default=-1))

    @rule(
        max_recoveries=st.integers(1, 3),
        retry_delay=st.sampled_from([0, 2.0]),
        limit=st.sampled_from([1, 1000]),
        wait=st.booleans(),
    )
    def recover(self, max_recoveries: int, retry_delay: float, limit: int, wait: bool) -> None:
        if wait:
            self.time_passes()
        before = self.snap
        t0 = self.server_ms()
        result = self.q.recover(QUEUE, limit=limit, max_recoveries=max_recoveries, retry_delay=retry_delay)
        t1 = self.server_ms()
        after = self.take()
        order = _order(before.z["active"])
        moved = [member for member, _ in order if member not in after.z["active"]]
        _moved_prefix(order, moved, limit, t0, t1)
        event(f"recover took back {min(len(moved), 2)}+ leases")
        counts = {"retry": 0, "archived": 0}
        for task_id in moved:
            model = self.tasks[task_id]
            self.release(qsync.Lease(task_id, self.held[task_id]))
            model.recoveries += 1
            error = after.hashes[task_id].get("error", "")
            delay_ms = _ms(retry_delay)
            if model.recoveries >= max_recoveries:
                model.state = "archived"
                assert error.startswith("poison"), error
            elif model.retried >= model.spec.retry:
                model.state = "archived"
                assert error == "lease expired", error
            elif 0 < model.deadline <= t1 + delay_ms and task_id in after.z["archived"]:
                model.state = "archived"
                assert error == "lease expired; deadline exceeded", error
            else:
                assert not 0 < model.deadline <= t0 + delay_ms, f"{task_id} retried past its deadline"
                model.state = "retry"
                model.retried += 1
                due = after.z["retry"].get(task_id, -1)
                assert t0 + _ms(retry_delay) <= due <= t1 + _ms(retry_delay), (t0, due, t1)
            counts[model.state] += 1
        next_expiry = min(after.z["active"].values(), default=-1)
        assert tuple(result) == (counts["retry"], counts["archived"], 0, next_expiry)

    @rule(
        limit=st.sampled_from([1, 1000]),
        max_age=st.sampled_from([SHORT, 90 * 24 * 3600.0]),
        max_count=st.sampled_from([0, 1, 2, 10_000]),
    )
    def trim(self, limit: int, max_age: float, max_count: int) -> None:
        before = self.snap
        t0 = self.server_ms()
        result = self.q.trim(QUEUE, limit=limit, archived_max_age=max_age, archived_max_count=max_count)
        t1 = self.server_ms()
        after = self.take()
        order = _order(before.z["completed"])
        completed = [m for m, _ in order if m not in after.z["completed"]]
        _moved_prefix(order, completed, limit, t0, t1)
        order = _order(before.z["archived"])
        archived = [m for m, _ in order if m not in after.z["archived"]]
        assert archived == [m for m, _ in order[: len(archived)]], "trim must drop the oldest first"
        if limit >= len(order):
            age_ms = _ms(max_age)
            least = max(sum(s <= t0 - age_ms for _, s in order), len(order) - max_count)
            most = max(sum(s <= t1 - age_ms for _, s in order), len(order) - max_count)
            assert least <= len(archived) <= most, (least, archived, most)
        else:
            assert len(archived) <= 2 * limit
        event(f"trim removed {min(len(completed), 1)}+ completed, {min(len(archived), 1)}+ archived")
        for task_id in completed:
            if self.tasks[task_id].state == "completed":  # else the id was only a stale index entry
                self.tasks[task_id].state = None
        for task_id in archived:
            self.tasks[task_id].state = None
        assert tuple(result) == (len(completed), len(archived))

    @rule()
    def time_passes(self) -> None:
        """Let 1 ms leases, delays and retentions run out (Redis TIME is real time). This
        waits for nothing in particular: every outcome of the next step is accepted by the
        model either way."""
        time.sleep(0.002)

    @rule(paused=st.booleans())
    def pause_or_resume(self, paused: bool) -> None:
        if paused:
            self.q.pause(QUEUE)
        else:
            self.q.resume(QUEUE)
        self.paused = paused

    @rule(pick=index)
    def info(self, pick: int) -> None:
        if not self.tasks:
            return
        task_id = sorted(self.tasks)[pick % len(self.tasks)]
        model = self.tasks[task_id]
        try:
            info = self.q.info(task_id, queue=QUEUE)
        except TaskNotFound:
            assert model.state is None or model.lapsed or model.may_lapse(), f"{task_id} is {model.state}"
            return
        assert model.state is not None and not model.lapsed
        assert (info.state.value, info.retried, info.max_retry) == (
            model.state,
            model.retried,
            model.spec.retry,
        )
        assert info.recoveries == model.recoveries

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def structure(self) -> None:
        snap = self.snap = self.take()
        self.check_containers(snap)
        for task_id, model in self.tasks.items():
            self.check_task(snap, task_id, model)
        self.check_locks(snap)
        self.check_keys(snap)
        assert snap.pending == self.pending, f"pending is {snap.pending}, expected {self.pending}"
        for task_id in self.held:
            assert self.tasks[task_id].state == "active"

    def check_containers(self, snap: Snapshot) -> None:
        """I5: one container per id, once."""
        places: dict[str, list[str]] = defaultdict(list)
        for task_id in snap.pending:
            places[task_id].append("pending")
        for name in ZSETS:
            for task_id in snap.z[name]:
                places[task_id].append(name)
        strangers = set(places) - set(self.tasks)
        assert not strangers, f"I5: ids {strangers} in containers were never enqueued"
        for task_id, model in self.tasks.items():
            expected = [] if model.state is None else [model.state]
            assert places.get(task_id, []) == expected, (
                f"I5: task {task_id} is in {places.get(task_id, [])}, expected {expected}"
            )

    def check_task(self, snap: Snapshot, task_id: str, model: TaskModel) -> None:
        """I5 (hash state), I8 (attempt counts), the token and the hash's TTL."""
        h = snap.hashes[task_id]
        if model.state is None:
            assert not h, f"task {task_id} should be gone, its hash is {h}"
            return
        if model.may_lapse() and not h:
            assert snap.now >= snap.z["completed"][task_id] - 2, "completed hash expired early"
            model.lapsed = True
            event("retention ran out")
            return
        assert h and not model.lapsed, f"I5: task {task_id} ({model.state}) has no hash"
        assert h["s"] == model.state, f"I5: {task_id} in {model.state}, hash says {h['s']}"
        assert int(h["r"]) <= int(h["m"]), f"I8: {task_id}: {h}"
        assert (int(h["r"]), int(h["m"])) == (model.retried, model.spec.retry), "I8"
        assert int(h.get("recoveries", "0")) == model.recoveries, "I8: recoveries"
        assert int(h.get("deadline", "0")) == model.deadline
        assert h.get("token") == self.held.get(task_id), f"token of {task_id}: {h.get('token')}"
        if model.state == "completed" and model.spec.retention:
            assert snap.pttl[task_id] >= 0, "a retained task's hash must expire"
        else:
            assert snap.pttl[task_id] == -1, f"{task_id} ({model.state}) has a TTL"
        if model.spec.unique is None:
            assert "unique" not in h

    def check_locks(self, snap: Snapshot) -> None:
        """I6: every lock names a live task that names it back; every live unique task holds
        its lock."""
        for lock, (owner, pttl) in snap.locks.items():
            if owner is None:
                continue
            model = self.tasks.get(owner)
            assert model is not None, f"I6: lock {lock} names unknown task {owner}"
            assert model.state in LIVE, f"I6: lock {lock} outlived {owner}, now {model.state}"
            assert snap.hashes[owner].get("unique") == lock, f"I6: {owner} does not name {lock}"
            assert pttl > 0, f"I6: lock {lock} has no TTL"
        for task_id, model in self.tasks.items():
            if model.state in LIVE and model.spec.unique is not None:
                lock = snap.hashes[task_id].get("unique", "")
                assert snap.locks.get(lock, (None, 0))[0] == task_id, f"I6: {task_id} lost {lock}"

    def check_keys(self, snap: Snapshot) -> None:
        allowed = {self.k.pending, self.k.paused, self.k.wake, self.k.registry, *self.k.z.values()}
        allowed |= {self.k.task(i) for i in self.tasks}
        stray = {key for key in snap.keys - allowed if not self.k.is_lock(key)}
        assert not stray, f"unexpected keys {stray}"
        assert (self.k.paused in snap.keys) == self.paused


def test_queue_state_machine(backend: redis.Redis) -> None:
    """Random operation sequences keep I5, I6, I7 and I8 after every step (200 examples on
    real Redis, 150 on fakeredis; 30 steps each)."""
    fake = isinstance(backend, fakeredis.FakeRedis)
    machine = type("QueueMachineOn" + ("Fake" if fake else "Redis"), (QueueMachine,), {"client": backend})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=150 if fake else 200,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
        ),
    )


def _until(predicate: Any, what: str, timeout: float = 2.0) -> None:
    """Poll a condition of the server (no sleeping): for a 1 ms expiry to pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"


def test_reenqueue_after_retention_ran_out_keeps_one_container(backend: redis.Redis) -> None:
    """I5, found by the state machine: ack.lua keeps a retained task by PEXPIRE on its hash
    and ZADD to completed; when the retention runs out only the hash goes, the id stays in
    completed until trim. Enqueue then sees no hash and creates the task anew, and the id is in
    pending and completed at once (and ``completed`` lists a task that is pending)."""
    q = qsync.new(backend, prefix="regress", check_server=False)
    tag = "{regress:q}"
    q.enqueue(qsync.Task("a", b"x", task_id="t0", retention=0.001), queue="q")
    assert q.ack("q", q.lease("q").tasks) == [True]
    _until(lambda: not backend.exists(f"{tag}:t:t0"), "the retention to run out")

    info = q.enqueue(qsync.Task("a", b"x", task_id="t0", retention=0.001), queue="q")

    assert info.state is qsync.TaskState.PENDING
    assert backend.lrange(f"{tag}:pending", 0, -1) == [b"t0"]
    assert backend.zscore(f"{tag}:completed", "t0") is None, "t0 is in pending AND completed"

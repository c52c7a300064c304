"""The sans-I/O core: one function per operation, returning a :class:`Call` (script, keys,
arguments, and how to decode the reply). No I/O and no asyncio here: the sync and the async
queue both execute these same calls, so every transition's Redis logic exists once."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from . import _scripts
from ._keys import QueueKeys, registry_key
from .errors import Code, QsyncError, TaskNotFound, error_for
from .task import DEFAULT_OPTIONS, Task, TaskInfo, TaskState, _enqueue_base, _enqueued_info

__all__ = [
    "TASK_FORMAT_VERSION",
    "Call",
    "Failure",
    "HasLease",
    "Lease",
    "LeaseBatch",
    "LeasedTask",
    "PromoteResult",
    "RecoverResult",
    "TrimResult",
    "ack",
    "enqueue_many",
    "extend",
    "fail",
    "info",
    "lease",
    "pause",
    "promote",
    "recover",
    "register_queue",
    "requeue",
    "trim",
    "unblock",
]

T = TypeVar("T")
# lua/README.md, task hash fields: 2 added "o", 3 a payload in pieces; lease reads 1 to 3
TASK_FORMAT_VERSION = 3
# Tasks per enqueue script call: small enough that the calls of one enqueue_many stream
# (Redis runs one while the next is packed), large enough that a call's overhead is noise.
ENQUEUE_CHUNK = 250
MAX_LEASE_BATCH = 1000
MAX_SWEEP_BATCH = 10_000


class Call(NamedTuple, Generic[T]):
    """One Redis round-trip item: a script (EVALSHA) or, with ``script=None``, a plain command.

    ``keys`` all carry one queue's hash tag (asserted when the call is built); ``idempotent``
    calls may be re-sent once after a connection error, others never are. A NamedTuple:
    immutable, and built once per call at a third of a frozen dataclass's cost.
    """

    op: str
    queue: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    decode: Callable[[Any], T]
    script: _scripts.Script | None = None
    idempotent: bool = False

    def command(self) -> tuple[Any, ...]:
        """The command to send."""
        if self.script is None:
            return self.args
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)


def _script_call(
    op: str,
    keys: QueueKeys,
    call_keys: tuple[str, ...],
    args: tuple[Any, ...],
    decode: Callable[[Any], T],
    *,
    idempotent: bool,
    script: str | None = None,
) -> Call[T]:
    # One slot per call, checked before sending: every key must carry the queue's tag
    # (QueueKeys.owns, inlined: this runs for every key of every call).
    tag = keys.tag
    for key in call_keys:
        if not key.startswith(tag):
            raise AssertionError(f"key {key!r} is outside the slot of {tag}")
    return Call(op, keys.queue, call_keys, args, decode, _scripts.script(script or op), idempotent)


def _check_whole(reply: list[Any], op: str, queue: str) -> None:
    if reply and isinstance(reply[0], int) and reply[0] == Code.WRONG_TYPE and len(reply) == 2:
        raise error_for(Code.WRONG_TYPE, op=op, queue=queue, task_id=None, detail=_text(reply[1]))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --- producer side ---------------------------------------------------------------------------


def enqueue_many(keys: QueueKeys, tasks: Sequence[Task]) -> list[Call[list[TaskInfo | QsyncError]]]:
    """Calls that enqueue ``tasks`` (ENQUEUE_CHUNK per script call), each decoding to per-task results:
    a TaskInfo, or the TaskError that refused that task."""
    return [_enqueue_chunk(keys, tasks[i : i + ENQUEUE_CHUNK]) for i in range(0, len(tasks), ENQUEUE_CHUNK)]


def _enqueue_chunk(keys: QueueKeys, tasks: Sequence[Task]) -> Call[list[TaskInfo | QsyncError]]:
    # Tasks of one type and options share a profile sent once per call (lua/enqueue.lua): each
    # task then costs four arguments, not fourteen, to pack in Python and to parse in Redis.
    task_prefix, queue = keys.task_prefix, keys.queue
    call_keys: list[str] = [keys.pending, keys.scheduled, keys.wake, keys.completed]
    profiles: dict[Any, int] = {}
    profile_args: list[Any] = []
    task_args: list[Any] = []
    for task in tasks:
        o = task.options
        shared = task.type if o is DEFAULT_OPTIONS else (task.type, *o[:-1])  # all but unique_key
        profile = profiles.get(shared)
        if profile is None:
            profile = profiles[shared] = len(profiles) + 1
            profile_args += _profile(task)
        call_keys.append(task_prefix + task.id)  # keys.task(task.id)
        if o.unique_key is not None:  # set exactly when unique_ttl_ms is (task.py _options)
            call_keys.append(keys.unique(o.unique_key))
        task_args += (task.id, profile, task.payload, task.fingerprint)
    args = (len(tasks), len(profiles), *profile_args, *task_args)
    return _script_call(
        "enqueue", keys, tuple(call_keys), args, _enqueue_decoder(queue, tasks), idempotent=True
    )


def _profile(task: Task) -> tuple[Any, ...]:
    """The profile fields of lua/enqueue.lua for ``task``: its type and options."""
    o = task.options
    return (task.type, o.max_retry, o.timeout_ms, o.deadline_ms, o.retention_ms, o.retry_delay_ms,
            o.delay_ms, o.process_at_ms, o.unique_ttl_ms)  # fmt: skip


def _enqueue_decoder(queue: str, tasks: Sequence[Task]) -> Callable[[list[Any]], list[TaskInfo | QsyncError]]:
    """Decodes an enqueue reply into one TaskInfo, or the error that refused it, per task."""

    def decode(reply: list[Any]) -> list[TaskInfo | QsyncError]:
        _check_whole(reply, "enqueue", queue)
        now_ms = reply[0]
        base = _enqueue_base(queue, now_ms)
        results: list[TaskInfo | QsyncError] = []
        for i, task in enumerate(tasks):
            code, detail = reply[1 + 2 * i], reply[2 + 2 * i]
            if code > 0:
                state = _STATES.get(detail) or TaskState(_text(detail))
                results.append(_enqueued_info(base, task, state, now_ms))
            else:
                results.append(
                    error_for(code, op="enqueue", queue=queue, task_id=task.id, detail=_text(detail))
                )
        return results

    return decode


_STATES: dict[bytes | str, TaskState] = {s.value.encode(): s for s in TaskState}


def register_queue(prefix: str, queue: str) -> Call[None]:
    """Add ``queue`` to the prefix's set of known queues (an index for tools, not the truth)."""
    key = registry_key(prefix, "queues")
    return Call("register", queue, (key,), ("SADD", key, queue), lambda _: None, None, True)


def info(keys: QueueKeys, task_id: str) -> Call[TaskInfo]:
    """Read one task."""
    call_keys = (keys.task(task_id), keys.scheduled, keys.retry, keys.active)

    def decode(reply: list[Any]) -> TaskInfo:
        if not reply:
            raise TaskNotFound(
                f"info on queue {keys.queue!r}: task {task_id!r} was not found (never enqueued, or "
                "finished and deleted: set retention= on the Task to keep finished tasks)",
                op="info", queue=keys.queue, task_id=task_id,
            )  # fmt: skip
        _check_whole(reply, "info", keys.queue)
        flat = reply[1:]
        return TaskInfo.from_hash(
            task_id, keys.queue, dict(zip(flat[::2], flat[1::2], strict=True)), reply[0]
        )

    return _script_call("info", keys, call_keys, (task_id,), decode, idempotent=True)


def pause(keys: QueueKeys, paused: bool) -> Call[None]:
    """Pause (workers lease nothing) or resume a queue (and wake idle workers if tasks wait)."""
    if paused:
        command = ("SET", keys.paused, "1")
        return Call("pause", keys.queue, (keys.paused,), command, lambda _: None, None, True)

    def decode(reply: Any) -> None:
        if isinstance(reply, list):
            _check_whole(reply, "resume", keys.queue)

    call_keys = (keys.paused, keys.pending, keys.wake)
    return _script_call("resume", keys, call_keys, (), decode, idempotent=True)


# --- worker side -----------------------------------------------------------------------------


class HasLease(Protocol):
    """Anything naming a lease: a task id and its current lease token."""

    @property
    def id(self) -> str: ...
    @property
    def token(self) -> str: ...


class Lease(NamedTuple):
    """A task id and the lease token that fences it."""

    id: str
    token: str


@dataclass(slots=True)
class LeasedTask:
    """A task leased to this worker, with everything the handler and the fencing need."""

    id: str
    token: str
    queue: str
    type: str
    payload: bytes = field(repr=False)  # never in logs
    retried: int
    max_retry: int
    timeout_ms: int
    deadline_ms: int
    retry_delay_ms: int


@dataclass(frozen=True, slots=True)
class LeaseBatch:
    """The result of one lease call."""

    now_ms: int
    expires_ms: int
    tasks: list[LeasedTask]
    deadline_archived: int
    corrupt_archived: int
    orphans: int


_LEASE_STRIDE = 8


def lease(keys: QueueKeys, count: int, lease_ms: int) -> Call[LeaseBatch]:
    """Lease up to ``count`` ready tasks for ``lease_ms``. Never re-sent: a lost reply leaves
    the leases to expire and be recovered, never to be handed out twice.

    The tasks of one call share its random token: a lease is the pair of task id and token,
    and a call leases an id at most once, so the pair is new for every lease (lua/lease.lua).
    """
    token = os.urandom(6).hex()
    call_keys = (keys.pending, keys.active, keys.archived, keys.paused, keys.task_prefix, keys.wake)
    queue = keys.queue

    def decode(reply: list[Any]) -> LeaseBatch:
        _check_whole(reply, "lease", queue)
        tasks = []
        for i in range(5, len(reply), _LEASE_STRIDE):
            r = reply[i : i + _LEASE_STRIDE]
            tasks.append(
                LeasedTask(r[0].decode(), token, queue, r[1].decode("utf-8", "replace"), r[2], r[3],
                           r[4], r[5], r[6], r[7])
            )  # fmt: skip
        return LeaseBatch(reply[0], reply[1], tasks, reply[2], reply[3], reply[4])

    args = (count, lease_ms, token, TASK_FORMAT_VERSION)
    return _script_call("lease", keys, call_keys, args, decode, idempotent=False)


def _flatten(leases: Sequence[HasLease]) -> tuple[str, ...]:
    out: list[str] = []
    for item in leases:
        out += (item.id, item.token)
    return tuple(out)


def _codes(op: str, queue: str, offset: int) -> Callable[[list[Any]], list[int]]:
    def decode(reply: list[Any]) -> list[int]:
        _check_whole(reply, op, queue)
        return reply[offset:]

    return decode


def extend(keys: QueueKeys, leases: Sequence[HasLease], lease_ms: int) -> Call[list[bool]]:
    """Heartbeat: extend each held lease to now + ``lease_ms``; False for a lost lease."""
    decode_codes = _codes("extend", keys.queue, 1)
    args = (lease_ms, *_flatten(leases))
    return _script_call(
        "extend", keys, (keys.active, keys.task_prefix), args,
        lambda reply: [c == Code.OK for c in decode_codes(reply)], idempotent=True,
    )  # fmt: skip


def ack(keys: QueueKeys, leases: Sequence[HasLease]) -> Call[list[bool]]:
    """Finish tasks that succeeded; False for a lease that was lost (nothing written)."""
    decode_codes = _codes("ack", keys.queue, 0)
    return _script_call(
        "ack", keys, (keys.active, keys.completed, keys.task_prefix), _flatten(leases),
        lambda reply: [c > 0 for c in decode_codes(reply)], idempotent=False,
    )  # fmt: skip


class Failure(NamedTuple):
    """A failed attempt: the lease, the error text, and the delay before the next attempt in
    ms (None: archive now, as for SkipRetry)."""

    id: str
    token: str
    error: str
    retry_delay_ms: int | None


MAX_ERROR_BYTES = 4096


def fail(keys: QueueKeys, failures: Sequence[Failure]) -> Call[list[TaskState | None]]:
    """Record failed attempts: each task goes to RETRY or ARCHIVED; None for a lost lease."""
    args: list[Any] = []
    for f in failures:
        error = f.error.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
        args += (f.id, f.token, error, -1 if f.retry_delay_ms is None else max(0, f.retry_delay_ms))
    decode_codes = _codes("fail", keys.queue, 1)
    outcome = {1: TaskState.RETRY, 2: TaskState.ARCHIVED}

    def decode(reply: list[Any]) -> list[TaskState | None]:
        return [outcome.get(c) for c in decode_codes(reply)]

    call_keys = (keys.active, keys.retry, keys.archived, keys.task_prefix)
    return _script_call("fail", keys, call_keys, tuple(args), decode, idempotent=False)


def requeue(keys: QueueKeys, leases: Sequence[HasLease]) -> Call[list[bool]]:
    """Hand leased tasks back to the front of pending without counting an attempt."""
    decode_codes = _codes("requeue", keys.queue, 0)
    return _script_call(
        "requeue", keys, (keys.active, keys.pending, keys.task_prefix, keys.wake), _flatten(leases),
        lambda reply: [c == Code.OK for c in decode_codes(reply)], idempotent=False,
    )  # fmt: skip


class PromoteResult(NamedTuple):
    """Due tasks moved to pending, orphan ids dropped, and the next due time (ms, -1: none)."""

    promoted: int
    orphans: int
    next_due_ms: int


def promote(keys: QueueKeys, limit: int = 1000) -> Call[PromoteResult]:
    """Move due scheduled and retry tasks to pending (bounded; safe to race)."""
    call_keys = (keys.scheduled, keys.retry, keys.pending, keys.task_prefix, keys.wake)

    def decode(reply: list[Any]) -> PromoteResult:
        _check_whole(reply, "promote", keys.queue)
        return PromoteResult(*reply)

    return _script_call("promote", keys, call_keys, (limit,), decode, idempotent=True)


class RecoverResult(NamedTuple):
    """Expired leases sent to retry, archived, orphans dropped, and the next expiry (ms, -1)."""

    retried: int
    archived: int
    orphans: int
    next_expiry_ms: int


def recover(keys: QueueKeys, limit: int, max_recoveries: int, retry_delay_ms: int) -> Call[RecoverResult]:
    """Reclaim expired leases as failed attempts (bounded; safe to race)."""
    call_keys = (keys.active, keys.retry, keys.archived, keys.task_prefix)

    def decode(reply: list[Any]) -> RecoverResult:
        _check_whole(reply, "recover", keys.queue)
        return RecoverResult(*reply)

    args = (limit, max_recoveries, retry_delay_ms)
    return _script_call("recover", keys, call_keys, args, decode, idempotent=True)


class TrimResult(NamedTuple):
    """How many completed and archived tasks were forgotten."""

    completed: int
    archived: int


def trim(keys: QueueKeys, limit: int, archived_max_age_ms: int, archived_max_count: int) -> Call[TrimResult]:
    """Forget completed tasks past their retention and old or excess archived tasks."""
    call_keys = (keys.completed, keys.archived, keys.task_prefix)

    def decode(reply: list[Any]) -> TrimResult:
        _check_whole(reply, "trim", keys.queue)
        return TrimResult(*reply)

    args = (limit, archived_max_age_ms, archived_max_count)
    return _script_call("trim", keys, call_keys, args, decode, idempotent=True)


# How long an unblock token waits for its listener before the key expires (the listener is
# blocked for at most the server's poll interval, so one that is still there pops it at once).
UNBLOCK_TTL_MS = 60_000


def unblock(keys: QueueKeys, listener: str) -> Call[None]:
    """End the blocking wait of one wake-up listener of this queue at once (lua/unblock.lua):
    the lease it sent behind its BRPOP runs now."""

    def decode(reply: Any) -> None:
        if isinstance(reply, list):
            _check_whole(reply, "unblock", keys.queue)

    call_keys = (keys.listener_wake(listener),)
    return _script_call("unblock", keys, call_keys, (UNBLOCK_TTL_MS,), decode, idempotent=True)

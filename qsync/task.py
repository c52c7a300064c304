"""Tasks as users build them (:class:`Task`) and as Redis reports them (:class:`TaskInfo`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from . import _validate as check
from ._keys import validate_name
from .errors import InvalidArgument, InvalidArgumentType

__all__ = ["DEFAULT_MAX_RETRY", "Task", "TaskInfo", "TaskState"]

DEFAULT_MAX_RETRY = 25
MAX_RETRY_LIMIT = 10_000
MAX_TYPE_BYTES = 255
MAX_ID_BYTES = 128
MAX_UNIQUE_KEY_BYTES = 512

Seconds = int | float | timedelta


class TaskState(StrEnum):
    """Where a task is in its life; each state is one Redis container of the queue."""

    PENDING = "pending"
    ACTIVE = "active"
    SCHEDULED = "scheduled"
    RETRY = "retry"
    ARCHIVED = "archived"
    COMPLETED = "completed"


class _Options(NamedTuple):
    """A task's options in the units the scripts take (ms, ms since the epoch, 0 = unset).
    A NamedTuple: immutable, and cheap to build (a frozen dataclass costs four times more)."""

    max_retry: int
    retry_delay_ms: int  # -1: the worker's backoff policy
    delay_ms: int
    process_at_ms: int
    timeout_ms: int
    deadline_ms: int
    retention_ms: int
    unique_ttl_ms: int
    unique_key: str | None


class Task:
    """A unit of work to enqueue: a type that selects the handler, and a payload of bytes.

    Args:
        type: the task type the worker's Mux routes on, e.g. ``"email:send"``.
        payload: the task's data, as bytes you encode (JSON, msgpack, ...). qsync never pickles.
        retry: how many times a failed attempt is retried before the task is archived.
        retry_delay: a fixed delay before each retry (seconds or timedelta); default: the
            worker's backoff policy.
        delay: run no earlier than this long after the enqueue (server clock).
        process_at: run no earlier than this timezone-aware time. Not with ``delay``.
        timeout: the longest one attempt may run; default: the worker's default timeout.
        deadline: a timezone-aware time after which the task must not run; it is archived.
        unique: a TTL (seconds or timedelta) for a unique lock: while the task lives and the
            TTL lasts, enqueueing another task with the same unique key raises DuplicateTask.
        unique_key: the key of the unique lock; default: derived from type and payload.
        task_id: the id; default a random UUID. Enqueueing the same id again with the same
            content is an idempotent success, with other content a TaskIdConflict.
        retention: keep the finished task readable by ``info`` this long; default: delete it.

    Raises:
        InvalidArgument, InvalidArgumentType: on any bad value, with what to change.
    """

    __slots__ = ("_fingerprint", "id", "options", "payload", "type")

    def __init__(
        self,
        type: str,
        payload: bytes | bytearray | memoryview = b"",
        *,
        retry: int = DEFAULT_MAX_RETRY,
        retry_delay: Seconds | None = None,
        delay: Seconds | None = None,
        process_at: datetime | None = None,
        timeout: Seconds | None = None,
        deadline: datetime | None = None,
        unique: Seconds | None = None,
        unique_key: str | None = None,
        task_id: str | None = None,
        retention: Seconds | None = None,
    ) -> None:
        self.type: str = check.printable_text(type, "task type", MAX_TYPE_BYTES)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidArgumentType(
                f"payload must be bytes, not {payload.__class__.__name__}; encode it yourself "
                "(e.g. json.dumps(obj).encode()): qsync never pickles or guesses an encoding"
            )
        self.payload: bytes = bytes(payload)
        self.id: str = _random_id() if task_id is None else validate_name(task_id, "task_id", MAX_ID_BYTES)
        if (
            retry == DEFAULT_MAX_RETRY
            and retry.__class__ is int
            and retry_delay is None
            and delay is None
            and process_at is None
            and timeout is None
            and deadline is None
            and unique is None
            and unique_key is None
            and retention is None
        ):
            self.options = DEFAULT_OPTIONS
        else:
            self.options = _options(
                self.type, self.payload, retry=retry, retry_delay=retry_delay, delay=delay,
                process_at=process_at, timeout=timeout, deadline=deadline, unique=unique,
                unique_key=unique_key, retention=retention,
            )  # fmt: skip
        self._fingerprint: bytes | None = None

    @property
    def fingerprint(self) -> bytes:
        """A digest of type, payload and options: equal for a client's retry of the same task.

        The due time is left out on purpose: a retried ``delay=`` enqueue is the same task.
        Eight raw bytes (not hex): it is stored in every task's hash.
        """
        fingerprint = self._fingerprint
        if fingerprint is None:
            o = self.options
            h = hashlib.blake2b((self.type + "\0").encode(), digest_size=8)
            h.update(self.payload)
            h.update(_DEFAULT_OPTIONS_DIGESTED if o is DEFAULT_OPTIONS else _digested(o))
            fingerprint = self._fingerprint = h.digest()
        return fingerprint

    def __repr__(self) -> str:
        return f"Task(type={self.type!r}, id={self.id!r}, payload=<{len(self.payload)} bytes>)"


def _options(
    type_: str,
    payload: bytes,
    *,
    retry: int,
    retry_delay: Seconds | None,
    delay: Seconds | None,
    process_at: datetime | None,
    timeout: Seconds | None,
    deadline: datetime | None,
    unique: Seconds | None,
    unique_key: str | None,
    retention: Seconds | None,
) -> _Options:
    """Validate a task's options (all but the defaults) into the units the scripts take."""
    if delay is not None and process_at is not None:
        raise InvalidArgument("give delay or process_at, not both")
    if unique_key is not None and unique is None:
        raise InvalidArgument("unique_key needs unique=<TTL>: a unique lock must expire")
    deadline_ms = 0 if deadline is None else check.epoch_ms(deadline, "deadline")
    process_at_ms = 0 if process_at is None else check.epoch_ms(process_at, "process_at")
    delay_ms = 0 if delay is None else check.duration_ms(delay, "delay", allow_zero=True)
    if deadline_ms:
        now_ms = datetime.now(UTC).timestamp() * 1000
        if deadline_ms <= now_ms:
            raise InvalidArgument("deadline has already passed; a task past its deadline never runs")
        if deadline_ms <= max(process_at_ms, now_ms + delay_ms):
            raise InvalidArgument("deadline must be later than the time the task is due to run")
    unique_ttl_ms = 0 if unique is None else check.duration_ms(unique, "unique")
    if unique is not None and unique_ttl_ms < 1000:
        raise InvalidArgument("unique TTL must be at least 1 second")
    if unique_key is not None:
        check.printable_text(unique_key, "unique_key", MAX_UNIQUE_KEY_BYTES)
    elif unique is not None:
        unique_key = type_ + ":" + hashlib.blake2b(payload, digest_size=16).hexdigest()
    return _Options(
        max_retry=check.count(retry, "retry", low=0, high=MAX_RETRY_LIMIT),
        retry_delay_ms=-1
        if retry_delay is None
        else check.duration_ms(retry_delay, "retry_delay", allow_zero=True),
        delay_ms=delay_ms,
        process_at_ms=process_at_ms,
        timeout_ms=0 if timeout is None else check.duration_ms(timeout, "timeout"),
        deadline_ms=deadline_ms,
        retention_ms=0 if retention is None else check.duration_ms(retention, "retention", allow_zero=True),
        unique_ttl_ms=unique_ttl_ms,
        unique_key=unique_key,
    )


def _digested(o: _Options) -> bytes:
    """The options' part of the fingerprint (stored in Redis: never change it)."""
    return (
        f"\0{o.max_retry}\0{o.retry_delay_ms}\0{o.timeout_ms}\0{o.deadline_ms}\0{o.retention_ms}"
        f"\0{o.unique_ttl_ms}\0{o.unique_key}".encode()
    )


# Most tasks take every default: they share one immutable _Options, digested once.
DEFAULT_OPTIONS = _Options(
    max_retry=DEFAULT_MAX_RETRY, retry_delay_ms=-1, delay_ms=0, process_at_ms=0, timeout_ms=0,
    deadline_ms=0, retention_ms=0, unique_ttl_ms=0, unique_key=None,
)  # fmt: skip
_DEFAULT_OPTIONS_DIGESTED = _digested(DEFAULT_OPTIONS)


def _random_id() -> str:
    """``uuid.uuid4().hex`` without building a UUID object (a third of the cost): 16 random
    bytes with the version (4) and variant (RFC 4122) bits set."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()


def _ms_to_datetime(ms: int | None) -> datetime | None:
    if not ms:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):  # out of datetime's range: a damaged field
        return None


# Not slots: enqueue builds one TaskInfo per task, and filling a frozen instance's __dict__
# (_enqueued_info below) costs a fifth of the generated __init__'s object.__setattr__ per field.
@dataclass(frozen=True, kw_only=True)
class TaskInfo:
    """A task as Redis holds it. Times are timezone-aware UTC datetimes from the server clock.

    Attributes:
        id, queue, type, payload: what was enqueued.
        state: where the task is now.
        retried: failed attempts so far; max_retry: how many retries it may have.
        last_error: the error text of the last failed attempt, if any.
        next_process_at: when a scheduled or retrying task is due, or an active lease expires.
    """

    id: str
    queue: str
    state: TaskState
    type: str = ""
    payload: bytes = field(default=b"", repr=False)
    retried: int = 0
    max_retry: int = 0
    recoveries: int = 0
    timeout: timedelta | None = None
    deadline: datetime | None = None
    retention: timedelta | None = None
    last_error: str | None = None
    created_at: datetime | None = None
    next_process_at: datetime | None = None
    last_failed_at: datetime | None = None
    finished_at: datetime | None = None
    unique_key: str | None = None

    @classmethod
    def from_hash(cls, task_id: str, queue: str, fields: dict[bytes, bytes], due_ms: int) -> TaskInfo:
        """Build from the task hash's raw fields (as read by the info script).

        The fields every task carries have one-letter names (``t`` type, ``p`` payload, ``s``
        state, ``r`` retried, ``m`` max_retry, ``c`` created, ``f`` fingerprint): the hash is
        most of a pending task's Redis memory (lua/README.md lists every field).
        """

        def text(name: bytes) -> str | None:
            raw = fields.get(name)
            return None if raw is None else raw.decode("utf-8", "replace")

        def number(name: bytes) -> int:
            raw = fields.get(name)
            try:
                return int(raw) if raw is not None else 0
            except ValueError:
                return 0

        timeout_ms, retention_ms = number(b"timeout"), number(b"retention")
        unique = text(b"unique")
        return cls(
            id=task_id,
            queue=queue,
            state=TaskState(text(b"s") or "pending"),
            type=text(b"t") or "",
            payload=fields.get(b"p", b""),
            retried=number(b"r"),
            max_retry=number(b"m"),
            recoveries=number(b"recoveries"),
            timeout=timedelta(milliseconds=timeout_ms) if timeout_ms else None,
            deadline=_ms_to_datetime(number(b"deadline")),
            retention=timedelta(milliseconds=retention_ms) if retention_ms else None,
            last_error=text(b"error"),
            created_at=_ms_to_datetime(number(b"c")),
            next_process_at=_ms_to_datetime(due_ms if due_ms > 0 else None),
            last_failed_at=_ms_to_datetime(number(b"failed_at")),
            finished_at=_ms_to_datetime(number(b"done_at")),
            unique_key=unique.split("}:u:", 1)[1] if unique and "}:u:" in unique else None,
        )


_INFO_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TaskInfo) if f.default is not MISSING}


def _enqueue_base(queue: str, now_ms: int) -> dict[str, Any]:
    """The fields shared by every TaskInfo of one enqueue call (the server time is per call)."""
    return {**_INFO_DEFAULTS, "queue": queue, "created_at": _ms_to_datetime(now_ms)}


def _enqueued_info(base: dict[str, Any], task: Task, state: TaskState, now_ms: int) -> TaskInfo:
    """The TaskInfo of a task just enqueued, from what the client sent (no read-back).

    Fills a new instance's __dict__ instead of calling the generated __init__ (five times
    slower, one object.__setattr__ per field): enqueue_many builds one per task.
    tests/unit/test_task_info.py checks the result equals the regular constructor's.
    """
    o = task.options
    info = object.__new__(TaskInfo)
    attrs = info.__dict__
    attrs.update(base)
    attrs["id"] = task.id
    attrs["state"] = state
    attrs["type"] = task.type
    attrs["payload"] = task.payload
    attrs["max_retry"] = o.max_retry
    attrs["unique_key"] = o.unique_key
    if o.timeout_ms:
        attrs["timeout"] = timedelta(milliseconds=o.timeout_ms)
    if o.deadline_ms:
        attrs["deadline"] = _ms_to_datetime(o.deadline_ms)
    if o.retention_ms:
        attrs["retention"] = timedelta(milliseconds=o.retention_ms)
    if state is TaskState.SCHEDULED:
        attrs["next_process_at"] = _ms_to_datetime(o.process_at_ms or now_ms + o.delay_ms)
    return info

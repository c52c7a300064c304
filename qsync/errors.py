"""The exceptions qsync raises, one tree under :class:`QsyncError`.

::

    QsyncError
    ├── InvalidArgument (also ValueError)       a bad value, caught before anything is sent
    │   ├── InvalidName                         a queue, prefix, task type, id or unique key
    │   └── PayloadTooLarge
    ├── InvalidArgumentType (also TypeError)    a value of the wrong type (e.g. str payload)
    ├── ConfigurationError                      the Redis server is unsafe or too old for qsync
    ├── ClientClosed                            the queue was closed
    ├── TaskError                               Redis refused an operation on a task
    │   ├── TaskIdConflict                      the id is taken by a task with other content
    │   ├── DuplicateTask                       a unique lock is held by another task
    │   ├── TaskNotFound
    │   ├── LeaseLost                           the lease was recovered or finished: no commit
    │   ├── CorruptState                        a qsync key holds another Redis type
    │   └── ScriptErrorTask                     an unknown reply code (a ScriptError as well)
    ├── RedisUnavailable                        Redis could not be reached or answered an error
    │   ├── NotApplied                          ... and the operation certainly did not happen
    │   │   └── NotEnqueued
    │   └── OutcomeUnknown                      ... and it may have happened (reply lost)
    │       └── EnqueueUncertain
    ├── ScriptError                             a qsync script failed: a bug, please report it
    └── HandlerError                            recorded as an attempt's error by the worker
        ├── UnknownTaskType                     no handler for the task's type
        ├── TaskTimeout                         the attempt ran past its timeout
        └── DeadlineExceeded                    the task's deadline passed

Redis-side refusals carry ``op`` (the operation), ``code`` (a :class:`Code`), ``queue`` and
``task_id``. Messages never contain payloads or credentials.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ClientClosed",
    "Code",
    "ConfigurationError",
    "DeadlineExceeded",
    "CorruptState",
    "DuplicateTask",
    "EnqueueUncertain",
    "HandlerError",
    "InvalidArgument",
    "InvalidArgumentType",
    "InvalidName",
    "LeaseLost",
    "NotApplied",
    "NotEnqueued",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "QsyncError",
    "RedisUnavailable",
    "ScriptError",
    "ScriptErrorTask",
    "TaskError",
    "TaskIdConflict",
    "TaskNotFound",
    "TaskTimeout",
    "UnknownTaskType",
    "raise_for",
]


class Code(IntEnum):
    """Reply codes of the Lua scripts (see each script's header and ``lua/README.md``)."""

    OK = 1
    EXISTS = 2
    CONFLICT = -1
    DUPLICATE = -2
    LEASE_LOST = -3
    NOT_FOUND = -4
    WRONG_TYPE = -5


class QsyncError(Exception):
    """Base class of every error qsync raises."""


class InvalidArgument(QsyncError, ValueError):
    """An argument has a bad value. Raised before anything is sent to Redis."""


class InvalidName(InvalidArgument):
    """A queue name, prefix, task type, task id or unique key is not allowed."""


class PayloadTooLarge(InvalidArgument):
    """A payload is larger than the queue's ``max_payload_bytes``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"payload is {size} bytes, over the limit of {limit} bytes; store large data elsewhere "
            "and enqueue a reference, or raise max_payload_bytes in qsync.new()"
        )
        self.size = size
        self.limit = limit


class InvalidArgumentType(QsyncError, TypeError):
    """An argument has the wrong type. Raised before anything is sent to Redis."""


class ConfigurationError(QsyncError):
    """The Redis server is configured in a way that can lose tasks, or is too old."""


class ClientClosed(QsyncError):
    """The queue was closed; create a new one with qsync.new()."""


class TaskError(QsyncError):
    """Redis refused an operation on a task. Carries the operation, code, queue and id."""

    code: Code = Code.NOT_FOUND

    def __init__(self, message: str, *, op: str, queue: str, task_id: str | None = None) -> None:
        super().__init__(message)
        self.op = op
        self.queue = queue
        self.task_id = task_id


class TaskIdConflict(TaskError):
    """The task id is already used by a task with a different type, payload or options."""

    code = Code.CONFLICT


class DuplicateTask(TaskError):
    """A unique lock for this task is held by another live task (``owner_id``)."""

    code = Code.DUPLICATE

    def __init__(self, message: str, *, op: str, queue: str, task_id: str | None, owner_id: str) -> None:
        super().__init__(message, op=op, queue=queue, task_id=task_id)
        self.owner_id = owner_id


class TaskNotFound(TaskError):
    """No task with this id exists in the queue (never enqueued, or finished and deleted)."""

    code = Code.NOT_FOUND


class LeaseLost(TaskError):
    """The lease token is no longer current: the task was recovered, finished or deleted."""

    code = Code.LEASE_LOST


class CorruptState(TaskError):
    """A qsync key holds another Redis type than qsync writes there; nothing was changed."""

    code = Code.WRONG_TYPE


class RedisUnavailable(QsyncError):
    """Redis could not be reached, or answered an error, for operation ``op``."""

    def __init__(self, message: str, *, op: str) -> None:
        super().__init__(message)
        self.op = op


class NotApplied(RedisUnavailable):
    """The operation certainly did not happen (connection refused, OOM, READONLY, BUSY, ...)."""


class OutcomeUnknown(RedisUnavailable):
    """The operation may or may not have happened (e.g. the reply was lost)."""


class NotEnqueued(NotApplied):
    """The enqueue certainly did not happen; it is safe to retry or to report failure."""


class EnqueueUncertain(OutcomeUnknown):
    """The enqueue may have happened. Retrying with the same task ids is safe: enqueue is
    idempotent by id, so a retry never doubles a task."""


class ScriptError(QsyncError):
    """A qsync Lua script failed in a way it is written never to: please report it."""


class ScriptErrorTask(TaskError, ScriptError):
    """A script answered a code qsync does not know (a version mismatch or a bug)."""


_CODE_ERRORS: dict[int, type[TaskError]] = {
    Code.CONFLICT: TaskIdConflict,
    Code.LEASE_LOST: LeaseLost,
    Code.NOT_FOUND: TaskNotFound,
    Code.WRONG_TYPE: CorruptState,
}

_MESSAGES: dict[int, str] = {
    Code.CONFLICT: "task id {id!r} is already used by a task with another type, payload or options",
    Code.LEASE_LOST: "lease on task {id!r} is lost (recovered, finished or deleted); nothing was changed",
    Code.NOT_FOUND: "task {id!r} was not found",
    Code.WRONG_TYPE: "key {detail!r} holds another Redis type than qsync expects; nothing was changed",
    Code.DUPLICATE: "a unique lock for task {id!r} is held by task {detail!r}; it can be enqueued again "
    "when that task finishes or the lock's TTL ends",
}


def error_for(code: int, *, op: str, queue: str, task_id: str | None, detail: str = "") -> TaskError:
    """The exception for a negative script reply code (one place maps codes to errors)."""
    message = f"{op} on queue {queue!r}: " + _MESSAGES.get(code, "refused with code {code}").format(
        id=task_id, detail=detail, code=code
    )
    if code == Code.DUPLICATE:
        return DuplicateTask(message, op=op, queue=queue, task_id=task_id, owner_id=detail)
    cls = _CODE_ERRORS.get(code)
    if cls is None:
        return ScriptErrorTask(message, op=op, queue=queue, task_id=task_id)
    return cls(message, op=op, queue=queue, task_id=task_id)


def raise_for(code: int, *, op: str, queue: str, task_id: str | None, detail: str = "") -> None:
    """Raise the exception for a negative script reply code; do nothing for a success code."""
    if code < 0:
        raise error_for(code, op=op, queue=queue, task_id=task_id, detail=detail)


class HandlerError(QsyncError):
    """Base of the errors the worker records as an attempt's failure (never raised to you)."""


class UnknownTaskType(HandlerError):
    """No handler is registered for the task's type. The attempt fails and follows the task's
    retry policy (a rolling deploy may add the handler), then the task is archived."""


class TaskTimeout(HandlerError):
    """The attempt ran past the task's timeout and was cancelled."""


class DeadlineExceeded(HandlerError):
    """The task's deadline passed; it is archived and never started again."""

"""Queue: the sync client. Each method builds its calls with the shared core
(:mod:`qsync._base`, :mod:`qsync._ops`) and only runs their I/O.

GENERATED from ``qsync/aio.py`` by ``.ci/unasync.py``: do not edit; edit aio.py and run
``make unasync``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import redis

from . import _ops
from . import _validate as check
from ._base import DEFAULT_MAX_PAYLOAD, DEFAULT_QUEUE, QueueBase
from ._keys import validate_name
from ._ops import Call, Failure, HasLease, LeaseBatch, PromoteResult, RecoverResult, TrimResult
from ._protocol import only_result
from ._transport import SyncTransport
from .errors import QsyncError
from .server.api import SyncServing
from .task import MAX_ID_BYTES, Seconds, Task, TaskInfo, TaskState

__all__ = ["Queue"]

T = TypeVar("T")


class Queue(QueueBase, SyncServing):
    """A task queue on Redis, for threads and plain scripts. Create it with ``qsync.new(client)``.

    Args:
        client: a ``redis.Redis`` or ``redis.RedisCluster``. qsync borrows its
            connections and never closes it; the client's retry setting does not apply to
            qsync's scripts (they are never re-sent blindly).
        prefix: the first part of every key's hash tag, so apps can share a Redis.
        max_payload_bytes: the largest payload accepted (default 1 MiB, at most 64 MiB).
        check_server: on first use, refuse a Redis older than 7.0 or one that may evict keys
            (maxmemory-policy other than noeviction). Pass False to skip the check.
    """

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        *,
        prefix: str = "qsync",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
        check_server: bool = True,
    ) -> None:
        super().__init__(prefix=prefix, max_payload_bytes=max_payload_bytes, check_server=check_server)
        self.client = client
        self._transport = SyncTransport(client)

    def run_calls(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Run prepared calls in one round trip per node; a result or QsyncError for each.
        The worker server uses this to pipeline heartbeats and sweeps across queues."""
        self._check_open()
        if not self._server_checked:
            refused = self._apply_server_check(self._transport.run(self._server_check_calls()), calls)
            if refused is not None:
                return refused
        return self._transport.run(calls)

    def _one(self, call: Call[T]) -> T:
        return only_result(self.run_calls([call]))  # type: ignore[no-any-return]

    def enqueue(self, task: Task, *, queue: str = DEFAULT_QUEUE) -> TaskInfo:
        """Put one task on ``queue``.

        Returns the task's TaskInfo (state PENDING or SCHEDULED). Enqueueing the same task id
        again with the same content returns the existing task's info (a safe client retry).

        Raises:
            InvalidArgument, InvalidArgumentType: a bad argument (nothing was sent).
            TaskIdConflict: the id is taken by a task with other content.
            DuplicateTask: the task's unique lock is held by another task.
            NotEnqueued: Redis refused or could not be reached; the task was not enqueued.
            EnqueueUncertain: the reply was lost; enqueue again (idempotent by id).
        """
        plan = self._prepare_enqueue_one(task, queue)
        return only_result(self._finish_enqueue(plan, self.run_calls(plan.calls)))  # type: ignore[no-any-return]

    def enqueue_many(
        self, tasks: Iterable[Task], *, queue: str = DEFAULT_QUEUE
    ) -> list[TaskInfo | QsyncError]:
        """Put many tasks on ``queue`` in one round trip (script calls of 250 tasks, pipelined).

        Returns one item per task, in order: its TaskInfo, or the QsyncError that refused it
        (TaskIdConflict, DuplicateTask, NotEnqueued, EnqueueUncertain, ...). Items are
        independent: one refusal does not stop the others.

        Raises:
            InvalidArgument, InvalidArgumentType: a bad task in the list (nothing was sent).
        """
        plan = self._prepare_enqueue(tasks, queue)
        if not plan.batch:
            return []
        return self._finish_enqueue(plan, self.run_calls(plan.calls))

    def info(self, task_id: str, *, queue: str = DEFAULT_QUEUE) -> TaskInfo:
        """Read a task's current state.

        Raises:
            TaskNotFound: no such task (never enqueued, or finished and not retained).
        """
        return self._one(_ops.info(self.keys(queue), validate_name(task_id, "task_id", MAX_ID_BYTES)))

    def pause(self, queue: str) -> None:
        """Pause ``queue``: workers lease nothing from it until :meth:`resume`."""
        self._one(_ops.pause(self.keys(queue), True))

    def resume(self, queue: str) -> None:
        """Resume a paused queue."""
        self._one(_ops.pause(self.keys(queue), False))

    def lease(self, queue: str, *, count: int = 1, lease_duration: Seconds = 30.0) -> LeaseBatch:
        """Lease up to ``count`` ready tasks (worker API). The call's tasks share its fresh token,
        which ack, fail, extend and requeue must present with the task id; a lease expires after
        lease_duration unless extended, and is then recovered by :meth:`recover`."""
        return self._one(self._lease_call(queue, count, lease_duration))

    def extend(self, queue: str, leases: Sequence[HasLease], *, lease_duration: Seconds = 30.0) -> list[bool]:
        """Extend held leases to now + lease_duration (heartbeat); False where a lease was lost."""
        ms = check.duration_ms(lease_duration, "lease_duration")
        return self._one(_ops.extend(self.keys(queue), self._leases(leases), ms))

    def ack(self, queue: str, leases: Sequence[HasLease]) -> list[bool]:
        """Finish tasks that succeeded; False where the lease was lost (nothing written)."""
        return self._one(_ops.ack(self.keys(queue), self._leases(leases)))

    def fail(self, queue: str, failures: Sequence[Failure]) -> list[TaskState | None]:
        """Record failed attempts: each task goes to RETRY (after its delay) or ARCHIVED (no
        retries left, SkipRetry, or past its deadline); None where the lease was lost."""
        return self._one(self._fail_call(queue, failures))

    def requeue(self, queue: str, leases: Sequence[HasLease]) -> list[bool]:
        """Hand leased tasks back to the front of the queue without counting an attempt."""
        return self._one(_ops.requeue(self.keys(queue), self._leases(leases)))

    def promote(self, queue: str, *, limit: int = 1000) -> PromoteResult:
        """Move due scheduled and retrying tasks to pending (server clock; safe to race)."""
        return self._one(_ops.promote(self.keys(queue), check.count(limit, "limit", low=1, high=10_000)))

    def recover(
        self, queue: str, *, limit: int = 1000, max_recoveries: int = 5, retry_delay: Seconds = 0
    ) -> RecoverResult:
        """Reclaim expired leases as failed attempts (safe to race); a task recovered
        max_recoveries times is archived as poison."""
        return self._one(self._recover_call(queue, limit, max_recoveries, retry_delay))

    def trim(
        self,
        queue: str,
        *,
        limit: int = 1000,
        archived_max_age: Seconds = 90 * 24 * 3600,
        archived_max_count: int = 10_000,
    ) -> TrimResult:
        """Forget completed tasks past their retention and archived tasks past age or count."""
        return self._one(self._trim_call(queue, limit, archived_max_age, archived_max_count))

    def close(self) -> None:
        """Stop using this queue and give its idle connection back to the client's pool. The
        Redis client stays open: it belongs to the caller. A queue dropped without close()
        gives it back when it is garbage-collected."""
        self._closed = True
        self._transport.close()

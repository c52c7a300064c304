"""What the sync :class:`~qsync.Queue` and the async :class:`~qsync.AsyncQueue` share: argument
checks and the building of calls. No I/O here (the httpx ``BaseClient`` idea)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from . import _ops
from . import _validate as check
from ._keys import QueueKeys, keys_for, registry_key, validate_prefix
from ._ops import Call, Failure, HasLease
from ._protocol import not_applied
from .errors import (
    ClientClosed,
    ConfigurationError,
    InvalidArgument,
    InvalidArgumentType,
    NotApplied,
    PayloadTooLarge,
    QsyncError,
)
from .task import Seconds, Task, TaskInfo, TaskState

__all__ = ["DEFAULT_QUEUE", "QueueBase"]

DEFAULT_QUEUE = "default"
DEFAULT_MAX_PAYLOAD = 1024 * 1024
HARD_MAX_PAYLOAD = 64 * 1024 * 1024
MIN_REDIS = (7, 0)


class _Enqueue(NamedTuple):
    queue: str
    batch: list[Task]
    calls: list[Call[Any]]
    register: bool


class QueueBase:
    """Configuration and call building shared by both queue classes."""

    def __init__(self, *, prefix: str, max_payload_bytes: int, check_server: bool) -> None:
        self.prefix: str = validate_prefix(prefix)
        self.max_payload_bytes: int = check.count(
            max_payload_bytes, "max_payload_bytes", low=1, high=HARD_MAX_PAYLOAD
        )
        if not isinstance(check_server, bool):
            raise InvalidArgumentType("check_server must be a bool")
        self._server_checked = not check_server
        self._registered: set[str] = set()
        self._closed = False

    def keys(self, queue: str) -> QueueKeys:
        """The Redis keys of ``queue`` (validates the name)."""
        return keys_for(self.prefix, queue)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosed("this queue was closed; create a new one with qsync.new()")

    def _prepare_enqueue(self, tasks: Iterable[Task], queue: str) -> _Enqueue:
        keys = self.keys(queue)
        if isinstance(tasks, Task):
            raise InvalidArgumentType("enqueue_many takes a list of tasks; use enqueue() for one task")
        try:
            batch = list(tasks)
        except TypeError:
            raise InvalidArgumentType(
                f"enqueue_many takes a list of tasks, not {type(tasks).__name__}"
            ) from None
        for task in batch:
            if not isinstance(task, Task):
                raise InvalidArgumentType(f"expected qsync.Task, got {type(task).__name__}")
            self._check_payload(task)
        return self._enqueue_plan(keys, batch)

    def _prepare_enqueue_one(self, task: Task, queue: str) -> _Enqueue:
        if not isinstance(task, Task):
            raise InvalidArgumentType(f"enqueue takes a qsync.Task, not {type(task).__name__}")
        keys = self.keys(queue)
        self._check_payload(task)
        return self._enqueue_plan(keys, [task])

    def _check_payload(self, task: Task) -> None:
        if len(task.payload) > self.max_payload_bytes:
            raise PayloadTooLarge(len(task.payload), self.max_payload_bytes)

    def _enqueue_plan(self, keys: QueueKeys, batch: list[Task]) -> _Enqueue:
        queue = keys.queue
        register = queue not in self._registered
        calls: list[Call[Any]] = [_ops.register_queue(self.prefix, queue)] if register else []
        calls += _ops.enqueue_many(keys, batch)
        return _Enqueue(queue, batch, calls, register)

    def _finish_enqueue(self, plan: _Enqueue, results: list[Any]) -> list[TaskInfo | QsyncError]:
        if plan.register:
            # The queue index is best effort: on failure it is tried again on the next enqueue.
            if results[0] is None:
                self._registered.add(plan.queue)
            results = results[1:]
        if len(results) == 1 and isinstance(results[0], list):
            return results[0]  # one script call answered task by task (every single enqueue)
        out: list[TaskInfo | QsyncError] = []
        for index, chunk in enumerate(results):
            size = min(_ops.ENQUEUE_CHUNK, len(plan.batch) - index * _ops.ENQUEUE_CHUNK)
            out += chunk if isinstance(chunk, list) else [chunk] * size
        return out

    def _server_check_calls(self) -> list[Call[Any]]:
        key = registry_key(self.prefix, "queues")
        return [
            Call("server check", "", (key,), ("INFO", "server"), _parse_info),
            Call("server check", "", (key,), ("INFO", "memory"), _parse_info),
        ]

    def _apply_server_check(self, results: list[Any], calls: Sequence[Call[Any]]) -> list[Any] | None:
        """Judge the server from the check's results. Returns None when the calls may go on,
        or their results when Redis could not even be asked: each call then fails as surely
        not applied (an enqueue with NotEnqueued), as it would have on its own. Raises
        ConfigurationError for an unsafe server."""
        for r in results:
            if isinstance(r, NotApplied):
                return [not_applied(call, str(r).removeprefix("server check: ")) for call in calls]
            if isinstance(r, QsyncError):
                raise r
        server, memory = results
        version = tuple(int(p) for p in server.get("redis_version", "0.0").split(".")[:2] if p.isdigit())
        if version < MIN_REDIS:
            raise ConfigurationError(
                f"qsync needs Redis >= 7.0, the server runs {server.get('redis_version', 'unknown')}; "
                "upgrade Redis, or pass check_server=False to qsync.new() at your own risk"
            )
        policy = memory.get("maxmemory_policy", "noeviction")
        if policy != "noeviction":
            raise ConfigurationError(
                f"Redis maxmemory-policy is {policy!r}: Redis may evict tasks, leases or unique locks. "
                "Set 'CONFIG SET maxmemory-policy noeviction', or pass check_server=False to qsync.new() "
                "if you accept losing tasks"
            )
        self._server_checked = True
        return None

    def _lease_call(self, queue: str, count: int, lease_duration: Seconds) -> Call[_ops.LeaseBatch]:
        n = check.count(count, "count", low=1, high=_ops.MAX_LEASE_BATCH)
        return _ops.lease(self.keys(queue), n, check.duration_ms(lease_duration, "lease_duration"))

    def _fail_call(self, queue: str, failures: Sequence[Failure]) -> Call[list[TaskState | None]]:
        checked = _leases(failures, Failure)
        for f in checked:
            if not isinstance(f.error, str):
                raise InvalidArgumentType(f"Failure.error must be a str, not {type(f.error).__name__}")
            if f.retry_delay_ms is not None:
                check.count(f.retry_delay_ms, "Failure.retry_delay_ms", low=0, high=check.MAX_DURATION_MS)
        return _ops.fail(self.keys(queue), checked)

    def _leases(self, leases: Sequence[HasLease]) -> Sequence[HasLease]:
        return _leases(leases, None)

    def _recover_call(
        self, queue: str, limit: int, max_recoveries: int, retry_delay: Seconds
    ) -> Call[_ops.RecoverResult]:
        return _ops.recover(
            self.keys(queue),
            check.count(limit, "limit", low=1, high=_ops.MAX_SWEEP_BATCH),
            check.count(max_recoveries, "max_recoveries", low=1, high=1_000_000),
            check.duration_ms(retry_delay, "retry_delay", allow_zero=True),
        )

    def _trim_call(
        self, queue: str, limit: int, archived_max_age: Seconds, archived_max_count: int
    ) -> Call[_ops.TrimResult]:
        return _ops.trim(
            self.keys(queue),
            check.count(limit, "limit", low=1, high=_ops.MAX_SWEEP_BATCH),
            check.duration_ms(archived_max_age, "archived_max_age"),
            check.count(archived_max_count, "archived_max_count", low=0, high=10**9),
        )


def _leases(items: Sequence[Any], kind: type | None) -> Sequence[Any]:
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise InvalidArgumentType("pass a list of leases (objects with .id and .token)")
    for item in items:
        if kind is not None and not isinstance(item, kind):
            raise InvalidArgumentType(f"expected {kind.__name__}, got {type(item).__name__}")
        if not isinstance(getattr(item, "id", None), str) or not isinstance(
            getattr(item, "token", None), str
        ):
            raise InvalidArgumentType("each lease needs str attributes .id and .token")
        if not (item.id.isprintable() and item.token.isprintable()):
            raise InvalidArgument("a lease's .id and .token must be printable text, as lease() returns them")
    return items


def _parse_info(reply: Any) -> dict[str, str]:
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            name, _, value = line.partition(":")
            out[name.strip()] = value.strip()
    return out

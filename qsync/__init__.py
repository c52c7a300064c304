"""qsync: a Redis task queue with atomic Lua transitions, fenced leases and at-least-once
delivery. Start with :func:`new`."""

from __future__ import annotations

from typing import Any, overload

import redis
import redis.asyncio as aioredis

from . import backoff, errors
from ._base import DEFAULT_MAX_PAYLOAD
from ._ops import Failure, Lease, LeaseBatch, LeasedTask, PromoteResult, RecoverResult, TrimResult
from .aio import AsyncQueue
from .client import Queue
from .context import Context
from .control import RetryAt, RetryIn, SkipRetry
from .errors import InvalidArgumentType
from .mux import Mux
from .server import ServerConfig
from .task import Task, TaskInfo, TaskState

__all__ = [
    "AsyncQueue",
    "Context",
    "Failure",
    "Lease",
    "LeaseBatch",
    "LeasedTask",
    "Mux",
    "PromoteResult",
    "Queue",
    "RecoverResult",
    "RetryAt",
    "RetryIn",
    "ServerConfig",
    "SkipRetry",
    "Task",
    "TaskInfo",
    "TaskState",
    "TrimResult",
    "backoff",
    "errors",
    "new",
]

__version__ = "0.1.0"


@overload
def new(
    client: redis.Redis | redis.RedisCluster,
    *,
    prefix: str = ...,
    max_payload_bytes: int = ...,
    check_server: bool = ...,
) -> Queue: ...
@overload
def new(
    client: aioredis.Redis | aioredis.RedisCluster,
    *,
    prefix: str = ...,
    max_payload_bytes: int = ...,
    check_server: bool = ...,
) -> AsyncQueue: ...
def new(
    client: Any,
    *,
    prefix: str = "qsync",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    check_server: bool = True,
) -> Queue | AsyncQueue:
    """A queue on ``client``: a sync :class:`Queue` for ``redis.Redis`` / ``redis.RedisCluster``,
    an :class:`AsyncQueue` for their ``redis.asyncio`` twins.

    Args:
        client: the Redis client to borrow connections from (qsync never closes it).
        prefix: namespaces every key, so several apps can share one Redis.
        max_payload_bytes: the largest payload accepted (default 1 MiB).
        check_server: on first use, refuse Redis < 7.0 and eviction policies that can drop
            tasks; False skips the check.

    Raises:
        InvalidArgumentType: ``client`` is not a redis-py client.
        InvalidName: ``prefix`` is empty or contains braces or whitespace.
    """
    options: dict[str, Any] = {
        "prefix": prefix,
        "max_payload_bytes": max_payload_bytes,
        "check_server": check_server,
    }
    if isinstance(client, aioredis.Redis | aioredis.RedisCluster):
        return AsyncQueue(client, **options)
    if isinstance(client, redis.Redis | redis.RedisCluster):
        return Queue(client, **options)
    raise InvalidArgumentType(
        f"qsync.new() takes a redis.Redis, redis.RedisCluster or their redis.asyncio twins, "
        f"not {type(client).__name__}"
    )

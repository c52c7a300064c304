"""ServerConfig: every worker server option, validated once, with the fast test profile."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .. import _validate as check
from .._keys import MAX_QUEUE_NAME, validate_name
from ..backoff import Backoff, exponential
from ..errors import InvalidArgument, InvalidArgumentType

__all__ = ["ServerConfig", "parse_queues"]


def parse_queues(value: str | Sequence[str] | Mapping[str, int]) -> dict[str, int]:
    """Queues and weights from ``{"a": 6}``, ``["a", "b"]`` (weight 1) or ``"a=6,b=3"``."""
    if isinstance(value, str):
        pairs: dict[str, int] = {}
        for part in value.split(","):
            label, _, number = part.strip().partition("=")
            if not (number.strip().isascii() and number.strip().isdigit()):
                raise InvalidArgument(f"queues must look like 'critical=6,default=3', got {value!r}")
            pairs[label.strip()] = int(number)
        return parse_queues(pairs)
    if not isinstance(value, Mapping):
        if not isinstance(value, Sequence):
            raise InvalidArgumentType(
                "queues must be a dict of name -> weight, a list of names, or 'a=6,b=3'"
            )
        value = dict.fromkeys(value, 1)
    if not value:
        raise InvalidArgument("give at least one queue")
    out: dict[str, int] = {}
    for name, weight in dict(value).items():
        validate_name(name, "queue name", MAX_QUEUE_NAME)
        out[name] = check.count(weight, f"weight of queue {name!r}", low=1, high=1000)
    return out


@dataclass(slots=True, kw_only=True)
class ServerConfig:
    """Options of a worker server (all durations in seconds).

    Attributes:
        queues: queue name -> weight. Each queue gets leases in proportion to its weight
            while all are busy; with ``strict`` higher weights are always drained first.
        concurrency: how many tasks run at once in this process.
        lease_duration: how long a lease lasts without a heartbeat; heartbeats extend it every
            ``lease_duration / 3``. A crashed worker's tasks come back after at most this long.
        default_timeout: the timeout of a task enqueued without one (30 minutes).
        shutdown_timeout: on stop, how long running tasks may finish before they are handed
            back to their queue (without counting an attempt).
        retry_policy: the delay before a retry for tasks without their own retry_delay.
        should_retry: a predicate on the error; False archives the task at once.
        max_recoveries: a task whose lease expired this many times is archived as poison.
        poll_interval: the longest an idle server waits before looking again (new tasks wake
            it at once; this bounds the delay of scheduled tasks and of missed wake-ups).
        recover_interval: how often expired leases are looked for.
        archived_max_age / archived_max_count: how long and how many archived tasks are kept.
    """

    queues: dict[str, int] = field(default_factory=lambda: {"default": 1})
    concurrency: int = 10
    strict: bool = False
    lease_duration: float = 30.0
    default_timeout: float = 1800.0
    shutdown_timeout: float = 8.0
    retry_policy: Backoff = field(default_factory=exponential)
    should_retry: Callable[[BaseException], bool] | None = None
    max_recoveries: int = 5
    poll_interval: float = 1.0
    recover_interval: float | None = None
    registry_interval: float = 5.0
    archived_max_age: float = 90 * 24 * 3600.0
    archived_max_count: int = 10_000

    def __post_init__(self) -> None:
        self.queues = parse_queues(self.queues)
        self.concurrency = check.count(self.concurrency, "concurrency", low=1, high=100_000)
        if not isinstance(self.strict, bool):
            raise InvalidArgumentType("strict must be a bool")
        for name in (
            "lease_duration",
            "default_timeout",
            "poll_interval",
            "registry_interval",
            "archived_max_age",
        ):
            setattr(self, name, check.duration_ms(getattr(self, name), name) / 1000)
        self.shutdown_timeout = (
            check.duration_ms(self.shutdown_timeout, "shutdown_timeout", allow_zero=True) / 1000
        )
        if self.lease_duration < 0.05:
            raise InvalidArgument("lease_duration must be at least 0.05 seconds")
        if self.recover_interval is None:
            self.recover_interval = min(5.0, self.lease_duration / 2)
        self.recover_interval = check.duration_ms(self.recover_interval, "recover_interval") / 1000
        self.max_recoveries = check.count(self.max_recoveries, "max_recoveries", low=1, high=1_000_000)
        self.archived_max_count = check.count(
            self.archived_max_count, "archived_max_count", low=0, high=10**9
        )
        if not callable(self.retry_policy):
            raise InvalidArgumentType("retry_policy must be callable: (retried, error) -> seconds")
        if self.should_retry is not None and not callable(self.should_retry):
            raise InvalidArgumentType("should_retry must be callable: (error) -> bool")

    @property
    def heartbeat_interval(self) -> float:
        """How often running tasks' leases are extended."""
        return self.lease_duration / 3

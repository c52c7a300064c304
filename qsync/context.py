"""Context: what a running handler can know about its attempt, and how it learns to stop."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

__all__ = ["Context"]


class Context:
    """Passed to every handler with its task.

    Attributes:
        task_id: the task's id.
        queue: the queue it was leased from.
        deadline: when this attempt will be cancelled (the earlier of start + timeout and the
            task's deadline), as a timezone-aware UTC datetime (a property).
    """

    __slots__ = (
        "_cancelled",
        "_deadline_monotonic",
        "_deadline_wall",
        "_event",
        "_lease_expiry",
        "_reason",
        "queue",
        "task_id",
    )

    def __init__(self, task_id: str, queue: str, timeout_s: float) -> None:
        self.task_id = task_id
        self.queue = queue
        self._deadline_monotonic = time.monotonic() + timeout_s
        self._deadline_wall = time.time() + timeout_s
        self._lease_expiry = 0.0
        self._cancelled = False
        # Made only for a handler that waits on it: most attempts never need a threading.Event.
        self._event: threading.Event | None = None
        self._reason = ""

    @classmethod
    def _attempt(
        cls, task_id: str, queue: str, deadline_monotonic: float, deadline_wall: float, lease_expiry: float
    ) -> Context:
        """The worker's constructor: the clocks are read once per lease reply, not per task."""
        self = object.__new__(cls)
        self.task_id = task_id
        self.queue = queue
        self._deadline_monotonic = deadline_monotonic
        self._deadline_wall = deadline_wall
        self._lease_expiry = lease_expiry
        self._cancelled = False
        self._event = None
        self._reason = ""
        return self

    @property
    def deadline(self) -> datetime:
        """When this attempt will be cancelled, as a timezone-aware UTC datetime."""
        return datetime.fromtimestamp(self._deadline_wall, UTC)

    def remaining(self) -> float:
        """Seconds left before this attempt is cancelled (never negative)."""
        return max(0.0, self._deadline_monotonic - time.monotonic())

    def lease_remaining(self) -> float:
        """Seconds left on the lease (the worker's heartbeat keeps extending it)."""
        return max(0.0, self._lease_expiry - time.monotonic())

    def is_cancelled(self) -> bool:
        """True once the attempt must stop (timeout, deadline, lost lease or shutdown). A sync
        handler should poll this in long loops: a thread cannot be interrupted from outside."""
        return self._cancelled

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block up to ``timeout`` seconds until cancelled (a sync handler's interruptible sleep)."""
        with _EVENT_LOCK:
            if self._event is None:
                self._event = threading.Event()
                if self._cancelled:
                    self._event.set()
            event = self._event
        return event.wait(timeout)

    @property
    def cancel_reason(self) -> str:
        """Why the attempt was cancelled ("" while it runs)."""
        return self._reason

    def _cancel(self, reason: str) -> None:
        with _EVENT_LOCK:
            if self._cancelled:
                return
            self._reason = reason
            self._cancelled = True
            if self._event is not None:
                self._event.set()


# Guards the lazy creation of a context's event against a concurrent cancel (handler thread
# vs event loop); taken only when a handler waits or an attempt is cancelled.
_EVENT_LOCK = threading.Lock()

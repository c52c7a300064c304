"""Exceptions a handler raises to steer what happens to its task (control flow, not errors)."""

from __future__ import annotations

from datetime import datetime

from . import _validate as check
from .task import Seconds

__all__ = ["RetryAt", "RetryIn", "SkipRetry"]


class SkipRetry(Exception):
    """Raise in a handler to archive the task now, whatever retries it has left.

    The message becomes the task's last error: ``raise qsync.SkipRetry("invalid address")``.
    """


class RetryIn(Exception):
    """Raise in a handler to fail this attempt and run the next one after ``seconds``.

    Counts as a failed attempt (the task is archived when it has no retries left).
    """

    def __init__(self, seconds: Seconds, reason: str = "") -> None:
        super().__init__(reason or f"retry in {seconds} s requested by the handler")
        self.delay_ms = check.duration_ms(seconds, "RetryIn seconds", allow_zero=True)

    def __repr__(self) -> str:
        return f"<RetryIn {self.delay_ms / 1000:.3f}s>"


class RetryAt(Exception):
    """Raise in a handler to fail this attempt and run the next one at ``when`` (a
    timezone-aware datetime; a past time means now). Counts as a failed attempt."""

    def __init__(self, when: datetime, reason: str = "") -> None:
        super().__init__(reason or f"retry at {when.isoformat()} requested by the handler")
        self.at_ms = check.epoch_ms(when, "RetryAt when")

    def __repr__(self) -> str:
        return f"<RetryAt {self.at_ms}>"

"""The jobs a server is running: one entry per held lease, from lease to confirmed commit."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .._ops import LeasedTask
from ..context import Context

__all__ = ["SUCCEEDED", "Job", "Outcome"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to commit: ack (``error is None``) or fail with a delay (None: archive now)."""

    error: str | None = None
    retry_delay_ms: int | None = None


SUCCEEDED = Outcome()
"""The outcome of every attempt that succeeded (one shared, immutable instance)."""


@dataclass(slots=True, eq=False)
class Job:
    """A leased task while this server holds it. It keeps its concurrency slot, and its lease
    keeps being extended, until its outcome is committed or its lease is lost."""

    task: LeasedTask
    ctx: Context
    timeout_s: float
    deadline_first: bool
    lease_expiry: float  # local monotonic time by which the lease surely ends unless extended
    runner: asyncio.Task[None] | None = None
    outcome: Outcome | None = None
    abandoned: str = ""  # why the result is no longer ours to commit (lost lease, shutdown)
    timed_out: bool = False  # the attempt's timeout (or the task's deadline) cancelled it
    commit_attempts: int = field(default=0)
    started: bool = False  # the runner has taken its first step (only then may it be cancelled)
    timeout_tick: int = 0  # the processor's timeout bucket holding this job

    @property
    def id(self) -> str:
        """The task id (with :attr:`token`, this is the lease the scripts check)."""
        return self.task.id

    @property
    def token(self) -> str:
        """The lease token."""
        return self.task.token

    def abandon(self, reason: str) -> None:
        """Give the task up: tell the handler (ctx) and cancel it if it still runs."""
        if self.abandoned:
            return
        self.abandoned = reason
        self.ctx._cancel(reason)
        if self.started and self.runner is not None and not self.runner.done():
            self.runner.cancel()  # (a runner not yet started sees ``abandoned`` as it starts)

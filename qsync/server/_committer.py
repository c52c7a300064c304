"""Committer: sends the outcomes of finished jobs (ack or fail) in batches.

Outcomes that arrive in the same event-loop tick go out together, as one ack and one fail
call per queue, pipelined in one round trip. While one batch is in flight the next gathers.
A batch that Redis did not take is sent again after a short backoff, until the job's lease
is surely over (then the recoverer owns the task). A job keeps its slot until then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _ops
from .._ops import Call, Failure
from ..errors import QsyncError
from ._jobs import Job

if TYPE_CHECKING:
    from ..aio import AsyncQueue

__all__ = ["Committer"]

log = logging.getLogger("qsync.server")


class Committer:
    """Batches and sends job outcomes; calls ``done(job, committed)`` when a job is settled."""

    def __init__(self, queue: AsyncQueue, done: Callable[[Job, bool], None]) -> None:
        self._queue = queue
        self._done = done
        self._waiting: list[Job] = []
        self._scheduled = False
        self._flushing: asyncio.Task[None] | None = None
        self._backoff = 0.0

    def submit(self, job: Job) -> None:
        """Queue a job whose outcome is set; it is sent with the next batch."""
        self._waiting.append(job)
        if not self._scheduled and (self._flushing is None or self._flushing.done()):
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    @property
    def idle(self) -> bool:
        """True when nothing is waiting or in flight."""
        return not self._waiting and (self._flushing is None or self._flushing.done())

    async def drain(self, timeout: float) -> None:
        """Wait until everything submitted is settled, or ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while not self.idle and time.monotonic() < end:
            if self._flushing is not None and not self._flushing.done():
                await asyncio.wait([self._flushing], timeout=max(0.0, end - time.monotonic()))
            elif self._waiting:
                self._start_flush()
            else:
                await asyncio.sleep(0.01)

    def _start_flush(self) -> None:
        self._scheduled = False
        if self._waiting and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._waiting:
            if self._backoff:
                await asyncio.sleep(self._backoff)
            batch, self._waiting = self._waiting, []
            plan = _plan(self._queue, batch)
            try:
                results = await self._queue.run_calls([call for call, _ in plan])
            except QsyncError as exc:  # e.g. the server check failed; keep the jobs
                results = [exc] * len(plan)
            retry: list[Job] = []
            for (_, jobs), result in zip(plan, results, strict=True):
                if isinstance(result, QsyncError):
                    retry += self._keep_or_drop(jobs, result)
                else:
                    for job, committed in zip(jobs, result, strict=True):
                        self._done(job, bool(committed))
            self._backoff = min(1.0, self._backoff * 2 or 0.05) if retry else 0.0
            self._waiting = retry + self._waiting

    def _keep_or_drop(self, jobs: list[Job], error: QsyncError) -> list[Job]:
        now = time.monotonic()
        keep = []
        for job in jobs:
            job.commit_attempts += 1
            if job.lease_expiry <= now:
                log.warning(
                    "could not commit task %s (%s); its lease ended, the task will be recovered",
                    job.id,
                    error,
                )
                self._done(job, False)
            else:
                if job.commit_attempts == 1:
                    log.warning("commit of task %s failed, retrying: %s", job.id, error)
                keep.append(job)
        return keep


def _plan(queue: AsyncQueue, jobs: list[Job]) -> list[tuple[Call[Any], list[Job]]]:
    acks: dict[str, list[Job]] = {}
    fails: dict[str, list[Job]] = {}
    for job in jobs:
        outcome = job.outcome
        assert outcome is not None
        (acks if outcome.error is None else fails).setdefault(job.task.queue, []).append(job)
    plan: list[tuple[Call[Any], list[Job]]] = []
    for name, group in acks.items():
        plan.append((_ops.ack(queue.keys(name), [j.task for j in group]), group))
    for name, group in fails.items():
        failures = [
            Failure(j.id, j.token, j.outcome.error or "", j.outcome.retry_delay_ms)  # type: ignore[union-attr]
            for j in group
        ]
        plan.append((_ops.fail(queue.keys(name), failures), group))
    return plan

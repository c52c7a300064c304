"""Processor: leases tasks into free concurrency slots and runs their handlers.

Free slots are offered to the queues by weight (or strictly by priority) and leased in batches,
one pipelined round trip for all queues, at most a third of the concurrency per round (so quick
tasks circulate as staggered batches: Redis leases or acks one while the worker runs another).
No task is held without a lease: the processor only asks for as many tasks as it has free slots.
When nothing is ready it waits for a wake-up signal (or ``poll_interval``) instead of polling
Redis; meanwhile each queue's wake-up listener may carry a lease of its own
(:meth:`Processor.arm`), for which the processor keeps slots reserved until its reply comes back
(:meth:`Processor.deliver`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import _faults
from .._ops import MAX_LEASE_BATCH, Call, LeaseBatch, LeasedTask
from .._priority import allocate, strict_order
from ..backoff import resolve_delay_ms
from ..context import Context
from ..control import RetryAt, RetryIn, SkipRetry
from ..errors import DeadlineExceeded, OutcomeUnknown, QsyncError, TaskTimeout
from ..mux import Mux
from ._jobs import SUCCEEDED, Job, Outcome
from ._waker import Waker
from .config import ServerConfig

if TYPE_CHECKING:
    from ..aio import AsyncQueue

__all__ = ["Processor"]

log = logging.getLogger("qsync.server")

# A queue that came back empty is skipped for this long while other queues keep the server
# busy, so busy rounds do not spend round trips on it; it is always retried when idle.
EMPTY_SKIP_S = 0.05

# Attempts time out at most this late (seconds): the granularity of the timeout buckets.
TIMEOUT_TICK = 0.005

# A lease round asks for at most this share of the concurrency. Quick tasks leased together
# finish and are acked together, so their slots come free at once; leased again as one batch
# they would keep Redis and this process waiting on each other in turns (lease, run, ack, lease).
# In three staggered batches Redis runs one batch's lease or ack while this process runs
# another's handlers. (One call also takes at most MAX_LEASE_BATCH, lease.lua's limit.)
LEASE_SPLIT = 3


class Processor:
    """Leases tasks and runs them; a job leaves ``running`` when ``settle`` is called."""

    def __init__(
        self,
        queue: AsyncQueue,
        mux: Mux,
        config: ServerConfig,
        submit: Callable[[Job], None],
        waker: Waker,
    ) -> None:
        self._queue = queue
        self._mux = mux
        self._config = config
        self._submit = submit
        self._waker = waker
        # Keyed by the job itself, not by task id: a task recovered and leased here again while
        # its abandoned attempt still winds down is two jobs, each settling only its own entry.
        self.running: dict[Job, Job] = {}
        # Slots held for the leases that idle wake-up listeners carry, per queue, and each
        # queue's share of the free slots when the processor last went idle.
        self._reserved: dict[str, int] = {}
        self._idle_shares: dict[str, int] = {}
        # Tasks a listener's lease brought in after the stop began: handed back, never run.
        self.handback: list[LeasedTask] = []
        # Attempt timeouts, bucketed by TIMEOUT_TICK of loop time: one timer per bucket, not
        # per attempt (a batch leased together shares one), and O(1) to disarm.
        self._timeouts: dict[int, tuple[set[Job], asyncio.TimerHandle]] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._empty_since: dict[str, float] = {}
        self._rng = random.Random()
        self._lease_batch = min(MAX_LEASE_BATCH, -(-config.concurrency // LEASE_SPLIT))
        self.stats = {"leased": 0, "succeeded": 0, "failed": 0, "lost": 0}

    def stop_leasing(self) -> None:
        """Lease nothing more (running jobs go on)."""
        self._stopping.set()
        self._slot_freed.set()

    def settle(self, job: Job, committed: bool) -> None:
        """A job's outcome was committed (or cannot be): free its slot."""
        if self.running.pop(job, None) is None:
            return
        if job.outcome is None or not committed:
            self.stats["lost"] += 1
        elif job.outcome.error is None:
            self.stats["succeeded"] += 1
        else:
            self.stats["failed"] += 1
        self._slot_freed.set()

    def _free(self) -> int:
        return self._config.concurrency - len(self.running) - sum(self._reserved.values())

    async def run(self) -> None:
        """Fill free slots until :meth:`stop_leasing`."""
        backoff = 0.0
        while not self._stopping.is_set():
            free = self._free()
            if free <= 0:
                # Full, perhaps only by reservations (a wake-up on a queue without one lands
                # here): every wait ends, its lease's slots come back, and no full server listens.
                self._waker.disarm(everyone=True)
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                leased = await self._lease_round(free)
                backoff = 0.0
            except QsyncError as exc:
                backoff = min(5.0, backoff * 2 or 0.1)
                log.warning("leasing failed, retrying in %.1fs: %s", backoff, exc)
                await self._sleep(backoff)
                continue
            if leased:
                self._got_work()
            elif not self._stopping.is_set() and self._all_empty():
                self._empty_since.clear()
                self._idle_shares = self._shares(max(0, self._free()))
                await self._waker.wait(self._config.poll_interval)

    def _shares(self, free: int) -> dict[str, int]:
        """The slots each idle listener may lease with its wake-up. Under strict priority only
        the first queue's listener leases: the others only wake the server, whose own round
        then takes the queues in order (a lower queue's lease could run before a higher one's)."""
        if self._config.strict:
            return {strict_order(self._config.queues)[0]: free}
        return allocate(free, self._config.queues, self._rng)

    def _got_work(self) -> None:
        """Tasks were leased: the armed listeners give their reserved slots back, and once the
        server is full no listener waits."""
        self._waker.disarm(everyone=self._free() <= 0)

    def arm(self, name: str) -> Call[LeaseBatch] | None:
        """The lease an idle listener of queue ``name`` sends behind its blocking wait, with
        the slots it may fill reserved until :meth:`deliver`; None: the listener only listens."""
        if self._stopping.is_set():
            return None
        count = min(self._idle_shares.get(name, 0), self._free(), self._lease_batch)
        if count <= 0:
            return None
        call = self._queue._lease_call(name, count, self._config.lease_duration)
        self._reserved[name] = count
        return call

    def deliver(self, name: str, result: LeaseBatch | QsyncError | None, sent_at: float) -> None:
        """The outcome of a listener's lease: its reserved slots come back, its tasks start
        (or, once stopping, wait in :attr:`handback` to be handed back)."""
        wanted = self._reserved.pop(name, 0)
        self._slot_freed.set()
        if isinstance(result, OutcomeUnknown):
            log.warning("queue %s: the reply to a lease sent with a wake-up was lost (%s); if it "
                        "ran, its tasks come back when their leases expire", name, result)  # fmt: skip
        elif isinstance(result, QsyncError):
            log.warning("queue %s: a lease sent with a wake-up failed: %s", name, result)
        elif result is not None:
            if self._stopping.is_set():
                self.handback += result.tasks
            elif self._take(name, wanted, result, sent_at):
                self._got_work()

    def _all_empty(self) -> bool:
        """True when every queue came back short recently: only then is there nothing to do
        (one empty queue in a round says nothing about the others)."""
        now = time.monotonic()
        return all(now - self._empty_since.get(q, -1e9) <= EMPTY_SKIP_S for q in self._config.queues)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _lease_round(self, free: int) -> int:
        free = min(free, self._lease_batch)
        weights = self._config.queues
        if self._config.strict:
            leased = 0
            for name in strict_order(weights):
                leased += await self._lease_from([(name, free - leased)])
                if leased >= free:
                    break
            return leased
        now = time.monotonic()
        ready = {q: w for q, w in weights.items() if now - self._empty_since.get(q, -1e9) > EMPTY_SKIP_S}
        if not ready:
            return 0
        return await self._lease_from(list(allocate(free, ready, self._rng).items()))

    async def _lease_from(self, wants: list[tuple[str, int]]) -> int:
        duration = self._config.lease_duration
        calls = [self._queue._lease_call(name, n, duration) for name, n in wants]
        sent_at = time.monotonic()
        results = await self._queue.run_calls(calls)
        leased = 0
        for (name, n), result in zip(wants, results, strict=True):
            if isinstance(result, QsyncError):
                raise result
            assert isinstance(result, LeaseBatch)
            leased += self._take(name, n, result, sent_at)
        return leased

    def _take(self, name: str, wanted: int, result: LeaseBatch, sent_at: float) -> int:
        """Start the tasks of one lease call sent at ``sent_at``; returns how many."""
        if len(result.tasks) < wanted:
            self._empty_since[name] = time.monotonic()
        if result.corrupt_archived or result.orphans or result.deadline_archived:
            log.warning(
                "queue %s: archived %d corrupt and %d past-deadline tasks, dropped %d orphan ids",
                name, result.corrupt_archived, result.deadline_archived, result.orphans,
            )  # fmt: skip
        # The lease ran after it was sent: an expiry counted from the send is never late.
        lease_expiry = sent_at + self._config.lease_duration
        self._start(result.tasks, result.now_ms, lease_expiry)
        self.stats["leased"] += len(result.tasks)
        if result.tasks:
            _faults.hit("after_lease")
        return len(result.tasks)

    def _start(self, tasks: list[LeasedTask], server_now_ms: int, lease_expiry: float) -> None:
        """Start an attempt per task of one lease reply. They all start in this loop step, so
        the clocks are read once for the reply, and attempts with the same timeout share one
        timeout bucket (and its one loop timer) until the last of them ends. (Armed as each
        handler started, a quick one emptied its bucket before the next attempt armed it: a
        timer made and cancelled per attempt.)"""
        loop = asyncio.get_running_loop()
        now, now_wall, loop_now = time.monotonic(), time.time(), loop.time()
        default_timeout, running, timeouts = self._config.default_timeout, self.running, self._timeouts
        new_context, create_task, execute = Context._attempt, loop.create_task, self._execute
        tick, bucket = 0, set[Job]()
        for task in tasks:
            timeout_s = task.timeout_ms / 1000 if task.timeout_ms else default_timeout
            deadline_first = False
            if task.deadline_ms:
                to_deadline = max(0.0, (task.deadline_ms - server_now_ms) / 1000)
                if to_deadline <= timeout_s:
                    timeout_s, deadline_first = to_deadline, True
            ctx = new_context(task.id, task.queue, now + timeout_s, now_wall + timeout_s, lease_expiry)
            job = Job(task, ctx, timeout_s, deadline_first, lease_expiry)
            running[job] = job
            job_tick = job.timeout_tick = math.ceil((loop_now + timeout_s) / TIMEOUT_TICK)
            if job_tick != tick:
                tick = job_tick
                entry = timeouts.get(tick)
                if entry is None:
                    entry = timeouts[tick] = (set(), loop.call_at(tick * TIMEOUT_TICK, self._expire, tick))
                bucket = entry[0]
            bucket.add(job)
            # Named after the task: asyncio.all_tasks() shows which task each runner runs, and
            # on 3.11 a given name spares formatting a 'Task-<n>' one (about 10% of a task's start).
            job.runner = create_task(execute(job), name=task.id)

    async def _execute(self, job: Job) -> None:
        job.started = True
        task, ctx = job.task, job.ctx
        _faults.hit("before_handler")
        try:
            # Timed out or abandoned before its first step (its runner was not cancelled then:
            # a task cancelled before it starts never runs this code, and would never settle).
            if not (job.timed_out or job.abandoned):
                await self._mux.chain(task.type)(ctx, task)
        except asyncio.CancelledError as exc:
            if job.abandoned:
                self.settle(job, False)
                return
            runner = asyncio.current_task()
            if job.timed_out:
                if runner is not None:
                    runner.uncancel()  # our own cancellation, handled here
            elif runner is not None and runner.cancelling():
                raise  # cancelled from outside: the event loop is going away
            # else the handler raised CancelledError itself: an ordinary failed attempt.
            job.outcome = self._failure(job, exc, job.timed_out)
        except BaseException as exc:  # noqa: B036 - every handler failure is an attempt's failure
            job.outcome = self._failure(job, exc, job.timed_out)
        else:
            # A handler that swallowed its timeout's cancellation still ran out of time.
            job.outcome = self._failure(job, TimeoutError(), True) if job.timed_out else SUCCEEDED
        finally:
            self._disarm_timeout(job)
        if job.abandoned:
            self.settle(job, False)
            return
        _faults.hit("after_handler_before_ack")
        self._submit(job)

    def _disarm_timeout(self, job: Job) -> None:
        entry = self._timeouts.get(job.timeout_tick)
        if entry is not None:
            entry[0].discard(job)
            if not entry[0]:  # the last attempt of this bucket finished: drop its timer too
                entry[1].cancel()
                del self._timeouts[job.timeout_tick]

    def _expire(self, tick: int) -> None:
        jobs, _ = self._timeouts.pop(tick, (set(), None))
        for job in jobs:
            _time_out(job)

    def _failure(self, job: Job, exc: BaseException, timed_out: bool) -> Outcome:
        task = job.task
        if timed_out:  # the context was already told, by _time_out
            if job.deadline_first:
                return Outcome("DeadlineExceeded: the task's deadline passed", None)
            exc = TaskTimeout(f"the attempt ran past its timeout of {job.timeout_s:g} s")
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, SkipRetry):
            return Outcome(error, None)
        if isinstance(exc, RetryIn):
            return Outcome(error, exc.delay_ms)
        if isinstance(exc, RetryAt):
            return Outcome(error, max(0, exc.at_ms - int(time.time() * 1000)))
        if isinstance(exc, DeadlineExceeded):
            return Outcome(error, None)
        predicate = self._config.should_retry
        if predicate is not None:
            try:
                if not predicate(exc):
                    return Outcome(error, None)
            except Exception:
                log.exception("should_retry raised; retrying task %s as usual", task.id)
        if task.retry_delay_ms >= 0:
            return Outcome(error, task.retry_delay_ms)
        delay, warning = resolve_delay_ms(self._config.retry_policy, task.retried, exc)
        if warning:
            log.warning("task %s: %s", task.id, warning)
        return Outcome(error, delay)


def _time_out(job: Job) -> None:
    """The attempt's time is up: tell the handler (its context first, so a handler or middleware
    catching the cancellation sees why), then cancel it; the runner reports the timeout."""
    if job.runner is not None and not job.runner.done() and not job.abandoned:
        job.timed_out = True
        job.ctx._cancel("deadline exceeded" if job.deadline_first else "timeout")
        if job.started:  # else it sees timed_out as it starts
            job.runner.cancel()

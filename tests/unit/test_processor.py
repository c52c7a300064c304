"""The processor and committer on an in-memory stand-in for Redis: how a burst of free slots is
leased, how many loop timers attempts cost, attempts that time out or are abandoned before they
start, and the same task held twice. (The same code on a real Redis is tested in
tests/integration; here the calls are only answered and counted, so no Redis server is needed.)"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import pytest

from qsync import Context, LeasedTask, Mux, TaskState
from qsync._keys import QueueKeys, keys_for
from qsync._ops import Call, LeaseBatch, lease
from qsync.server._committer import Committer
from qsync.server._jobs import Job
from qsync.server._processor import Processor
from qsync.server.config import ServerConfig

_ids = itertools.count()


class FakeQueue:
    """Answers lease, ack and fail calls from a counter of waiting tasks; records every call."""

    prefix = "unit"

    def __init__(self, waiting: int, timeout_ms: int = 0) -> None:
        self.waiting = waiting
        self.timeout_ms = timeout_ms
        self.lease_counts: list[int] = []
        self.acked = 0
        self.failed = 0
        self.all_settled = asyncio.Event()
        self.stopped = asyncio.Event()
        self.total = waiting

    def keys(self, name: str) -> QueueKeys:
        return keys_for(self.prefix, name)

    def _lease_call(self, name: str, count: int, lease_duration: float) -> Call[LeaseBatch]:
        return lease(self.keys(name), count, int(lease_duration * 1000))

    def task(self, name: str = "default", timeout_ms: int = 0) -> LeasedTask:
        n = next(_ids)
        return LeasedTask(f"t{n}", f"tok-{n}", name, "t", b"", 0, 3, timeout_ms, 0, -1)

    async def run_calls(self, calls: Sequence[Call[Any]]) -> list[Any]:
        await asyncio.sleep(0)  # a round trip yields to the loop
        out: list[Any] = []
        for call in calls:
            if call.op == "lease":
                count = min(call.args[0], self.waiting)
                self.waiting -= count
                self.lease_counts.append(call.args[0])
                tasks = [self.task(call.queue, self.timeout_ms) for _ in range(count)]
                out.append(LeaseBatch(0, 0, tasks, 0, 0, 0))
            elif call.op == "ack":
                self.acked += len(call.args) // 2
                out.append([True] * (len(call.args) // 2))
            elif call.op == "fail":
                self.failed += len(call.args) // 4
                out.append([TaskState.RETRY] * (len(call.args) // 4))
            else:
                raise AssertionError(f"unexpected call {call.op}")
        if self.acked + self.failed >= self.total:
            self.all_settled.set()
        return out


class _IdleWaker:
    """The Waker's side the processor uses, without Redis: waits until ``stopped`` or the
    timeout, and carries no lease behind its waits (nothing to disarm)."""

    def __init__(self, stopped: asyncio.Event | None = None) -> None:
        self._stopped = stopped or asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            pass

    def disarm(self, *, everyone: bool = False) -> None:
        return None


def _processor(queue: FakeQueue, mux: Mux, **options: Any) -> Processor:
    config = ServerConfig(**options)
    holder: list[Processor] = []
    committer = Committer(queue, lambda job, ok: holder[0].settle(job, ok))  # type: ignore[arg-type]

    processor = Processor(queue, mux, config, committer.submit, _IdleWaker(queue.stopped))  # type: ignore[arg-type]
    holder.append(processor)
    return processor


def _noop_mux() -> Mux:
    mux = Mux()

    @mux.handle("t")
    async def noop(ctx: Context, task: LeasedTask) -> None:
        return None

    return mux


async def _drain(queue: FakeQueue, processor: Processor) -> None:
    runner = asyncio.get_running_loop().create_task(processor.run())
    try:
        await asyncio.wait_for(queue.all_settled.wait(), 30)
    finally:
        processor.stop_leasing()
        queue.stopped.set()
        await runner


@pytest.mark.parametrize(("concurrency", "largest"), [(500, 167), (9, 3), (1, 1), (4500, 1000)])
async def test_a_burst_of_free_slots_is_leased_in_staggered_batches(concurrency: int, largest: int) -> None:
    """Quick tasks free their slots all at once; leasing them back as one batch would leave
    Redis and the worker waiting on each other in turns. At most a third of the concurrency is
    asked for per call (and never more than lease.lua takes, 1,000: a larger concurrency used
    to fail every lease round)."""
    queue = FakeQueue(waiting=3 * concurrency + 7)
    processor = _processor(queue, _noop_mux(), concurrency=concurrency)
    await _drain(queue, processor)
    assert queue.acked == queue.total
    assert max(queue.lease_counts) == largest
    assert not processor.running


async def test_the_attempts_of_one_lease_reply_share_their_timeout_timer() -> None:
    """Quick attempts must not each make and cancel a loop timer: those leased together share
    a timeout bucket until the last of them ends (a reply's attempts start within a few ms, so
    a reply spans at most a couple of 5 ms buckets)."""
    queue = FakeQueue(waiting=3000)
    processor = _processor(queue, _noop_mux(), concurrency=300)
    loop = asyncio.get_running_loop()
    timers = 0
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal timers
        if callback == processor._expire:
            timers += 1
        return call_at(when, callback, *args, **kwargs)

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        await _drain(queue, processor)
    finally:
        del loop.call_at
    replies = sum(1 for n in queue.lease_counts if n) - 1  # the last one found nothing
    assert queue.acked == 3000
    assert 0 < timers <= 2 * replies, (timers, replies)
    assert processor._timeouts == {}, "every bucket goes with its last attempt"


def _started(processor: Processor, queue: FakeQueue, timeout_ms: int = 0) -> Job:
    processor._start([queue.task(timeout_ms=timeout_ms)], 0, float("inf"))
    (job,) = processor.running.values()
    return job


def _recording() -> tuple[Processor, FakeQueue, list[str], list[Job]]:
    """A processor on an empty FakeQueue whose handler for "t" records the ids it runs, with
    the list of jobs it submits for commit."""
    ran: list[str] = []
    mux = Mux()

    @mux.handle("t")
    async def handler(ctx: Context, task: LeasedTask) -> None:
        ran.append(task.id)

    submitted: list[Job] = []
    queue = FakeQueue(waiting=0)
    processor = Processor(queue, mux, ServerConfig(), submitted.append, _IdleWaker())  # type: ignore[arg-type]
    return processor, queue, ran, submitted


async def test_an_attempt_timed_out_before_its_first_step_fails_without_running() -> None:
    """A timer may fire before a leased attempt's runner took its first step (a timeout or
    deadline shorter than the loop's turn, or a loop that runs timers first). Cancelling the
    runner then would skip all of its code, leaving the job unsettled with its lease extended
    forever; instead the attempt fails as timed out, without calling the handler."""
    processor, queue, ran, submitted = _recording()
    job = _started(processor, queue, timeout_ms=1)
    processor._expire(job.timeout_tick)  # before the loop ran the runner's first step
    assert job.runner is not None
    await job.runner
    assert ran == []
    assert submitted == [job]
    assert job.outcome is not None and job.outcome.error is not None
    assert job.outcome.error.startswith("TaskTimeout"), job.outcome
    assert job.ctx.is_cancelled() and job.ctx.cancel_reason == "timeout"
    assert processor._timeouts == {}


async def test_an_attempt_abandoned_before_its_first_step_is_settled_without_running() -> None:
    processor, queue, ran, submitted = _recording()
    job = _started(processor, queue)
    job.abandon("lease lost")
    assert job.runner is not None
    await job.runner
    assert ran == [] and submitted == []
    assert not processor.running, "the abandoned job gave its slot back"
    assert processor.stats["lost"] == 1
    assert processor._timeouts == {}


async def test_a_task_leased_again_while_its_old_attempt_winds_down_keeps_both_slots() -> None:
    """The same task id can be held twice for a moment: its lease was recovered and the task
    leased here again while the abandoned attempt still runs. Settling the old attempt must
    not free the new one's slot (nor stop its heartbeats)."""
    release = asyncio.Event()
    mux = Mux()

    @mux.handle("t")
    async def handler(ctx: Context, task: LeasedTask) -> None:
        await release.wait()

    queue = FakeQueue(waiting=0)
    processor = Processor(queue, mux, ServerConfig(), lambda job: None, _IdleWaker())  # type: ignore[arg-type]
    old = LeasedTask("same", "token-1", "default", "t", b"", 0, 3, 0, 0, -1)
    new = LeasedTask("same", "token-2", "default", "t", b"", 1, 3, 0, 0, -1)
    processor._start([old], 0, float("inf"))
    await asyncio.sleep(0)  # the old attempt is running
    processor._start([new], 0, float("inf"))
    old_job, new_job = processor.running.values()
    old_job.abandon("lease lost")
    assert old_job.runner is not None
    await old_job.runner
    assert list(processor.running.values()) == [new_job]
    release.set()
    assert new_job.runner is not None
    await new_job.runner

"""Process faults of the idle pick-up path (qsync/server/_waker.py): real worker subprocesses
whose idle wake-up listeners wait with a lease queued behind their BRPOP, killed or stopped
while they wait. Leases are long (30 s) and so is the poll interval: a task stranded in a dead
or stopped worker's lease would only come back after the drain's deadline.
"""

from __future__ import annotations

import signal

import pytest
import redis

import qsync
from tests.chaos.harness import Chaos, make, wait_until

pytestmark = pytest.mark.chaos

LONG = {"lease_duration": 30.0, "poll_interval": 30.0, "shutdown_timeout": 1.0}


def _armed(r: redis.Redis) -> int:
    """Listeners blocked in BRPOP with a command (the lease) queued behind it."""
    return sum(
        1
        for c in r.client_list()
        if c.get("cmd") == "brpop" and "b" in c.get("flags", "") and int(c.get("qbuf", 0)) > 0
    )


def _no_attempt_counted(report_infos: dict[str, qsync.TaskInfo | None]) -> None:
    for task_id, info in report_infos.items():
        assert info is not None and info.state is qsync.TaskState.COMPLETED, (task_id, info)
        assert (info.retried, info.recoveries) == (0, 0), info


def test_sigkill_of_an_idle_armed_worker_strands_nothing(chaos: Chaos) -> None:
    """SIGKILL of an idle worker whose listener waits with a lease behind its BRPOP: the lease
    goes with the connection and never runs, so tasks enqueued afterwards are run at once by
    the surviving worker, once each, with no attempt or recovery counted (I1, I3, I4, I8)."""
    doomed, survivor = chaos.fleet.spawn_many(2, concurrency=4, **LONG)
    chaos.fleet.wait_ready([doomed, survivor])
    wait_until(lambda: _armed(chaos.r) == 2, "both workers to wait with a lease behind", 20)
    chaos.fleet.kill(doomed)
    wait_until(lambda: _armed(chaos.r) == 1, "Redis to drop the killed worker's wait", 10)
    chaos.enqueue([make("quick", {"i": i}) for i in range(40)])
    chaos.drain(15)  # half a lease: nothing may have waited for a recovery
    assert chaos.fleet.graceful([survivor]) == [0]
    report = chaos.check(dup_bound=0)
    _no_attempt_counted(report.infos)


def test_rolling_graceful_restarts_of_armed_workers_count_no_attempt(chaos: Chaos) -> None:
    """Tasks stream in while idle, armed workers are SIGTERMed one after another and replaced:
    whatever a stopping worker's leases brought in is run or handed back, so every task runs
    once, none waits for a lease to expire, and no attempt is counted (I1, I3, I4, I8)."""
    workers = chaos.fleet.spawn_many(3, concurrency=2, **LONG)
    chaos.fleet.wait_ready(workers)
    for round_ in range(6):
        chaos.enqueue([make("quick", {"r": round_, "i": i}) for i in range(20)])
        leaving = workers.pop(0)
        leaving.send(signal.SIGTERM)
        joining = chaos.fleet.spawn(concurrency=2, **LONG)
        assert leaving.wait(15) == 0, leaving.tail()
        workers.append(joining)
        chaos.fleet.wait_ready([joining])
    chaos.drain(15)  # half a lease: nothing may have waited for a recovery
    assert chaos.fleet.graceful(workers) == [0, 0, 0]
    report = chaos.check(dup_bound=0)
    _no_attempt_counted(report.infos)

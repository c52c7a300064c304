"""Fault tests of the worker server (reliability.md section 3.2): real worker subprocesses on
the session's real Redis, real signals, a drain, and the Jepsen-style checker of harness.py.

Each test prints one ``[chaos <test>] ...`` line with the checker's counts (run with ``-s`` to
see them on success). Timing profile: lease 1-2 s (heartbeat lease/3), poll 0.2 s.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import qsync
from qsync.errors import DuplicateTask
from tests.chaos.harness import Chaos, Worker, final_stats, make, recovered_in_logs, wait_until

pytestmark = pytest.mark.chaos


def _seeded(name: str) -> random.Random:
    seed = random.randrange(2**32)
    print(f"[chaos {name}] seed={seed}")
    return random.Random(seed)


def _in_flight(chaos: Chaos, worker: Worker, n: int) -> Callable[[], set[str] | None]:
    """A predicate: the ids running in ``worker`` once there are exactly ``n`` of them."""

    def predicate() -> set[str] | None:
        ids = chaos.execs().in_flight(worker.pid)
        return ids if len(ids) == n else None

    return predicate


def _due_ms(info: qsync.TaskInfo) -> int:
    assert info.next_process_at is not None
    return round(info.next_process_at.timestamp() * 1000)


def _check_not_early(chaos: Chaos, delayed: list[qsync.Task]) -> float:
    """Every delayed task started no earlier than its due time on the Redis clock (TIME and the
    records' ``ts`` read the same host clock); returns the worst lateness in seconds."""
    execs = chaos.execs()
    worst = 0.0
    for task in delayed:
        due = _due_ms(chaos.history.ok[task.id])
        first = min(r["ts"] for r in execs.of("exec_start", task.id))
        assert first * 1000 >= due - 1, f"{task.id} started {due - first * 1000:.0f} ms before it was due"
        worst = max(worst, first - due / 1000)
    return worst


# --- F00 ---------------------------------------------------------------------------------------


def test_f00_control_no_faults(chaos: Chaos) -> None:
    """Control: 3 workers x c4, immediate, delayed, retrying, unique and long tasks: nothing lost,
    no duplicate, every invariant holds, workers stop cleanly."""
    rng = _seeded(chaos.name)
    uniques = [make("quick", {"u": i}, unique=60) for i in range(40)]
    chaos.enqueue(uniques)
    copies = [make("quick", {"u": i}, unique=60) for i in range(10)]
    refused = chaos.queue.enqueue_many(copies, queue=chaos.qname)
    assert all(isinstance(result, DuplicateTask) for result in refused), refused

    workers = chaos.fleet.spawn_many(3, concurrency=4, lease_duration=2.0)
    immediate = [make("quick", {"i": i}) for i in range(1500)]
    delayed = [make("quick", {"d": i}, delay=round(rng.uniform(0.5, 2.5), 3)) for i in range(100)]
    flaky = [make("flaky", {"f": i, "fail_times": 1}, retry=3, retry_delay=0.1) for i in range(60)]
    long = [make("sleepy", {"secs": round(rng.uniform(0.2, 0.6), 3)}) for _ in range(20)]
    long += [make("sync_sleepy", {"secs": 0.2}) for _ in range(20)]
    tasks = immediate + delayed + flaky + long
    rng.shuffle(tasks)
    for i in range(0, len(tasks), 50):
        chaos.enqueue(tasks[i : i + 50])
    chaos.drain(60)
    statuses = chaos.fleet.graceful(workers)

    report = chaos.check(dup_bound=0, workers=len(workers))
    assert statuses == [0, 0, 0], chaos.fleet.diagnostics()
    assert not chaos.fleet.log_lines("WARNING")
    assert report.state_counts() == {"completed": len(uniques) + len(tasks)}
    starts = report.execs.count("exec_start")
    for task in flaky:
        assert starts[task.id] == 2 and report.infos[task.id].retried == 1  # type: ignore[union-attr]
    for task in [*uniques, *immediate, *delayed, *long]:
        assert starts[task.id] == 1, task.id
    print(f"[chaos {chaos.name}] worst delayed-task lateness {_check_not_early(chaos, delayed):.3f} s")
    # I6: the unique keys are free again once their tasks finished.
    chaos.queue.enqueue(make("quick", {"u": 0}, unique=60), queue=chaos.qname)


# --- F01 ---------------------------------------------------------------------------------------


def test_f01_sigkill_mid_task_with_respawn(chaos: Chaos) -> None:
    """SIGKILL a busy worker every 0.8-2 s (8 times), respawning it: nothing lost; duplicates
    at most kills x concurrency; only killed leases are recovered."""
    rng = _seeded(chaos.name)
    c, kills_wanted = 4, 8
    chaos.fleet.spawn_many(3, respawn=True, concurrency=c, lease_duration=1.0)
    tasks = [make("sleepy", {"secs": round(rng.uniform(0.1, 0.5), 3)}) for _ in range(800)]
    chaos.enqueue(tasks)

    kills, stranded = 0, 0
    while kills < kills_wanted:
        not_before = time.monotonic() + rng.uniform(0.8, 2.0)

        def busy_victim(not_before: float = not_before) -> tuple[Worker, int] | None:
            if time.monotonic() < not_before:
                return None
            execs = chaos.execs()
            busy = [(len(execs.in_flight(w.pid)), w) for w in chaos.fleet.live]
            n, victim = max(busy, key=lambda item: item[0], default=(0, None))
            return (victim, n) if victim is not None and n > 0 else None

        victim, n = wait_until(
            busy_victim, "a worker with tasks in flight", 30, tick=chaos.fleet.respawn_dead,
            diagnostics=chaos.diagnostics,
        )  # fmt: skip
        assert chaos.fleet.kill(victim) == -9
        kills, stranded = kills + 1, stranded + n
        chaos.fleet.respawn_dead()
    chaos.drain(90, respawn=True)

    report = chaos.check(dup_bound=kills * c, kills=kills, stranded_in_flight=stranded)
    assert report.state_counts() == {"completed": len(tasks)}
    recovered = {i: info.recoveries for i, info in report.infos.items() if info and info.recoveries}
    assert len(recovered) <= kills * c, f"{len(recovered)} tasks recovered after {kills} kills of c={c}"
    for task_id in recovered:
        info = report.infos[task_id]
        assert info is not None and info.retried == info.recoveries
    assert all(status == -9 for _, status in chaos.fleet.exits)


# --- F02 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "point", ["after_lease", "before_handler", "after_handler_before_ack", "during_heartbeat"]
)
def test_f02_fault_points(chaos: Chaos, point: str) -> None:
    """The worker dies (os._exit(137)) at a fault point with probability 0.15; workers respawn.
    Nothing is lost; before the handler no task runs twice (and each still runs); after the
    handler at most one extra run per hit.

    Concurrency 1, so every death strands exactly the one task at the fault point (with more
    slots, a death could also take a neighbour that had finished but not yet committed, which
    is the after_handler_before_ack window of that neighbour). max_recoveries is raised so the
    dice cannot archive a normal task as poison."""
    workers = chaos.fleet.spawn_many(
        3, respawn=True, env={"QSYNC_FAULTPOINT": f"{point}:0.15"}, concurrency=1, lease_duration=1.0,
        max_recoveries=1000,
    )  # fmt: skip
    chaos.fleet.wait_ready(workers)
    # Heartbeats beat every lease/3 only while a task runs: give those tasks some length.
    secs, n = (0.5, 40) if point == "during_heartbeat" else (0.01, 100)
    tasks = [make("quick", {"i": i, "secs": secs}) for i in range(n)]
    chaos.enqueue(tasks)
    chaos.drain(90, respawn=True)

    hits = sum(w.log().count(f"fault point {point} hit") for w in chaos.fleet.workers)
    # Only a death after the handler's end can repeat it: at most one extra run per hit.
    bound = hits if point in ("after_handler_before_ack", "during_heartbeat") else 0
    report = chaos.check(dup_bound=bound, hits=hits)
    assert hits >= 1, "the fault point was never hit"
    assert all(status == 137 for _, status in chaos.fleet.exits), chaos.fleet.exits
    assert report.state_counts() == {"completed": len(tasks)}
    recoveries = sum(info.recoveries for info in report.infos.values() if info)
    if point == "during_heartbeat":
        # A beat can also fire while the one job's ack is applied but its reply not yet read.
        assert recoveries <= hits
    else:
        # Each hit stranded exactly one lease, recovered exactly once.
        assert recoveries == hits
    starts, ends = report.execs.count("exec_start"), report.execs.count("exec_end")
    if point in ("after_lease", "before_handler"):
        # The process died before the handler: each task ran exactly once, and still ran.
        assert all(starts[t.id] == 1 and ends[t.id] == 1 for t in tasks)
    if point == "after_handler_before_ack":
        # Every hit threw away one finished run, which then ran again.
        assert report.dup_execs == hits


# --- F03 ---------------------------------------------------------------------------------------


def test_f03_graceful_stop_requeues_at_once(chaos: Chaos) -> None:
    """SIGTERM with shutdown_timeout 1 s while 4 tasks of 5 s run: the worker exits 0 and its
    in-flight tasks are back in pending before their leases would have expired, with their
    attempt not consumed (retried 0, recoveries 0); they then run to completion once."""
    c, lease = 4, 6.0
    tasks = [make("sleepy" if i % 2 else "sync_sleepy", {"secs": 5}) for i in range(8)]
    chaos.enqueue(tasks)
    worker = chaos.fleet.spawn(concurrency=c, lease_duration=lease, shutdown_timeout=1.0)
    running = wait_until(_in_flight(chaos, worker, c), "4 tasks in flight", 20, diagnostics=chaos.diagnostics)
    leases = chaos.r.zrange(chaos.keys.active, 0, -1, withscores=True)
    assert {raw.decode() for raw, _ in leases} == running
    first_expiry = min(score for _, score in leases)

    chaos.fleet.graceful([worker])
    assert worker.returncode == 0, worker.tail()
    now = chaos.server_ms()
    assert now < first_expiry, f"requeued only {now - first_expiry:.0f} ms after the leases expired"
    assert chaos.counts() == {"pending": len(tasks), "active": 0, "scheduled": 0, "retry": 0}
    assert sorted(raw.decode() for raw in chaos.r.lrange(chaos.keys.pending, 0, -1)) == sorted(
        t.id for t in tasks
    )
    for task_id in running:
        info = chaos.info(task_id)
        assert info is not None and info.state is qsync.TaskState.PENDING
        assert (info.retried, info.recoveries) == (0, 0), info
    execs = chaos.execs()
    for task_id in running:
        assert not execs.of("exec_end", task_id), "an interrupted task reported completion"
        assert execs.of("exec_error", task_id), "the interrupted handler was not cancelled"
    assert re.search(rf"handed {c} unfinished tasks back", worker.log()), worker.tail()

    chaos.fleet.spawn(concurrency=8, lease_duration=2.0)
    chaos.drain(30)
    report = chaos.check(dup_bound=0)
    assert report.state_counts() == {"completed": len(tasks)}
    assert all(info is not None and info.retried == 0 for info in report.infos.values())


def test_f03_leases_kept_during_shutdown_grace(chaos: Chaos) -> None:
    """Rolling restart with the fast profile (lease 1 s, shutdown_timeout 5 s): a worker is
    SIGTERMed while its 4 tasks still run and another worker is up. Its tasks finish inside the
    grace period (they end when a gate file appears, after the leases as granted at SIGTERM
    time would have run out), so they must commit there: the stopping worker keeps its leases
    (heartbeats go on until its running tasks are settled), none is recovered by the other
    worker, none runs twice, no attempt is consumed."""
    c, lease = 4, 1.0
    gate = chaos.folder / "gate"
    stopping = chaos.fleet.spawn(concurrency=c, lease_duration=lease, shutdown_timeout=5.0)
    tasks = [make("cancellable", {"gate": str(gate), "n": i}) for i in range(c)]
    chaos.enqueue(tasks)
    wait_until(_in_flight(chaos, stopping, c), "4 tasks in flight", 20, diagnostics=chaos.diagnostics)
    other = chaos.fleet.spawn(concurrency=c, lease_duration=lease)
    chaos.fleet.wait_ready([other])

    stopping.respawn = False
    stopping.send(signal.SIGTERM)
    wait_until(lambda: "stopping gracefully" in stopping.log(), "the worker to begin its graceful stop", 10)
    last_expiry = max(score for _, score in chaos.r.zrange(chaos.keys.active, 0, -1, withscores=True))
    # The behaviour under test: the leases held at SIGTERM would have expired (plus two
    # recover intervals of the other worker) while the tasks still run.
    wait_until(lambda: chaos.server_ms() > last_expiry + 1000 * lease, "the old leases to run out", 10)
    gate.touch()
    assert stopping.wait(20) == 0, stopping.tail()
    chaos.drain(30)
    assert chaos.fleet.graceful([other]) == [0]

    report = chaos.check(dup_bound=0, recovered_in_logs=recovered_in_logs([other]))
    for task in tasks:
        info = report.infos[task.id]
        assert info is not None and info.state is qsync.TaskState.COMPLETED
        assert (info.recoveries, info.retried) == (0, 0), f"recovered during the grace period: {info}"
        assert [r["pid"] for r in report.execs.of("exec_end", task.id)] == [stopping.pid]
    assert final_stats(stopping)["succeeded"] == c


# --- F04 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("zombie_task", ["ends_while_stopped", "outlives_the_stop"])
def test_f04_zombie_worker_sigstop(chaos: Chaos, zombie_task: str) -> None:
    """SIGSTOP a worker running 4 tasks for 3 x lease, then SIGCONT. Meanwhile its leases expire
    and the other worker recovers and reruns the tasks. On waking the zombie must not commit:

    - ``ends_while_stopped`` (tasks of 2 x lease): its handlers finish at once on waking, while
      the new holder still runs them; its acks are refused and each task's final commit is the
      new holder's; dup <= c.
    - ``outlives_the_stop`` (tasks of a minute on the first attempt): its first heartbeat on
      waking finds the leases lost and cancels the handlers: dup = 0.

    Either way all its jobs end uncommitted ("lost" in its stats) and it stays healthy. The
    other worker starts while the zombie is stopped: however long its start-up takes, the
    zombie's tasks are still running when it stops."""
    c, lease = 4, 1.0
    zombie = chaos.fleet.spawn(concurrency=c, lease_duration=lease)
    if zombie_task == "ends_while_stopped":
        payload = {"secs": 2 * lease}
    else:
        payload = {"secs": 60 * lease, "hold_attempts": 1}
    tasks = [make("sleepy", {**payload, "n": i}) for i in range(c)]
    chaos.enqueue(tasks)
    stolen = wait_until(_in_flight(chaos, zombie, c), "the zombie-to-be running 4 tasks", 20)
    chaos.fleet.pause(zombie)
    stopped_at = time.monotonic()
    other = chaos.fleet.spawn(concurrency=c, lease_duration=lease)

    def rerun_elsewhere() -> bool:
        execs = chaos.execs()
        return time.monotonic() - stopped_at >= 3 * lease and all(
            any(r["pid"] == other.pid for r in execs.of("exec_start", i)) for i in stolen
        )

    wait_until(rerun_elsewhere, "the stopped worker's tasks to be recovered and rerun", 30,
               diagnostics=chaos.diagnostics)  # fmt: skip
    chaos.fleet.resume(zombie)
    wait_until(lambda: len(chaos.execs().in_flight(zombie.pid)) == 0, "the zombie's handlers to end", 20)
    later = [make("quick", {"later": i}) for i in range(20)]
    chaos.enqueue(later)
    chaos.drain(60)
    statuses = chaos.fleet.graceful([zombie, other])

    bound = c if zombie_task == "ends_while_stopped" else 0
    report = chaos.check(dup_bound=bound)
    assert statuses == [0, 0], chaos.fleet.diagnostics()
    assert report.state_counts() == {"completed": len(tasks) + len(later)}
    execs = report.execs
    zombie_tokens = {r["token"] for r in execs.records if r["pid"] == zombie.pid and r["id"] in stolen}
    for task_id in stolen:
        info = report.infos[task_id]
        assert info is not None and (info.recoveries, info.retried) == (1, 1), info
        final = [r for r in execs.of("exec_end", task_id) if r["attempt"] == info.retried]
        assert len(final) == 1 and final[0]["pid"] == other.pid, final
        assert final[0]["token"] not in zombie_tokens
        assert info.finished_at is not None
        # Committed (server clock) only after the new holder's handler finished.
        assert info.finished_at.timestamp() >= final[0]["ts"] - 0.002, (info.finished_at, final)
        if zombie_task == "outlives_the_stop":
            errors = execs.of("exec_error", task_id, pid=zombie.pid)
            assert [r["error"].split(":")[0] for r in errors] == ["CancelledError"], errors
    # Every zombie job ended without a commit: refused ack, or abandoned on the lost lease.
    stats = final_stats(zombie)
    assert stats["lost"] == len(stolen), stats
    zombie_ends = [r for r in execs.of("exec_end", pid=zombie.pid) if r["id"] in stolen]
    print(f"[chaos {chaos.name}] zombie finished {len(zombie_ends)} stolen tasks late; stats {stats}")


# --- F05 ---------------------------------------------------------------------------------------


def test_f05_blocked_event_loop(chaos: Chaos) -> None:
    """An async handler blocks its worker's event loop (time.sleep) for 8 x lease on its first
    attempt. Heartbeats run on the loop, so that worker's leases expire and the other worker
    (started once the block began: 8 x lease leaves room for a slow start-up) recovers and
    completes its tasks; the blocked worker's late results are refused; dup <= c."""
    c, lease = 4, 1.0
    blocked = chaos.fleet.spawn(concurrency=c, lease_duration=lease)
    chaos.fleet.wait_ready([blocked])
    tasks = [make("blocking", {"secs": 8 * lease, "hold_attempts": 1})]
    tasks += [make("sleepy", {"secs": 0.5, "n": i}) for i in range(c - 1)]
    chaos.enqueue(tasks)
    wait_until(_in_flight(chaos, blocked, 1), "the blocking task to start", 20)
    other = chaos.fleet.spawn(concurrency=c, lease_duration=lease)
    chaos.drain(60)
    statuses = chaos.fleet.graceful([blocked, other])

    report = chaos.check(dup_bound=c)
    assert statuses == [0, 0], chaos.fleet.diagnostics()
    assert report.state_counts() == {"completed": len(tasks)}
    info = report.infos[tasks[0].id]
    assert info is not None and info.recoveries == 1 and info.retried == 1, info
    final = [r for r in report.execs.of("exec_end", tasks[0].id) if r["attempt"] == 1]
    assert [r["pid"] for r in final] == [other.pid]
    assert final_stats(blocked)["succeeded"] + final_stats(other)["succeeded"] == len(tasks)


# --- F06 ---------------------------------------------------------------------------------------


def test_f06_long_tasks_with_heartbeats_never_recovered(chaos: Chaos) -> None:
    """Negative control: tasks running 5 x lease (async and sync) beside a load of quick tasks
    keep their leases through heartbeats: never recovered, never duplicated."""
    lease = 1.0
    long = [make("sleepy", {"secs": 5 * lease}) for _ in range(4)]
    long += [make("sync_sleepy", {"secs": 5 * lease}) for _ in range(4)]
    load = [make("quick", {"i": i, "secs": 0.02}) for i in range(150)]
    chaos.enqueue(long)
    chaos.enqueue(load)
    workers = chaos.fleet.spawn_many(2, concurrency=6, lease_duration=lease)
    chaos.drain(60)
    statuses = chaos.fleet.graceful(workers)

    report = chaos.check(dup_bound=0, recovered_in_logs=recovered_in_logs(workers))
    assert statuses == [0, 0]
    assert report.state_counts() == {"completed": len(long) + len(load)}
    for info in report.infos.values():
        assert info is not None and (info.recoveries, info.retried) == (0, 0), info
    assert all(n == 1 for n in report.execs.count("exec_start").values())
    assert recovered_in_logs(workers) == 0
    assert not chaos.fleet.log_lines("WARNING")  # no lease lost or late


# --- F08 ---------------------------------------------------------------------------------------


def test_f08_poison_task_archived_after_max_recoveries(chaos: Chaos) -> None:
    """A task that kills its worker (os._exit(139)) every time, with respawning workers (c=1, so
    a death strands only the poison): archived as poison after max_recoveries (default 5);
    every normal task completes once."""
    rng = _seeded(chaos.name)
    max_recoveries = qsync.ServerConfig().max_recoveries
    chaos.fleet.spawn_many(3, respawn=True, concurrency=1, lease_duration=1.0)
    normal = [make("quick", {"i": i}) for i in range(30)]
    poison = [make("poison", {"p": i}) for i in range(3)]
    tasks = normal + poison
    rng.shuffle(tasks)
    chaos.enqueue(tasks)
    chaos.drain(90, respawn=True)

    report = chaos.check(dup_bound=0)
    starts = report.execs.count("exec_start")
    for task in poison:
        info = report.infos[task.id]
        assert info is not None and info.state is qsync.TaskState.ARCHIVED, info
        assert (info.last_error or "").startswith("poison"), info.last_error
        assert info.recoveries == max_recoveries, info
        assert starts[task.id] == max_recoveries, starts[task.id]
    for task in normal:
        info = report.infos[task.id]
        assert info is not None and info.state is qsync.TaskState.COMPLETED and starts[task.id] == 1
    deaths = [w for w in chaos.fleet.workers if w.returncode == 139]
    assert len(deaths) == len(poison) * max_recoveries


# --- F09 ---------------------------------------------------------------------------------------


def test_f09_always_raising_task_archived_with_last_error(chaos: Chaos) -> None:
    """A handler that always raises, retry=3, retry_delay 0.1: archived with the last error after
    4 attempts, retried == 3, and its unique lock released (a new copy can be enqueued)."""
    tasks = [make("raising", {"n": i}, retry=3, retry_delay=0.1, unique=60) for i in range(3)]
    chaos.enqueue(tasks)
    worker = chaos.fleet.spawn(concurrency=4)
    chaos.drain(30)
    assert chaos.fleet.graceful([worker]) == [0]

    report = chaos.check(dup_bound=0)
    for task in tasks:
        info = report.infos[task.id]
        assert info is not None and info.state is qsync.TaskState.ARCHIVED
        assert info.retried == 3 and info.last_error == "RuntimeError: boom on attempt 3", info
        assert [r["attempt"] for r in report.execs.of("exec_start", task.id)] == [0, 1, 2, 3]
        assert not report.execs.of("exec_end", task.id)
        assert task.options.unique_key is not None
        assert not chaos.r.exists(chaos.keys.unique(task.options.unique_key))
    # I6: the same unique content is accepted again.
    chaos.queue.enqueue(make("raising", {"n": 0}, retry=3, retry_delay=0.1, unique=60), queue=chaos.qname)


# --- F10 ---------------------------------------------------------------------------------------


def test_f10_timeout_cancels_the_attempt(chaos: Chaos) -> None:
    """timeout=0.5 on tasks that would run 3 s (async: cancelled; sync: told through its
    context): each attempt is cut short and fails with TaskTimeout; retry=1, so archived.
    Tasks whose deadline (now + 1.5 s) passes while they run are cancelled and archived with
    DeadlineExceeded, never retried."""
    worker = chaos.fleet.spawn(concurrency=8)
    chaos.fleet.wait_ready([worker])
    options: dict[str, Any] = {"timeout": 0.5, "retry": 1, "retry_delay": 0.1}
    tasks = [make("cancellable", {"secs": 3, "n": i}, **options) for i in range(3)]
    tasks += [make("sync_sleepy", {"secs": 3, "n": i}, **options) for i in range(3)]
    deadline = datetime.now(UTC) + timedelta(seconds=1.5)
    past_deadline = [make("cancellable", {"secs": 5, "dl": i}, deadline=deadline) for i in range(2)]
    chaos.enqueue(tasks + past_deadline)
    chaos.drain(30)
    # A sync handler notices its cancellation in its own thread, a moment after the commit.
    want = 2 * len(tasks) + len(past_deadline)
    wait_until(lambda: sum(chaos.execs().count("exec_error").values()) == want, "handlers to stop")
    assert chaos.fleet.graceful([worker]) == [0]

    report = chaos.check(dup_bound=0)
    execs = report.execs
    for task in past_deadline:  # cancelled at the deadline, archived, not retried
        info = report.infos[task.id]
        assert info is not None and info.state is qsync.TaskState.ARCHIVED, info
        assert (info.last_error or "").startswith("DeadlineExceeded"), info.last_error
        assert len(execs.of("exec_start", task.id)) == 1 and not execs.of("exec_end", task.id)
    for task in tasks:
        info = report.infos[task.id]
        assert info is not None and info.state is qsync.TaskState.ARCHIVED, info
        assert (info.last_error or "").startswith("TaskTimeout"), info.last_error
        assert info.retried == 1
        assert len(execs.of("exec_start", task.id)) == 2 and not execs.of("exec_end", task.id)
        expected = "CancelledError" if task.type == "cancellable" else "Cancelled: timeout"
        assert all(r["error"].startswith(expected) for r in execs.of("exec_error", task.id))
    starts = {(r["id"], r["token"]): r["ts"] for r in execs.of("exec_start")}
    timed = {t.id for t in tasks}
    worst = max(r["ts"] - starts[(r["id"], r["token"])] for r in execs.of("exec_error") if r["id"] in timed)
    print(f"[chaos {chaos.name}] longest attempt with timeout 0.5 s: {worst:.3f} s")


def test_f10_deadline_passed_while_queued_never_starts(chaos: Chaos) -> None:
    """Tasks with deadline = now + 1 s wait behind a busy worker (c=1) until the deadline has
    passed on the Redis clock: they are archived "deadline exceeded" and never started; the
    tasks behind them run."""
    gate = chaos.folder / "gate"
    worker = chaos.fleet.spawn(concurrency=1)
    blocker = make("cancellable", {"gate": str(gate)})
    chaos.enqueue([blocker])
    wait_until(lambda: chaos.execs().of("exec_start", blocker.id), "the blocker to start", 20)
    deadline = datetime.now(UTC) + timedelta(seconds=1)
    late = [make("quick", {"late": i}, deadline=deadline) for i in range(5)]
    normal = [make("quick", {"normal": i}) for i in range(5)]
    chaos.enqueue(late + normal)
    deadline_ms = int(deadline.timestamp() * 1000)
    wait_until(lambda: chaos.server_ms() > deadline_ms, "the deadline to pass on the Redis clock", 10)
    gate.touch()
    chaos.drain(30)
    assert chaos.fleet.graceful([worker]) == [0]

    report = chaos.check(dup_bound=0)
    for task in late:
        info = report.infos[task.id]
        assert info is not None and info.state is qsync.TaskState.ARCHIVED, info
        assert info.last_error == "deadline exceeded", info.last_error
        assert not report.execs.of("exec_start", task.id), "a task started after its deadline"
    for task in [blocker, *normal]:
        info = report.infos[task.id]
        assert info is not None and info.state is qsync.TaskState.COMPLETED


# --- F21 ---------------------------------------------------------------------------------------


def test_f21_worker_clock_skew(chaos: Chaos) -> None:
    """Two workers whose wall clocks are 3 x lease ahead and behind: no premature recovery, no
    duplicate, and delayed and retried tasks never start before they are due by Redis TIME."""
    rng = _seeded(chaos.name)
    lease = 1.0
    skew = 3 * lease
    # c=6: the 8 long tasks leave slots free, so due tasks are not late for want of capacity.
    ahead, behind = (
        chaos.fleet.spawn(env={"QSYNC_TEST_CLOCK_OFFSET": str(offset)}, concurrency=6, lease_duration=lease)
        for offset in (skew, -skew)
    )
    chaos.fleet.wait_ready([ahead, behind])
    immediate = [make("quick", {"i": i}) for i in range(150)]
    delayed = [make("quick", {"d": i}, delay=round(rng.uniform(1, 3), 3)) for i in range(40)]
    long = [make("sleepy", {"secs": 2.5 * lease}) for _ in range(8)]
    flaky = [make("flaky", {"f": i, "fail_times": 1}, retry=3, retry_delay=1) for i in range(20)]
    tasks = immediate + delayed + long + flaky
    rng.shuffle(tasks)
    chaos.enqueue(tasks)
    chaos.drain(60)
    statuses = chaos.fleet.graceful([ahead, behind])

    report = chaos.check(dup_bound=0)
    assert statuses == [0, 0]
    assert not chaos.fleet.log_lines("WARNING")
    assert report.state_counts() == {"completed": len(tasks)}
    for task in tasks:
        info = report.infos[task.id]
        assert info is not None and info.recoveries == 0, info
        assert info.retried == (1 if task.type == "flaky" else 0), info
    worst = _check_not_early(chaos, delayed)
    execs = report.execs
    for task in flaky:
        info = report.infos[task.id]
        assert info is not None and info.last_failed_at is not None
        second = [r for r in execs.of("exec_start", task.id) if r["attempt"] == 1]
        assert len(second) == 1
        assert second[0]["ts"] * 1000 >= info.last_failed_at.timestamp() * 1000 + 1000 - 1, "retried early"
    # The skew was really in force in both processes.
    for worker, sign in ((ahead, 1), (behind, -1)):
        mine = [r for r in execs.records if r["pid"] == worker.pid]
        assert mine, f"{worker!r} ran nothing"
        assert all(sign * (r["clock"] - r["ts"]) > skew - 0.5 for r in mine)
    print(f"[chaos {chaos.name}] worst delayed-task lateness {worst:.3f} s")


# --- F29 ---------------------------------------------------------------------------------------


def test_f29_racing_recoverers(chaos: Chaos) -> None:
    """A worker holding 250 leases is SIGKILLed while 4 workers recover every 50 ms: the leases
    expire together and each task is recovered exactly once (recoveries == 1), never appears
    twice in pending, and runs to completion once."""
    n = 250
    holder = chaos.fleet.spawn(concurrency=n, lease_duration=1.0)
    chaos.fleet.wait_ready([holder])
    tasks = [make("sleepy", {"secs": 300, "hold_attempts": 1}) for _ in range(n)]
    chaos.enqueue(tasks)
    wait_until(
        _in_flight(chaos, holder, n), f"the holder to run {n} tasks", 30, diagnostics=chaos.diagnostics
    )
    racers = chaos.fleet.spawn_many(4, concurrency=4, lease_duration=1.0, recover_interval=0.05)
    chaos.fleet.wait_ready(racers)
    assert chaos.counts()["active"] == n

    assert chaos.fleet.kill(holder) == -9
    twice: list[str] = []

    def sample_pending() -> None:
        ids = chaos.r.lrange(chaos.keys.pending, 0, -1)
        twice.extend(raw.decode() for raw in set(ids) if ids.count(raw) > 1)

    chaos.drain(60, tick=sample_pending)
    statuses = chaos.fleet.graceful(racers)

    report = chaos.check(dup_bound=0, recovered_in_logs=recovered_in_logs(racers))
    assert statuses == [0, 0, 0, 0]
    assert not twice, f"ids seen twice in pending: {sorted(set(twice))[:10]}"
    assert report.state_counts() == {"completed": n}
    for info in report.infos.values():
        assert info is not None and (info.recoveries, info.retried) == (1, 1), info
    ends = report.execs.of("exec_end")
    assert sorted(r["attempt"] for r in ends) == [1] * n
    assert {r["pid"] for r in ends} <= {w.pid for w in racers}
    assert recovered_in_logs(racers) == n

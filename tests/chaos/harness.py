"""The chaos harness: real worker subprocesses, real signals, a drain, and a Jepsen-style checker.

- :class:`Fleet` starts workers as subprocesses (``python -m qsync worker tests.chaos.app:mux``,
  or ``python -m tests.chaos.runner`` when an option is not on the command line), kills them
  (SIGKILL), stops and continues them (SIGSTOP/SIGCONT), stops them gracefully (SIGTERM) and
  respawns the ones that died. Every process is stopped by pid in :meth:`Fleet.close`.
- :class:`History` records every enqueue (attempted, ok, failed, uncertain) by task id.
- :class:`Execs` reads the handlers' ``exec_start`` / ``exec_end`` / ``exec_error`` records
  (see tests/chaos/app.py).
- :class:`Chaos` ties them to one queue under a unique prefix on the session's Redis, drains
  (polls until pending, active, scheduled and retry are all empty, read in one MULTI), and
  checks (reliability.md 3.1, Jepsen ``total-queue``):

  - **lost** = enqueued ok - (completed U archived with a reason)
  - **unexpected** = executed ids that were never enqueued
  - **phantom** = completed ids with no ``exec_end`` record (completed without running)
  - **duplicated** = ids with more than one ``exec_end`` (counted, bounded per test)
  - structure: **I4** (active empty, nothing due left), **I5** (each id in exactly one
    container, at most once, hash state = container, no orphan id, no hash without a
    container), **I6** (no unique lock held by a finished task), **I8** (retried <= max_retry),
    and no traceback or ERROR line in any worker's log.

  Every check prints its counts on one line (``[chaos <name>] ...``).

Synchronisation is by polling Redis or the record files with deadlines, never by sleeping.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

import qsync
from qsync._keys import keys_for
from qsync.errors import OutcomeUnknown, QsyncError, TaskNotFound

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.chaos.app:mux"
QUEUE = "q"
RETENTION = 600  # seconds: finished tasks stay readable by info() for the checker
# Options the command line takes; anything else starts tests/chaos/runner.py instead.
CLI_OPTIONS = ("concurrency", "lease_duration", "shutdown_timeout", "poll_interval")
FAST: dict[str, Any] = {
    "concurrency": 4, "lease_duration": 1.0, "poll_interval": 0.2, "shutdown_timeout": 1.0,
}  # fmt: skip
READY = re.compile(r"qsync server \S+: queues")
CONTAINERS = ("pending", "active", "scheduled", "retry", "archived", "completed")
CRASH = ("Traceback", " ERROR ", " CRITICAL ")  # in a worker's log: an internal failure


def wait_until(
    predicate: Callable[[], Any],
    what: str,
    timeout: float = 30.0,
    *,
    tick: Callable[[], None] | None = None,
    diagnostics: Callable[[], str] | None = None,
    interval: float = 0.02,
) -> Any:
    """Poll ``predicate`` (calling ``tick`` first each round) until it is truthy; fail after
    ``timeout`` seconds with ``diagnostics()`` in the message."""
    deadline = time.monotonic() + timeout
    while True:
        if tick is not None:
            tick()
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            extra = diagnostics() if diagnostics is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def make(type_: str, payload: dict[str, Any] | None = None, **options: Any) -> qsync.Task:
    """A task with a JSON payload, kept ``RETENTION`` seconds after it finishes."""
    options.setdefault("retention", RETENTION)
    return qsync.Task(type_, json.dumps(payload or {}).encode(), **options)


# --- worker processes ------------------------------------------------------------------------


class Worker:
    """One worker subprocess; its stdout and stderr go to ``worker-<n>.log``."""

    def __init__(
        self,
        number: int,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        options: dict[str, Any],
        extra_env: dict[str, str],
        respawn: bool,
    ) -> None:
        self.number = number
        self.options = options
        self.extra_env = extra_env
        self.respawn = respawn
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in close()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.proc.pid

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exit {self.proc.returncode}"
        return f"<worker #{self.number} pid {self.pid} {state}>"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(f"    {line}" for line in self.log().splitlines()[-lines:])

    def ready(self) -> bool:
        """True once the server logged its start (it has registered and begins processing)."""
        return READY.search(self.log()) is not None

    def send(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill (by pid) if still running, reap, close the log."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        finally:
            self._log.close()


class Fleet:
    """The worker processes of one test."""

    def __init__(self, redis_url: str, prefix: str, queue: str, folder: Path) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.queue = queue
        self.folder = folder
        self.workers: list[Worker] = []  # every worker started, dead or alive
        self.exits: list[tuple[int, int]] = []  # (pid, exit status) of workers found dead and respawned

    def spawn(self, *, respawn: bool = False, env: dict[str, str] | None = None, **options: Any) -> Worker:
        """Start a worker with FAST defaults overridden by ``options`` (ServerConfig fields)."""
        options = {**FAST, **options}
        extra_env = dict(env or {})
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("QSYNC_")}
        full_env.update(QSYNC_CHAOS_DIR=str(self.folder), PYTHONUNBUFFERED="1", **extra_env)
        if set(options) <= set(CLI_OPTIONS):
            argv = [
                sys.executable, "-m", "qsync", "worker", APP, "--redis-url", self.redis_url,
                "--prefix", self.prefix, "--queues", f"{self.queue}=1",
                "--concurrency", str(options["concurrency"]),
                "--lease-duration", str(options["lease_duration"]),
                "--shutdown-timeout", str(options["shutdown_timeout"]),
                "--poll-interval", str(options["poll_interval"]),
            ]  # fmt: skip
        else:
            argv = [sys.executable, "-m", "tests.chaos.runner"]
            full_env.update(
                QSYNC_REDIS_URL=self.redis_url,
                QSYNC_PREFIX=self.prefix,
                QSYNC_CHAOS_SERVER=json.dumps({"queues": {self.queue: 1}, **options}),
            )
        number = len(self.workers)
        worker = Worker(
            number, argv, full_env, self.folder / f"worker-{number}.log", options, extra_env, respawn
        )
        self.workers.append(worker)
        return worker

    def spawn_many(self, n: int, **kwargs: Any) -> list[Worker]:
        return [self.spawn(**kwargs) for _ in range(n)]

    @property
    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.alive]

    def wait_ready(self, workers: Iterable[Worker], timeout: float = 20.0) -> None:
        workers = list(workers)
        wait_until(
            lambda: all(w.ready() for w in workers), "workers to start", timeout, diagnostics=self.diagnostics
        )

    def respawn_dead(self) -> int:
        """Replace every dead worker spawned with ``respawn=True``; returns how many."""
        count = 0
        for worker in list(self.workers):
            if worker.respawn and not worker.alive:
                worker.respawn = False
                self.exits.append((worker.pid, worker.proc.returncode or 0))
                self.spawn(respawn=True, env=worker.extra_env, **worker.options)
                count += 1
        return count

    def kill(self, worker: Worker, sig: int = signal.SIGKILL) -> int:
        """Kill a worker (SIGKILL by default) and reap it; returns its exit status."""
        worker.send(sig)
        return worker.wait(10)

    def pause(self, worker: Worker) -> None:
        worker.send(signal.SIGSTOP)

    def resume(self, worker: Worker) -> None:
        worker.send(signal.SIGCONT)

    def graceful(self, workers: Sequence[Worker], timeout: float = 30.0) -> list[int]:
        """SIGTERM every worker at once, then wait for each; returns their exit statuses."""
        for worker in workers:
            worker.respawn = False
            worker.send(signal.SIGTERM)
        return [worker.wait(timeout) for worker in workers]

    def log_lines(self, *needles: str) -> list[str]:
        """Lines of every worker's log that contain one of ``needles``."""
        lines = ((w, line) for w in self.workers for line in w.log().splitlines())
        return [f"{w!r}: {line}" for w, line in lines if any(n in line for n in needles)]

    def diagnostics(self) -> str:
        parts = []
        for worker in self.workers:
            parts.append(f"\n  {worker!r} log tail:\n{worker.tail()}")
        return "".join(parts)

    def close(self) -> None:
        errors = []
        for worker in self.workers:
            try:
                worker.close()
            except Exception as exc:  # keep closing the others
                errors.append(exc)
        if errors:
            raise errors[0]


def recovered_in_logs(workers: Iterable[Worker]) -> int:
    """Expired leases the workers' sweepers report having recovered (their INFO log lines)."""
    pattern = re.compile(r"recovered (\d+) expired leases")
    return sum(int(m) for w in workers for m in pattern.findall(w.log()))


def final_stats(worker: Worker) -> dict[str, int]:
    """The counters a worker logs when it stops gracefully ("... stopped: {...}")."""
    match = re.search(r"stopped: (\{.*\})", worker.log())
    assert match, f"{worker!r} logged no final stats:\n{worker.tail()}"
    return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", match.group(1))}


# --- history and records ---------------------------------------------------------------------


class History:
    """Every enqueue, by task id: attempted, acknowledged (ok), refused, or uncertain."""

    def __init__(self) -> None:
        self.attempted: dict[str, qsync.Task] = {}
        self.ok: dict[str, qsync.TaskInfo] = {}
        self.failed: dict[str, QsyncError] = {}
        self.uncertain: dict[str, QsyncError] = {}

    def enqueue(self, queue: qsync.Queue, qname: str, tasks: Sequence[qsync.Task]) -> list[Any]:
        for task in tasks:
            self.attempted[task.id] = task
        results = queue.enqueue_many(tasks, queue=qname)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, qsync.TaskInfo):
                self.ok[task.id] = result
            elif isinstance(result, OutcomeUnknown):
                self.uncertain[task.id] = result
            else:
                self.failed[task.id] = result
        return results


@dataclass
class Execs:
    """The handlers' records, read from every ``exec-<pid>.jsonl`` in the folder."""

    records: list[dict[str, Any]]

    @classmethod
    def read(cls, folder: Path) -> Execs:
        records = []
        for path in sorted(folder.glob("exec-*.jsonl")):
            data = path.read_bytes()
            complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
            records += [json.loads(line) for line in complete.splitlines() if line]
        records.sort(key=lambda r: r["ts"])
        return cls(records)

    def of(self, ev: str, task_id: str | None = None, pid: int | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["ev"] == ev and (task_id is None or r["id"] == task_id) and (pid is None or r["pid"] == pid)
        ]

    def count(self, ev: str) -> Counter[str]:
        return Counter(r["id"] for r in self.records if r["ev"] == ev)

    def ids(self) -> set[str]:
        return {r["id"] for r in self.records}

    def in_flight(self, pid: int) -> set[str]:
        """Ids whose handler started in process ``pid`` and has not ended there."""
        started = {(r["id"], r["token"]) for r in self.records if r["pid"] == pid and r["ev"] == "exec_start"}
        ended = {(r["id"], r["token"]) for r in self.records if r["pid"] == pid and r["ev"] != "exec_start"}
        return {task_id for task_id, _ in started - ended}


# --- one test's queue ------------------------------------------------------------------------


@dataclass
class Report:
    """The checker's verdict for one run."""

    name: str
    history: History
    execs: Execs
    infos: dict[str, qsync.TaskInfo | None]
    lost: set[str]
    unexpected: set[str]
    phantom: set[str]
    dup: dict[str, int]  # id -> extra exec_end records
    problems: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dup_execs(self) -> int:
        return sum(self.dup.values())

    def state_counts(self) -> Counter[str]:
        return Counter(info.state.value if info else "missing" for info in self.infos.values())

    def summary(self, dup_bound: int | None) -> str:
        h = self.history
        states = self.state_counts()
        extra = "".join(f" {k}={v}" for k, v in self.extra.items())
        return (
            f"[chaos {self.name}] attempted={len(h.attempted)} ok={len(h.ok)} fail={len(h.failed)} "
            f"info={len(h.uncertain)} | completed={states['completed']} archived={states['archived']} "
            f"other={sum(v for k, v in states.items() if k not in ('completed', 'archived'))} | "
            f"lost={len(self.lost)} unexpected={len(self.unexpected)} phantom={len(self.phantom)} "
            f"duplicated_ids={len(self.dup)} duplicated_execs={self.dup_execs} bound={dup_bound} | "
            f"invariant_violations={len(self.problems)}{extra}"
        )

    def assert_valid(self, dup_bound: int) -> None:
        """lost = unexpected = phantom = {} , structural invariants hold, dup <= bound."""
        assert not self.lost, f"{len(self.lost)} acknowledged tasks lost: " + _show(self.lost, self.infos)
        assert not self.unexpected, f"executions of tasks never enqueued: {sorted(self.unexpected)[:10]}"
        assert not self.phantom, f"completed without an exec_end: {sorted(self.phantom)[:10]}"
        assert not self.problems, "structural invariants violated:\n  " + "\n  ".join(self.problems[:30])
        assert self.dup_execs <= dup_bound, (
            f"{self.dup_execs} duplicate executions > bound {dup_bound}: {dict(list(self.dup.items())[:10])}"
        )


def _show(ids: Iterable[str], infos: dict[str, qsync.TaskInfo | None]) -> str:
    out = []
    for task_id in sorted(ids)[:10]:
        info = infos.get(task_id)
        out.append(f"{task_id}: " + ("not found" if info is None else f"{info.state} ({info.last_error})"))
    return "; ".join(out)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class Chaos:
    """One test's queue (a unique prefix on the session's Redis), its fleet, history and checker."""

    def __init__(self, name: str, redis_url: str, port: int, folder: Path) -> None:
        self.name = name
        clean = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:40]
        self.prefix = f"chaos-{clean}-{uuid.uuid4().hex[:6]}"
        self.qname = QUEUE
        self.folder = folder
        self.r = redis.Redis(port=port)
        self.queue = qsync.new(self.r, prefix=self.prefix)
        self.keys = keys_for(self.prefix, self.qname)
        self.fleet = Fleet(redis_url, self.prefix, self.qname, folder)
        self.history = History()

    def close(self) -> None:
        try:
            self.fleet.close()
        finally:
            self.r.close()

    # -- producing and observing --

    def enqueue(self, tasks: Sequence[qsync.Task]) -> list[Any]:
        return self.history.enqueue(self.queue, self.qname, tasks)

    def execs(self) -> Execs:
        return Execs.read(self.folder)

    def server_ms(self) -> int:
        seconds, micros = self.r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def counts(self) -> dict[str, int]:
        """pending, active, scheduled, retry sizes, read atomically (one MULTI)."""
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.llen(k.pending).zcard(k.active).zcard(k.scheduled).zcard(k.retry)
        return dict(zip(("pending", "active", "scheduled", "retry"), pipe.execute(), strict=True))

    def info(self, task_id: str) -> qsync.TaskInfo | None:
        try:
            return self.queue.info(task_id, queue=self.qname)
        except TaskNotFound:
            return None

    def diagnostics(self) -> str:
        return f"\n  queue: {self.counts()}" + self.fleet.diagnostics()

    def drain(
        self, timeout: float = 60.0, *, respawn: bool = False, tick: Callable[[], None] | None = None
    ) -> None:
        """Wait until pending, active, scheduled and retry are all empty (no task is left
        unfinished; nothing can come back), respawning dead workers if asked."""

        def step() -> None:
            if respawn:
                self.fleet.respawn_dead()
            if tick is not None:
                tick()

        wait_until(
            lambda: not any(self.counts().values()),
            "the queue to drain",
            timeout,
            tick=step,
            diagnostics=self.diagnostics,
            interval=0.05,
        )

    # -- checking --

    def structure(self) -> list[str]:
        """Violations of I4, I5, I6 and I8 in the queue's keys as they are now."""
        contents = self._containers()
        states = self._task_states()
        return [
            *_container_problems(contents),
            *_placement_problems(contents, states),
            *self._attempt_problems(states),
            *self._lock_problems(states),
        ]

    def _containers(self) -> dict[str, list[bytes]]:
        k = self.keys
        pipe = self.r.pipeline(transaction=True)
        pipe.lrange(k.pending, 0, -1)
        for name in CONTAINERS[1:]:
            pipe.zrange(getattr(k, name), 0, -1)
        return dict(zip(CONTAINERS, pipe.execute(), strict=True))

    def _task_states(self) -> dict[str, str]:
        prefix = self.keys.task_prefix
        states: dict[str, str] = {}
        for key in self.r.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            state = self.r.hget(key, "s")
            if state is not None:  # gone between SCAN and HGET (retention ran out): ignore
                states[key.decode()[len(prefix) :]] = state.decode()
        return states

    def _attempt_problems(self, states: dict[str, str]) -> list[str]:
        problems = []
        for task_id in states:
            retried, max_retry = self.r.hmget(self.keys.task(task_id), "r", "m")
            if retried is not None and max_retry is not None and int(retried) > int(max_retry):
                problems.append(f"I8: {task_id} retried {int(retried)} > max_retry {int(max_retry)}")
        return problems

    def _lock_problems(self, states: dict[str, str]) -> list[str]:
        problems = []
        for key in self.r.scan_iter(match=_glob_escape(self.keys.unique_prefix) + "*", count=1000):
            owner = self.r.get(key)
            if owner is not None and states.get(owner.decode()) in (None, "completed", "archived"):
                problems.append(f"I6: unique lock {key.decode()} held by finished task {owner.decode()}")
        return problems

    def check(self, *, dup_bound: int, **extra: Any) -> Report:
        """Read every task, classify, print the counts, and assert validity with ``dup_bound``."""
        execs = self.execs()
        infos = {task_id: self.info(task_id) for task_id in self.history.ok}
        done: set[str] = set()
        for task_id, info in infos.items():
            if info is None:
                continue
            if info.state is qsync.TaskState.COMPLETED or (
                info.state is qsync.TaskState.ARCHIVED and info.last_error
            ):
                done.add(task_id)
        ends = execs.count("exec_end")
        completed = {i for i, info in infos.items() if info and info.state is qsync.TaskState.COMPLETED}
        report = Report(
            name=self.name,
            history=self.history,
            execs=execs,
            infos=infos,
            lost=set(self.history.ok) - done,
            unexpected=execs.ids() - set(self.history.attempted),
            phantom={i for i in completed if ends[i] == 0},
            dup={i: n - 1 for i, n in ends.items() if n > 1},
            problems=self.structure() + [f"worker crash: {line}" for line in self.fleet.log_lines(*CRASH)],
            extra=extra,
        )
        print(report.summary(dup_bound), flush=True)
        report.assert_valid(dup_bound)
        return report


def _container_problems(contents: dict[str, list[bytes]]) -> list[str]:
    """I4 (nothing active or left to do after the drain) and I5 (no id twice in pending)."""
    problems = []
    if contents["active"]:
        problems.append(f"I4: {len(contents['active'])} ids still active after the drain")
    for name in ("pending", "scheduled", "retry"):
        if contents[name]:
            problems.append(f"I4: {len(contents[name])} ids left in {name}")
    for raw, n in Counter(contents["pending"]).items():
        if n > 1:
            problems.append(f"I5: {raw.decode()} appears {n} times in pending")
    return problems


def _placement_problems(contents: dict[str, list[bytes]], states: dict[str, str]) -> list[str]:
    """I5: every id in exactly one container, with a hash whose state names that container."""
    where: dict[str, set[str]] = defaultdict(set)
    for name, ids in contents.items():
        for raw in ids:
            where[raw.decode()].add(name)
    problems = []
    for task_id, names in where.items():
        if len(names) > 1:
            problems.append(f"I5: {task_id} is in {sorted(names)}")
        if task_id not in states:
            problems.append(f"I5: {task_id} in {sorted(names)} has no task hash (orphan id)")
        elif states[task_id] not in names:
            problems.append(f"I5: {task_id} has state {states[task_id]} but is in {sorted(names)}")
    for task_id, state in states.items():
        if task_id not in where:
            problems.append(f"I5: task hash {task_id} (state {state}) is in no container")
    return problems

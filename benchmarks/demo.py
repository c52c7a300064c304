"""``make demo``: a real producer and a fleet of worker processes, end to end.

Connects to ``REDIS_URL`` (default redis://localhost:6379/0) under a fresh key prefix and never
flushes anything; if nothing answers there (or that Redis may evict keys) and redis-server is on
PATH, it starts a private one in a temporary folder and removes it afterwards. It enqueues
tasks on three weighted queues (some delayed, some failing and retrying, some doomed to be
archived), starts three ``qsync worker`` processes, SIGKILLs one midway, and waits until every
task is done or archived. It exits 0 only if nothing was lost.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

import qsync

HERE = Path(__file__).resolve().parent
QUEUES = {"critical": 6, "default": 3, "low": 1}
WORKERS = 3
CONCURRENCY = 8
LEASE = 2.0
console = Console()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _usable(url: str) -> str | None:
    """None if qsync can use the Redis at url, else why not."""
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
            qsync.new(client, prefix="qsync-demo-probe").run_calls([])
    except (redis.RedisError, qsync.errors.QsyncError, OSError) as exc:
        return str(exc)
    return None


class PrivateRedis:
    """A redis-server in a temporary folder, stopped and removed by :meth:`close`."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="qsync-demo-")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.folder,
             "--save", "", "--appendonly", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while _usable(self.url) is not None:
            if time.monotonic() > deadline:
                raise SystemExit("demo: the private redis-server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def _tasks() -> list[tuple[str, qsync.Task]]:
    rng = random.Random(7)
    out: list[tuple[str, qsync.Task]] = []
    for queue, count in (("critical", 700), ("default", 700), ("low", 700)):
        for i in range(count):
            roll = rng.random()
            if roll < 0.05:
                task = qsync.Task("demo:slow", b"slow", retention=600)
            elif roll < 0.12:
                task = qsync.Task("demo:flaky", b"flaky", retry=3, retry_delay=0.2, retention=600)
            elif roll < 0.14:
                task = qsync.Task("demo:doomed", b"doomed", retry=1, retry_delay=0.1, retention=600)
            elif roll < 0.22:
                task = qsync.Task("demo:work", b"later %d" % i, delay=rng.uniform(0.5, 3), retention=600)
            else:
                task = qsync.Task("demo:work", b"now %d" % i, retention=600)
            out.append((queue, task))
    return out


def _spawn(url: str, prefix: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "QSYNC_REDIS_URL": url, "QSYNC_PREFIX": prefix, "PYTHONPATH": str(HERE)}
    queues = ",".join(f"{q}={w}" for q, w in QUEUES.items())
    return subprocess.Popen(
        [sys.executable, "-m", "qsync", "worker", "demo_tasks:mux", "--queues", queues,
         "--concurrency", str(CONCURRENCY), "--lease-duration", str(LEASE), "--log-level", "WARNING"],
        env=env, cwd=HERE,
    )  # fmt: skip


def _cleanup(client: redis.Redis, prefix: str) -> None:
    for pattern in ("{" + prefix + ":*", "{" + prefix + "}*"):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])


def run(url: str) -> int:
    prefix = "qsync-demo-" + uuid.uuid4().hex[:6]
    book = "{" + prefix + ":demo}"
    client = redis.Redis.from_url(url)
    queue = qsync.new(client, prefix=prefix)
    plan = _tasks()
    workers = [_spawn(url, prefix) for _ in range(WORKERS)]
    try:
        started = time.monotonic()
        ids: dict[str, str] = {}
        for name in QUEUES:
            batch = [t for q, t in plan if q == name]
            for task, result in zip(batch, queue.enqueue_many(batch, queue=name), strict=True):
                if isinstance(result, Exception):
                    raise result
                ids[task.id] = name
        console.print(f"[bold]enqueued[/] {len(ids)} tasks on {', '.join(QUEUES)} (prefix {prefix}); "
                      f"{WORKERS} workers x {CONCURRENCY}, lease {LEASE:g}s")  # fmt: skip
        doomed = {t.id for _, t in plan if t.type == "demo:doomed"}
        expected_done = len(ids) - len(doomed)
        killed = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            done = client.hlen(book + ":runs")
            archived = sum(client.zcard(queue.keys(q).archived) for q in QUEUES)
            pending = {q: client.llen(queue.keys(q).pending) for q in QUEUES}
            console.print(f"  t={time.monotonic() - started:5.1f}s done {done:5d}/{expected_done}  archived "
                          f"{archived:3d}  pending {pending}  workers alive "
                          f"{sum(w.poll() is None for w in workers)}")  # fmt: skip
            if not killed and done > expected_done * 0.3:
                console.print(
                    f"[bold red]SIGKILL[/] worker pid {workers[0].pid} (its leased tasks must come back)"
                )
                os.kill(workers[0].pid, signal.SIGKILL)
                workers[0].wait()
                killed = True
            if done >= expected_done and archived >= len(doomed):
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        return _report(client, queue, book, ids, doomed, elapsed)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=15)
            except subprocess.TimeoutExpired:
                w.kill()
        _cleanup(client, prefix)
        client.close()


def _report(client: redis.Redis, queue: qsync.Queue, book: str, ids: dict[str, str], doomed: set[str],
            elapsed: float) -> int:  # fmt: skip
    runs = {k.decode(): int(v) for k, v in client.hgetall(book + ":runs").items()}
    states: Counter[str] = Counter()
    retried = recovered = 0
    lost: list[str] = []
    for task_id, name in ids.items():
        try:
            info = queue.info(task_id, queue=name)
        except qsync.errors.TaskNotFound:
            lost.append(task_id)
            continue
        states[info.state.value] += 1
        retried += info.retried > 0
        recovered += info.recoveries > 0
        ok = info.state is qsync.TaskState.COMPLETED and task_id in runs
        dead = info.state is qsync.TaskState.ARCHIVED and task_id in doomed
        if not (ok or dead):
            lost.append(task_id)
    duplicates = sum(1 for n in runs.values() if n > 1)
    order = [q.decode() for q in client.lrange(book + ":order", 0, len(runs) // 3)]
    share = Counter(order)

    table = Table(title=f"qsync demo: {len(ids)} tasks in {elapsed:.1f}s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("enqueued", str(len(ids)))
    table.add_row("done (completed)", str(states["completed"]))
    table.add_row("retried (failed at least once)", str(retried))
    table.add_row("archived (out of retries, on purpose)", str(states["archived"]))
    table.add_row("recovered (lease expired after SIGKILL)", str(recovered))
    table.add_row("run more than once (at-least-once)", str(duplicates))
    for name, weight in QUEUES.items():
        pct = 100 * share[name] / max(1, len(order))
        table.add_row(f"share of first third: {name} (weight {weight})", f"{pct:.0f}%")
    table.add_row("lost", str(len(lost)), style="bold red" if lost else "bold green")
    console.print(table)
    if lost:
        console.print(f"[bold red]LOST {len(lost)} tasks[/], e.g. {lost[:5]}")
        return 1
    console.print("[bold green]nothing lost[/]")
    return 0


def main() -> int:
    url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    problem = _usable(url)
    if problem is None:
        console.print(f"demo: using Redis at {url} (own key prefix, nothing flushed)")
        return run(url)
    if shutil.which("redis-server") is None:
        console.print(f"demo: cannot use {url} ({problem}) and redis-server is not on PATH")
        return 1
    console.print(f"demo: cannot use {url} ({problem}); starting a private redis-server")
    private = PrivateRedis()
    try:
        return run(private.url)
    finally:
        private.close()


if __name__ == "__main__":
    sys.exit(main())

"""``make bench``: qsync's speed and cost, each figure next to a ceiling measured in the same run.

It starts its own redis-server (never a Redis it did not start), then measures:

- the Redis ceiling: ``redis-benchmark`` with plain LPUSH/RPOP and with qsync's enqueue and lease
  scripts (EVALSHA), at ``-P 1`` and ``-P 16``;
- enqueue: single ``Queue.enqueue`` against ``redis-benchmark -c 1 -P 1`` with the same script
  (runs alternated, so both see the same minute of the machine), and ``enqueue_many``
  against a bare loop sending the same pre-built 1,000-task script calls;
- drain: the full worker server (1 and 2 processes, no-op async handler) against a bare asyncio
  loop that only leases, runs a no-op coroutine and acks (``bare_loop.py``), and Redis CPU per
  task (the three drained in turns);
- latency from ``enqueue`` to handler start, idle (probes ~50 ms apart, so the machine's cores
  go idle too), warm (2 ms apart) and under a 5,000 tasks/s background load, against a floor
  process that makes only the same hops (``latency_floor.py``; the floor and the server probed
  in turns);
- memory per pending task in Redis (beyond its payload) and Redis CPU per task over its life
  (enqueue, lease, ack), by payload size, each size in a fresh Redis; worker RSS growth;
- growth: lease+ack, promote and recover cost per task with 10k and with 1M tasks waiting,
  scheduled or leased (both queues side by side in one Redis, measured in turns).

Medians of repeated runs where a figure is cheap to repeat. It prints one table and writes
JSON to ``benchmarks/results/`` (compared with the previous run when there is one). The
machine is shared and noisy: trust ratios measured in the same run over absolute figures.

Usage: ``python benchmarks/run.py [--quick] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

import qsync
from qsync import _ops
from qsync._keys import QueueKeys
from qsync._scripts import script

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
console = Console(width=150)


# --- the Redis under test -------------------------------------------------------------------


class PrivateRedis:
    """A redis-server on a free port in a temporary folder, removed by :meth:`close`."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("bench: redis-server is not on PATH (install Redis >= 7)")
        self.folder = tempfile.mkdtemp(prefix="qsync-bench-")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.folder,
             "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit("bench: the private redis-server did not start") from None
                time.sleep(0.02)

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- results ----------------------------------------------------------------------------------


@dataclass
class Row:
    """One figure: its value, the ceiling it is compared with and the target."""

    group: str
    name: str
    value: float
    unit: str
    ceiling_name: str = ""
    ceiling: float | None = None
    target: str = ""
    samples: tuple[float, ...] = ()  # the measurements the value is the median of, when kept

    @property
    def ratio(self) -> float | None:
        if self.ceiling is None or self.ceiling == 0:
            return None
        return self.value / self.ceiling


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        # A row is matched with the previous run's by group and name.
        if any((r.group, r.name) == (row.group, row.name) for r in self.rows):
            raise ValueError(f"bench: two rows named {row.group}/{row.name!r}")
        self.rows.append(row)
        ratio = f"  ({row.ratio:.2f}x {row.ceiling_name})" if row.ratio is not None else ""
        console.print(f"  {row.name}: [bold]{_fmt(row.value)}[/] {row.unit}{ratio}")
        return row


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


# --- workers ------------------------------------------------------------------------------------


@contextmanager
def workers(bench: PrivateRedis, prefix: str, count: int, concurrency: int) -> Iterator[list[int]]:
    """``count`` ``qsync worker`` processes on the bench app; yields their pids once every one
    has registered, stops them with SIGTERM at the end."""
    env = {**os.environ, "QSYNC_REDIS_URL": bench.url, "QSYNC_PREFIX": prefix, "PYTHONPATH": str(HERE)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qsync",
                "worker",
                "bench_app:mux",
                "--concurrency",
                str(concurrency),
                "--log-level",
                "WARNING",
            ],
            env=env,
            cwd=HERE,
        )  # fmt: skip
        for _ in range(count)
    ]
    try:
        index = "{" + prefix + "}:servers"
        _wait(lambda: bench.client.zcard(index) >= count, "the workers to register", 30)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(predicate: Callable[[], Any], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.005)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _redis_cpu(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def _process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


# --- producers ----------------------------------------------------------------------------------


def _tasks(count: int, payload: bytes = b"x" * 16, kind: str = "bench:noop") -> list[qsync.Task]:
    return [qsync.Task(kind, payload) for _ in range(count)]


def fill(queue: qsync.Queue, count: int, name: str = "default", payload: bytes = b"x" * 16) -> None:
    """Enqueue ``count`` no-op tasks in 10,000-task calls."""
    for start in range(0, count, 10_000):
        queue.enqueue_many(_tasks(min(10_000, count - start), payload), queue=name)


def _check_succeeded(client: redis.Redis, queue: qsync.Queue, name: str = "default") -> None:
    """Every task drained succeeded: none waits for a retry, none was archived."""
    keys = queue.keys(name)
    for key in (keys.retry, keys.archived, keys.scheduled):
        if client.zcard(key):
            raise SystemExit(f"bench: {key} holds tasks after a drain: the no-op handler failed")


def drained(client: redis.Redis, queue: qsync.Queue, name: str = "default") -> bool:
    keys = queue.keys(name)
    pipe = client.pipeline(transaction=False)
    pipe.llen(keys.pending)
    pipe.zcard(keys.active)
    pending, active = pipe.execute()
    return int(pending) == 0 and int(active) == 0


# --- the measurements ------------------------------------------------------------------------


def redis_benchmark(bench: PrivateRedis, *command: str, pipeline: int, requests: int) -> float:
    """Requests per second that ``redis-benchmark -c 1`` reaches with ``command``."""
    out = subprocess.run(
        ["redis-benchmark", "-p", str(bench.port), "-c", "1", "-P", str(pipeline), "-n", str(requests),
         "-r", "100000000", "--csv", *command],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) > 1 and cells[0] != "test":
            return float(cells[1])
    raise SystemExit(f"bench: cannot read redis-benchmark's output: {out!r}")


def enqueue_command(queue: qsync.Queue) -> list[str]:
    """qsync's enqueue EVALSHA for one 16-byte task, with a random id per request."""
    task = qsync.Task("bench:noop", b"x" * 16)
    call = _ops.enqueue_many(queue.keys("ceiling"), [task])[0]
    # The fingerprint is 8 raw bytes; redis-benchmark takes text, so 8 printable ones stand in.
    args = [b"fingerpr" if a == task.fingerprint else a for a in call.command()]
    words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
    return [w.replace(task.id, "__rand_int__") for w in words]


def measure_ceiling(bench: PrivateRedis, report: Report, quick: bool) -> None:
    console.rule("Redis ceiling (redis-benchmark, one connection)")
    n = 50_000 if quick else 200_000
    queue = qsync.new(bench.client, prefix="ceiling")
    bench.client.script_load(script("enqueue").source)
    evalsha = enqueue_command(queue)
    for label, command in (("LPUSH", ["LPUSH", "ceiling:list", "x" * 16]), ("RPOP", ["RPOP", "ceiling:list"]),
                           ("EVALSHA enqueue", evalsha)):  # fmt: skip
        for pipeline in (1, 16):
            runs = [redis_benchmark(bench, *command, pipeline=pipeline, requests=n) for _ in range(3)]
            report.add(Row("ceiling", f"{label} -P {pipeline}", _median(runs), "req/s"))
    # The lease script, one task per call, each run on a queue filled with a task per request.
    lease_n = n // 4
    bench.client.script_load(script("lease").source)
    lease = [
        a.decode() if isinstance(a, bytes) else str(a)
        for a in _ops.lease(queue.keys("lease"), 1, 60_000).command()
    ]
    for pipeline in (1, 16):
        runs = []
        for _ in range(3):
            fill(queue, lease_n, name="lease")
            runs.append(redis_benchmark(bench, *lease, pipeline=pipeline, requests=lease_n))
        report.add(Row("ceiling", f"EVALSHA lease (1 task) -P {pipeline}", _median(runs), "req/s"))
    _delete_prefix(bench.client, "ceiling")
    bench.client.delete("ceiling:list")


def measure_enqueue(bench: PrivateRedis, report: Report, quick: bool) -> None:
    console.rule("Enqueue (one producer)")
    prefix = f"enq-{uuid.uuid4().hex[:6]}"
    queue = qsync.new(bench.client, prefix=prefix)
    queue.enqueue(qsync.Task("bench:noop"))  # the server check and the script load come first
    single_n = 3_000 if quick else 10_000
    # Each sample runs right after a redis-benchmark run of the same script call, so that both
    # sides of the ratio see the same minute of this shared machine (its speed swings by a
    # third within minutes).
    evalsha = enqueue_command(queue)
    samples, ceilings, redis_us = [], [], []
    payload = b"x" * 16
    for _ in range(5):
        ceilings.append(redis_benchmark(bench, *evalsha, pipeline=1, requests=single_n))
        cpu_before = _redis_cpu(bench.client)
        started = time.perf_counter()
        for _ in range(single_n):  # building each Task is part of what a producer pays
            queue.enqueue(qsync.Task("bench:noop", payload))
        samples.append(single_n / (time.perf_counter() - started))
        redis_us.append((_redis_cpu(bench.client) - cpu_before) / single_n * 1e6)
    report.add(Row("enqueue", "enqueue (single)", _median(samples), "tasks/s",
                   "redis-benchmark EVALSHA -P 1 (alternated)", _median(ceilings), ">= 0.60x"))  # fmt: skip
    report.add(Row("enqueue", "  Redis CPU per task (single)", _median(redis_us), "µs"))
    _delete_prefix(bench.client, prefix)

    batch_n = 50_000 if quick else 100_000
    bare, full, redis_us = [], [], []
    for _ in range(3):
        tasks = _tasks(batch_n)
        # The baseline: 1,000-task script calls, one round trip each, nothing else.
        commands = [
            _ops._enqueue_chunk(queue.keys("bare"), tasks[i : i + 1000]).command()
            for i in range(0, batch_n, 1000)
        ]
        started = time.perf_counter()
        for command in commands:
            bench.client.execute_command(*command)
        bare.append(batch_n / (time.perf_counter() - started))
        cpu_before = _redis_cpu(bench.client)
        started = time.perf_counter()
        for _ in range(0, batch_n, 1000):  # the Tasks built in the timed loop, as a producer does
            queue.enqueue_many(_tasks(1000))
        full.append(batch_n / (time.perf_counter() - started))
        redis_us.append((_redis_cpu(bench.client) - cpu_before) / batch_n * 1e6)
        _delete_prefix(bench.client, prefix)
    report.add(Row("enqueue", "enqueue_many (1,000 per call)", _median(full), "tasks/s",
                   "bare loop of the same script calls", _median(bare), ">= 70,000/s"))  # fmt: skip
    report.add(Row("enqueue", "  Redis CPU per task (enqueue_many)", _median(redis_us), "µs"))


@dataclass
class PayloadCost:
    """What one pending task of a payload size costs Redis, from one sample in a fresh Redis."""

    memory: float  # bytes per pending task beyond its payload (used_memory over the sample)
    hash_usage: int  # one task hash's MEMORY USAGE beyond its payload
    cpu_us: float  # Redis CPU per task to enqueue it (in batches), lease it and ack it


def _payload_cost(payload: int, n: int, listpack_value: int | None = None) -> PayloadCost:
    """Fill a Redis of its own with ``n`` pending tasks (so the keyspace's table grows from
    empty, as it does for a real queue, and is counted), then lease and ack them all; with
    ``hash-max-listpack-value`` set to ``listpack_value`` when given."""
    node = PrivateRedis()
    try:
        if listpack_value is not None:
            node.client.config_set("hash-max-listpack-value", listpack_value)
        queue = qsync.new(node.client, prefix="mem")
        queue.enqueue(qsync.Task("bench:noop", b"x" * payload))  # the queue's own keys exist first
        queue.ack("default", queue.lease("default").tasks)
        before, cpu_before = int(node.client.info("memory")["used_memory"]), _redis_cpu(node.client)
        fill(queue, n, payload=b"x" * payload)
        after = int(node.client.info("memory")["used_memory"])
        keys = queue.keys("default")
        sample_id = node.client.lindex(keys.pending, 0)
        assert sample_id is not None
        hash_usage = int(node.client.memory_usage(keys.task(sample_id.decode())) or 0)
        while batch := queue.lease("default", count=500).tasks:
            assert all(queue.ack("default", batch))
        cpu_us = (_redis_cpu(node.client) - cpu_before) / n * 1e6
        return PayloadCost((after - before) / n - payload, hash_usage - payload, cpu_us)
    finally:
        node.close()


def measure_memory(report: Report, quick: bool) -> None:
    console.rule("Redis memory and CPU per task, by payload size")
    n = 20_000 if quick else 100_000
    small = _payload_cost(16, n)
    name = "Redis memory per pending task beyond payload (16-byte payloads)"
    report.add(Row("cost", name, small.memory, "bytes", target="<= 250"))
    report.add(Row("cost", "  of which the task hash (MEMORY USAGE)", small.hash_usage, "bytes"))
    # Up to 64 bytes a payload is one field of a compact hash (a listpack); from 65 to 512 it
    # is kept in pieces of at most 63 (format 3, lua/lib/payload.lua), so the hash stays compact
    # at some Redis CPU per piece; beyond that it is one field again and the hash a hash table.
    costs = {size: _payload_cost(size, n) for size in (64, 65, 200, 512, 513, 1024, 4096)}
    for size, cost in costs.items():
        report.add(Row("cost", f"  the same with {size}-byte payloads", cost.memory, "bytes"))
    # What README advises for larger payloads: a setting above them keeps their hash compact.
    tuned = _payload_cost(1024, n, listpack_value=2048)
    name = "  the same with 1024-byte payloads, hash-max-listpack-value 2048"
    report.add(Row("cost", name, tuned.memory, "bytes"))
    name = "Redis CPU per task, enqueue in batches + lease + ack (16-byte payloads)"
    report.add(Row("cost", name, small.cpu_us, "µs"))
    for size, cost in costs.items():
        name = f"  Redis CPU per task with {size}-byte payloads"  # row names are unique: JSON keys
        report.add(Row("cost", name, cost.cpu_us, "µs", "16-byte payloads", small.cpu_us))
    name = "  Redis CPU per task with 1024-byte payloads, hash-max-listpack-value 2048"
    report.add(Row("cost", name, tuned.cpu_us, "µs", "16-byte payloads", small.cpu_us))


def measure_drain(bench: PrivateRedis, report: Report, quick: bool) -> None:
    console.rule("Drain (no-op handler)")
    n = 30_000 if quick else 100_000
    prefix = f"drain-{uuid.uuid4().hex[:6]}"
    queue = qsync.new(bench.client, prefix=prefix)
    # The bare loop, one process and two in turns, so all see the same minutes of this noisy
    # machine (in sequence, a drift between them read as a difference of the code).
    bare: list[float] = []
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu_per_task: dict[int, list[float]] = {1: [], 2: []}
    worker_cpu_per_task: dict[int, list[float]] = {1: [], 2: []}
    bare_cpu_per_task: list[float] = []
    for round_index in range(2 if quick else 5):
        fill(queue, n)
        out = subprocess.run(
            [sys.executable, str(HERE / "bare_loop.py"), bench.url, prefix, "default", "500"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        done, elapsed, cpu = out.split()
        assert int(done) == n, f"the bare loop acked {done} of {n}"
        bare.append(n / float(elapsed))
        bare_cpu_per_task.append(float(cpu) / n * 1e6)
        # One process first in even rounds, two first in odd ones: neither always runs later.
        for processes in (1, 2) if round_index % 2 == 0 else (2, 1):
            fill(queue, n)
            queue.pause("default")
            with workers(bench, prefix, processes, concurrency=500) as pids:
                cpu_before, worker_cpu_before = _redis_cpu(bench.client), _process_cpu(pids)
                started = time.perf_counter()
                queue.resume("default")
                _wait(lambda: drained(bench.client, queue), "the queue to drain", 300)
                rates[processes].append(n / (time.perf_counter() - started))
                cpu_per_task[processes].append((_redis_cpu(bench.client) - cpu_before) / n * 1e6)
                worker_cpu_per_task[processes].append((_process_cpu(pids) - worker_cpu_before) / n * 1e6)
            _check_succeeded(bench.client, queue)
    bare_rate = _median(bare)
    report.add(Row("drain", "bare asyncio loop (lease 500, no-op, ack)", bare_rate, "tasks/s",
                   samples=tuple(bare)))  # fmt: skip
    report.add(Row("drain", "  its CPU per task", _median(bare_cpu_per_task), "µs"))
    one = _median(rates[1])
    report.add(Row("drain", "server, 1 worker process (concurrency 500)", one, "tasks/s",
                   "bare loop", bare_rate, ">= 30,000/s and >= 0.67x", tuple(rates[1])))  # fmt: skip
    report.add(Row("drain", "  Redis CPU per task (1 process)", _median(cpu_per_task[1]), "µs"))
    report.add(Row("drain", "  worker CPU per task (1 process)", _median(worker_cpu_per_task[1]), "µs"))
    report.add(Row("drain", "server, 2 worker processes (concurrency 500)", _median(rates[2]), "tasks/s",
                   "1 process", one, "> 1.00x", tuple(rates[2])))  # fmt: skip
    report.add(Row("drain", "  Redis CPU per task (2 processes)", _median(cpu_per_task[2]), "µs"))
    report.add(
        Row("drain", "  worker CPU per task (2 processes together)", _median(worker_cpu_per_task[2]), "µs")
    )
    _delete_prefix(bench.client, prefix)


def _latencies(
    bench: PrivateRedis,
    probed: list[tuple[qsync.Queue, str]],
    rounds: int,
    gap_s: tuple[float, float] = (0.002, 0.002),
) -> list[list[float]]:
    """Enqueue-to-handler-start latencies in ms, one list per ``(queue, prefix)`` of ``probed``:
    each round probes each of them in turn, one probe in flight at a time (the others idle),
    so every process measured sees the same minutes of this machine. Between probes the
    producer waits a random time in ``gap_s`` (seconds)."""
    keys = ["{" + prefix + ":bench}:latency" for _, prefix in probed]
    bench.client.delete(*keys)
    out: list[list[float]] = [[] for _ in probed]
    for _ in range(rounds):
        for (queue, _), key, samples in zip(probed, keys, out, strict=True):
            queue.enqueue(qsync.Task("bench:probe", repr(time.time()).encode()))
            reply = bench.client.blpop([key], timeout=10)
            if reply is None:
                raise SystemExit("bench: a probe task was not picked up within 10 s")
            samples.append(float(reply[1]) * 1000)
            time.sleep(random.uniform(*gap_s))  # let the worker go idle again
    return out


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def floor_worker(bench: PrivateRedis, prefix: str) -> Iterator[None]:
    """The latency floor process (``latency_floor.py``), stopped with SIGTERM at the end."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "latency_floor.py"), bench.url, prefix], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("bench: the latency floor process did not start")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def measure_latency(bench: PrivateRedis, report: Report, quick: bool) -> None:
    console.rule("Latency: enqueue to handler start (one worker process)")
    probes, idle_probes = (200, 60) if quick else (1000, 300)
    floor_prefix, prefix = f"floor-{uuid.uuid4().hex[:6]}", f"lat-{uuid.uuid4().hex[:6]}"
    floor_queue, queue = qsync.new(bench.client, prefix=floor_prefix), qsync.new(bench.client, prefix=prefix)
    with workers(bench, prefix, 1, concurrency=100):
        # The floor and the server probed in turns: in sequence, the machine's drift between
        # the two halves would read as the server's cost.
        with floor_worker(bench, floor_prefix):
            pair = [(floor_queue, floor_prefix), (queue, prefix)]
            _latencies(bench, pair, 20)  # warm up
            # Probes 2 ms apart keep this machine's cores awake between them ("warm"); about
            # 50 ms apart (jittered) they go idle, as they do while a worker waits for work, and
            # waking them costs more: that is the idle figure.
            warm_floor, warm = _latencies(bench, pair, probes)
            idle_floor, idle = _latencies(bench, pair, idle_probes, gap_s=(0.04, 0.06))
        _delete_prefix(bench.client, floor_prefix)
        for label, floor, server, targets in (
            ("warm (probes 2 ms apart)", warm_floor, warm, ("", "")),
            ("idle (probes ~50 ms apart)", idle_floor, idle, ("<= 0.5", "<= 2")),
        ):
            for q, target in zip((0.5, 0.99), targets, strict=True):
                name, floor_q = f"{label} p{round(q * 100)}", _percentile(floor, q)
                report.add(
                    Row("latency", f"{name} floor (BRPOP + lease behind it, coroutine)", floor_q, "ms")
                )
                report.add(Row("latency", name, _percentile(server, q), "ms", "floor", floor_q, target))

        stop = threading.Event()
        sent = [0]

        def background() -> None:
            producer = qsync.new(redis.Redis(port=bench.port), prefix=prefix)
            start = time.perf_counter()
            while not stop.is_set():
                producer.enqueue_many(_tasks(50))
                sent[0] += 50
                ahead = sent[0] / 5000 - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)

        thread = threading.Thread(target=background, daemon=True)
        started = time.perf_counter()
        thread.start()
        [loaded] = _latencies(bench, [(queue, prefix)], probes)
        stop.set()
        thread.join()
        rate = sent[0] / (time.perf_counter() - started)
        load = f"({rate:,.0f} tasks/s background)"
        report.add(Row("latency", f"loaded p50 {load}", _percentile(loaded, 0.5), "ms"))
        report.add(Row("latency", f"loaded p99 {load}", _percentile(loaded, 0.99), "ms", target="<= 5"))
        _wait(lambda: drained(bench.client, queue), "the background load to drain", 120)
    _delete_prefix(bench.client, prefix)


def measure_rss(bench: PrivateRedis, report: Report, quick: bool) -> None:
    total = 300_000 if quick else 1_000_000
    console.rule(f"Worker RSS from 100k to {total // 1000}k processed tasks")
    prefix = f"rss-{uuid.uuid4().hex[:6]}"
    queue = qsync.new(bench.client, prefix=prefix)
    keys = queue.keys("default")
    with workers(bench, prefix, 1, concurrency=500) as pids:
        fill(queue, 100_000)
        _wait(lambda: drained(bench.client, queue), "100k tasks to drain", 300)
        at_100k = _rss_kib(pids[0])
        for _ in range(100_000, total, 100_000):
            fill(queue, 100_000)
            # Keep at most 200k waiting, so Redis memory stays modest.
            _wait(lambda: bench.client.llen(keys.pending) < 100_000, "the worker to keep up", 300)
        _wait(lambda: drained(bench.client, queue), "the rest to drain", 300)
        at_end = _rss_kib(pids[0])
    report.add(Row("cost", "worker RSS at 100k processed", at_100k / 1024, "MiB"))
    report.add(Row("cost", f"worker RSS at {total // 1000}k processed", at_end / 1024, "MiB",
                   "RSS at 100k", at_100k / 1024, "<= 1.10x"))  # fmt: skip
    _delete_prefix(bench.client, prefix)


def _lease_ack_us(queue: qsync.Queue, count: int) -> float:
    """Microseconds per task to lease and ack ``count`` tasks in batches of 500."""
    started = time.perf_counter()
    done = 0
    while done < count:
        batch = queue.lease("default", count=min(500, count - done), lease_duration=60)
        queue.ack("default", batch.tasks)
        done += len(batch.tasks)
    return (time.perf_counter() - started) / count * 1e6


def _schedule_far(queue: qsync.Queue, count: int) -> None:
    """``count`` tasks due in an hour: the scheduled set promote must not walk."""
    for start in range(0, count, 10_000):
        size = min(10_000, count - start)
        queue.enqueue_many([qsync.Task("bench:noop", b"x" * 16, delay=3600) for _ in range(size)])


def _promote_us(bench: PrivateRedis, queue: qsync.Queue, due: int) -> float:
    """Microseconds per task to promote ``due`` tasks that come due among the far ones."""
    keys = queue.keys("default")
    before = int(bench.client.zcard(keys.scheduled))
    queue.enqueue_many([qsync.Task("bench:noop", b"x" * 16, delay=0.001) for _ in range(due)])
    time.sleep(0.01)  # the due tasks' time (1 ms ahead, Redis clock) has passed
    elapsed = _seconds_to_move(due, lambda: queue.promote("default", limit=1000).promoted)
    assert bench.client.zcard(keys.scheduled) == before
    _forget(bench.client, keys, keys.pending, bench.client.lrange(keys.pending, 0, -1))
    return elapsed / due * 1e6


def _seconds_to_move(count: int, sweep: Callable[[], int]) -> float:
    """Seconds that repeated ``sweep`` calls (each returning how many tasks it moved) take to
    move ``count`` tasks."""
    started = time.perf_counter()
    moved = 0
    while moved < count:
        moved += sweep()
    return time.perf_counter() - started


def _forget(client: redis.Redis, keys: QueueKeys, container: str, task_ids: list[Any]) -> None:
    """Delete measured tasks and the key that holds them, so the keyspace (whose size every task
    lookup feels) stays the same from one sample to the next."""
    hashes = [keys.task(task_id.decode()) for task_id in task_ids]
    for i in range(0, len(hashes), 10_000):
        client.unlink(*hashes[i : i + 10_000])
    client.delete(container)


def _lease_all(queue: qsync.Queue, count: int, lease_duration: float) -> None:
    """Enqueue ``count`` tasks and lease them all (the queue's pending list holds no others)."""
    fill(queue, count)
    leased = 0
    while leased < count:
        batch = queue.lease("default", count=min(1000, count - leased), lease_duration=lease_duration)
        leased += len(batch.tasks)


def _recover_us(bench: PrivateRedis, queue: qsync.Queue, expired: int) -> float:
    """Microseconds per task to recover ``expired`` leases that expire among the live ones."""
    keys = queue.keys("default")
    before = int(bench.client.zcard(keys.active))
    _lease_all(queue, expired, lease_duration=0.001)
    time.sleep(0.01)  # the short leases (1 ms, Redis clock) have expired
    elapsed = _seconds_to_move(expired, lambda: queue.recover("default", limit=1000).retried)
    assert bench.client.zcard(keys.active) == before
    _forget(bench.client, keys, keys.retry, bench.client.zrange(keys.retry, 0, -1))
    return elapsed / expired * 1e6


def measure_growth(bench: PrivateRedis, report: Report, quick: bool) -> None:
    big = 300_000 if quick else 1_000_000
    console.rule(f"Growth: cost per task with 10k and {big // 1000}k tasks waiting, scheduled or leased")
    # Both queues live side by side in one Redis and are measured in turns, so the ratio is the
    # cost of a queue's length (an O(n) command would show it a hundredfold), not the minute of
    # this shared machine, nor a keyspace outgrowing the CPU cache (that slows every command).
    for label, measure, held in (("lease+ack", "lease", "waiting"), ("promote", "promote", "scheduled"),
                                 ("recover", "recover", "leased")):  # fmt: skip
        prefixes = {size: f"grow-{uuid.uuid4().hex[:6]}" for size in (10_000, big)}
        queues = {size: qsync.new(bench.client, prefix=prefix) for size, prefix in prefixes.items()}
        samples: dict[int, list[float]] = {10_000: [], big: []}
        for size, queue in queues.items():
            if measure == "lease":
                fill(queue, size)
            elif measure == "promote":
                _schedule_far(queue, size - 5000)
            else:
                _lease_all(queue, size - 5000, lease_duration=3600)  # live leases recover must not walk
        for round_index in range(5):  # five samples each, the two sizes taking turns going first
            order = list(queues.items())
            for size, queue in order if round_index % 2 == 0 else order[::-1]:
                if measure == "lease":
                    fill(queue, size - int(bench.client.llen(queue.keys("default").pending)))  # top up
                    samples[size].append(_lease_ack_us(queue, 3000))
                else:
                    # Four batches of 5,000 a sample: one lasts about 15 ms, too short here.
                    sample = _promote_us if measure == "promote" else _recover_us
                    samples[size].append(statistics.fmean(sample(bench, queue, 5000) for _ in range(4)))
        for prefix in prefixes.values():
            _delete_prefix(bench.client, prefix)
        small_us, big_us = _median(samples[10_000]), _median(samples[big])
        report.add(Row("growth", f"{label} per task, 10k {held}", small_us, "µs"))
        report.add(Row("growth", f"{label} per task, {big // 1000}k {held}", big_us, "µs",
                       f"10k {held}", small_us, "~1.0x"))  # fmt: skip


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key of a prefix (the benchmark's own Redis only)."""
    batch: list[bytes] = []
    for key in client.scan_iter(match="{" + prefix + "*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


# --- the table -------------------------------------------------------------------------------------


def print_table(
    report: Report,
    previous: dict[str, Any] | None,
    title: str = "qsync benchmark (medians; ratios against ceilings measured in this run)",
) -> None:
    old = {(r["group"], r["name"]): r["value"] for r in previous["rows"]} if previous else {}
    table = Table(title=title)
    for column in ("group", "figure", "value", "unit", "ratio", "against", "target", "previous run"):
        table.add_column(column, justify="right" if column in ("value", "ratio", "previous run") else "left")
    for row in report.rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        before = old.get((row.group, row.name))
        table.add_row(row.group, row.name, _fmt(row.value), row.unit, ratio, row.ceiling_name, row.target,
                      _fmt(before) if before is not None else "")  # fmt: skip
    console.print(table)


SECTIONS = ("ceiling", "enqueue", "memory", "drain", "latency", "rss", "growth")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a rough figure in ~1 minute)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)
    sections = args.only or list(SECTIONS)
    bench = PrivateRedis()
    report = Report()
    started = time.time()
    try:
        if "ceiling" in sections or "enqueue" in sections:
            measure_ceiling(bench, report, args.quick)
        if "enqueue" in sections:
            measure_enqueue(bench, report, args.quick)
        if "memory" in sections:
            measure_memory(report, args.quick)
        if "drain" in sections:
            measure_drain(bench, report, args.quick)
        if "latency" in sections:
            measure_latency(bench, report, args.quick)
        if "rss" in sections:
            measure_rss(bench, report, args.quick)
        if "growth" in sections:
            measure_growth(bench, report, args.quick)
    finally:
        bench.close()
    RESULTS.mkdir(exist_ok=True)
    # The latest earlier run of the same kind (a --quick run measures smaller samples).
    earlier = (json.loads(path.read_text()) for path in sorted(RESULTS.glob("run-*.json"), reverse=True))
    previous = next((run for run in earlier if run.get("quick") == args.quick), None)
    print_table(report, previous)
    record = {
        "started": started, "seconds": time.time() - started, "quick": args.quick,
        "python": sys.version.split()[0], "redis": _redis_version(), "cpus": os.cpu_count(),
        "rows": [{**asdict(r), "ratio": r.ratio} for r in report.rows],
    }  # fmt: skip
    path = RESULTS / time.strftime("run-%Y%m%d-%H%M%S.json", time.gmtime(started))
    path.write_text(json.dumps(record, indent=1))
    console.print(f"written {path.relative_to(HERE.parent)} ({record['seconds']:.0f} s)")
    return 0


def _redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else out.strip()


if __name__ == "__main__":
    sys.exit(main())

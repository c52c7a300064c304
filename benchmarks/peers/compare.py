"""``make bench-peers``: qsync beside the Python queues its users run today, in one run.

The issue's peer figures were measured on another day; this machine's speed swings by half
between sessions, so "far ahead" is judged here against peers measured in the same minutes,
on the same private redis-server, with the same redis-py (5.3, the newest arq accepts and the
oldest qsync supports):

- single enqueue: each system's producer puts no-op tasks one call at a time (qsync's sync
  and async clients; SAQ and arq have only async ones), in alternated rounds;
- drain: one worker process per system on a pre-filled queue, the steady rate between 90% and
  10% of the backlog left (start-up and the tail excluded, the same for all);
- pick-up latency, enqueue to handler start, with probes 2 ms apart (cores warm) and ~50 ms
  apart (cores idle), in turns with a machine floor: a raw socket blocked in ``BRPOP`` and
  fed by ``LPUSH`` (``machine_floor.py``), the least a pick-up can cost here.

Peers run with their own defaults apart from concurrency (``peer_apps.py``); arq polls for
jobs every 0.5 s by design, so its latency is measured with fewer probes, after the others.
Versions are pinned in ``requirements.txt``. Prints one table and writes
``benchmarks/results/peers-*.json``.

Usage (in the peers virtualenv, which ``make bench-peers`` builds): ``python compare.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

HERE_PEERS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE_PEERS))  # benchmarks/: the runner's helpers

from peer_apps import SAQ_QUEUE, latency_key  # noqa: E402
from run import (  # noqa: E402
    RESULTS,
    PrivateRedis,
    Report,
    Row,
    _median,
    _percentile,
    console,
    fill,
    print_table,
    workers,
)

import qsync  # noqa: E402

QSYNC_PREFIX = "peers-qsync"
LOOP = asyncio.new_event_loop()


def run(coro: Awaitable[Any]) -> Any:
    """Runs a peer's async producer call from this sync runner."""
    return LOOP.run_until_complete(coro)  # type: ignore[arg-type]


@dataclass
class System:
    """One queue under comparison: how to start its worker and drive its producer."""

    name: str
    worker: Callable[[PrivateRedis], AbstractContextManager[Any]]
    enqueue_noop: Callable[[int], None]  # enqueue n no-op tasks one call at a time
    fill: Callable[[int], None]  # enqueue n no-op tasks as fast as the producer allows
    probe: Callable[[str], None]  # enqueue one probe carrying the stamp
    latency_key: str
    backlog: Callable[[], int]  # tasks not yet started


@contextmanager
def peer_worker(bench: PrivateRedis, system: str, concurrency: int) -> Iterator[None]:
    command = [sys.executable, os.path.join(HERE_PEERS, "peer_apps.py"), system, bench.url, str(concurrency)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def systems(bench: PrivateRedis) -> list[System]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from saq import Queue as SaqQueue

    queue = qsync.new(bench.client, prefix=QSYNC_PREFIX)
    qsync_keys = queue.keys("default")
    saq = SaqQueue.from_url(bench.url, name=SAQ_QUEUE)
    run(saq.connect())
    arq = run(create_pool(RedisSettings.from_dsn(bench.url)))

    def qsync_noop(n: int) -> None:
        for _ in range(n):
            queue.enqueue(qsync.Task("bench:noop", b"x" * 16))

    async def saq_noop(n: int) -> None:
        for _ in range(n):
            await saq.enqueue("noop")

    async def arq_noop(n: int) -> None:
        for _ in range(n):
            await arq.enqueue_job("noop")

    async def gathered(enqueue: Callable[[], Awaitable[Any]], n: int) -> None:
        for start in range(0, n, 200):
            await asyncio.gather(*(enqueue() for _ in range(min(200, n - start))))

    return [
        System(
            "qsync", lambda b: workers(b, QSYNC_PREFIX, 1, concurrency=500), qsync_noop,
            lambda n: fill(queue, n), lambda stamp: queue.enqueue(qsync.Task("bench:probe", stamp.encode())),
            "{" + QSYNC_PREFIX + ":bench}:latency", lambda: int(bench.client.llen(qsync_keys.pending)),
        ),
        System(
            "SAQ", lambda b: peer_worker(b, "saq", 100), lambda n: run(saq_noop(n)),
            lambda n: run(gathered(lambda: saq.enqueue("noop"), n)),
            lambda stamp: run(saq.enqueue("probe", stamp=stamp)), latency_key("saq"),
            lambda: int(bench.client.llen(f"saq:{SAQ_QUEUE}:queued")),
        ),
        System(
            "arq", lambda b: peer_worker(b, "arq", 100), lambda n: run(arq_noop(n)),
            lambda n: run(gathered(lambda: arq.enqueue_job("noop"), n)),
            lambda stamp: run(arq.enqueue_job("probe", stamp=stamp)), latency_key("arq"),
            lambda: int(bench.client.zcard("arq:queue")),
        ),
    ]  # fmt: skip


def _async_qsync_noop(bench: PrivateRedis) -> Callable[[int], None]:
    """qsync's async producer, for a like-for-like look at the peers' (async only) ones."""
    queue = qsync.new(aioredis.Redis(port=bench.port), prefix=QSYNC_PREFIX)

    async def enqueue(n: int) -> None:
        for _ in range(n):
            await queue.enqueue(qsync.Task("bench:noop", b"x" * 16))

    return lambda n: run(enqueue(n))


def measure_enqueue(bench: PrivateRedis, report: Report, all_systems: list[System], quick: bool) -> None:
    console.rule("Single enqueue (one producer, one call per task)")
    n = 1_000 if quick else 3_000
    producers = {"qsync (sync client)": all_systems[0].enqueue_noop}
    producers["qsync (async client)"] = _async_qsync_noop(bench)
    producers |= {s.name: s.enqueue_noop for s in all_systems[1:]}
    rates: dict[str, list[float]] = {name: [] for name in producers}
    for round_index in range(3):
        order = list(producers.items())
        for name, enqueue_noop in order if round_index % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            enqueue_noop(n)
            rates[name].append(n / (time.perf_counter() - started))
        bench.client.flushall()  # the private server: nothing else lives there
    ours = _median(rates["qsync (async client)"])
    for name in producers:
        against = ("qsync async", ours) if not name.startswith("qsync") else ("", None)
        report.add(Row("enqueue", f"single enqueue, {name}", _median(rates[name]), "tasks/s", *against))


def _steady_rate(system: System, backlog: int, timeout: float) -> float:
    """Tasks per second while the backlog falls from 90% to 10% of ``backlog``."""
    high, low = backlog * 0.9, backlog * 0.1
    deadline = time.monotonic() + timeout
    t_high = None
    while True:
        left, now = system.backlog(), time.perf_counter()
        if t_high is None and left <= high:
            t_high = now
        if left <= low and t_high is not None:
            return (high - low) / (now - t_high)
        if time.monotonic() > deadline:
            raise SystemExit(f"bench-peers: {system.name} did not drain {backlog} tasks in {timeout:.0f} s")
        time.sleep(0.002)


def measure_drain(bench: PrivateRedis, report: Report, all_systems: list[System], quick: bool) -> None:
    console.rule("Drain (one worker process, no-op tasks)")
    backlogs = {
        "qsync": 50_000 if quick else 100_000,
        "SAQ": 5_000 if quick else 20_000,
        "arq": 5_000 if quick else 20_000,
    }
    rates: dict[str, list[float]] = {s.name: [] for s in all_systems}
    for round_index in range(2 if quick else 3):
        order = all_systems if round_index % 2 == 0 else all_systems[::-1]
        for system in order:
            backlog = backlogs[system.name]
            system.fill(backlog)
            with system.worker(bench):
                rates[system.name].append(_steady_rate(system, backlog, timeout=600))
                deadline = time.monotonic() + 120
                while system.backlog() and time.monotonic() < deadline:
                    time.sleep(0.01)
            bench.client.flushall()
    ours = _median(rates["qsync"])
    for system in all_systems:
        name, value = f"drain, {system.name} ({backlogs[system.name]:,} backlog)", _median(rates[system.name])
        if system.name == "qsync":
            report.add(Row("drain", name + ", concurrency 500", value, "tasks/s"))
        else:
            report.add(Row("drain", name + ", concurrency 100", value, "tasks/s", "qsync", ours))


@contextmanager
def machine_floor(bench: PrivateRedis) -> Iterator[System]:
    wake, key = "peers:floor:wake", latency_key("floor")
    command = [sys.executable, os.path.join(HERE_PEERS, "machine_floor.py"), str(bench.port), wake, key]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("bench-peers: the machine floor process did not start")
        yield System("machine floor (raw BRPOP)", _no_worker, _none, _none,
                     lambda stamp: bench.client.lpush(wake, stamp), key, lambda: 0)  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def _no_worker(bench: PrivateRedis) -> Iterator[None]:
    yield


def _none(n: int) -> None:
    return None


def _probe_rounds(
    bench: PrivateRedis, probed: list[System], rounds: int, gap_s: tuple[float, float]
) -> dict[str, list[float]]:
    """Latencies in ms per system, probed in turns, one probe in flight at a time."""
    out: dict[str, list[float]] = {s.name: [] for s in probed}
    for _ in range(rounds):
        for system in probed:
            system.probe(repr(time.time()))
            reply = bench.client.blpop([system.latency_key], timeout=10)
            if reply is None:
                raise SystemExit(f"bench-peers: a probe to {system.name} was not picked up within 10 s")
            out[system.name].append(float(reply[1]) * 1000)
            time.sleep(random.uniform(*gap_s))
    return out


def measure_latency(bench: PrivateRedis, report: Report, all_systems: list[System], quick: bool) -> None:
    console.rule("Pick-up latency, enqueue to handler start (one worker process each)")
    probes = 100 if quick else 300
    pushed = [s for s in all_systems if s.name != "arq"]
    polling = [s for s in all_systems if s.name == "arq"]  # each probe waits for its next poll
    with machine_floor(bench) as floor, ExitStack() as running:
        for system in all_systems:
            running.enter_context(system.worker(bench))
        probed = [floor, *pushed]
        _probe_rounds(bench, probed + polling, 3, (0.002, 0.002))  # each worker up and warm
        regimes = (("warm (probes 2 ms apart)", (0.002, 0.002)), ("idle (probes ~50 ms apart)", (0.04, 0.06)))
        for label, gap in regimes:
            samples = _probe_rounds(bench, probed, probes, gap)
            samples |= _probe_rounds(bench, polling, 10 if quick else 30, gap)
            floor_p50 = _percentile(samples[floor.name], 0.5)
            for system in probed + polling:
                for q in (0.5, 0.99):
                    value = _percentile(samples[system.name], q)
                    name = f"{label} p{round(q * 100)}, {system.name}"
                    if system is floor or q != 0.5:
                        report.add(Row("latency", name, value, "ms"))
                    else:
                        report.add(Row("latency", name, value, "ms", "machine floor p50", floor_p50))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a rough figure in a few minutes)")
    args = parser.parse_args()
    bench = PrivateRedis()
    report = Report()
    started = time.time()
    try:
        all_systems = systems(bench)
        all_systems[0].enqueue_noop(1)  # qsync's server check and script load come first
        bench.client.flushall()
        measure_enqueue(bench, report, all_systems, args.quick)
        measure_drain(bench, report, all_systems, args.quick)
        measure_latency(bench, report, all_systems, args.quick)
    finally:
        bench.close()
    print_table(
        report,
        None,
        title="qsync beside its peers (medians; ratios against qsync or the machine floor, this run)",
    )
    rows = [{**asdict(r), "ratio": r.ratio} for r in report.rows]
    record = {"started": started, "seconds": time.time() - started, "quick": args.quick, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / time.strftime("peers-%Y%m%d-%H%M%S.json", time.gmtime(started))
    path.write_text(json.dumps(record, indent=1))
    console.print(f"written {path} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

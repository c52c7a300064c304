"""Attacks on a wake-up listener's taken-over connection (qsync/server/_link.py): replies that
redis-py reads one way and a bare hiredis reader another (RESP3 booleans, push frames), unix
sockets, RESP3 and decoding clients through the worker, repeated kills and cancellations (no
stale reply, no leaked descriptor), and a stop while Redis refuses writes.

Each test compares with what redis-py itself reads, or polls Redis with deadlines; nothing
here sleeps or times."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import qsync
from qsync import Context, LeasedTask, Task
from qsync._atransport import roundtrip
from qsync._protocol import Exchange
from qsync._takeover import Replies
from tests.integration.test_link import (
    PASSWORD,
    USER,
    TlsRedis,
    _Recorder,
    blocked,
    connections,
    kill_while_blocked,
    open_link,
)
from tests.polling import wait_until
from tests.redis_procs import RedisServer

pytestmark = pytest.mark.redis

_names = itertools.count()


def _name() -> str:
    return f"attack-{os.getpid()}-{next(_names)}"


@pytest.fixture
async def resp3(tls_redis: TlsRedis, kind: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    name = _name()
    client = tls_redis.client(kind, client_name=name, protocol=3)
    try:
        yield client, name
    finally:
        await client.aclose()


async def _redis_py(client: aioredis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """What the redis-py floor (qsync._atransport.roundtrip) reads for ``commands``."""
    conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        return await roundtrip(conn, Exchange(commands, "k"))
    finally:
        await client.connection_pool.release(conn)


# --- replies as redis-py reads them ------------------------------------------------------------


async def test_a_resp3_false_reply_is_a_reply(resp3: tuple[aioredis.Redis, str]) -> None:
    # In RESP3 (a script that set RESP3 for its replies), Lua false is the boolean reply #f;
    # hiredis's gets() returns False for it, which is also what gets() returns when no whole
    # reply is buffered yet.
    client, _ = resp3
    commands: list[tuple[Any, ...]] = [("EVAL", "redis.setresp(3) return false", 0), ("PING",)]
    expected = await _redis_py(client, commands)
    assert expected == [False, b"PONG"]
    link = await open_link(client)
    assert link.taken_over
    assert await asyncio.wait_for(link.roundtrip(Exchange(commands, "k")), 10) == expected


async def test_a_resp3_push_frame_is_not_read_as_a_reply(
    resp3: tuple[aioredis.Redis, str], admin: redis.Redis
) -> None:
    # A push frame (here a tracking invalidation) is not the reply to any command: redis-py
    # skips it. Read as a reply, it would stand in for the BRPOP's and shift the lease's.
    client, name = resp3
    key = f"{name}:tracked"
    admin.set(key, "1")
    link = await open_link(client)
    assert await link.roundtrip(Exchange([("CLIENT", "TRACKING", "ON"), ("GET", key)], key)) == [b"OK", b"1"]
    pushed = asyncio.create_task(
        link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 20), ("ECHO", "lease")], key))
    )
    await blocked(admin, name)
    admin.set(key, "2")  # the invalidation is pushed while the BRPOP waits
    admin.rpush(f"{name}:wake", b"w")
    assert await asyncio.wait_for(pushed, 20) == [[f"{name}:wake".encode(), b"w"], b"lease"]
    assert await link.roundtrip(Exchange([("PING",)], key)) == [b"PONG"]


async def test_decoding_and_resp3_clients_get_the_same_replies_as_redis_py(
    tls_redis: TlsRedis, kind: str, admin: redis.Redis
) -> None:
    for options in ({"decode_responses": True}, {"protocol": 3}, {"protocol": 3, "decode_responses": True}):
        name = _name()
        client = tls_redis.client(kind, client_name=name, **options)
        try:
            commands: list[tuple[Any, ...]] = [
                ("BRPOP", f"{name}:wake", 0.01),
                ("EVALSHA", "0" * 40, 0),
                ("EVAL", "return {1, 'b\\255', {3, 'x'}, redis.status_reply('OK')}", 0),
                ("EVAL", "return redis.error_reply('OOM no memory')", 0),
                ("EVAL", "return 1.5", 0),
                ("SCRIPT", "LOAD", "return 1"),
            ]
            expected = await _redis_py(client, commands)
            link = await open_link(client)
            replies = await asyncio.wait_for(link.roundtrip(Exchange(commands, "k")), 10)
            assert [type(r) for r in replies] == [type(r) for r in expected], options
            assert [r for r in replies if not isinstance(r, Exception)] == [
                r for r in expected if not isinstance(r, Exception)
            ]
            assert [str(r) for r in replies if isinstance(r, Exception)] == [
                str(r) for r in expected if isinstance(r, Exception)
            ]
        finally:
            await client.aclose()


async def test_a_large_reply_over_many_reads_is_whole(
    named_client: tuple[aioredis.Redis, str], admin: redis.Redis
) -> None:
    client, name = named_client
    big = os.urandom(3 * 1024 * 1024 + 7)
    admin.set(f"{name}:big", big)
    commands: list[tuple[Any, ...]] = [
        ("GET", f"{name}:big"),
        ("LRANGE", f"{name}:none", 0, -1),
        ("PING",),
    ]
    link = await open_link(client)
    assert await link.roundtrip(Exchange(commands, "k")) == [big, [], b"PONG"]


# --- unix sockets ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unix_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    folder = tmp_path_factory.mktemp("unix")
    server = RedisServer("--unixsocket", str(folder / "redis.sock"), "--unixsocketperm", "700").start()
    try:
        yield server
    finally:
        server.cleanup()


def _sock(server: RedisServer) -> str:
    return str(Path(server.extra[1]))


async def test_a_unix_socket_connection_is_taken_over_and_survives_a_kill(unix_redis: RedisServer) -> None:
    name = _name()
    client = aioredis.Redis.from_url(f"unix://{_sock(unix_redis)}?db=3", client_name=name)
    admin = unix_redis.client()
    try:
        link = await open_link(client)
        assert link.taken_over
        await kill_while_blocked(link, admin, name, [("BRPOP", f"{name}:wake", 30), ("PING",)])
        await link.connect()
        assert link.taken_over
        admin.select(3)
        admin.rpush(f"{name}:wake", b"w")
        assert await link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 5)], name)) == [
            [f"{name}:wake".encode(), b"w"]
        ]
    finally:
        admin.close()
        await client.aclose()


def test_a_worker_over_a_unix_socket_picks_up_while_idle(unix_redis: RedisServer) -> None:
    client = redis.Redis(unix_socket_path=_sock(unix_redis))
    queue = qsync.new(client, prefix=_name())
    ran = threading.Event()
    queue.start(lambda ctx, task: ran.set(), concurrency=2, poll_interval=30)
    try:
        wait_until(
            lambda: any(c.get("cmd") == "brpop" and int(c.get("qbuf", 0)) > 0 for c in client.client_list()),
            "the listener to wait with a lease behind",
        )
        thread = queue._thread
        assert thread is not None and thread.server is not None
        assert thread.server.waker._links["default"].taken_over
        queue.enqueue(Task("t"))
        assert ran.wait(20), "the task did not run"
    finally:
        queue.stop(20)
        client.close()


# --- RESP3 and decoding clients through the worker ---------------------------------------------------


@pytest.mark.parametrize(
    "options", [{"protocol": 3}, {"decode_responses": True}, {"protocol": 3, "decode_responses": True}]
)
def test_a_resp3_or_decoding_worker_picks_up_while_idle_and_reloads_a_flushed_script(
    tls_redis: TlsRedis, admin: redis.Redis, options: dict[str, Any]
) -> None:
    client = redis.Redis(port=tls_redis.server.port, **options)
    queue = qsync.new(client, prefix=_name())
    payloads: list[bytes] = []
    ran = threading.Semaphore(0)

    def armed() -> bool:
        return any(c.get("cmd") == "brpop" and int(c.get("qbuf", 0)) > 0 for c in admin.client_list())

    def handler(ctx: Context, task: LeasedTask) -> None:
        payloads.append(task.payload)
        ran.release()

    queue.start(handler, concurrency=2, poll_interval=30, lease_duration=60)
    try:
        wait_until(armed, "the listener to wait with a lease behind")
        queue.enqueue(Task("t", b"\xff\x00first"))
        assert ran.acquire(timeout=20), "the first task did not run"
        wait_until(armed, "the listener to wait again")
        admin.script_flush()  # the lease behind the next wake-up meets NOSCRIPT
        queue.enqueue(Task("t", b"\xff\x00second"))
        assert ran.acquire(timeout=20), "the second task did not run"
        assert payloads == [b"\xff\x00first", b"\xff\x00second"]
    finally:
        queue.stop(20)
        client.close()


# --- kills, cancellations: no stale reply, no leaked descriptor ------------------------------------


async def _gone(admin: redis.Redis, name: str) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while connections(admin, name):
        assert asyncio.get_running_loop().time() < deadline, f"{name} never closed"
        await asyncio.sleep(0.01)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_kills_and_cancellations_leak_no_descriptor_and_read_no_stale_reply(
    tls_redis: TlsRedis, kind: str, admin: redis.Redis
) -> None:
    name = _name()
    client = tls_redis.client(kind, client_name=name)
    try:
        link = await open_link(client)
        await link.roundtrip(Exchange([("PING",)], name))
        gc.collect()
        before = _fds()
        for round_ in range(12):
            # A kill while idle (between waits), a kill while blocked, a cancellation while
            # blocked with a reply queued behind, a cancellation right after the send.
            how = round_ % 4
            if how == 0:
                [conn] = connections(admin, name)
                admin.client_kill_filter(_id=conn["id"])
                await _gone(admin, name)
                # Once the loop has read its end (a wait sent before that fails, as it does
                # through redis-py: the connection looked open when it was sent).
                replies = link._replies
                deadline = asyncio.get_running_loop().time() + 20
                while replies is not None and replies.broken is None:
                    assert asyncio.get_running_loop().time() < deadline, "the end was never read"
                    await asyncio.sleep(0.01)
            else:
                wait = asyncio.create_task(
                    link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 30), ("ECHO", f"old{round_}")], name))
                )
                if how == 3:
                    await asyncio.sleep(0)  # sent, not yet answered
                    wait.cancel()
                else:
                    conn = await blocked(admin, name)
                    if how == 1:
                        admin.client_kill_filter(_id=conn["id"])
                    else:
                        wait.cancel()
                with pytest.raises((redis.ConnectionError, asyncio.CancelledError)):
                    await asyncio.wait_for(wait, 20)
            await link.connect()
            assert link.taken_over
            assert await link.roundtrip(Exchange([("ECHO", f"new{round_}")], name)) == [
                f"new{round_}".encode()
            ]
        gc.collect()
        assert _fds() <= before + 1
        # The protocols of the dropped connections went with them (one per live connection).
        assert sum(1 for o in gc.get_objects() if isinstance(o, Replies)) <= 2
        assert len(connections(admin, name)) == 1
    finally:
        await client.aclose()
    wait_until(lambda: not connections(admin, name), "the link's connection to close")


# --- the protocol alone ----------------------------------------------------------------------------


PUSH = b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n$1\r\nx\r\n"


async def test_push_frames_between_and_inside_exchanges_are_passed_by() -> None:
    protocol = Replies(_Recorder())  # type: ignore[arg-type]
    protocol.data_received(PUSH)  # before any exchange
    waiter = protocol.expect(2)
    protocol.data_received(PUSH + b"+OK\r\n" + PUSH)
    assert not waiter.done()
    protocol.data_received(b"#f\r\n" + PUSH)
    assert waiter.result() == [b"OK", False]
    protocol.data_received(PUSH)  # between exchanges
    assert protocol.broken is None
    waiter = protocol.expect(1)
    protocol.data_received(b"_\r\n")
    assert waiter.result() == [None]


async def test_a_reply_after_a_finished_exchange_breaks_the_connection_and_leaves_its_replies() -> None:
    protocol = Replies(_Recorder())  # type: ignore[arg-type]
    waiter = protocol.expect(2)
    protocol.data_received(b"+A\r\n+B\r\n")
    protocol.data_received(b"+STRAY\r\n")
    assert waiter.result() == [b"A", b"B"]
    assert isinstance(protocol.broken, redis.ConnectionError)


# --- a worker over TLS: many queues, a Redis restart while armed, the stop ----------------------


def test_a_tls_worker_with_many_queues_survives_a_redis_restart_and_closes_every_link(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = TlsRedis(tmp_path)
    names = [f"q{i}" for i in range(24)]
    ran: list[str] = []
    done = threading.Semaphore(0)

    def handler(ctx: Context, task: LeasedTask) -> None:
        ran.append(task.queue)
        done.release()

    def listeners() -> list[dict[str, Any]]:
        with server.server.client() as admin:
            return [c for c in admin.client_list() if c.get("cmd") == "brpop" and c.get("user") == USER]

    def user_connections() -> list[dict[str, Any]]:
        with server.server.client() as admin:
            return [c for c in admin.client_list() if c.get("user") == USER]

    client = redis.Redis.from_url(server.url("tls"), ssl_ca_certs=str(server.cert))
    queue = qsync.new(client, prefix=_name())
    try:
        queue.start(
            handler, queues=dict.fromkeys(names, 1), concurrency=3, poll_interval=30, lease_duration=60
        )
        wait_until(lambda: len(listeners()) == len(names), "every queue's listener to wait")
        thread = queue._thread
        assert thread is not None and thread.server is not None
        assert all(link.taken_over for link in thread.server.waker._links.values())
        server.server.kill()  # kill -9 while every listener blocks (some with a lease behind)
        server.server.start()
        with server.server.client() as admin:  # ACL users are not in the AOF
            admin.execute_command("ACL", "SETUSER", USER, "on", ">" + PASSWORD, "~*", "&*", "+@all")
        wait_until(lambda: len(listeners()) == len(names), "every listener to wait again", timeout=40)
        for name in ("q0", "q11", "q23"):
            queue.enqueue(Task("t"), queue=name)
            assert done.acquire(timeout=20), f"the task on {name} did not run"
        assert sorted(ran) == ["q0", "q11", "q23"]
        wait_until(lambda: len(listeners()) == len(names), "idle again")
    finally:
        _stop_cleanly(queue, client, server, user_connections, caplog)


def assert_nothing_left_behind(caplog: pytest.LogCaptureFixture) -> None:
    """No task destroyed while pending and nothing unclosed was logged."""
    bad = [
        r.getMessage() for r in caplog.records if "destroyed" in r.getMessage() or "nclosed" in r.getMessage()
    ]
    assert bad == []


def _stop_cleanly(
    queue: qsync.Queue,
    client: redis.Redis,
    server: TlsRedis,
    connections_left: Callable[[], list[dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stop the worker, then check that it stopped, that every connection of its user closed and
    that nothing pending or unclosed was logged; ``server`` is cleaned up either way."""
    queue.stop(30)
    client.close()
    try:
        assert queue._thread is None, "the server did not stop"
        wait_until(lambda: not connections_left(), "every connection of the worker to close")
    finally:
        server.server.cleanup()
    assert_nothing_left_behind(caplog)


def test_tls_links_closed_by_redis_while_the_worker_is_busy_rearm_and_the_armed_stop_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis's idle timeout closes the listeners' connections (a TLS close, not a kill) while a
    # full server does not listen; once idle again the listeners reconnect, take the new
    # connections over and pick tasks up; a stop while armed returns and closes them all.
    server = TlsRedis(tmp_path)
    release = threading.Event()
    ran = threading.Semaphore(0)

    def handler(ctx: Context, task: LeasedTask) -> None:
        ran.release()
        if task.type == "hold":
            release.wait(30)

    def mine(cmd: str | None = None) -> list[dict[str, Any]]:
        with server.server.client() as admin:
            return [
                c
                for c in admin.client_list()
                if c.get("user") == USER and (cmd is None or c.get("cmd") == cmd)
            ]

    def armed() -> int:
        return sum(1 for c in mine("brpop") if int(c.get("qbuf", 0)) > 0)

    client = redis.Redis.from_url(server.url("tls"), ssl_ca_certs=str(server.cert))
    queue = qsync.new(client, prefix=_name())
    try:
        queue.start(handler, queues={"a": 1, "b": 1}, concurrency=1, poll_interval=30, lease_duration=60)
        wait_until(lambda: len(mine("brpop")) == 2, "both listeners to wait")
        before = {c["id"] for c in mine("brpop")}
        queue.enqueue(Task("hold"), queue="a")
        assert ran.acquire(timeout=20)
        # A full server's listeners do not all wait: the idle ones' connections time out.
        with server.server.client() as admin:
            admin.config_set("timeout", 1)
        wait_until(lambda: len({c["id"] for c in mine()} & before) < 2, "Redis to close an idle listener")
        with server.server.client() as admin:
            admin.config_set("timeout", 0)
        release.set()
        wait_until(lambda: len(mine("brpop")) == 2 and armed() >= 1, "both listeners to wait again")
        queue.enqueue(Task("t"), queue="b")
        assert ran.acquire(timeout=20), "the task was not picked up"
        wait_until(lambda: armed() >= 1, "armed again")
    finally:
        release.set()
        _stop_cleanly(queue, client, server, mine, caplog)


@pytest.mark.parametrize("options", [{}, {"protocol": 3, "decode_responses": True}])
async def test_an_async_tls_worker_cancelled_while_armed_leaves_nothing_behind(
    tls_redis: TlsRedis, admin: redis.Redis, caplog: pytest.LogCaptureFixture, options: dict[str, Any]
) -> None:
    # await queue.run() on the test's own loop over TLS: a pick-up while idle, then the run is
    # cancelled while the listeners are armed (the other way to stop it). Every connection of
    # the user closes, and nothing pending or unclosed is left for the loop's end.
    client = tls_redis.client("tls", **options)
    queue = qsync.new(client, prefix=_name())
    ran = asyncio.Event()

    async def handler(ctx: Context, task: LeasedTask) -> None:
        ran.set()

    async def waiting(count: int) -> None:
        # (Armed or not: an idle async server does not always arm both; not the link's doing.)
        deadline = asyncio.get_running_loop().time() + 20
        while (
            sum(1 for c in admin.client_list() if c.get("cmd") == "brpop" and c.get("user") == USER) < count
        ):
            if run.done():
                raise AssertionError(f"run ended: {run.exception()!r}")
            assert asyncio.get_running_loop().time() < deadline, "the listeners never waited"
            await asyncio.sleep(0.01)

    def mine() -> list[dict[str, Any]]:
        return [c for c in admin.client_list() if c.get("user") == USER]

    run = asyncio.create_task(queue.run(handler, queues={"a": 1, "b": 1}, concurrency=4, poll_interval=30))
    try:
        await waiting(2)
        await queue.enqueue(Task("t"), queue="b")
        await asyncio.wait_for(ran.wait(), 20)
        await waiting(2)
        run.cancel()
        await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 20)
    finally:
        if not run.done():
            run.cancel()
            await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 20)
        await client.aclose()
    deadline = asyncio.get_running_loop().time() + 20
    while mine():
        assert asyncio.get_running_loop().time() < deadline, (
            f"still open: {[(c['id'], c['cmd'], c['age'], c['idle']) for c in mine()]}"
        )
        await asyncio.sleep(0.01)
    gc.collect()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == []
    assert_nothing_left_behind(caplog)


async def test_a_connection_closed_behind_the_links_back_is_taken_over_again(
    named_client: tuple[aioredis.Redis, str], admin: redis.Redis
) -> None:
    # redis-py closes a connection without waiting in places (its _close(): a disconnect
    # outside a task, a failed release): the next connect() makes a new transport at once,
    # before the old one's end reached the link. The link must read the new one, not wait on
    # the old (whose writes go nowhere).
    client, name = named_client
    link = await open_link(client)
    link._conn._close()
    await link.connect()
    assert link.taken_over
    assert await asyncio.wait_for(link.roundtrip(Exchange([("ECHO", "new")], name)), 10) == [b"new"]
    assert len(connections(admin, name)) == 1

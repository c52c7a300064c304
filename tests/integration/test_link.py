"""A wake-up listener's connection (qsync/server/_link.py): redis-py connects it, then its
replies are parsed by the link's own asyncio protocol as they arrive.

Each test runs over plain TCP with the default user and over TLS with an ACL user and
password (``rediss://``), on a Redis of this module's own; connections are told apart by
their client names in ``CLIENT LIST``. The replies must be what redis-py itself would read;
a killed, timed-out or cancelled wait must drop its connection and the next one reconnect,
with no reply of the old wait read on the new connection. Nothing here sleeps or times.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

import qsync
from qsync import Context, LeasedTask, Task
from qsync._atransport import roundtrip
from qsync._protocol import Exchange
from qsync._takeover import Replies
from qsync.server._link import Link
from tests.polling import wait_until
from tests.redis_procs import RedisServer, free_port

pytestmark = pytest.mark.redis

USER, PASSWORD = "link-user", "link-test-SECRET-7"
_names = itertools.count()


class TlsRedis:
    """A RedisServer with a TLS port beside its plain one (a self-signed certificate made by
    openssl here) and an ACL user."""

    def __init__(self, folder: Path) -> None:
        self.cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.tls_port = free_port()
        self.server = RedisServer(
            "--tls-port", str(self.tls_port), "--tls-cert-file", str(self.cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
        ).start()  # fmt: skip
        with self.server.client() as admin:
            admin.execute_command("ACL", "SETUSER", USER, "on", ">" + PASSWORD, "~*", "&*", "+@all")

    def url(self, kind: str) -> str:
        if kind == "tls":
            return f"rediss://{USER}:{PASSWORD}@127.0.0.1:{self.tls_port}/0"
        return f"redis://127.0.0.1:{self.server.port}/0"

    def client(self, kind: str, **kwargs: Any) -> aioredis.Redis:
        tls: dict[str, Any] = {"ssl_ca_certs": str(self.cert)} if kind == "tls" else {}
        return aioredis.Redis.from_url(self.url(kind), **tls, **kwargs)


def next_name() -> str:
    """A client name (and key stem) no other test of the session uses."""
    return f"link-{next(_names)}"


async def open_link(client: aioredis.Redis) -> Link:
    link = Link(await client.connection_pool.get_connection())  # type: ignore[no-untyped-call]
    await link.connect()
    return link


def connections(admin: redis.Redis, name: str, command: str | None = None) -> list[dict[str, Any]]:
    """The server's connections named ``name`` (running ``command``, when given)."""
    return [
        c
        for c in admin.client_list()
        if c.get("name") == name and (command is None or c.get("cmd") == command)
    ]


async def blocked(admin: redis.Redis, name: str) -> dict[str, Any]:
    """The connection named ``name`` once it blocks in a BRPOP (polled with a deadline)."""
    deadline = asyncio.get_running_loop().time() + 20
    while not (found := connections(admin, name, "brpop")):
        assert asyncio.get_running_loop().time() < deadline, f"{name} never blocked in BRPOP"
        await asyncio.sleep(0.01)
    return found[0]


async def kill_while_blocked(
    link: Link, admin: redis.Redis, name: str, commands: list[tuple[Any, ...]]
) -> dict[str, Any]:
    """Send ``commands`` (a BRPOP first) on ``link``, kill its connection once it blocks, and
    check that the wait fails; returns the killed connection's CLIENT LIST entry."""
    wait = asyncio.create_task(link.roundtrip(Exchange(commands, name)))
    old = await blocked(admin, name)
    admin.client_kill_filter(_id=old["id"])
    with pytest.raises(redis.ConnectionError):
        await asyncio.wait_for(wait, 20)
    return old


# --- replies --------------------------------------------------------------------------------------


async def test_replies_are_what_redis_py_reads(
    named_client: tuple[aioredis.Redis, str], admin: redis.Redis
) -> None:
    client, name = named_client
    admin.rpush(f"{name}:wake", b"token\x00\xff")
    admin.rpush(f"{name}:list", b"x")
    commands: list[tuple[Any, ...]] = [
        ("BRPOP", f"{name}:wake", 1),
        ("PING",),
        ("EVALSHA", "0" * 40, 0),
        ("INCR", f"{name}:list"),
        ("EVAL", "return {1, 'two', {3}}", 0),
        ("BRPOP", f"{name}:empty", 0.01),
    ]
    link = await open_link(client)
    assert link.taken_over
    replies = await link.roundtrip(Exchange(commands, f"{name}:wake"))
    admin.rpush(f"{name}:wake", b"token\x00\xff")
    other = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    expected = await roundtrip(other, Exchange(commands, f"{name}:wake"))

    assert [type(r) for r in replies] == [type(r) for r in expected]
    assert replies[0] == [f"{name}:wake".encode(), b"token\x00\xff"] == expected[0]
    assert replies[1] == b"PONG" and replies[4] == [1, b"two", [3]] and replies[5] is None
    assert isinstance(replies[2], NoScriptError) and str(replies[2]) == str(expected[2])
    assert isinstance(replies[3], ResponseError) and "WRONGTYPE" in str(replies[3])


async def test_on_reply_sees_every_reply_in_order(named_client: tuple[aioredis.Redis, str]) -> None:
    client, name = named_client
    seen: list[tuple[int, Any]] = []
    link = await open_link(client)
    commands: list[tuple[Any, ...]] = [("PING",), ("ECHO", "a"), ("ECHO", "b")]
    replies = await link.roundtrip(Exchange(commands, name, on_reply=lambda i, r: seen.append((i, r))))
    assert seen == [(0, b"PONG"), (1, b"a"), (2, b"b")] and replies == [b"PONG", b"a", b"b"]


async def test_a_blocked_wait_returns_the_pushed_value_when_woken(
    named_client: tuple[aioredis.Redis, str], admin: redis.Redis
) -> None:
    client, name = named_client
    link = await open_link(client)
    wait = asyncio.create_task(link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 30), ("PING",)], name)))
    await blocked(admin, name)
    admin.rpush(f"{name}:wake", b"w")
    assert await asyncio.wait_for(wait, 20) == [[f"{name}:wake".encode(), b"w"], b"PONG"]


# --- failures ---------------------------------------------------------------------------------------


async def test_a_killed_connection_fails_the_wait_and_the_next_one_reconnects(
    named_client: tuple[aioredis.Redis, str], admin: redis.Redis
) -> None:
    client, name = named_client
    link = await open_link(client)
    old = await kill_while_blocked(link, admin, name, [("BRPOP", f"{name}:wake", 30)])
    await link.connect()
    assert link.taken_over
    assert await link.roundtrip(Exchange([("PING",)], name)) == [b"PONG"]
    [new] = connections(admin, name)
    assert new["id"] != old["id"]


async def test_a_wait_past_the_socket_timeout_fails_and_drops_its_connection(
    tls_redis: TlsRedis, kind: str, admin: redis.Redis
) -> None:
    name = next_name()
    client = tls_redis.client(kind, client_name=name, socket_timeout=1.0)
    try:
        link = await open_link(client)
        with pytest.raises(redis.TimeoutError):
            await link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 30)], name))
        wait_until(lambda: not connections(admin, name), "the timed-out connection to close")
        # The old BRPOP went with its connection: a value pushed now waits for the next wait.
        admin.rpush(f"{name}:wake", b"kept")
        await link.connect()
        assert await link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 1)], name)) == [
            [f"{name}:wake".encode(), b"kept"]
        ]
    finally:
        await client.aclose()


async def test_a_cancelled_wait_drops_its_connection_and_no_stale_reply_is_read(
    named_client: tuple[aioredis.Redis, str], admin: redis.Redis
) -> None:
    client, name = named_client
    link = await open_link(client)
    wait = asyncio.create_task(
        link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 30), ("ECHO", "old")], name))
    )
    old = await blocked(admin, name)
    wait.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait
    wait_until(lambda: not connections(admin, name), "the cancelled wait's connection to close")
    admin.rpush(f"{name}:wake", b"v")
    await link.connect()
    assert await link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 1), ("ECHO", "new")], name)) == [
        [f"{name}:wake".encode(), b"v"],
        b"new",
    ]
    assert admin.llen(f"{name}:wake") == 0
    assert connections(admin, name)[0]["id"] != old["id"]


async def test_closing_the_client_closes_a_taken_over_connection(
    tls_redis: TlsRedis, kind: str, admin: redis.Redis
) -> None:
    name = next_name()
    client = tls_redis.client(kind, client_name=name)
    link = await open_link(client)
    assert link.taken_over and connections(admin, name)
    await asyncio.wait_for(client.aclose(), 20)  # redis-py waits for the close: it must end
    wait_until(lambda: not connections(admin, name), "the link's connection to close")


async def test_a_connection_that_cannot_be_taken_over_is_read_through_redis_py(
    named_client: tuple[aioredis.Redis, str], admin: redis.Redis
) -> None:
    client, name = named_client
    link = Link(_Opaque(await client.connection_pool.get_connection()))  # type: ignore[no-untyped-call]
    await link.connect()
    assert not link.taken_over
    admin.rpush(f"{name}:wake", b"w")
    assert await link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 1), ("PING",)], name)) == [
        [f"{name}:wake".encode(), b"w"],
        b"PONG",
    ]
    wait = asyncio.create_task(link.roundtrip(Exchange([("BRPOP", f"{name}:wake", 30)], name)))
    admin.client_kill_filter(_id=(await blocked(admin, name))["id"])
    with pytest.raises(redis.ConnectionError):
        await asyncio.wait_for(wait, 20)
    await link.connect()
    assert await link.roundtrip(Exchange([("PING",)], name)) == [b"PONG"]


class _Opaque:
    """A redis-py connection that hides its stream writer (as a redis-py with another layout
    would), so the link cannot take its transport over."""

    def __init__(self, conn: Any) -> None:
        self.__dict__["_conn"] = conn

    def __getattr__(self, name: str) -> Any:
        if name == "_writer":
            raise AttributeError(name)
        return getattr(self.__dict__["_conn"], name)


# --- the worker server over TLS with an ACL user ------------------------------------------------


def test_a_worker_over_tls_with_an_acl_user_runs_a_task_picked_up_while_idle(
    tls_redis: TlsRedis, admin: redis.Redis
) -> None:
    prefix = f"tls{next(_names)}"
    client = redis.Redis.from_url(tls_redis.url("tls"), ssl_ca_certs=str(tls_redis.cert))
    queue = qsync.new(client, prefix=prefix)
    ran = threading.Event()
    payloads: list[bytes] = []

    async def handler(ctx: Context, task: LeasedTask) -> None:
        payloads.append(task.payload)
        ran.set()

    queue.start(handler, concurrency=2, poll_interval=30)
    try:
        # The listener waits in its BRPOP, as the ACL user, so the task is an idle pick-up.
        wait_until(
            lambda: any(c.get("cmd") == "brpop" and c.get("user") == USER for c in admin.client_list()),
            "the listener to wait",
        )
        thread = queue._thread
        assert thread is not None and thread.server is not None
        assert thread.server.waker._links["default"].taken_over
        queue.enqueue(Task("tls:task", b"over tls \x00"))
        assert ran.wait(20), "the task did not run"
        assert payloads == [b"over tls \x00"]
    finally:
        queue.stop(20)
        client.close()


# --- the protocol alone ----------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.lost: list[Exception | None] = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def test_replies_split_across_reads_resolve_once_the_last_is_whole() -> None:
    protocol = Replies(_Recorder())  # type: ignore[arg-type]
    waiter = protocol.expect(2)
    for byte in b"*2\r\n$1\r\na\r\n:7\r\n+OK\r\n":
        assert not waiter.done()
        protocol.data_received(bytes([byte]))
        if waiter.done():
            break
    assert waiter.result() == [[b"a", 7], b"OK"]


async def test_a_reply_nobody_asked_for_breaks_the_connection() -> None:
    protocol = Replies(_Recorder())  # type: ignore[arg-type]
    protocol.data_received(b"+OK\r\n")
    assert isinstance(protocol.broken, redis.ConnectionError)
    with pytest.raises(redis.ConnectionError):
        protocol.expect(1)


# Bytes that end the exchange with a ConnectionError: the count of replies asked for, what
# Redis sends, and what the error says (None: any message).
BREAKING_STREAMS = {
    "more replies than asked for": (1, b"+OK\r\n+EXTRA\r\n", None),
    "bytes that are not RESP": (1, b"?garbage\r\n", "unreadable reply"),
    # redis-py raises "max number of clients" (a ConnectionError) instead of returning it as a
    # reply: the link fails the exchange with it, so the waker handles it as a lost connection.
    "an error redis-py raises as a connection failure": (
        2,
        b"+OK\r\n-ERR max number of clients reached\r\n",
        "max number of clients",
    ),
}


@pytest.mark.parametrize("wanted, data, match", BREAKING_STREAMS.values(), ids=BREAKING_STREAMS.keys())
async def test_bytes_that_break_the_stream_fail_the_wait(wanted: int, data: bytes, match: str | None) -> None:
    protocol = Replies(_Recorder())  # type: ignore[arg-type]
    waiter = protocol.expect(wanted)
    protocol.data_received(data)
    with pytest.raises(redis.ConnectionError, match=match):
        waiter.result()


async def test_the_end_of_the_connection_fails_the_wait_and_reaches_the_replaced_protocol() -> None:
    replaced = _Recorder()
    protocol = Replies(replaced)  # type: ignore[arg-type]
    waiter = protocol.expect(1)
    protocol.data_received(b"*1\r\n")  # half a reply
    error = OSError("reset")
    protocol.connection_lost(error)
    with pytest.raises(redis.ConnectionError):
        waiter.result()
    assert replaced.lost == [error]

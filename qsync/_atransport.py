"""The asyncio I/O shell: the twin of :mod:`qsync._transport`, with ``await``.

Commands go straight onto a pooled connection so that redis-py's automatic retry never
re-sends a state-changing script, and replies are read undecoded (binary payloads survive
``decode_responses=True``). A cancelled call drops its connection: a reply may be in flight.
A transport keeps one idle connection as a spare, as the sync one does.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import MaxConnectionsError, RedisClusterException

from ._ops import Call
from ._protocol import (
    REPLY_ERRORS,
    ConnectFailed,
    Exchange,
    decoded,
    exchange_calls,
    packed_pieces,
    single_exchange,
)
from ._takeover import ended, exchange_on, hand_back, take_over
from ._transport import CONNECT_ERRORS, DRIVER_ERRORS, Spares

__all__ = ["AsyncTransport", "roundtrip"]


class _LoopSpares(Spares):
    """Spares and the event loop that last used them (their pool is released on it)."""

    __slots__ = ("loop",)

    def __init__(self, pool: Any) -> None:
        super().__init__(pool)
        self.loop: asyncio.AbstractEventLoop | None = None


# Tasks giving back the spares of transports collected without close(): the finalizer cannot
# await the pool, so a task on the spares' loop does it (kept here until done).
_RELEASING: set[asyncio.Task[None]] = set()


def _release_later(spares: _LoopSpares) -> None:
    spares.closed = True
    conns, loop = spares.take_all(), spares.loop
    if not conns or loop is None or loop.is_closed():
        return  # a closed loop's connections can no longer be awaited, by the pool or anyone

    def start() -> None:
        task = loop.create_task(_give_back(spares.pool, conns))
        _RELEASING.add(task)
        task.add_done_callback(_RELEASING.discard)

    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        start()
    else:
        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop closed in the meantime
            pass


async def _give_back(pool: Any, conns: list[Any]) -> None:
    for conn in conns:
        await pool.release(conn)


async def _reconnect_if_ended(conn: Any) -> None:
    """Reconnect ``conn`` if the server ended it while it sat idle. redis-py before 8 checks a
    connection by a read that times out at once and can miss the end; sent on, a call would
    wait for a reply that cannot come, or end uncertain. Nothing has been sent yet here."""
    if ended(conn):
        await conn.disconnect()
        await conn.connect()


async def _pool_connection(pool: Any) -> Any:
    """A connection from the pool. A pool at max_connections may be waiting only for the
    spares of queues just dropped (their release is a task that has not run yet): wait for
    those once and ask again."""
    try:
        return await pool.get_connection()
    except redis.ConnectionError as exc:
        # redis-py 8 raises MaxConnectionsError; older async pools a plain ConnectionError.
        if not isinstance(exc, MaxConnectionsError) and str(exc) != "Too many connections":
            raise
        loop = asyncio.get_running_loop()
        pending = [t for t in tuple(_RELEASING) if t.get_loop() is loop]  # other loops' threads add too
        if not pending:
            raise
        await asyncio.wait(pending)
        return await pool.get_connection()


class AsyncTransport:
    """Runs calls on a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` client."""

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster) -> None:
        self.client = client
        self.by_slot = isinstance(client, aioredis.RedisCluster)
        self._spares: _LoopSpares | None = None
        if isinstance(client, aioredis.Redis):
            self._spares = _LoopSpares(client.connection_pool)
            weakref.finalize(self, _release_later, self._spares)

    async def close(self) -> None:
        """Give the spare connection back to the client's pool."""
        spares = self._spares
        if spares is not None:
            spares.closed = True
            await _give_back(spares.pool, spares.take_all())

    async def run(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Run calls in one round trip per node; one result or QsyncError per call."""
        first: list[Any] | BaseException | None = None
        if len(calls) == 1 and not self.by_slot:
            # A single call (every enqueue, info, ...) goes out without the exchange flow; the
            # flow takes over, from this first outcome, only for an error reply or a failure.
            call = calls[0]
            try:
                first = await self._send(single_exchange(call))
            except DRIVER_ERRORS as exc:
                first = exc
            else:
                if not isinstance(first[0], REPLY_ERRORS):
                    return [decoded(call, first[0])]
        flow = exchange_calls(calls, by_slot=self.by_slot)
        try:
            exchange = next(flow)
            if first is not None:
                exchange = flow.throw(first) if isinstance(first, BaseException) else flow.send(first)
            while True:
                try:
                    replies = await self._send(exchange)
                except DRIVER_ERRORS as exc:
                    exchange = flow.throw(exc)
                else:
                    exchange = flow.send(replies)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _send(self, exchange: Exchange) -> list[Any]:
        spares = self._spares
        if spares is None:
            assert isinstance(self.client, aioredis.RedisCluster)
            return await self._send_cluster(self.client, exchange)
        pool, pid = spares.pool, os.getpid()
        conn = spares.take(pid)
        try:
            if conn is None:
                conn = await _pool_connection(pool)
            else:
                # Made ready to send as the pool makes every connection it hands out: a socket
                # the server closed, or one holding data nobody read, is reconnected first.
                await pool.ensure_connection(conn)
            await _reconnect_if_ended(conn)
        except BaseException as exc:
            if conn is not None:
                await pool.release(conn)
            if isinstance(exc, CONNECT_ERRORS):
                raise ConnectFailed(str(exc)) from exc
            raise
        try:
            replies = await roundtrip(conn, exchange)
        except BaseException:
            await pool.release(conn)
            raise
        spares.loop = asyncio.get_running_loop()
        for extra in spares.keep(conn, pid):
            await pool.release(extra)
        return replies

    async def _send_cluster(self, client: aioredis.RedisCluster, exchange: Exchange) -> list[Any]:
        try:
            # The async cluster client learns the slot map on first use; ours is a direct send.
            await client.initialize()
            if exchange.refresh_routes:
                await client.nodes_manager.initialize()
            node = client.get_node_from_key(exchange.route_key)
            if node is None:
                raise ConnectFailed(f"no node serves the slot of {exchange.route_key!r}")
            # The client's own instance of that node: after a refresh, redis-py 7's slot map
            # holds fresh copies of known nodes, whose connections its aclose() never reaches.
            node = client.get_node(node_name=node.name) or node
            conn = node.acquire_connection()
            await conn.connect()  # type: ignore[no-untyped-call]
        except (*CONNECT_ERRORS, RedisClusterException) as exc:
            raise ConnectFailed(str(exc)) from exc
        try:
            return await roundtrip(conn, exchange)
        finally:
            _release_to_node(node, conn)


def _release_to_node(node: Any, conn: Any) -> None:
    release = getattr(node, "release", None)
    if release is not None:
        release(conn)
    else:  # redis-py before 6: a node's own commands put the connection back so
        node._free.append(conn)


async def roundtrip(conn: Any, exchange: Exchange) -> list[Any]:
    """Send an exchange's commands on ``conn`` and read one reply per command (an error reply
    as its exception object); any failure, cancellation included, drops the connection, since
    a reply may be in flight. The server's wake-up listeners use it on a connection whose
    transport they cannot take over (qsync/server/_link.py).

    An exchange whose replies are wanted only together (no ``on_reply``: every single call) is
    read by qsync's own protocol (:mod:`qsync._takeover`): two event-loop iterations per call
    instead of redis-py's five. The transport goes back to redis-py after the last reply."""
    taken = take_over(conn) if exchange.on_reply is None else None
    if taken is not None:
        transport, protocol = taken
        try:
            result = await exchange_on(transport, protocol, exchange.commands, conn.socket_timeout)
        except BaseException:
            await conn.disconnect()
            raise
        hand_back(transport, protocol)
        return result
    try:
        for piece in packed_pieces(exchange.commands):
            await conn.send_packed_command(piece, check_health=False)
        replies: list[Any] = []
        on_reply = exchange.on_reply
        refused: Exception | None = None
        for position in range(len(exchange.commands)):
            if refused is not None:
                reply = refused
            else:
                try:
                    reply = await conn.read_response(disable_decoding=True)
                except REPLY_ERRORS as err:
                    reply = err.with_traceback(None)  # a reply, not a failure here: no frames kept
                    if isinstance(reply, redis.AuthenticationError):
                        # NOAUTH: Redis refuses every command of a connection that has not
                        # authenticated, and redis-py before 8 drops it after the first refusal.
                        # The rest are refused alike; the connection starts afresh next time.
                        refused = reply
                        await conn.disconnect()
            replies.append(reply)
            if on_reply is not None:
                on_reply(position, reply)
        return replies
    except BaseException:
        await conn.disconnect()
        raise

"""A wake-up listener's connection, its replies parsed as the bytes arrive.

redis-py opens, sets up (TLS, password or ACL user, database, client name) and closes the
connection, as for any other. The listener's exchanges (a ``BRPOP``, the lease behind it) then
skip redis-py's stream reader and parser: the connection's transport is handed to a small
asyncio protocol that feeds hiredis as bytes arrive and wakes the listener once the exchange's
last reply is in. An idle pick-up is mostly waiting, and the few steps after a wake-up are what
a user sees: on the development machine this took 35-60 µs (about a tenth) off it.

A connection whose transport cannot be taken over (a redis-py that no longer keeps an asyncio
stream writer, say) is read through redis-py, as before; :attr:`Link.taken_over` tells which.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import redis
from redis._parsers import BaseParser
from redis.exceptions import InvalidResponse

from .._atransport import roundtrip
from .._protocol import REPLY_ERRORS, Exchange, packed_pieces

__all__ = ["Link"]

_NOT_ENOUGH = object()


class _Replies(asyncio.Protocol):
    """Parses a taken-over transport's bytes into replies (an error reply as redis-py's
    exception object). The end of the connection is passed on to the stream protocol it
    replaced, so that redis-py's close, which waits for it, completes."""

    def __init__(self, replaced: asyncio.BaseProtocol) -> None:
        self._replaced = replaced
        # A sentinel for "no whole reply yet": gets() returns False by default, which is also
        # a reply (RESP3's boolean false), as redis-py's own parser knows.
        self._reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error, notEnoughData=_NOT_ENOUGH
        )
        self._replies: list[Any] = []
        self._wanted = 0
        self._waiter: asyncio.Future[list[Any]] | None = None
        self.broken: Exception | None = None  # why the connection can no longer be used

    def expect(self, count: int) -> asyncio.Future[list[Any]]:
        """A future for the next ``count`` replies (none may be outstanding)."""
        if self.broken is not None:
            raise self.broken
        self._replies, self._wanted = [], count
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    def data_received(self, data: bytes) -> None:
        replies = self._replies
        try:
            self._reader.feed(data)
            while (reply := self._reader.gets()) is not _NOT_ENOUGH:
                if isinstance(reply, Exception) and not isinstance(reply, REPLY_ERRORS):
                    # An error redis-py raises as a failure of the connection (max clients,
                    # say), not one it hands over as a reply (qsync._atransport.roundtrip).
                    self._break(reply)
                    return
                # A RESP3 push frame (an invalidation, a maintenance notice) is nobody's reply:
                # redis-py passes it by too. Counted, it would stand in for the next reply.
                if not isinstance(reply, hiredis.PushNotification):
                    replies.append(reply)
        except Exception as exc:  # a protocol error: this connection's stream is lost
            self._break(redis.ConnectionError(f"unreadable reply from Redis: {exc}"))
            return
        waiter = self._waiter
        if len(replies) > self._wanted or (waiter is None and replies):
            self._break(redis.ConnectionError("Redis sent a reply nobody asked for"))
        elif waiter is not None and len(replies) == self._wanted:
            self._waiter, self._replies = None, []
            if not waiter.done():
                waiter.set_result(replies)

    def eof_received(self) -> bool | None:
        self._break(redis.ConnectionError("connection closed by Redis"))
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(redis.ConnectionError(f"the connection closed: {exc}" if exc else "closed"))
        self._replaced.connection_lost(exc)

    def pause_writing(self) -> None:
        self._replaced.pause_writing()

    def resume_writing(self) -> None:
        self._replaced.resume_writing()

    def _break(self, error: Exception) -> None:
        if self.broken is None:
            self.broken = error
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.broken)


class Link:
    """One listener's connection: redis-py's ``conn``, taken from its pool and never given
    back (closing the client closes it). Exchanges on it run one at a time."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._replies: _Replies | None = None
        self._transport: asyncio.Transport | None = None

    @property
    def taken_over(self) -> bool:
        """True when replies are read by this link's own protocol, not through redis-py."""
        return self._replies is not None

    async def connect(self) -> None:
        """Connect (again, after a failure) and take the transport over. Raises what redis-py
        raises when Redis cannot be reached; nothing is sent then."""
        replies = self._replies
        if replies is not None and (
            replies.broken is not None or _transport(self._conn) is not self._transport
        ):
            # Broken, or closed by redis-py itself without waiting (its end may not have
            # reached this link yet): either way the transport taken over is done with.
            await self._drop()
        await self._conn.connect()
        if self._replies is None:
            self._take_over()

    async def roundtrip(self, exchange: Exchange) -> list[Any]:
        """Send ``exchange``'s commands and return one reply per command (an error reply as
        its exception object). Any failure, a cancellation or a timeout of the connection's
        socket timeout included, drops the connection, since a reply may be in flight."""
        replies, transport = self._replies, self._transport
        if replies is None or transport is None:
            return await roundtrip(self._conn, exchange)
        try:
            waiter = replies.expect(len(exchange.commands))
            transport.write(b"".join(packed_pieces(exchange.commands)))
            try:
                async with asyncio.timeout(self._conn.socket_timeout):
                    result = await waiter
            except TimeoutError:
                raise redis.TimeoutError("timed out reading from Redis") from None
        except BaseException:
            await self._drop()
            raise
        on_reply = exchange.on_reply
        if on_reply is not None:
            for position, reply in enumerate(result):
                on_reply(position, reply)
        return result

    def _take_over(self) -> None:
        transport = _transport(self._conn)
        if not isinstance(transport, asyncio.Transport):
            return
        replies = _Replies(transport.get_protocol())
        transport.set_protocol(replies)
        self._replies, self._transport = replies, transport

    async def _drop(self) -> None:
        self._replies = self._transport = None
        await self._conn.disconnect()


def _transport(conn: Any) -> Any:
    """The transport under redis-py's stream writer of ``conn`` (None when not connected)."""
    return getattr(getattr(conn, "_writer", None), "transport", None)

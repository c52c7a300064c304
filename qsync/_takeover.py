"""A redis-py asyncio connection's replies read by qsync's own protocol, as the bytes arrive.

redis-py opens, sets up (TLS, password or ACL user, database, client name) and closes a
connection, as for any other. For an exchange, qsync can hand the connection's transport to a
small asyncio protocol that feeds hiredis as bytes arrive and wakes the caller once the
exchange's last reply is in: no stream reader, no task per read for its timeout, one loop
iteration from the bytes to the caller. The worker's wake-up listeners keep their transport
taken over (:mod:`qsync.server._link`); other calls take it over for one exchange and hand it
back (:func:`qsync._atransport.roundtrip`).

A connection whose transport cannot be taken over (a redis-py that no longer keeps an asyncio
stream writer, say) is read through redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis._parsers import BaseParser
from redis.exceptions import InvalidResponse

from ._protocol import REPLY_ERRORS, packed_pieces

__all__ = ["Replies", "ended", "exchange_on", "hand_back", "take_over", "transport_of"]

_NOT_ENOUGH = object()


class Replies(asyncio.Protocol):
    """Parses a taken-over transport's bytes into replies (an error reply as redis-py's
    exception object). The end of the connection is passed on to the stream protocol it
    replaced, so that redis-py's close, which waits for it, completes."""

    def __init__(self, replaced: asyncio.BaseProtocol) -> None:
        self.replaced = replaced
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
        self.replaced.connection_lost(exc)

    def pause_writing(self) -> None:
        self.replaced.pause_writing()

    def resume_writing(self) -> None:
        self.replaced.resume_writing()

    def _break(self, error: Exception) -> None:
        if self.broken is None:
            self.broken = error
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.broken)


def transport_of(conn: Any) -> Any:
    """The transport under redis-py's stream writer of ``conn`` (None when not connected)."""
    return getattr(getattr(conn, "_writer", None), "transport", None)


def ended(conn: Any) -> bool:
    """True when redis-py's side of ``conn`` has seen the connection end (the server closed
    it): its transport no longer reads, so nothing sent on it would be answered."""
    transport, reader = transport_of(conn), getattr(conn, "_reader", None)
    if transport is not None and transport.is_closing():
        return True
    return isinstance(reader, asyncio.StreamReader) and reader.at_eof()


def take_over(conn: Any) -> tuple[asyncio.Transport, Replies] | None:
    """Hand ``conn``'s transport to a new :class:`Replies`; None when it cannot be (then
    redis-py reads the exchange, and a connection that ended fails as it always has)."""
    transport = transport_of(conn)
    if not isinstance(transport, asyncio.Transport) or ended(conn):
        return None
    replies = Replies(transport.get_protocol())
    transport.set_protocol(replies)
    return transport, replies


def hand_back(transport: asyncio.Transport, replies: Replies) -> None:
    """Give the transport back to redis-py's protocol (after a whole exchange: nothing of a
    reply is left unread, so redis-py's reader resumes at a reply's start)."""
    transport.set_protocol(replies.replaced)


async def exchange_on(
    transport: asyncio.Transport, replies: Replies, commands: Sequence[tuple[Any, ...]], timeout: float | None
) -> list[Any]:
    """Send ``commands`` and wait for their replies, at most ``timeout`` seconds (the
    connection's socket timeout; None waits as long as it takes)."""
    waiter = replies.expect(len(commands))
    transport.write(b"".join(packed_pieces(commands)))
    try:
        async with asyncio.timeout(timeout):
            return await waiter
    except TimeoutError:
        raise redis.TimeoutError("timed out reading from Redis") from None

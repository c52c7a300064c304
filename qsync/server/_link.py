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

from .._atransport import roundtrip
from .._protocol import Exchange
from .._takeover import Replies, exchange_on, take_over, transport_of

__all__ = ["Link"]


class Link:
    """One listener's connection: redis-py's ``conn``, taken from its pool and never given
    back (closing the client closes it). Exchanges on it run one at a time."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._replies: Replies | None = None
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
            replies.broken is not None or transport_of(self._conn) is not self._transport
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
            result = await exchange_on(transport, replies, exchange.commands, self._conn.socket_timeout)
        except BaseException:
            await self._drop()
            raise
        on_reply = exchange.on_reply
        if on_reply is not None:
            for position, reply in enumerate(result):
                on_reply(position, reply)
        return result

    def _take_over(self) -> None:
        taken = take_over(self._conn)
        if taken is not None:
            self._transport, self._replies = taken

    async def _drop(self) -> None:
        self._replies = self._transport = None
        await self._conn.disconnect()

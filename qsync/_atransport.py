"""The asyncio I/O shell: the twin of :mod:`qsync._transport`, with ``await``.

Commands go straight onto a pooled connection so that redis-py's automatic retry never
re-sends a state-changing script, and replies are read undecoded (binary payloads survive
``decode_responses=True``). A cancelled call drops its connection: a reply may be in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException

from ._ops import Call
from ._protocol import REPLY_ERRORS, ConnectFailed, Exchange, exchange_calls, packed_pieces

__all__ = ["AsyncTransport"]


class AsyncTransport:
    """Runs calls on a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` client."""

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster) -> None:
        self.client = client
        self.by_slot = isinstance(client, aioredis.RedisCluster)

    async def run(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Run calls in one round trip per node; one result or QsyncError per call."""
        flow = exchange_calls(calls, by_slot=self.by_slot)
        try:
            exchange = next(flow)
            while True:
                try:
                    replies = await self._send(exchange)
                except (ConnectFailed, redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    exchange = flow.throw(exc)
                else:
                    exchange = flow.send(replies)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _send(self, exchange: Exchange) -> list[Any]:
        client = self.client
        if isinstance(client, aioredis.RedisCluster):
            return await self._send_cluster(client, exchange)
        pool = client.connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            await conn.connect()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise ConnectFailed(str(exc)) from exc
        try:
            return await _roundtrip(conn, exchange)
        finally:
            await pool.release(conn)

    async def _send_cluster(self, client: aioredis.RedisCluster, exchange: Exchange) -> list[Any]:
        try:
            # The async cluster client learns the slot map on first use; ours is a direct send.
            await client.initialize()
            if exchange.refresh_routes:
                await client.nodes_manager.initialize()
            node = client.get_node_from_key(exchange.route_key)
            if node is None:
                raise ConnectFailed(f"no node serves the slot of {exchange.route_key!r}")
            conn = node.acquire_connection()
            await conn.connect()  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError, OSError, RedisClusterException) as exc:
            raise ConnectFailed(str(exc)) from exc
        try:
            return await _roundtrip(conn, exchange)
        finally:
            node.release(conn)


async def _roundtrip(conn: Any, exchange: Exchange) -> list[Any]:
    try:
        for piece in packed_pieces(exchange.commands):
            await conn.send_packed_command(piece, check_health=False)
        replies: list[Any] = []
        for _ in exchange.commands:
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except REPLY_ERRORS as err:
                replies.append(err)
        return replies
    except BaseException:
        await conn.disconnect()
        raise

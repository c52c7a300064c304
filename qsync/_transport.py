"""The sync I/O shell: sends the exchanges of :mod:`qsync._protocol` on pooled connections.

Commands go straight onto a connection taken from the client's pool (not through
``execute_command``) so that redis-py's automatic retry never re-sends a state-changing script,
and replies are read undecoded so binary payloads survive ``decode_responses=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from ._ops import Call
from ._protocol import REPLY_ERRORS, ConnectFailed, Exchange, exchange_calls, packed_pieces

__all__ = ["SyncTransport"]


class SyncTransport:
    """Runs calls on a ``redis.Redis`` or ``redis.RedisCluster`` client."""

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self.client = client
        self.by_slot = isinstance(client, redis.RedisCluster)

    def run(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Run calls in one round trip per node; one result or QsyncError per call."""
        flow = exchange_calls(calls, by_slot=self.by_slot)
        try:
            exchange = next(flow)
            while True:
                try:
                    replies = self._send(exchange)
                except (ConnectFailed, redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    exchange = flow.throw(exc)
                else:
                    exchange = flow.send(replies)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _pool(self, exchange: Exchange) -> Any:
        client = self.client
        if isinstance(client, redis.RedisCluster):
            if exchange.refresh_routes:
                client.nodes_manager.initialize()
            node = client.get_node_from_key(exchange.route_key)  # type: ignore[no-untyped-call]
            return client.get_redis_connection(node).connection_pool
        return client.connection_pool

    def _send(self, exchange: Exchange) -> list[Any]:
        try:
            pool = self._pool(exchange)
            conn = pool.get_connection()
        except (redis.ConnectionError, redis.TimeoutError, OSError, RedisClusterException) as exc:
            raise ConnectFailed(str(exc)) from exc
        try:
            try:
                conn.connect()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise ConnectFailed(str(exc)) from exc
            conn.send_packed_command(packed_pieces(exchange.commands), check_health=False)
            replies: list[Any] = []
            for _ in exchange.commands:
                try:
                    replies.append(conn.read_response(disable_decoding=True))
                except REPLY_ERRORS as err:
                    replies.append(err)
            return replies
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

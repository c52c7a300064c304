"""The sync I/O shell: sends the exchanges of :mod:`qsync._protocol` on pooled connections.

Commands go straight onto a connection taken from the client's pool (not through
``execute_command``) so that redis-py's automatic retry never re-sends a state-changing script,
and replies are read undecoded so binary payloads survive ``decode_responses=True``.

A transport keeps one idle connection of the pool as a spare (see :class:`Spares`): a single
call then skips the pool's checkout and release, which cost as much Python time as the rest of
an enqueue. Cluster clients take every connection from the pool.
"""

from __future__ import annotations

import _thread
import gc
import os
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import RedisClusterException

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

__all__ = ["CONNECT_ERRORS", "DRIVER_ERRORS", "MAX_SPARES", "Spares", "SyncTransport"]

# Idle connections a transport keeps out of the pool: one serves a single thread's calls
# back to back; more threads share the pool as before. Each is a connection the rest of the
# application cannot take from a pool with max_connections while the queue lives.
MAX_SPARES = 1
# What connecting or a round trip raises when the connection fails (the async client's errors
# are these classes too), and what a send raises that the exchange flow judges (thrown into it).
CONNECT_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
DRIVER_ERRORS = (ConnectFailed, *CONNECT_ERRORS)


class Spares:
    """A transport's idle connections, with the pool they belong to and return to.

    It holds no reference to its transport, so the transport's ``weakref.finalize`` can give
    the connections back when a queue is dropped without ``close()`` (from a thread of its own
    when the cyclic GC collects it: see ``_ORPHANS``). Each connection is kept
    with the pid that used it: a forked child drops the parent's (it must never use or shut
    down the parent's sockets), and ``list.pop`` hands each one to exactly one thread. The pid
    is ``os.getpid()`` at each call, never a value cached and refreshed by an
    ``os.register_at_fork`` hook: a fork made in C (uWSGI's pre-forked workers by default) runs
    no such hook, and a child holding its parent's pid would share the parent's socket.
    """

    __slots__ = ("closed", "conns", "pool")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.conns: list[tuple[int, Any]] = []
        self.closed = False

    def take(self, pid: int) -> Any | None:
        """A spare connection of process ``pid`` (the caller's ``os.getpid()``), or None."""
        while True:
            try:
                owner, conn = self.conns.pop()
            except IndexError:
                return None
            if owner == pid:
                return conn

    def keep(self, conn: Any, pid: int) -> list[Any]:
        """Keep ``conn`` as a spare; returns the connections to give back to the pool (beyond
        MAX_SPARES, or all once closed). Checked after the append, so a racing ``close()`` or
        another thread's ``keep`` never leaves one behind."""
        conns = self.conns
        conns.append((pid, conn))
        if len(conns) <= MAX_SPARES and not self.closed:
            return []
        return self.take_all(0 if self.closed else MAX_SPARES)

    def take_all(self, keep: int = 0) -> list[Any]:
        """Remove this process's spares beyond ``keep`` (inherited ones are dropped)."""
        pid = os.getpid()
        out = []
        while len(self.conns) > keep:
            conn = self.take(pid)
            if conn is None:
                break
            out.append(conn)
        return out


def _release(spares: Spares) -> None:
    """Give every spare back to its pool (on close, and when the transport is collected)."""
    spares.closed = True
    conns = spares.take_all()
    if not conns:  # closed before, or never used: no thread to start during a collection
        return
    if _collecting:
        pid = os.getpid()
        _ORPHANS.extend((pid, spares.pool, conn) for conn in conns)
        _start_giving_back(pid)
        return
    for conn in conns:
        spares.pool.release(conn)


# A transport the cyclic GC collects gives its spares back from a thread of its own. The GC runs
# wherever an allocation starts it, inside a pool's own code too, with the pool's lock held by
# this very thread: redis-py before 6 guards its pools with a plain Lock, and every version's
# BlockingConnectionPool a queue.Queue, so a release from there would wait for itself forever.
# Another thread waits only until this one leaves the pool.
_ORPHANS: list[tuple[int, Any, Any]] = []  # (pid, pool, connection)
_collecting = False
_giving_back_in = 0  # the pid whose thread is giving orphans back (0: none is)


def _track_collections(phase: str, info: dict[str, int]) -> None:
    global _collecting
    _collecting = phase == "start"


gc.callbacks.append(_track_collections)


def _start_giving_back(pid: int) -> None:
    """Start a thread that gives the orphans back, unless one of this process runs. A bare
    ``_thread`` one: ``threading.Thread.start`` takes locks and waits for the thread, neither of
    which is safe in the middle of a collection."""
    global _giving_back_in
    if _giving_back_in == pid:
        return
    _giving_back_in = pid
    try:
        _thread.start_new_thread(_give_back_orphans, ())
    except RuntimeError:  # the interpreter is shutting down: its sockets go with it
        _giving_back_in = 0


def _give_back_orphans() -> None:
    """Release the orphans to their pools (a forked child drops its parent's: they are the
    parent's sockets), until none is left."""
    global _giving_back_in
    pid = os.getpid()
    while True:
        try:
            while _ORPHANS:
                owner, pool, conn = _ORPHANS.pop()
                if owner == pid:
                    pool.release(conn)
        except IndexError:  # another thread took the last one
            pass
        finally:  # a release that raised leaves the rest to the next collection's thread
            _giving_back_in = 0
        if not _ORPHANS:
            return
        _giving_back_in = pid  # one came after the last pop: keep going


class SyncTransport:
    """Runs calls on a ``redis.Redis`` or ``redis.RedisCluster`` client."""

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self.client = client
        self.by_slot = isinstance(client, redis.RedisCluster)
        self._spares: Spares | None = None
        if isinstance(client, redis.Redis):
            self._spares = Spares(client.connection_pool)
            weakref.finalize(self, _release, self._spares)

    def close(self) -> None:
        """Give the spare connection back to the client's pool."""
        if self._spares is not None:
            _release(self._spares)

    def run(self, calls: Sequence[Call[Any]]) -> list[Any]:
        """Run calls in one round trip per node; one result or QsyncError per call."""
        first: list[Any] | BaseException | None = None
        if len(calls) == 1 and not self.by_slot:
            # A single call (every enqueue, info, ...) goes out without the exchange flow; the
            # flow takes over, from this first outcome, only for an error reply or a failure.
            call = calls[0]
            try:
                first = self._send(single_exchange(call))
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
                    replies = self._send(exchange)
                except DRIVER_ERRORS as exc:
                    exchange = flow.throw(exc)
                else:
                    exchange = flow.send(replies)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _send(self, exchange: Exchange) -> list[Any]:
        spares = self._spares
        if spares is None:
            return self._send_pooled(exchange)
        pool, pid = spares.pool, os.getpid()
        conn = spares.take(pid)
        try:
            if conn is None:
                conn = pool.get_connection()
            else:
                _check_spare(conn)
        except BaseException as exc:
            if conn is not None:
                pool.release(conn)
            if isinstance(exc, CONNECT_ERRORS):
                raise ConnectFailed(str(exc)) from exc
            raise
        try:
            replies = _roundtrip(conn, exchange)
        except BaseException:
            pool.release(conn)
            raise
        for extra in spares.keep(conn, pid):
            pool.release(extra)
        return replies

    def _send_pooled(self, exchange: Exchange) -> list[Any]:
        client = self.client
        pool: Any
        try:
            if isinstance(client, redis.RedisCluster):
                if exchange.refresh_routes:
                    client.nodes_manager.initialize()
                node = client.get_node_from_key(exchange.route_key)  # type: ignore[no-untyped-call]
                pool = client.get_redis_connection(node).connection_pool
            else:
                pool = client.connection_pool
            conn = pool.get_connection()
        except (*CONNECT_ERRORS, RedisClusterException) as exc:
            raise ConnectFailed(str(exc)) from exc
        try:
            try:
                conn.connect()
            except CONNECT_ERRORS as exc:
                raise ConnectFailed(str(exc)) from exc
            return _roundtrip(conn, exchange)
        finally:
            pool.release(conn)


def _check_spare(conn: Any) -> None:
    """Make an idle spare ready to send as the pool does for a connection it hands out: a
    socket the server closed, or one holding data nobody read, is noticed before anything is
    sent and reconnected. (Written with connect/can_read/disconnect only: older redis-py sync
    pools have no ensure_connection.)"""
    try:
        conn.connect()  # a no-op while connected
        if not conn.can_read():
            return
    except redis.ConnectionError:
        pass
    conn.disconnect()
    conn.connect()


def _roundtrip(conn: Any, exchange: Exchange) -> list[Any]:
    try:
        conn.send_packed_command(packed_pieces(exchange.commands), check_health=False)
        replies: list[Any] = []
        on_reply = exchange.on_reply
        refused: Exception | None = None
        for position in range(len(exchange.commands)):
            if refused is not None:
                reply = refused
            else:
                try:
                    reply = conn.read_response(disable_decoding=True)
                except REPLY_ERRORS as err:
                    reply = err.with_traceback(None)  # a reply, not a failure here: no frames kept
                    if isinstance(reply, redis.AuthenticationError):
                        # NOAUTH: Redis refuses every command of a connection that has not
                        # authenticated, and redis-py before 8 drops it after the first refusal.
                        # The rest are refused alike; the connection starts afresh next time.
                        refused = reply
                        conn.disconnect()
            replies.append(reply)
            if on_reply is not None:
                on_reply(position, reply)
        return replies
    except BaseException:
        conn.disconnect()
        raise

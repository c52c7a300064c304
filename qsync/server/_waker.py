"""Waker: wakes an idle processor within milliseconds of new work, without polling.

Scripts that make work ready (enqueue, promote, requeue, and lease when it leaves work behind)
push a token onto the queue's wake list ``{<prefix>:<queue>}:wake`` (capped at one entry).
While the processor is idle, one listener per queue blocks in ``BRPOP`` on its own connection,
on that list and on its own key ``{<prefix>:<queue>}:wake:<listener>`` (one slot, so it works
unchanged on Redis Cluster). A listener that delivered a wake-up listens again only once the
processor is idle again, so a busy server does not take the tokens that would wake an idle one;
tokens stay in Redis until popped, so none is lost meanwhile.

The idle pick-up is one round trip. On a single Redis a listener sends its queue's lease call
right behind the ``BRPOP`` on the same connection; Redis runs it the moment the ``BRPOP``
returns (woken or timed out), so the leased tasks arrive with the wake-up; the listener's
connection parses both replies as their bytes arrive (``_link.Link``). The processor
reserves the slots such a lease may fill when the listener arms (``arm``) and gets them back
with its reply (``deliver``), so the server never runs more than its concurrency. When the
processor gets busy or stops, the armed waits are ended at once (lua/unblock.lua puts a token on
each listener's own key), so no slot stays reserved by a listener that would otherwise wait for
its block time. A lease sent behind a ``BRPOP`` runs up to that block time after it was sent,
while its expiry is counted from the send: the block is kept to a quarter of a lease, far inside
the first heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from .. import _ops
from .._ops import Call, LeaseBatch
from .._protocol import REPLY_ERRORS, Exchange, absorb_replies, outcome_unknown
from ..errors import QsyncError
from ._link import Link

if TYPE_CHECKING:
    from ..aio import AsyncQueue

__all__ = ["Arm", "Deliver", "Waker"]

log = logging.getLogger("qsync.server")

# The longest an armed wait blocks: if its unblock cannot be written (Redis at maxmemory), the
# slots it reserved, or a stop, wait at most this long for it.
MAX_LEASE_BLOCK_S = 2.0

# The lease a listener of a queue sends behind its BRPOP (its slots reserved), or None.
Arm = Callable[[str], Call[LeaseBatch] | None]
# That lease's outcome, with the monotonic time it was sent: the tasks, an error, or None when
# it surely did not run (a NOSCRIPT reply). Called exactly once per armed lease.
LeaseResult = LeaseBatch | QsyncError | None
Deliver = Callable[[str, LeaseResult, float], None]


class Waker:
    """Per-queue blocking listeners, active only while :attr:`idle` is set."""

    def __init__(
        self,
        queue: AsyncQueue,
        client: aioredis.Redis | aioredis.RedisCluster,
        names: list[str],
        block_s: float,
        lease_duration: float,
    ) -> None:
        self._queue = queue
        self._client = client
        self._keys = {name: queue.keys(name) for name in names}
        self._listener_id = uuid.uuid4().hex[:12]
        self._block_s = max(0.1, block_s)
        self._lease_block_s = max(0.05, min(self._block_s, lease_duration / 4, MAX_LEASE_BLOCK_S))
        # Leases ride behind the BRPOP on a single Redis only: on a cluster the listener's
        # blocking command goes through the cluster client, which owns its connections.
        self._pipelined = isinstance(client, aioredis.Redis)
        self.idle = asyncio.Event()
        self._woken = False  # a wake-up arrived since the processor last looked
        self._waiter: asyncio.Future[None] | None = None
        self._listeners: dict[str, asyncio.Task[None]] = {}
        self._links: dict[str, Link] = {}  # queue -> the listener's own connection
        self._waiting: set[str] = set()  # listeners in a BRPOP on their own connection
        self._armed: set[str] = set()  # those of them with a lease behind their BRPOP
        self._unblocking: set[str] = set()
        self._reload: set[str] = set()  # listeners whose lease met NOSCRIPT: load it first
        self._background: set[asyncio.Task[None]] = set()
        self._arm: Arm = _never_arm
        self._deliver: Deliver = _ignore
        self._closing = False
        self._closed = False

    def start(self, arm: Arm | None = None, deliver: Deliver | None = None) -> None:
        """Start one listener per queue; ``arm``/``deliver`` enable the lease behind the BRPOP."""
        if arm is not None and deliver is not None:
            self._arm, self._deliver = arm, deliver
        loop = asyncio.get_running_loop()
        self._listeners = {name: loop.create_task(self._listen(name)) for name in self._keys}

    async def stop(self) -> None:
        """Stop listening. Armed listeners are unblocked and their leases delivered first, so
        none is lost; then the listeners end and their connections close. Safe to call twice."""
        if self._closed:
            return
        # The flag ends every listener's loop, whatever its last wait ended with.
        self._closing = True
        armed = [self._listeners[name] for name in self._armed]
        self._unblock(self._waiting)
        if armed:
            _, late = await asyncio.wait(armed, timeout=self._lease_block_s + 2)
            if late:
                log.warning("a wake-up listener did not return; the tasks its lease may have "
                            "taken come back when their leases expire")  # fmt: skip
        # The other listeners have no lease at stake: they are cancelled (closing the client
        # ends a read that a cancellation did not), and so are the calls that end waits early:
        # best effort, and against a frozen Redis they would wait out the queue client's socket
        # timeout (none by default with redis-py before 8).
        tasks = [*self._listeners.values(), *self._background]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1)
        self._closed = True
        if isinstance(self._client, aioredis.Redis):
            await self._client.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, timeout: float) -> None:
        """Wait (idle) until a wake-up arrives or ``timeout`` seconds pass.

        A wake-up that arrived since the last wait (say, during the lease round that found
        nothing) returns at once: the flag is cleared only here, right before the caller looks
        again, so no signal falls between a look and the next wait.
        """
        if not self._woken:
            loop = asyncio.get_running_loop()
            # A bare future and a timer, not asyncio.wait_for: a wake-up resumes the processor
            # in one event-loop step, with no task created per wait.
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _resolve, waiter)
            self.idle.set()
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
                self.idle.clear()
        self._woken = False

    def poke(self) -> None:
        """Wake the waiting processor now (also used to stop an idle server at once)."""
        self._woken = True
        # Not idle from now on: no listener re-arms before the processor has looked and waits.
        self.idle.clear()
        if self._waiter is not None:
            _resolve(self._waiter)

    def disarm(self, *, everyone: bool = False) -> None:
        """End every armed wait now (the processor got work): each lease runs at once and its
        reserved slots come back with its reply. With ``everyone`` (the processor is full),
        the waits without a lease end too: a server that cannot take work does not pop the
        wake-ups meant for idle ones. Costs nothing when no listener waits."""
        self._unblock(self._waiting if everyone else self._armed)

    def _unblock(self, names: set[str]) -> None:
        names = names - self._unblocking
        if not names:
            return
        self._unblocking |= names
        calls = [_ops.unblock(self._keys[name], self._listener_id) for name in sorted(names)]
        task = asyncio.get_running_loop().create_task(self._send_unblock(calls))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_unblock(self, calls: list[Call[None]]) -> None:
        # A failure leaves the listener to return at its block time; nothing else is at stake.
        try:
            results = await self._queue.run_calls(calls)
        except QsyncError as exc:
            results = [exc]
        for result in results:
            if isinstance(result, QsyncError):
                log.debug("could not end a wake-up listener's wait early: %s", result)

    async def _listen(self, name: str) -> None:
        backoff = 0.0
        while not self._closing:
            await self.idle.wait()
            if self._closing:
                return
            if not self.idle.is_set():  # woken and cleared again before this listener ran
                continue
            try:
                if self._pipelined:
                    woken = await self._wait_and_lease(name)
                else:
                    woken = await self._wait_cluster(name)
                backoff = 0.0
            except (redis.ConnectionError, redis.TimeoutError, OSError, redis.ResponseError) as exc:
                if self._closing:
                    return
                backoff = min(5.0, backoff * 2 or 0.1)
                log.debug("wake-up listener on %s failed, retrying in %.1fs: %s", name, backoff, exc)
                await asyncio.sleep(backoff)
                continue
            if woken:
                self.poke()

    async def _wait_and_lease(self, name: str) -> bool:
        """One BRPOP on this listener's connection, with the lease ``arm`` gives (if any) right
        behind it. Returns True when the queue's wake-up token was popped or tasks were leased;
        raises ResponseError for an error reply to the BRPOP, after delivering the lease."""
        keys = self._keys[name]
        lease = self._arm(name)
        block = self._block_s
        commands: list[tuple[Any, ...]] = []
        self._waiting.add(name)  # before any await: stop() and disarm() must see every wait
        if lease is not None:
            self._armed.add(name)
            block = self._lease_block_s
            if name in self._reload and lease.script is not None:
                commands.append(("SCRIPT", "LOAD", lease.script.source))
        commands.append(("BRPOP", keys.wake, keys.listener_wake(self._listener_id), block))
        if lease is not None:
            commands.append(lease.command())
        sent_at = time.monotonic()
        try:
            link = await self._link(name)
        except BaseException:
            self._settle(name, lease, None, sent_at)  # nothing was sent
            raise
        try:
            replies = await link.roundtrip(Exchange(commands, keys.wake))
        except BaseException as exc:
            lost = None if lease is None else outcome_unknown(lease, f"connection to Redis lost: {exc}")
            self._settle(name, lease, lost, sent_at)
            raise
        popped = replies[-2] if lease is not None else replies[-1]
        result = None if lease is None else self._decode_lease(name, lease, replies[-1])
        self._settle(name, lease, result, sent_at)
        leased = isinstance(result, LeaseBatch) and bool(result.tasks)
        if isinstance(popped, REPLY_ERRORS):
            raise popped
        return leased or (popped is not None and popped[0] == keys.wake.encode())

    def _settle(self, name: str, lease: Call[LeaseBatch] | None, result: LeaseResult, sent_at: float) -> None:
        """A wait is over: hand its lease's outcome over (once per armed lease)."""
        self._waiting.discard(name)
        self._armed.discard(name)
        self._unblocking.discard(name)
        if lease is not None:
            self._deliver(name, result, sent_at)

    def _decode_lease(self, name: str, lease: Call[LeaseBatch], reply: Any) -> LeaseResult:
        """The lease reply as the core decodes it (errors mapped as for any call); None when
        the script was not loaded (it did not run: load it with the next lease)."""
        results: list[Any] = [None]
        again, loads, _ = absorb_replies([lease], [0], [reply], results)
        if loads:
            self._reload.add(name)
        elif name in self._reload:
            self._reload.discard(name)
        if again:
            return None
        return results[0]  # type: ignore[no-any-return]

    async def _link(self, name: str) -> Link:
        """This listener's own connection, connected: taken from the listener client's pool
        once and never given back, so closing the client closes it. A connection error leaves
        it disconnected; the next wait reconnects."""
        link = self._links.get(name)
        if link is None:
            assert isinstance(self._client, aioredis.Redis)
            pool = self._client.connection_pool
            link = self._links[name] = Link(await pool.get_connection())  # type: ignore[no-untyped-call]
        await link.connect()
        return link

    async def _wait_cluster(self, name: str) -> bool:
        wake = self._keys[name].wake
        return bool(await self._client.execute_command("BRPOP", wake, self._block_s))


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _never_arm(name: str) -> None:
    return None


def _ignore(name: str, result: LeaseResult, sent_at: float) -> None:
    return None

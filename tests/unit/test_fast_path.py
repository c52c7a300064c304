"""The single-call fast path of both transports (``SyncTransport.run`` / ``AsyncTransport.run``)
on scripted stand-ins for a redis-py pool and its connections: whatever the first outcome (a
reply, an error reply, a broken connection, no connection), the caller gets the result the
exchange flow gives, the call is sent again only when the flow says so, and every connection
goes back. No Redis here: each send is answered by the next scripted step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, NoScriptError, OutOfMemoryError

from qsync import Task, TaskInfo, TaskState
from qsync._atransport import AsyncTransport
from qsync._keys import keys_for
from qsync._ops import Call, enqueue_many, lease
from qsync._protocol import MAX_ROUNDS
from qsync._transport import SyncTransport
from qsync.errors import EnqueueUncertain, NotEnqueued, OutcomeUnknown

KEYS = keys_for("fast", "q")
NOW_MS = 1_800_000_000_000
OK = [NOW_MS, 1, b"pending"]
REFUSED = "refused"  # a step: the pool cannot make a connection


def enqueue_call(task_id: str = "a") -> Call[Any]:
    return enqueue_many(KEYS, [Task("t", b"x", task_id=task_id)])[0]


class Wire:
    """The scripted server side shared by every connection of a pool: each send takes the next
    step, a list of what the reads return (an exception in it is raised by that read: a reply
    error, or the connection breaking), or REFUSED for the pool's next connect."""

    def __init__(self, *steps: list[Any] | str) -> None:
        self.steps = list(steps)
        self.sent: list[bytes] = []
        self.made = 0
        self.released = 0

    def connect(self) -> None:
        if self.steps and self.steps[0] == REFUSED:
            self.steps.pop(0)
            raise redis.ConnectionError("Error 111 connecting: refused")
        self.made += 1

    def send(self, pieces: Any) -> list[Any]:
        self.sent.append(b"".join([pieces] if isinstance(pieces, bytes) else pieces))
        step = self.steps.pop(0)
        assert isinstance(step, list), f"a send where the script expects {step!r}"
        return list(step)

    def evalsha_sent(self) -> int:
        return sum(data.count(b"EVALSHA") for data in self.sent)


class SyncConn:
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.pending: list[Any] = []
        self.connected = True

    def connect(self) -> None:
        self.connected = True

    def can_read(self, timeout: float = 0) -> bool:
        return False

    def disconnect(self, *args: Any) -> None:
        self.connected = False

    def send_packed_command(self, pieces: Any, check_health: bool = True) -> None:
        self.pending = self.wire.send(pieces)

    def read_response(self, disable_decoding: bool = False) -> Any:
        item = self.pending.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


class SyncPool:
    connection_kwargs: dict[str, Any] = {}

    def __init__(self, wire: Wire) -> None:
        self.wire = wire

    def get_connection(self, *args: Any, **kwargs: Any) -> SyncConn:
        self.wire.connect()
        return SyncConn(self.wire)

    def release(self, conn: SyncConn) -> None:
        self.wire.released += 1


class AsyncConn(SyncConn):
    async def connect(self) -> None:  # type: ignore[override]
        self.connected = True

    async def disconnect(self, *args: Any) -> None:  # type: ignore[override]
        self.connected = False

    async def send_packed_command(self, pieces: Any, check_health: bool = True) -> None:  # type: ignore[override]
        self.pending = self.wire.send(pieces)

    async def read_response(self, disable_decoding: bool = False) -> Any:  # type: ignore[override]
        return SyncConn.read_response(self, disable_decoding)


class AsyncPool(SyncPool):
    async def get_connection(self, *args: Any, **kwargs: Any) -> AsyncConn:  # type: ignore[override]
        self.wire.connect()
        return AsyncConn(self.wire)

    async def release(self, conn: SyncConn) -> None:  # type: ignore[override]
        self.wire.released += 1

    async def ensure_connection(self, conn: AsyncConn) -> None:
        # What redis-py's async pools (5.x to 8.x) do before handing a connection out; the
        # transport asks the pool, as async connections have no can_read before redis-py 6.
        await conn.connect()


Runner = Callable[[Wire, list[Call[Any]]], list[Any]]


def run_sync(wire: Wire, calls: list[Call[Any]]) -> list[Any]:
    transport = SyncTransport(redis.Redis(connection_pool=SyncPool(wire)))  # type: ignore[arg-type]
    try:
        return transport.run(calls)
    finally:
        transport.close()


def run_async(wire: Wire, calls: list[Call[Any]]) -> list[Any]:
    async def go() -> list[Any]:
        transport = AsyncTransport(aioredis.Redis(connection_pool=AsyncPool(wire)))  # type: ignore[arg-type]
        try:
            return await transport.run(calls)
        finally:
            await transport.close()

    return asyncio.run(go())


@pytest.fixture(params=["sync", "async"])
def run(request: pytest.FixtureRequest) -> Runner:
    return run_sync if request.param == "sync" else run_async


def every_connection_back(wire: Wire) -> None:
    assert wire.released == wire.made, f"{wire.made} connections made, {wire.released} given back"


def test_a_reply_is_decoded_at_once(run: Runner) -> None:
    wire = Wire([OK])
    [[info]] = run(wire, [enqueue_call()])
    assert isinstance(info, TaskInfo) and (info.id, info.state) == ("a", TaskState.PENDING)
    assert wire.evalsha_sent() == 1
    every_connection_back(wire)


def test_noscript_on_the_fast_path_loads_the_script_and_sends_the_call_once_more(run: Runner) -> None:
    wire = Wire([NoScriptError("No matching script.")], [b"sha", OK])
    [[info]] = run(wire, [enqueue_call()])
    assert isinstance(info, TaskInfo)
    assert wire.sent[1].count(b"SCRIPT") == 1 and wire.evalsha_sent() == 2
    every_connection_back(wire)


def test_a_refusal_on_the_fast_path_is_not_enqueued_and_not_sent_again(run: Runner) -> None:
    wire = Wire([OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")])
    [result] = run(wire, [enqueue_call()])
    assert isinstance(result, NotEnqueued)
    assert wire.evalsha_sent() == 1
    every_connection_back(wire)


def test_noauth_refuses_every_call_of_the_exchange_and_never_reads_a_dropped_connection(run: Runner) -> None:
    # redis-py before 8 connects without credentials when none are given, and drops the
    # connection after raising the first NOAUTH reply: a further read fails as "closed", which
    # must not turn the refused calls into uncertain ones.
    noauth = redis.AuthenticationError("Authentication required.")
    wire = Wire([noauth, redis.ConnectionError("Connection closed by server.")])
    results = run(wire, [enqueue_call("a"), enqueue_call("b")])
    assert [type(r) for r in results] == [NotEnqueued, NotEnqueued]
    assert "Authentication required" in str(results[0]) and wire.evalsha_sent() == 2
    every_connection_back(wire)


def test_no_connection_on_the_fast_path_is_not_enqueued_and_nothing_is_sent(run: Runner) -> None:
    wire = Wire(REFUSED)
    [result] = run(wire, [enqueue_call()])
    assert isinstance(result, NotEnqueued) and wire.sent == []


def test_a_connection_broken_on_the_fast_path_sends_the_enqueue_once_more(run: Runner) -> None:
    wire = Wire([redis.ConnectionError("reset")], [OK])
    [[info]] = run(wire, [enqueue_call()])
    assert isinstance(info, TaskInfo)
    assert wire.evalsha_sent() == 2
    every_connection_back(wire)


@pytest.mark.parametrize(
    "then",
    [
        pytest.param([redis.ConnectionError("reset again")], id="broken-again"),
        pytest.param(REFUSED, id="no-new-connection"),
    ],
)
def test_a_connection_broken_on_the_fast_path_then_no_answer_is_uncertain(run: Runner, then: Any) -> None:
    wire = Wire([redis.ConnectionError("reset")], then)
    [result] = run(wire, [enqueue_call()])
    assert isinstance(result, EnqueueUncertain)
    every_connection_back(wire)


def test_a_timeout_on_the_fast_path_is_uncertain_and_not_sent_again(run: Runner) -> None:
    wire = Wire([redis.TimeoutError("Timeout reading from socket")])
    [result] = run(wire, [enqueue_call()])
    assert isinstance(result, EnqueueUncertain) and wire.evalsha_sent() == 1
    every_connection_back(wire)


def test_a_lease_whose_connection_broke_on_the_fast_path_is_never_sent_again(run: Runner) -> None:
    wire = Wire([redis.ConnectionError("reset")])
    [result] = run(wire, [lease(KEYS, 1, 1000)])
    assert isinstance(result, OutcomeUnknown) and wire.evalsha_sent() == 1
    every_connection_back(wire)


# A call sent on a connection that broke may have run there. What Redis answers to the second
# send says nothing about the first, so a refusal of the second send is not "certainly not
# applied": e.g. Redis restarted from its AOF (holding the first send's writes) and answers
# LOADING while it reads the file back.


def test_a_refused_resend_of_a_call_whose_connection_broke_is_uncertain_not_refused(run: Runner) -> None:
    wire = Wire(
        [redis.ConnectionError("reset")], [BusyLoadingError("Redis is loading the dataset in memory")]
    )
    [result] = run(wire, [enqueue_call()])
    assert isinstance(result, EnqueueUncertain) and not isinstance(result, NotEnqueued)
    assert "LOADING" in str(result) and "idempotent" in str(result)


def test_giving_up_on_a_call_whose_connection_broke_is_uncertain_not_refused(run: Runner) -> None:
    noscript = NoScriptError("No matching script.")
    wire = Wire([redis.ConnectionError("reset")], [noscript], *[[b"sha", noscript]] * (MAX_ROUNDS - 2))
    [result] = run(wire, [enqueue_call()])
    assert isinstance(result, EnqueueUncertain) and not isinstance(result, NotEnqueued)

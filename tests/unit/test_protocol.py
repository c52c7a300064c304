"""The sans-I/O exchange flow (:func:`qsync._protocol.exchange_calls`) driven by hand: what is
sent in which round, what is sent again, and which error each outcome gets. No Redis here."""

from __future__ import annotations

from typing import Any, NamedTuple

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from qsync import Task, TaskState
from qsync._keys import keys_for
from qsync._ops import Call, enqueue_many, lease
from qsync._protocol import ConnectFailed, Exchange, exchange_calls
from qsync.errors import EnqueueUncertain, NotApplied, NotEnqueued, OutcomeUnknown, ScriptError

KEYS = keys_for("proto", "q")
NOW_MS = 1_800_000_000_000


def enqueue_call(task_id: str) -> Call[Any]:
    return enqueue_many(KEYS, [Task("t", b"x", task_id=task_id)])[0]


OK = [NOW_MS, 1, b"pending"]


class BrokeAfter(NamedTuple):
    """A step where the connection broke after these replies were read."""

    replies: list[Any]
    error: Exception


class Driver:
    """Runs exchange_calls as the transports do, answering each exchange with the next
    scripted step: a list of replies (each handed to the exchange's on_reply as it is "read"),
    an exception the connection raised, or some replies and then the exception."""

    def __init__(self, *steps: list[Any] | Exception | BrokeAfter) -> None:
        self.steps = list(steps)
        self.sent: list[Exchange] = []
        self.log: list[str] = []

    def run(self, calls: list[Call[Any]], by_slot: bool = False) -> list[Any]:
        flow = exchange_calls(calls, by_slot=by_slot)
        try:
            exchange = next(flow)
            while True:
                self.sent.append(exchange)
                step = self.steps.pop(0)
                if isinstance(step, Exception):
                    exchange = flow.throw(step)
                    continue
                replies = step.replies if isinstance(step, BrokeAfter) else step
                for position, reply in enumerate(replies):
                    self.log.append(f"read {position}")
                    if exchange.on_reply is not None:
                        exchange.on_reply(position, reply)
                exchange = flow.throw(step.error) if isinstance(step, BrokeAfter) else flow.send(step)
        except StopIteration as done:
            assert not self.steps, "steps left over"
            return done.value  # type: ignore[no-any-return]


def test_the_common_case_is_one_exchange_of_the_calls() -> None:
    calls = [enqueue_call("a"), enqueue_call("b")]
    driver = Driver([OK, OK])
    results = driver.run(calls)
    assert [[info.id for info in r] for r in results] == [["a"], ["b"]]
    assert results[0][0].state is TaskState.PENDING
    [exchange] = driver.sent
    assert exchange.commands == [c.command() for c in calls] and not exchange.refresh_routes


def test_noscript_loads_the_script_then_sends_only_the_calls_that_did_not_run() -> None:
    calls = [enqueue_call("a"), enqueue_call("b")]
    driver = Driver([OK, NoScriptError("No matching script.")], [b"sha", OK])
    results = driver.run(calls)
    assert [r[0].id for r in results] == ["a", "b"]
    script = calls[1].script
    assert script is not None
    assert driver.sent[1].commands == [("SCRIPT", "LOAD", script.source), calls[1].command()]


def test_a_redirect_refreshes_the_routes_and_sends_again() -> None:
    driver = Driver([ResponseError("MOVED 1234 127.0.0.1:7001")], [OK])
    [result] = driver.run([enqueue_call("a")], by_slot=True)
    assert result[0].id == "a"
    assert [e.refresh_routes for e in driver.sent] == [False, True]


def test_an_error_reply_is_that_calls_error_only() -> None:
    calls = [enqueue_call("a"), enqueue_call("b")]
    oom = ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
    results = Driver([oom, OK]).run(calls)
    assert isinstance(results[0], NotEnqueued) and results[1][0].id == "b"
    [other] = Driver([[ResponseError("ERR something odd")]]).run([lease(KEYS, 1, 1000)])
    assert isinstance(other, ScriptError)


def test_cannot_connect_means_not_applied() -> None:
    [enq, lse] = Driver(ConnectFailed("refused")).run([enqueue_call("a"), lease(KEYS, 1, 1000)])
    assert isinstance(enq, NotEnqueued) and isinstance(lse, NotApplied)
    assert not isinstance(lse, OutcomeUnknown)


def test_a_broken_connection_sends_idempotent_calls_once_more_and_others_never() -> None:
    calls = [enqueue_call("a"), lease(KEYS, 1, 1000)]
    driver = Driver(RedisConnectionError("reset"), [OK])
    enq, lse = driver.run(calls)
    assert enq[0].id == "a"
    assert isinstance(lse, OutcomeUnknown) and lse.op == "lease"
    assert driver.sent[1].commands == [calls[0].command()]


def test_a_call_whose_connection_broke_stays_uncertain_when_no_new_connection_comes() -> None:
    # The first send may have been applied: failing to reconnect does not make it "not enqueued".
    driver = Driver(RedisConnectionError("reset"), ConnectFailed("refused"))
    [result] = driver.run([enqueue_call("a")])
    assert isinstance(result, EnqueueUncertain) and not isinstance(result, NotEnqueued)
    assert "idempotent" in str(result)


def test_a_second_broken_connection_is_uncertain_not_a_third_send() -> None:
    driver = Driver(RedisConnectionError("reset"), RedisConnectionError("reset again"))
    [result] = driver.run([enqueue_call("a")])
    assert isinstance(result, EnqueueUncertain)
    assert len(driver.sent) == 2


def test_errors_decoded_into_results_keep_no_traceback() -> None:
    # A traceback would hold the caller's frames (and so the queue and its connection) in a cycle.
    [result] = Driver([[]]).run([Call("info", "q", (KEYS.pending,), ("X",), _not_found)])
    assert isinstance(result, NotApplied) and result.__traceback__ is None


def _not_found(reply: Any) -> Any:
    raise NotApplied("info: gone", op="info")


def _logged(driver: Driver, name: str, reply: Any) -> Any:
    driver.log.append(f"decode {name}")
    return reply


def test_each_reply_is_decoded_as_it_is_read_while_later_ones_are_in_flight() -> None:
    driver = Driver([b"r0", b"r1", b"r2"])
    calls = [Call("op", "q", (KEYS.pending,), ("X",), lambda r, n=n: _logged(driver, n, r)) for n in "abc"]
    assert driver.run(calls) == [b"r0", b"r1", b"r2"]
    assert driver.log == ["read 0", "decode a", "read 1", "decode b", "read 2", "decode c"]


def test_replies_read_before_the_connection_broke_are_results_and_never_sent_again() -> None:
    # The ack's reply arrived: it is its result, not OutcomeUnknown, though acks are never
    # re-sent; the enqueue whose reply was lost is sent once more, alone.
    ack = Call("ack", "q", (KEYS.active,), ("X",), lambda r: ("acked", r))
    calls = [ack, enqueue_call("a"), enqueue_call("b")]
    driver = Driver(BrokeAfter([b"done", OK], RedisConnectionError("reset")), [OK])
    got_ack, got_a, got_b = driver.run(calls)
    assert got_ack == ("acked", b"done")
    assert got_a[0].id == "a" and got_b[0].id == "b"
    assert driver.sent[1].commands == [calls[2].command()]


def test_error_replies_wait_for_the_whole_exchange_then_are_judged_as_before() -> None:
    calls = [enqueue_call("a"), enqueue_call("b"), enqueue_call("c")]
    noscript = NoScriptError("No matching script.")
    driver = Driver([OK, noscript, OK], [b"sha", OK])
    results = driver.run(calls)
    assert [r[0].id for r in results] == ["a", "b", "c"]
    script = calls[1].script
    assert script is not None
    assert driver.sent[1].commands == [("SCRIPT", "LOAD", script.source), calls[1].command()]

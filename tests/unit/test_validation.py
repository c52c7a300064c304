"""Bad input is refused with a typed error before anything reaches Redis (reliability.md 4.1).

Every queue here sits on a client pointed at a closed port, and the client's connection pool
records each connection asked for: a call that slipped through validation would ask for one
(and fail with NotEnqueued / NotApplied instead of the expected error). Each check runs on the
sync Queue and on the AsyncQueue (under asyncio.run)."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

import qsync
from qsync import Failure, Lease, Task
from qsync.errors import (
    ClientClosed,
    InvalidArgument,
    InvalidArgumentType,
    InvalidName,
    NotEnqueued,
    PayloadTooLarge,
    QsyncError,
)
from tests.redis_procs import free_port

MiB = 1024 * 1024
NAN = math.nan
INF = math.inf
# Far from the test's own clock, so no case depends on how long the suite takes.
PAST = datetime(2000, 1, 1, tzinfo=UTC)
FUTURE = datetime(2090, 1, 1, tzinfo=UTC)
LATER = datetime(2091, 1, 1, tzinfo=UTC)
TOMORROW = datetime.now(UTC) + timedelta(days=1)


class _NoOffset(tzinfo):
    """A tzinfo that does not know its offset: as ambiguous as a naive datetime."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None


# --- the harness: a queue on a closed port, with a record of every connection asked for ------


@dataclass
class Shell:
    """Runs ``action(queue)`` on a fresh sync or async queue over a dead port. The client does
    not retry its connect (redis-py's default backs off for seconds before giving up)."""

    flavour: str
    port: int
    connections: list[Any] = field(default_factory=list)

    def _spy(self, client: Any) -> None:
        pool = client.connection_pool
        original = pool.get_connection

        def get_connection(*args: Any, **kwargs: Any) -> Any:
            self.connections.append(args)
            return original(*args, **kwargs)

        pool.get_connection = get_connection

    def run(self, action: Callable[[Any], Any], **options: Any) -> Any:
        options.setdefault("check_server", False)
        if self.flavour == "sync":
            client = redis.Redis(host="127.0.0.1", port=self.port, retry=Retry(NoBackoff(), 0))
            self._spy(client)
            try:
                return action(qsync.new(client, **options))
            finally:
                client.close()

        async def main() -> Any:
            aclient = aioredis.Redis(host="127.0.0.1", port=self.port, retry=AsyncRetry(NoBackoff(), 0))
            self._spy(aclient)
            try:
                result = action(qsync.new(aclient, **options))
                return await result if inspect.isawaitable(result) else result
            finally:
                await aclient.aclose()

        return asyncio.run(main())

    def refused(
        self, action: Callable[[Any], Any], exc: type[QsyncError], *fragments: str, **options: Any
    ) -> QsyncError:
        """Assert ``action`` raises ``exc`` naming ``fragments``, and that nothing was sent."""
        with pytest.raises(exc) as info:
            self.run(action, **options)
        assert self.connections == [], "a connection was asked for: validation came after the send"
        message = str(info.value)
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        return info.value


@pytest.fixture(scope="module")
def dead_port() -> int:
    """A port nothing listens on (the test never starts a server there)."""
    return free_port()


@pytest.fixture(params=["sync", "async"])
def shell(request: pytest.FixtureRequest, dead_port: int) -> Iterator[Shell]:
    yield Shell(request.param, dead_port)


def test_harness_sends_a_valid_enqueue(shell: Shell) -> None:
    """The control: a valid call does reach the transport and fails to connect, so every
    refusal below really happened before any send."""
    with pytest.raises(NotEnqueued):
        shell.run(lambda q: q.enqueue(Task("email:send", b"x")))
    assert shell.connections


def test_harness_sends_a_valid_enqueue_many(shell: Shell) -> None:
    results = shell.run(lambda q: q.enqueue_many(Task("t", bytes([i])) for i in range(3)))
    assert [type(r) for r in results] == [NotEnqueued] * 3
    assert shell.connections


# --- Task: the matrix of reliability.md 4.1 ---------------------------------------------------


def _case(kwargs: dict[str, Any], exc: type[QsyncError], *fragments: str, id: str) -> Any:
    return pytest.param(kwargs, exc, fragments, id=id)


T = "email:send"

TASK_CASES = [
    # task type: a non-empty printable str of at most 255 bytes
    _case({"type": ""}, InvalidName, "task type", "empty", id="type-empty"),
    _case({"type": "   "}, InvalidName, "task type", "whitespace", id="type-spaces"),
    _case({"type": "\t\n"}, InvalidName, "task type", id="type-tab-newline"),
    _case({"type": None}, InvalidArgumentType, "task type", "str", id="type-none"),
    _case({"type": b"email"}, InvalidArgumentType, "task type", "bytes", id="type-bytes"),
    _case({"type": 5}, InvalidArgumentType, "task type", id="type-int"),
    _case({"type": "a" * 256}, InvalidName, "task type", "255", id="type-256-bytes"),
    _case({"type": "é" * 128}, InvalidName, "task type", "255", id="type-256-utf8-bytes"),
    _case({"type": "email\nsend"}, InvalidName, "task type", "control", id="type-newline"),
    _case({"type": "email\x00"}, InvalidName, "task type", "control", id="type-nul"),
    _case({"type": "email\x9bsend"}, InvalidName, "task type", id="type-c1-control"),
    # payload: bytes-like only, never an implicit encode
    _case({"payload": "text"}, InvalidArgumentType, "payload must be bytes", "encode", id="payload-str"),
    _case({"payload": {"a": 1}}, InvalidArgumentType, "payload must be bytes", "dict", id="payload-dict"),
    _case({"payload": None}, InvalidArgumentType, "payload must be bytes", id="payload-none"),
    _case({"payload": 5}, InvalidArgumentType, "payload must be bytes", id="payload-int"),
    _case({"payload": [1, 2]}, InvalidArgumentType, "payload must be bytes", id="payload-list"),
    # retry: an int in [0, 10000], never a bool
    _case({"retry": -1}, InvalidArgument, "retry", "between 0 and 10000", id="retry-negative"),
    _case({"retry": 10_001}, InvalidArgument, "retry", "10000", id="retry-over-limit"),
    _case({"retry": True}, InvalidArgumentType, "retry", "int", "bool", id="retry-true"),
    _case({"retry": False}, InvalidArgumentType, "retry", "bool", id="retry-false"),
    _case({"retry": 1.5}, InvalidArgumentType, "retry", "float", id="retry-float"),
    _case({"retry": "3"}, InvalidArgumentType, "retry", "str", id="retry-str"),
    _case({"retry": None}, InvalidArgumentType, "retry", id="retry-none"),
    # retry_delay: >= 0, finite
    _case({"retry_delay": -1}, InvalidArgument, "retry_delay", ">= 0", id="retry_delay-negative"),
    _case({"retry_delay": NAN}, InvalidArgument, "retry_delay", "finite", id="retry_delay-nan"),
    _case({"retry_delay": INF}, InvalidArgument, "retry_delay", "finite", id="retry_delay-inf"),
    _case({"retry_delay": True}, InvalidArgumentType, "retry_delay", id="retry_delay-bool"),
    _case({"retry_delay": "5"}, InvalidArgumentType, "retry_delay", id="retry_delay-str"),
    # delay: >= 0 (0 means now), finite, not absurd
    _case({"delay": -1}, InvalidArgument, "delay", ">= 0", id="delay-negative"),
    _case({"delay": -0.001}, InvalidArgument, "delay", id="delay-slightly-negative"),
    _case({"delay": timedelta(seconds=-1)}, InvalidArgument, "delay", id="delay-negative-timedelta"),
    _case({"delay": NAN}, InvalidArgument, "delay", "finite", id="delay-nan"),
    _case({"delay": INF}, InvalidArgument, "delay", "finite", id="delay-inf"),
    _case({"delay": -INF}, InvalidArgument, "delay", "finite", id="delay-minus-inf"),
    _case({"delay": 200 * 365 * 86400}, InvalidArgument, "delay", "100 years", id="delay-200-years"),
    _case({"delay": True}, InvalidArgumentType, "delay", "bool", id="delay-bool"),
    _case({"delay": "5"}, InvalidArgumentType, "delay", "str", id="delay-str"),
    # process_at: a timezone-aware datetime, not with delay
    _case(
        {"process_at": datetime(2090, 1, 1)}, InvalidArgument, "process_at", "timezone-aware", id="pat-naive"
    ),
    _case(
        {"process_at": datetime(2090, 1, 1, tzinfo=_NoOffset())},
        InvalidArgument,
        "process_at",
        "timezone-aware",
        id="pat-tz-without-offset",
    ),  # fmt: skip
    _case({"process_at": 4102444800.0}, InvalidArgumentType, "process_at", "datetime", id="pat-timestamp"),
    _case({"process_at": date(2090, 1, 1)}, InvalidArgumentType, "process_at", id="pat-date"),
    _case({"process_at": FUTURE, "delay": 5}, InvalidArgument, "delay", "process_at", id="pat-and-delay"),
    # timeout: > 0, finite
    _case({"timeout": 0}, InvalidArgument, "timeout", "> 0", id="timeout-zero"),
    _case({"timeout": 0.0}, InvalidArgument, "timeout", "> 0", id="timeout-zero-float"),
    _case({"timeout": timedelta(0)}, InvalidArgument, "timeout", id="timeout-zero-timedelta"),
    _case({"timeout": -1}, InvalidArgument, "timeout", "> 0", id="timeout-negative"),
    _case({"timeout": NAN}, InvalidArgument, "timeout", "finite", id="timeout-nan"),
    _case({"timeout": INF}, InvalidArgument, "timeout", "finite", id="timeout-inf"),
    _case({"timeout": True}, InvalidArgumentType, "timeout", "bool", id="timeout-bool"),
    _case({"timeout": "30"}, InvalidArgumentType, "timeout", id="timeout-str"),
    # deadline: aware, in the future, after the due time
    _case({"deadline": datetime(2090, 1, 1)}, InvalidArgument, "deadline", "timezone-aware", id="dl-naive"),
    _case({"deadline": PAST}, InvalidArgument, "deadline", "passed", id="dl-past"),
    _case({"deadline": FUTURE, "process_at": LATER}, InvalidArgument, "deadline", id="dl-before-process_at"),
    _case({"deadline": FUTURE, "process_at": FUTURE}, InvalidArgument, "deadline", id="dl-at-process_at"),
    _case(
        {"deadline": TOMORROW, "delay": timedelta(days=10)}, InvalidArgument, "deadline", id="dl-before-delay"
    ),
    _case({"deadline": 4102444800}, InvalidArgumentType, "deadline", "datetime", id="dl-int"),
    # unique: a TTL of at least 1 s; unique_key needs it
    _case({"unique": 0}, InvalidArgument, "unique", id="unique-zero"),
    _case({"unique": 0.5}, InvalidArgument, "unique", "1 second", id="unique-half-second"),
    _case({"unique": timedelta(milliseconds=999)}, InvalidArgument, "unique", "1 second", id="unique-999ms"),
    _case({"unique": -1}, InvalidArgument, "unique", id="unique-negative"),
    _case({"unique": NAN}, InvalidArgument, "unique", "finite", id="unique-nan"),
    _case({"unique": INF}, InvalidArgument, "unique", "finite", id="unique-inf"),
    _case({"unique": True}, InvalidArgumentType, "unique", "bool", id="unique-bool"),
    _case({"unique": "60"}, InvalidArgumentType, "unique", id="unique-str"),
    _case({"unique_key": "k"}, InvalidArgument, "unique_key", "unique=", id="unique_key-without-ttl"),
    _case({"unique": 60, "unique_key": ""}, InvalidName, "unique_key", id="unique_key-empty"),
    _case({"unique": 60, "unique_key": "  "}, InvalidName, "unique_key", id="unique_key-spaces"),
    _case({"unique": 60, "unique_key": 5}, InvalidArgumentType, "unique_key", id="unique_key-int"),
    _case({"unique": 60, "unique_key": "a\x00"}, InvalidName, "unique_key", id="unique_key-nul"),
    _case({"unique": 60, "unique_key": "k" * 513}, InvalidName, "unique_key", "512", id="unique_key-long"),
    # task_id: the same character rules as a queue name, at most 128 bytes
    _case({"task_id": ""}, InvalidName, "task_id", "empty", id="id-empty"),
    _case({"task_id": " "}, InvalidName, "task_id", id="id-space"),
    _case({"task_id": "a b"}, InvalidName, "task_id", "whitespace", id="id-inner-space"),
    _case({"task_id": "a{b"}, InvalidName, "task_id", "braces", id="id-open-brace"),
    _case({"task_id": "a}b"}, InvalidName, "task_id", "braces", id="id-close-brace"),
    _case({"task_id": "{x}"}, InvalidName, "task_id", "hash tag", id="id-tag"),
    _case({"task_id": "a\x00"}, InvalidName, "task_id", id="id-nul"),
    _case({"task_id": "a\tb"}, InvalidName, "task_id", id="id-tab"),
    _case({"task_id": "a\nb"}, InvalidName, "task_id", id="id-newline"),
    _case({"task_id": "a\x9bb"}, InvalidName, "task_id", id="id-c1-control"),
    _case({"task_id": "a\ud800b"}, InvalidName, "task_id", id="id-lone-surrogate"),
    _case({"task_id": "x" * 129}, InvalidName, "task_id", "128", id="id-129-bytes"),
    _case({"task_id": "é" * 65}, InvalidName, "task_id", "128", id="id-130-utf8-bytes"),
    _case({"task_id": 123}, InvalidArgumentType, "task_id", "str", id="id-int"),
    _case({"task_id": b"id"}, InvalidArgumentType, "task_id", "bytes", id="id-bytes"),
    # retention: >= 0, finite
    _case({"retention": -1}, InvalidArgument, "retention", ">= 0", id="retention-negative"),
    _case({"retention": NAN}, InvalidArgument, "retention", "finite", id="retention-nan"),
    _case({"retention": INF}, InvalidArgument, "retention", "finite", id="retention-inf"),
    _case({"retention": True}, InvalidArgumentType, "retention", "bool", id="retention-bool"),
    _case({"retention": "1d"}, InvalidArgumentType, "retention", id="retention-str"),
]


def _task(kwargs: dict[str, Any]) -> Task:
    kwargs = dict(kwargs)
    return Task(kwargs.pop("type", T), kwargs.pop("payload", b"{}"), **kwargs)


@pytest.mark.parametrize(("kwargs", "exc", "fragments"), TASK_CASES)
def test_task_refuses(kwargs: dict[str, Any], exc: type[QsyncError], fragments: tuple[str, ...]) -> None:
    with pytest.raises(exc) as info:
        _task(kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


@pytest.mark.parametrize(("kwargs", "exc", "fragments"), TASK_CASES)
def test_task_refused_before_enqueue_sends(
    shell: Shell, kwargs: dict[str, Any], exc: type[QsyncError], fragments: tuple[str, ...]
) -> None:
    shell.refused(lambda q: q.enqueue(_task(kwargs)), exc, *fragments)


def test_refusals_are_value_and_type_errors() -> None:
    """``except ValueError`` / ``except TypeError`` work as Python users expect."""
    with pytest.raises(ValueError):
        Task(T, retry=-1)
    with pytest.raises(TypeError):
        Task(T, "not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"retry": 0}, id="retry-0"),
        pytest.param({"retry": 10_000}, id="retry-10000"),
        pytest.param({"delay": 0}, id="delay-0"),
        pytest.param({"delay": timedelta(minutes=5)}, id="delay-timedelta"),
        pytest.param({"retry_delay": 0}, id="retry_delay-0"),
        pytest.param({"retention": 0}, id="retention-0"),
        pytest.param({"unique": 1}, id="unique-1s"),
        pytest.param({"unique": timedelta(seconds=1), "unique_key": "user:42"}, id="unique-key"),
        pytest.param({"task_id": "x" * 128}, id="id-128-bytes"),
        pytest.param({"task_id": "order-42.v1:retry_3"}, id="id-punctuation"),
        pytest.param({"type": "a" * 255}, id="type-255-bytes"),
        pytest.param({"type": "email send"}, id="type-inner-space"),
        pytest.param({"process_at": PAST}, id="process_at-past-aware-is-now"),
        pytest.param({"deadline": FUTURE, "process_at": datetime(2089, 1, 1, tzinfo=UTC)}, id="dl-after"),
        pytest.param(
            {"deadline": datetime(2090, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))}, id="dl-other-zone"
        ),
    ],
)
def test_task_accepts_edges(kwargs: dict[str, Any]) -> None:
    _task(kwargs)


def test_payload_takes_bytes_like_and_copies_it() -> None:
    data = bytearray(b"abc")
    task = Task(T, data)
    data[0] = ord("z")
    assert task.payload == b"abc" and type(task.payload) is bytes
    assert Task(T, memoryview(b"abcdef")[::2]).payload == b"ace"
    assert Task(T).payload == b""


def test_durations_are_milliseconds_without_truncation() -> None:
    """asynq truncates a 0.5 s timeout to 0 (= none); qsync keeps milliseconds, and rounds a
    sub-millisecond timeout up to 1 ms, never down to 0 (documented in _validate.duration_ms)."""
    assert Task(T, timeout=0.5).options.timeout_ms == 500
    assert Task(T, timeout=timedelta(milliseconds=1500)).options.timeout_ms == 1500
    assert Task(T, timeout=0.0004).options.timeout_ms == 1
    assert Task(T, delay=0.25).options.delay_ms == 250


def test_task_error_messages_say_how_to_fix() -> None:
    with pytest.raises(InvalidArgumentType, match=r"encode it yourself"):
        Task(T, "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"datetime\.now\(timezone\.utc\)"):
        Task(T, deadline=datetime(2090, 1, 1))
    with pytest.raises(InvalidName, match=r"hash tag"):
        Task(T, task_id="a}b")
    with pytest.raises(InvalidArgument, match=r"must expire"):
        Task(T, unique_key="k")


# --- queue construction ------------------------------------------------------------------------

BAD_NAMES = [
    pytest.param("", InvalidName, ("empty",), id="empty"),
    pytest.param(" ", InvalidName, ("whitespace",), id="space"),
    pytest.param("a b", InvalidName, ("whitespace",), id="inner-space"),
    pytest.param(" a", InvalidName, (), id="leading-space"),
    pytest.param("a\t", InvalidName, (), id="tab"),
    pytest.param("a\nb", InvalidName, (), id="newline"),
    pytest.param("a\u00a0b", InvalidName, (), id="nbsp"),
    pytest.param("a{b", InvalidName, ("braces", "hash tag"), id="open-brace"),
    pytest.param("a}b", InvalidName, ("braces", "hash tag"), id="close-brace"),
    pytest.param("{}", InvalidName, ("braces",), id="empty-tag"),
    pytest.param("{a}", InvalidName, ("braces",), id="tag"),
    pytest.param("a\x00", InvalidName, (), id="nul"),
    pytest.param("a\x7f", InvalidName, (), id="del"),
    pytest.param("a\x9bb", InvalidName, (), id="c1-control"),
    pytest.param("a\u200bb", InvalidName, (), id="zero-width-space"),
    pytest.param("a\ud800b", InvalidName, (), id="lone-surrogate"),
    pytest.param(None, InvalidArgumentType, ("must be a str",), id="none"),
    pytest.param(5, InvalidArgumentType, ("must be a str", "int"), id="int"),
    pytest.param(b"q", InvalidArgumentType, ("must be a str", "bytes"), id="bytes"),
    pytest.param(["q"], InvalidArgumentType, ("must be a str", "list"), id="unhashable-list"),
]


class _Str(str):
    """A str subclass: validated like a str (names are cached for exact str only)."""


@pytest.mark.parametrize(("name", "exc", "fragments"), BAD_NAMES)
def test_prefix_refused(shell: Shell, name: Any, exc: type[QsyncError], fragments: tuple[str, ...]) -> None:
    shell.refused(lambda q: None, exc, "prefix", *fragments, prefix=name)


def test_prefix_length(shell: Shell) -> None:
    shell.refused(lambda q: None, InvalidName, "prefix", "64", prefix="p" * 65)
    shell.run(lambda q: None, prefix="p" * 64)
    shell.run(lambda q: None, prefix="myapp.prod-1_eu")
    shell.refused(lambda q: None, InvalidName, "prefix", "must not contain ':'", prefix="myapp:eu")
    shell.refused(lambda q: None, InvalidName, "prefix", "must not contain ':'", prefix=_Str("myapp:eu"))
    assert shell.connections == []


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        pytest.param(0, InvalidArgument, id="zero"),
        pytest.param(-1, InvalidArgument, id="negative"),
        pytest.param(64 * MiB + 1, InvalidArgument, id="over-hard-ceiling"),
        pytest.param(True, InvalidArgumentType, id="bool"),
        pytest.param(1.5, InvalidArgumentType, id="float"),
        pytest.param("1MiB", InvalidArgumentType, id="str"),
        pytest.param(None, InvalidArgumentType, id="none"),
    ],
)
def test_max_payload_bytes_refused(shell: Shell, value: Any, exc: type[QsyncError]) -> None:
    shell.refused(lambda q: None, exc, "max_payload_bytes", max_payload_bytes=value)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_check_server_must_be_bool(shell: Shell, value: Any) -> None:
    shell.refused(lambda q: None, InvalidArgumentType, "check_server", check_server=value)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_queue_classes_validate_like_new(flavour: str, dead_port: int) -> None:
    if flavour == "sync":
        client = redis.Redis(port=dead_port)
        with pytest.raises(InvalidName, match="prefix"):
            qsync.Queue(client, prefix="a{b}")
        with pytest.raises(InvalidArgument, match="max_payload_bytes"):
            qsync.Queue(client, max_payload_bytes=0)
        client.close()
        return

    async def main() -> None:
        aclient = aioredis.Redis(port=dead_port)
        with pytest.raises(InvalidName, match="prefix"):
            qsync.AsyncQueue(aclient, prefix="a{b}")
        with pytest.raises(InvalidArgument, match="max_payload_bytes"):
            qsync.AsyncQueue(aclient, max_payload_bytes=0)
        await aclient.aclose()

    asyncio.run(main())


# --- queue names on every method -----------------------------------------------------------------

LEASES = [Lease("id1", "token1")]
FAILURES = [Failure("id1", "token1", "boom", 1000)]

# Every method that takes a queue name, called with it.
METHODS: dict[str, Callable[[Any, Any], Any]] = {
    "enqueue": lambda q, name: q.enqueue(Task(T), queue=name),
    "enqueue_many": lambda q, name: q.enqueue_many([Task(T)], queue=name),
    "enqueue_many-empty": lambda q, name: q.enqueue_many([], queue=name),
    "info": lambda q, name: q.info("id1", queue=name),
    "pause": lambda q, name: q.pause(name),
    "resume": lambda q, name: q.resume(name),
    "lease": lambda q, name: q.lease(name),
    "extend": lambda q, name: q.extend(name, LEASES),
    "ack": lambda q, name: q.ack(name, LEASES),
    "fail": lambda q, name: q.fail(name, FAILURES),
    "requeue": lambda q, name: q.requeue(name, LEASES),
    "promote": lambda q, name: q.promote(name),
    "recover": lambda q, name: q.recover(name),
    "trim": lambda q, name: q.trim(name),
}


@pytest.mark.parametrize(("name", "exc", "fragments"), BAD_NAMES)
@pytest.mark.parametrize("method", ["enqueue", "enqueue_many", "lease"])
def test_queue_name_refused(
    shell: Shell, method: str, name: Any, exc: type[QsyncError], fragments: tuple[str, ...]
) -> None:
    shell.refused(lambda q: METHODS[method](q, name), exc, "queue name", *fragments)


@pytest.mark.parametrize(
    ("name", "exc"),
    [
        pytest.param("a}b", InvalidName, id="brace"),
        pytest.param("q" * 129, InvalidName, id="129-bytes"),
        pytest.param(None, InvalidArgumentType, id="none"),
    ],
)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_checks_the_queue_name(
    shell: Shell, method: str, name: Any, exc: type[QsyncError]
) -> None:
    shell.refused(lambda q: METHODS[method](q, name), exc, "queue name")


def test_queue_name_length(shell: Shell) -> None:
    shell.refused(lambda q: q.enqueue(Task(T), queue="q" * 129), InvalidName, "128")
    shell.refused(lambda q: q.enqueue(Task(T), queue="é" * 65), InvalidName, "128")


@pytest.mark.parametrize("name", ["q" * 128, "email:send", "a.b-c_d", "ünïcode", "crit/1"])
def test_queue_names_that_are_fine_are_sent(shell: Shell, name: str) -> None:
    with pytest.raises(NotEnqueued):
        shell.run(lambda q: q.enqueue(Task(T), queue=name))


# --- enqueue and enqueue_many ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param(b"payload", id="bytes"),
        pytest.param("email:send", id="str"),
        pytest.param([Task(T)], id="list"),
        pytest.param({"type": T}, id="dict"),
    ],
)
def test_enqueue_takes_one_task(shell: Shell, value: Any) -> None:
    shell.refused(lambda q: q.enqueue(value), InvalidArgumentType, "Task")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        pytest.param(Task(T), "enqueue()", id="single-task"),
        pytest.param([Task(T), "oops"], "str", id="str-item"),
        pytest.param([Task(T), None], "NoneType", id="none-item"),
        pytest.param([{"type": T}], "dict", id="dict-item"),
        pytest.param("abc", "str", id="str"),
        pytest.param(None, "", id="none"),
        pytest.param(5, "", id="int"),
    ],
)
def test_enqueue_many_takes_tasks(shell: Shell, value: Any, fragment: str) -> None:
    shell.refused(lambda q: q.enqueue_many(value), InvalidArgumentType, fragment)


def test_enqueue_many_empty_is_an_empty_result_and_sends_nothing(shell: Shell) -> None:
    assert shell.run(lambda q: q.enqueue_many([])) == []
    assert shell.run(lambda q: q.enqueue_many(iter(()))) == []
    assert shell.connections == []


def test_payload_over_limit(shell: Shell) -> None:
    error = shell.refused(
        lambda q: q.enqueue(Task(T, b"x" * 17)), PayloadTooLarge, "17 bytes", "16", "max_payload_bytes",
        max_payload_bytes=16,
    )  # fmt: skip
    assert isinstance(error, PayloadTooLarge) and (error.size, error.limit) == (17, 16)


def test_payload_over_default_limit(shell: Shell) -> None:
    error = shell.refused(lambda q: q.enqueue(Task(T, bytes(MiB + 1))), PayloadTooLarge)
    assert isinstance(error, PayloadTooLarge) and error.limit == MiB


def test_payload_at_limit_is_sent(shell: Shell) -> None:
    with pytest.raises(NotEnqueued):
        shell.run(lambda q: q.enqueue(Task(T, b"x" * 16)), max_payload_bytes=16)


def test_one_bad_task_refuses_the_whole_batch(shell: Shell) -> None:
    batch = [Task(T, b"ok"), Task(T, b"x" * 17), Task(T, b"ok")]
    shell.refused(lambda q: q.enqueue_many(batch), PayloadTooLarge, max_payload_bytes=16)


def test_closed_queue_sends_nothing(shell: Shell) -> None:
    async def aclose_then_enqueue(q: Any) -> Any:
        await q.close()
        return await q.enqueue(Task(T))

    def close_then_enqueue(q: Any) -> Any:
        if shell.flavour == "async":
            return aclose_then_enqueue(q)
        q.close()
        return q.enqueue(Task(T))

    shell.refused(close_then_enqueue, ClientClosed, "qsync.new()")


def test_validation_comes_before_the_server_check(shell: Shell) -> None:
    """With check_server on, the first send would be INFO: a bad call must not even do that."""
    shell.refused(lambda q: q.enqueue(Task(T), queue="a b"), InvalidName, check_server=True)
    shell.refused(lambda q: q.lease("q", count=0), InvalidArgument, check_server=True)


# --- info ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_id", "exc"),
    [
        pytest.param("", InvalidName, id="empty"),
        pytest.param("a\x00", InvalidName, id="nul"),
        pytest.param("x" * 129, InvalidName, id="129-bytes"),
        pytest.param(None, InvalidArgumentType, id="none"),
        pytest.param(42, InvalidArgumentType, id="int"),
        # Ids that Task() refuses can never exist: the same rules apply (reliability.md 4.2,
        # "admin / inspector inputs: same validation as the client").
        pytest.param("a b", InvalidName, id="inner-space"),
        pytest.param("a{b}", InvalidName, id="braces"),
    ],
)
def test_info_task_id_refused(shell: Shell, task_id: Any, exc: type[QsyncError]) -> None:
    shell.refused(lambda q: q.info(task_id), exc, "task_id")


# --- worker-side calls -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "exc"),
    [
        pytest.param(0, InvalidArgument, id="zero"),
        pytest.param(-1, InvalidArgument, id="negative"),
        pytest.param(1001, InvalidArgument, id="over-batch-limit"),
        pytest.param(10**9, InvalidArgument, id="huge"),
        pytest.param(True, InvalidArgumentType, id="bool"),
        pytest.param(1.0, InvalidArgumentType, id="float"),
        pytest.param("10", InvalidArgumentType, id="str"),
        pytest.param(None, InvalidArgumentType, id="none"),
    ],
)
def test_lease_count_refused(shell: Shell, count: Any, exc: type[QsyncError]) -> None:
    shell.refused(lambda q: q.lease("q", count=count), exc, "count")


DURATIONS = [
    pytest.param(0, InvalidArgument, id="zero"),
    pytest.param(-1, InvalidArgument, id="negative"),
    pytest.param(NAN, InvalidArgument, id="nan"),
    pytest.param(INF, InvalidArgument, id="inf"),
    pytest.param(True, InvalidArgumentType, id="bool"),
    pytest.param("30", InvalidArgumentType, id="str"),
    pytest.param(None, InvalidArgumentType, id="none"),
]


@pytest.mark.parametrize(("value", "exc"), DURATIONS)
def test_lease_duration_refused(shell: Shell, value: Any, exc: type[QsyncError]) -> None:
    shell.refused(lambda q: q.lease("q", lease_duration=value), exc, "lease_duration")


@pytest.mark.parametrize(("value", "exc"), DURATIONS)
def test_extend_duration_refused(shell: Shell, value: Any, exc: type[QsyncError]) -> None:
    shell.refused(lambda q: q.extend("q", LEASES, lease_duration=value), exc, "lease_duration")


BAD_LEASES = [
    pytest.param("id1", id="str"),
    pytest.param(b"id1", id="bytes"),
    pytest.param(None, id="none"),
    pytest.param({"id": "id1", "token": "t"}, id="dict"),
    pytest.param(iter(LEASES), id="iterator"),
    pytest.param([object()], id="object-item"),
    pytest.param([("id1", "token1")], id="plain-tuple-item"),
    pytest.param([Lease(1, "token1")], id="int-id"),  # type: ignore[arg-type]
    pytest.param([Lease("id1", None)], id="none-token"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("leases", BAD_LEASES)
@pytest.mark.parametrize("method", ["ack", "requeue", "extend"])
def test_lease_lists_refused(shell: Shell, method: str, leases: Any) -> None:
    shell.refused(lambda q: getattr(q, method)("q", leases), InvalidArgumentType)


@pytest.mark.parametrize(
    "failures",
    [
        pytest.param(LEASES, id="leases-not-failures"),
        pytest.param("boom", id="str"),
        pytest.param([Failure(1, "t", "boom", 0)], id="int-id"),  # type: ignore[arg-type]
        # The error text and the delay are used before sending: a wrong type must be a typed
        # refusal, not an AttributeError / TypeError from deep inside, nor a redis DataError.
        pytest.param([Failure("id1", "t", None, 0)], id="error-none"),  # type: ignore[arg-type]
        pytest.param([Failure("id1", "t", b"boom", 0)], id="error-bytes"),  # type: ignore[arg-type]
        pytest.param([Failure("id1", "t", "boom", "soon")], id="delay-str"),  # type: ignore[arg-type]
        pytest.param([Failure("id1", "t", "boom", True)], id="delay-bool"),
    ],
)
def test_fail_refuses_bad_failures(shell: Shell, failures: Any) -> None:
    shell.refused(lambda q: q.fail("q", failures), InvalidArgumentType)


@pytest.mark.parametrize(
    ("call", "exc", "fragment"),
    [
        pytest.param(lambda q: q.promote("q", limit=0), InvalidArgument, "limit", id="promote-limit-0"),
        pytest.param(
            lambda q: q.promote("q", limit=10_001), InvalidArgument, "limit", id="promote-limit-big"
        ),
        pytest.param(
            lambda q: q.promote("q", limit=True), InvalidArgumentType, "limit", id="promote-limit-bool"
        ),
        pytest.param(lambda q: q.recover("q", limit=0), InvalidArgument, "limit", id="recover-limit-0"),
        pytest.param(lambda q: q.recover("q", limit=10**6), InvalidArgument, "limit", id="recover-limit-big"),
        pytest.param(
            lambda q: q.recover("q", max_recoveries=0), InvalidArgument, "max_recoveries", id="recover-max-0"
        ),
        pytest.param(
            lambda q: q.recover("q", max_recoveries=True),
            InvalidArgumentType,
            "max_recoveries",
            id="recover-max-bool",
        ),
        pytest.param(
            lambda q: q.recover("q", retry_delay=-1), InvalidArgument, "retry_delay", id="recover-delay-neg"
        ),
        pytest.param(
            lambda q: q.recover("q", retry_delay=NAN), InvalidArgument, "retry_delay", id="recover-delay-nan"
        ),
        pytest.param(lambda q: q.trim("q", limit=0), InvalidArgument, "limit", id="trim-limit-0"),
        pytest.param(
            lambda q: q.trim("q", archived_max_age=0), InvalidArgument, "archived_max_age", id="trim-age-0"
        ),
        pytest.param(
            lambda q: q.trim("q", archived_max_age=-1), InvalidArgument, "archived_max_age", id="trim-age-neg"
        ),
        pytest.param(
            lambda q: q.trim("q", archived_max_count=-1),
            InvalidArgument,
            "archived_max_count",
            id="trim-count-neg",
        ),
        pytest.param(
            lambda q: q.trim("q", archived_max_count=1.5),
            InvalidArgumentType,
            "archived_max_count",
            id="trim-count-float",
        ),
    ],
)
def test_sweep_bounds_refused(
    shell: Shell, call: Callable[[Any], Any], exc: type[QsyncError], fragment: str
) -> None:
    shell.refused(call, exc, fragment)

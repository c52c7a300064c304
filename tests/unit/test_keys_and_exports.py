"""Key names stay in one cluster slot per queue; the public surface is what it says it is: names
resolve and are documented, the error tree holds, errors never echo payloads, and the package is
typed."""

from __future__ import annotations

import builtins
import dataclasses
import re
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

import qsync
import qsync.errors as errors
from qsync import _ops
from qsync._keys import QueueKeys, keys_for, registry_key
from qsync.errors import (
    Code,
    DuplicateTask,
    EnqueueUncertain,
    InvalidArgument,
    InvalidArgumentType,
    InvalidName,
    NotApplied,
    NotEnqueued,
    OutcomeUnknown,
    PayloadTooLarge,
    QsyncError,
    RedisUnavailable,
    ScriptError,
    TaskError,
    TaskIdConflict,
)
from tests.redis_procs import free_port

REPO = Path(__file__).resolve().parents[2]

# --- slots ---------------------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster uses for slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot(key: str) -> int:
    """The cluster slot of ``key``, per the Redis Cluster spec: hash only the first non-empty
    ``{...}`` section when there is one."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % 16384


@pytest.mark.parametrize(
    "key", ["", "foo", "{user1000}.following", "{a}b}", "a", "foo{}{bar}", "foo{{bar}}zap", "ünï{cödé}"]
)
def test_own_slot_function_agrees_with_redis_py(key: str) -> None:
    assert slot(key) == key_slot(key.encode())


def test_slot_reference_values() -> None:
    # The example from the Redis Cluster spec, and reliability.md's observation that a queue
    # named "a}b" would hash exactly like queue "a".
    assert crc16(b"123456789") == 0x31C3
    assert slot("qsync:{a}b}:pending") == slot("{a}") == 15495


NAMES = [
    ("qsync", "default"),
    ("myapp", "email:send"),
    ("p", "ünïcode-ß"),
    ("a.b-c_d", "x_y-z.1"),
    ("p" * 64, "q" * 128),
    ("t0", "crit/1"),
]


def _all_keys(keys: QueueKeys) -> dict[str, str]:
    out = {
        f.name: getattr(keys, f.name) for f in dataclasses.fields(keys) if f.name not in ("prefix", "queue")
    }
    out["task(id)"] = keys.task("0123456789abcdef")
    out["unique(k)"] = keys.unique("email:send:abc")
    out["unique(braces)"] = keys.unique("x{y}z")
    return out


@pytest.mark.parametrize(("prefix", "queue"), NAMES)
def test_every_key_of_a_queue_has_its_tag_and_slot(prefix: str, queue: str) -> None:
    keys = keys_for(prefix, queue)
    assert keys.tag == "{" + prefix + ":" + queue + "}"
    expected = key_slot((prefix + ":" + queue).encode())
    for name, key in _all_keys(keys).items():
        assert key.startswith(keys.tag), name
        assert keys.owns(key), name
        assert slot(key) == key_slot(key.encode()) == expected, name


def test_queue_keys_are_all_distinct() -> None:
    keys = _all_keys(keys_for("p", "q"))
    containers = {k: v for k, v in keys.items() if k not in ("tag", "task_prefix", "unique_prefix")}
    assert len(set(containers.values())) == len(containers)


def test_a_queue_does_not_own_a_longer_named_queue() -> None:
    a, ab = keys_for("p", "a"), keys_for("p", "ab")
    assert not a.owns(ab.pending) and not ab.owns(a.pending)
    assert not keys_for("p", "q").owns(keys_for("pp", "q").pending)


def test_distinct_prefix_and_queue_pairs_never_share_keys() -> None:
    """The prefix is a namespace ("several apps can share one Redis"): app ``acme`` with queue
    ``eu:mail`` and app ``acme:eu`` with queue ``mail`` must not read each other's tasks. Either
    the two pairs get different keys, or one of the names is refused."""
    pairs = [("acme", "eu:mail"), ("acme:eu", "mail")]
    tags = []
    for prefix, queue in pairs:
        try:
            tags.append(keys_for(prefix, queue).tag)
        except InvalidName:
            return
    assert tags[0] != tags[1], f"{pairs[0]} and {pairs[1]} share the keys {tags[0]}:*"


def test_registry_keys_are_outside_every_queue() -> None:
    key = registry_key("qsync", "queues")
    assert key == "{qsync}:queues"
    assert not keys_for("qsync", "queues").owns(key)


def _calls_for(keys: QueueKeys) -> dict[str, _ops.Call[Any]]:
    tasks = [
        qsync.Task("t", b"1"),
        qsync.Task("t", b"2", unique=60),
        qsync.Task("t", b"3", unique=60, unique_key="k{with}braces"),
        qsync.Task("t", b"4", task_id="given-id", delay=5),
    ]
    leases = [qsync.Lease("id1", "tok1"), qsync.Lease("id2", "tok2")]
    (enqueue,) = _ops.enqueue_many(keys, tasks)
    return {
        "enqueue": enqueue,
        "info": _ops.info(keys, "id1"),
        "pause": _ops.pause(keys, True),
        "resume": _ops.pause(keys, False),
        "lease": _ops.lease(keys, 10, 30_000),
        "extend": _ops.extend(keys, leases, 30_000),
        "ack": _ops.ack(keys, leases),
        "fail": _ops.fail(keys, [qsync.Failure("id1", "tok1", "boom", 1000)]),
        "requeue": _ops.requeue(keys, leases),
        "promote": _ops.promote(keys, 100),
        "recover": _ops.recover(keys, 100, 5, 0),
        "trim": _ops.trim(keys, 100, 1000, 10),
    }


@pytest.mark.parametrize(("prefix", "queue"), NAMES)
def test_every_call_touches_one_slot(prefix: str, queue: str) -> None:
    keys = keys_for(prefix, queue)
    for op, call in _calls_for(keys).items():
        assert call.keys, op
        assert {slot(k) for k in call.keys} == {slot(keys.tag)}, op
        assert all(keys.owns(k) for k in call.keys), op
        assert call.queue == queue, op


def test_enqueue_many_splits_into_one_slot_chunks() -> None:
    keys = keys_for("p", "bulk")
    chunk = _ops.ENQUEUE_CHUNK
    tasks = [qsync.Task("t", bytes([i % 256])) for i in range(2 * chunk + chunk // 2)]
    calls = _ops.enqueue_many(keys, tasks)
    assert [int(c.args[0]) for c in calls] == [chunk, chunk, chunk // 2]
    for call in calls:
        assert {slot(k) for k in call.keys} == {slot(keys.tag)}


@pytest.mark.parametrize(
    "foreign",
    [
        keys_for("p", "other").pending,
        keys_for("other", "q").pending,
        "x{p:q}:pending",  # the tag, but not first: hashes on the whole key
        "pending",
    ],
)
def test_a_call_with_a_key_outside_the_slot_is_refused_before_sending(foreign: str) -> None:
    keys = keys_for("p", "q")
    with pytest.raises(AssertionError, match=re.escape(foreign)):
        _ops._script_call("ack", keys, (keys.active, foreign), (), lambda r: r, idempotent=False)


def test_register_queue_is_a_single_registry_key() -> None:
    call = _ops.register_queue("p", "q")
    assert call.keys == (registry_key("p", "queues"),)
    assert call.script is None


# --- public names --------------------------------------------------------------------------------


def _own_doc(obj: Any) -> str:
    """The object's own docstring; dataclasses and NamedTuples make up ``Name(fields)``."""
    doc = obj.__doc__ or ""
    name = getattr(obj, "__name__", "")
    if name and doc.startswith(name + "("):
        return ""
    return doc.strip()


@pytest.mark.parametrize("module", [qsync, errors], ids=["qsync", "qsync.errors"])
def test_every_exported_name_resolves_and_is_documented(module: Any) -> None:
    assert module.__doc__ and module.__doc__.strip()
    assert len(module.__all__) == len(set(module.__all__)), "duplicates in __all__"
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.{name} is in __all__ but missing"
        assert _own_doc(getattr(module, name)), f"{module.__name__}.{name} has no docstring"


def test_the_names_users_rely_on_are_exported() -> None:
    for name in ("new", "Queue", "AsyncQueue", "Task", "TaskInfo", "TaskState", "Mux", "Context", "errors"):
        assert name in qsync.__all__, name
    assert [s.value for s in qsync.TaskState] == [
        "pending", "active", "scheduled", "retry", "archived", "completed",
    ]  # fmt: skip
    assert issubclass(qsync.TaskState, str)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from qsync import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(qsync.__all__)


def test_version_matches_the_project() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert qsync.__version__ == project["version"] == metadata.version("qsync")


def test_package_is_typed() -> None:
    assert resources.files("qsync").joinpath("py.typed").is_file()
    assert (Path(qsync.__file__).parent / "py.typed").is_file()


# --- the error tree ------------------------------------------------------------------------------

CONTROL_FLOW = {"SkipRetry", "RetryIn", "RetryAt"}  # raised by handlers, not by qsync


def _exception_classes(module: Any) -> dict[str, type[BaseException]]:
    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
    }


def test_every_qsync_exception_is_a_qsync_error() -> None:
    for name, cls in _exception_classes(errors).items():
        assert issubclass(cls, QsyncError), name
    exported = {n: getattr(qsync, n) for n in qsync.__all__}
    not_qsync = {
        n for n, obj in exported.items()
        if isinstance(obj, type) and issubclass(obj, BaseException) and not issubclass(obj, QsyncError)
    }  # fmt: skip
    # Only the handler's control-flow signals (qsync.control: "control flow, not errors").
    assert not_qsync == CONTROL_FLOW


def _documented_tree() -> dict[str, tuple[str | None, str]]:
    """name -> (parent, note) from the tree drawn in qsync.errors' docstring."""
    tree: dict[str, tuple[str | None, str]] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^(\s*(?:[│ ]   )*(?:[├└]── )?)([A-Z]\w+)(.*)$", line)
        if not match or not ("──" in line or match.group(2) == "QsyncError"):
            continue
        depth, name, note = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        tree[name] = (stack[-1][1] if stack else None, note)
        stack.append((depth, name))
    return tree


def test_the_documented_tree_holds() -> None:
    tree = _documented_tree()
    assert tree["QsyncError"] == (None, "")
    assert len(tree) >= 20, tree
    for name, (parent, note) in tree.items():
        cls = getattr(errors, name)
        assert name in errors.__all__, f"{name} is in the tree but not exported"
        if parent is not None:
            assert cls.__bases__[0] is getattr(errors, parent), f"{name} should derive from {parent}"
        for builtin in re.findall(r"also (\w+Error)", note):
            assert issubclass(cls, getattr(builtins, builtin)), (name, builtin)


def test_every_public_exception_is_in_the_documented_tree() -> None:
    """A class qsync may raise to users is drawn in the tree and exported, so users can find
    it and catch it by name."""
    tree = _documented_tree()
    public = {n for n in _exception_classes(errors) if not n.startswith("_")}
    assert public - set(tree) == set(), "public exception classes missing from the docstring tree"
    assert public - set(errors.__all__) == set(), "public exception classes missing from __all__"


def test_not_enqueued_and_enqueue_uncertain_are_distinct_branches() -> None:
    assert issubclass(NotEnqueued, NotApplied) and issubclass(NotApplied, RedisUnavailable)
    assert issubclass(EnqueueUncertain, OutcomeUnknown) and issubclass(OutcomeUnknown, RedisUnavailable)
    assert not issubclass(NotEnqueued, OutcomeUnknown) and not issubclass(EnqueueUncertain, NotApplied)
    assert not issubclass(NotEnqueued, EnqueueUncertain) and not issubclass(EnqueueUncertain, NotEnqueued)
    # "except NotEnqueued: retry later" must never swallow an uncertain enqueue
    with pytest.raises(EnqueueUncertain):
        try:
            raise EnqueueUncertain("enqueue: reply lost", op="enqueue")
        except NotEnqueued:
            pytest.fail("EnqueueUncertain caught as NotEnqueued")


def test_argument_errors_are_value_and_type_errors() -> None:
    assert issubclass(InvalidArgument, ValueError) and issubclass(InvalidArgumentType, TypeError)
    assert issubclass(InvalidName, InvalidArgument) and issubclass(PayloadTooLarge, InvalidArgument)
    assert not issubclass(InvalidArgumentType, ValueError)
    for cls in (TaskError, RedisUnavailable, ScriptError):
        assert not issubclass(cls, ValueError | TypeError)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (Code.CONFLICT, TaskIdConflict),
        (Code.DUPLICATE, DuplicateTask),
        (Code.LEASE_LOST, errors.LeaseLost),
        (Code.NOT_FOUND, errors.TaskNotFound),
        (Code.WRONG_TYPE, errors.CorruptState),
    ],
)
def test_reply_codes_map_to_their_errors(code: Code, cls: type[TaskError]) -> None:
    assert cls.code == code
    with pytest.raises(cls) as info:
        errors.raise_for(code, op="ack", queue="q", task_id="id1", detail="other-id")
    err = info.value
    assert (err.op, err.queue, err.task_id) == ("ack", "q", "id1")
    assert "ack" in str(err) and "'q'" in str(err)
    if cls is DuplicateTask:
        assert isinstance(err, DuplicateTask) and err.owner_id == "other-id"


def test_success_codes_do_not_raise_and_unknown_codes_are_script_errors() -> None:
    for code in (Code.OK, Code.EXISTS, 0):
        errors.raise_for(code, op="ack", queue="q", task_id="id1")
    with pytest.raises(ScriptError) as info:
        errors.raise_for(-99, op="ack", queue="q", task_id="id1")
    assert isinstance(info.value, TaskError) and "-99" in str(info.value)


# --- no payload in errors --------------------------------------------------------------------------

SECRET = b"SECRET-4f1c9a-PAYLOAD"


def _texts(err: BaseException) -> Iterator[str]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield from (repr(a) for a in current.args)
        current = current.__cause__ or current.__context__


def _assert_no_secret(err: BaseException) -> None:
    for text in _texts(err):
        assert SECRET.decode() not in text and "4f1c9a" not in text, text


@pytest.fixture
def dead_queue() -> Iterator[qsync.Queue]:
    client = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    yield qsync.new(client, check_server=False)
    client.close()


@pytest.fixture
def fake_queue() -> Iterator[qsync.Queue]:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield qsync.new(client, check_server=False)
    client.close()


def test_task_and_info_reprs_hide_the_payload() -> None:
    task = qsync.Task("t", SECRET)
    assert SECRET.decode() not in repr(task) and f"<{len(SECRET)} bytes>" in repr(task)
    info = qsync.TaskInfo(id="i", queue="q", state=qsync.TaskState.PENDING, payload=SECRET)
    assert SECRET.decode() not in repr(info)


@pytest.mark.parametrize(
    "build",
    [
        lambda: qsync.Task("t", SECRET.decode()),
        lambda: qsync.Task("t", {"password": SECRET.decode()}),
        lambda: qsync.Task("t", [SECRET]),
        lambda: qsync.Task("t", SECRET, retry=-1),
        lambda: qsync.Task("t", SECRET, deadline=datetime(2000, 1, 1, tzinfo=UTC)),
        lambda: qsync.Task("t", SECRET, task_id="a b"),
    ],
)
def test_argument_errors_do_not_echo_the_payload(build: Any) -> None:
    with pytest.raises(QsyncError) as info:
        build()
    _assert_no_secret(info.value)


def test_payload_too_large_does_not_echo_the_payload() -> None:
    client = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    queue = qsync.new(client, check_server=False, max_payload_bytes=8)
    with pytest.raises(PayloadTooLarge) as info:
        queue.enqueue(qsync.Task("t", SECRET))
    _assert_no_secret(info.value)
    client.close()


def test_connection_errors_do_not_echo_the_payload(dead_queue: qsync.Queue) -> None:
    with pytest.raises(NotEnqueued) as info:
        dead_queue.enqueue(qsync.Task("t", SECRET))
    _assert_no_secret(info.value)
    for result in dead_queue.enqueue_many([qsync.Task("t", SECRET)]):
        assert isinstance(result, NotEnqueued)
        _assert_no_secret(result)


def test_conflict_and_duplicate_errors_do_not_echo_the_payload(fake_queue: qsync.Queue) -> None:
    fake_queue.enqueue(qsync.Task("t", SECRET + b"-1", task_id="same"))
    with pytest.raises(TaskIdConflict) as conflict:
        fake_queue.enqueue(qsync.Task("t", SECRET + b"-2", task_id="same"))
    _assert_no_secret(conflict.value)
    fake_queue.enqueue(qsync.Task("t", SECRET, unique=60))
    with pytest.raises(DuplicateTask) as duplicate:
        fake_queue.enqueue(qsync.Task("t", SECRET, unique=60))
    _assert_no_secret(duplicate.value)


def test_corrupt_state_does_not_echo_the_payload(fake_queue: qsync.Queue) -> None:
    fake_queue.client.set(fake_queue.keys("default").pending, SECRET)
    with pytest.raises(errors.CorruptState) as info:
        fake_queue.enqueue(qsync.Task("t", SECRET))
    _assert_no_secret(info.value)


# --- qsync.new -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client",
    [
        pytest.param(None, id="none"),
        pytest.param(object(), id="object"),
        pytest.param("redis://localhost:6379/0", id="url"),
        pytest.param({"host": "localhost"}, id="dict"),
        pytest.param(redis.Redis, id="the-class"),
        pytest.param(redis.ConnectionPool(host="127.0.0.1", port=1), id="connection-pool"),
    ],
)
def test_new_refuses_what_is_not_a_redis_client(client: Any) -> None:
    with pytest.raises(InvalidArgumentType) as info:
        qsync.new(client)
    message = str(info.value)
    assert "redis.Redis" in message and "redis.asyncio" in message
    assert type(client).__name__ in message
    assert isinstance(info.value, TypeError)


def test_new_picks_the_shell_by_client() -> None:
    import redis.asyncio as aioredis

    client = redis.Redis(host="127.0.0.1", port=1)
    aclient = aioredis.Redis(host="127.0.0.1", port=1)
    assert type(qsync.new(client, check_server=False)) is qsync.Queue
    assert type(qsync.new(aclient, check_server=False)) is qsync.AsyncQueue
    client.close()

"""The TaskInfo an enqueue returns: built without the generated __init__ (for speed), it must be
indistinguishable from one built the regular way, and stay frozen."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from qsync import Task, TaskInfo, TaskState
from qsync.task import _enqueue_base, _enqueued_info, _ms_to_datetime

NOW_MS = 1_800_000_000_123
AT = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def _regular(task: Task, state: TaskState) -> TaskInfo:
    o = task.options
    due = o.process_at_ms or NOW_MS + o.delay_ms
    return TaskInfo(
        id=task.id,
        queue="emails",
        state=state,
        type=task.type,
        payload=task.payload,
        max_retry=o.max_retry,
        timeout=timedelta(milliseconds=o.timeout_ms) if o.timeout_ms else None,
        deadline=_ms_to_datetime(o.deadline_ms),
        retention=timedelta(milliseconds=o.retention_ms) if o.retention_ms else None,
        created_at=_ms_to_datetime(NOW_MS),
        next_process_at=_ms_to_datetime(due) if state is TaskState.SCHEDULED else None,
        unique_key=o.unique_key,
    )


@pytest.mark.parametrize(
    ("task", "state"),
    [
        (Task("plain", b"p"), TaskState.PENDING),
        (Task("opts", b"", retry=3, timeout=2.5, deadline=AT, retention=60, task_id="x1"), TaskState.PENDING),
        (Task("delayed", b"d", delay=30), TaskState.SCHEDULED),
        (Task("at", b"a", process_at=AT), TaskState.SCHEDULED),
        (Task("unique", b"u", unique=60), TaskState.PENDING),
        (Task("unique-key", b"u", unique=60, unique_key="k"), TaskState.ACTIVE),  # EXISTS, now active
    ],
    ids=["plain", "options", "delay", "process-at", "unique", "exists-active"],
)
def test_enqueued_info_equals_the_regular_constructor(task: Task, state: TaskState) -> None:
    fast = _enqueued_info(_enqueue_base("emails", NOW_MS), task, state, NOW_MS)
    regular = _regular(task, state)

    assert fast == regular
    assert {f.name: getattr(fast, f.name) for f in dataclasses.fields(TaskInfo)} == {
        f.name: getattr(regular, f.name) for f in dataclasses.fields(TaskInfo)
    }
    assert repr(fast) == repr(regular)
    assert hash(fast) == hash(regular)


def test_enqueued_info_is_frozen_and_does_not_share_state() -> None:
    base = _enqueue_base("emails", NOW_MS)
    first = _enqueued_info(base, Task("a", b"1"), TaskState.PENDING, NOW_MS)
    second = _enqueued_info(base, Task("b", b"2", timeout=1), TaskState.PENDING, NOW_MS)

    with pytest.raises(dataclasses.FrozenInstanceError):
        first.state = TaskState.ACTIVE  # type: ignore[misc]
    assert (first.type, first.timeout) == ("a", None), "a later task's fields do not leak back"
    assert (second.type, second.timeout) == ("b", timedelta(seconds=1))
    assert base["type"] == "" and base["timeout"] is None, "the shared base is not written"
    assert dataclasses.replace(first, state=TaskState.ACTIVE).state is TaskState.ACTIVE

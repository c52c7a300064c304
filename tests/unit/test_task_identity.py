"""A task's identity on the wire: its random id and its fingerprint. Both are built on fast paths
(no UUID object, one shared options object for tasks that take every default), which must give
exactly what the plain ways give: fingerprints are stored in Redis, so a changed one would turn a
client's retry after an upgrade into a TaskIdConflict."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from qsync import Task
from qsync.task import DEFAULT_MAX_RETRY

LATER = datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)


def reference_fingerprint(task: Task) -> bytes:
    """The fingerprint as qsync has always computed it."""
    o = task.options
    h = hashlib.blake2b(digest_size=8)
    h.update(task.type.encode())
    h.update(b"\0")
    h.update(task.payload)
    h.update(
        f"\0{o.max_retry}\0{o.retry_delay_ms}\0{o.timeout_ms}\0{o.deadline_ms}\0{o.retention_ms}"
        f"\0{o.unique_ttl_ms}\0{o.unique_key}".encode()
    )
    return h.digest()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"retry": DEFAULT_MAX_RETRY},
        {"retry": 0},
        {"retry_delay": 2.5},
        {"delay": 30},
        {"process_at": LATER},
        {"timeout": timedelta(minutes=5)},
        {"deadline": LATER},
        {"unique": 60},
        {"unique": 60, "unique_key": "k:1"},
        {"retention": 3600},
        {"retry": 3, "timeout": 1, "deadline": LATER, "unique": 5, "retention": 0},
    ],
    ids=repr,
)
@pytest.mark.parametrize("payload", [b"", b"\x00\xff payload", "é".encode() * 1000])
def test_the_fingerprint_is_unchanged(options: dict[str, Any], payload: bytes) -> None:
    task = Task("type:é", payload, **options)
    assert task.fingerprint == reference_fingerprint(task)
    assert task.fingerprint is task.fingerprint  # computed once


def test_tasks_with_every_default_share_options_equal_to_spelled_out_defaults() -> None:
    plain, spelled = Task("t", b"x"), Task("t", b"x", retry=DEFAULT_MAX_RETRY)
    assert plain.options is spelled.options
    assert plain.options.max_retry == DEFAULT_MAX_RETRY and plain.options.retry_delay_ms == -1
    # A value equal to the default but of another type still goes through validation.
    for bad in (25.0, True):
        with pytest.raises(TypeError):
            Task("t", b"x", retry=bad)  # type: ignore[arg-type]


def test_random_ids_are_uuid4_hex() -> None:
    ids = {Task("t").id for _ in range(2000)}
    assert len(ids) == 2000
    for task_id in ids:
        parsed = uuid.UUID(hex=task_id)
        assert parsed.hex == task_id
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)

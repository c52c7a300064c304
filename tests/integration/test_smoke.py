"""The shortest path through the public API, on both shells."""

from __future__ import annotations

from typing import Any

import qsync


def test_enqueue_lease_ack_round_trip(make_queue: Any) -> None:
    queue = make_queue()
    info = queue.enqueue(qsync.Task("email:send", b"\x00\xff payload"))
    assert info.state is qsync.TaskState.PENDING
    batch = queue.lease("default", count=10)
    assert [t.id for t in batch.tasks] == [info.id]
    assert batch.tasks[0].payload == b"\x00\xff payload"
    assert queue.ack("default", batch.tasks) == [True]

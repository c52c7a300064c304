"""The worker app of the chaos tests: ``qsync worker tests.chaos.app:mux`` (or tests/chaos/runner.py).

Every handler appends an ``exec_start`` record before its body and an ``exec_end`` record after
it (``exec_error`` when the body raised or was cancelled), one JSON line per record, written with
a single unbuffered ``os.write`` to ``$QSYNC_CHAOS_DIR/exec-<pid>.jsonl``. A SIGKILL therefore
loses no line that was written, and never leaves half a line behind.

A record: ``{"ev", "id", "type", "pid", "attempt" (task.retried), "token" (lease token),
"ts" (the host's real wall clock), "clock" (time.time() as this process sees it, skewed by
QSYNC_TEST_CLOCK_OFFSET), "error" (exec_error only)}``.

The payload is JSON; the fields each type reads:

- ``quick``: ``secs`` (default 0.005), an async sleep.
- ``sleepy``: ``secs``, an async sleep; with ``hold_attempts`` n only attempts ``retried < n``
  sleep (later attempts are quick), so a held task finishes fast once recovered.
- ``sync_sleepy``: a plain ``def`` (thread pool) sleeping ``secs`` in small steps while polling
  ``ctx.is_cancelled()``; when cancelled it raises ``Cancelled(<reason>)``.
- ``flaky``: raises ``RuntimeError`` while ``retried < fail_times``, then succeeds.
- ``raising``: always raises ``RuntimeError("boom on attempt <retried>")``.
- ``poison``: ``os._exit(139)`` (kills its worker every time).
- ``blocking``: ``time.sleep(secs)`` inside ``async def`` (blocks the event loop); with
  ``hold_attempts`` n only attempts ``retried < n`` block.
- ``cancellable``: an async sleep of ``secs`` (default an hour) that only a cancellation ends;
  with ``gate`` (a file path) it ends as soon as that file exists.

``QSYNC_TEST_CLOCK_OFFSET=<seconds>`` shifts ``time.time()`` in the whole worker process (the
clock-skew fault): qsync must not depend on a worker's wall clock.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import qsync

__all__ = ["mux"]

_real_time = time.time
CLOCK_OFFSET = float(os.environ.get("QSYNC_TEST_CLOCK_OFFSET", "0") or 0)
if CLOCK_OFFSET:

    def _skewed_time() -> float:
        return _real_time() + CLOCK_OFFSET

    time.time = _skewed_time

_lock = threading.Lock()
_fd: int | None = None


def _record(ev: str, task: qsync.LeasedTask, **extra: Any) -> None:
    global _fd
    folder = os.environ.get("QSYNC_CHAOS_DIR")
    if not folder:
        return
    line = {
        "ev": ev,
        "id": task.id,
        "type": task.type,
        "pid": os.getpid(),
        "attempt": task.retried,
        "token": task.token,
        "ts": _real_time(),
        "clock": time.time(),
        **extra,
    }
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
    with _lock:
        if _fd is None:
            path = os.path.join(folder, f"exec-{os.getpid()}.jsonl")
            _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(_fd, data)


def _payload(task: qsync.LeasedTask) -> dict[str, Any]:
    if not task.payload:
        return {}
    value = json.loads(task.payload)
    return value if isinstance(value, dict) else {}


class Cancelled(Exception):
    """A sync handler noticed through its context that its attempt was cancelled."""


def recorded(body: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler body with the exec_start / exec_end / exec_error records."""
    if inspect.iscoroutinefunction(body):

        @functools.wraps(body)
        async def run_async(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
            _record("exec_start", task)
            try:
                await body(ctx, task, _payload(task))
            except BaseException as exc:
                _record("exec_error", task, error=f"{type(exc).__name__}: {exc}")
                raise
            _record("exec_end", task)

        return run_async

    @functools.wraps(body)
    def run_sync(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
        _record("exec_start", task)
        try:
            body(ctx, task, _payload(task))
        except BaseException as exc:
            _record("exec_error", task, error=f"{type(exc).__name__}: {exc}")
            raise
        _record("exec_end", task)

    return run_sync


mux = qsync.Mux()


@mux.handle("quick")
@recorded
async def quick(ctx: qsync.Context, task: qsync.LeasedTask, p: dict[str, Any]) -> None:
    await asyncio.sleep(float(p.get("secs", 0.005)))


@mux.handle("sleepy")
@recorded
async def sleepy(ctx: qsync.Context, task: qsync.LeasedTask, p: dict[str, Any]) -> None:
    hold = p.get("hold_attempts")
    if hold is None or task.retried < int(hold):
        await asyncio.sleep(float(p["secs"]))


@mux.handle("sync_sleepy")
@recorded
def sync_sleepy(ctx: qsync.Context, task: qsync.LeasedTask, p: dict[str, Any]) -> None:
    end = time.monotonic() + float(p["secs"])
    while time.monotonic() < end:
        if ctx.wait_cancelled(min(0.02, max(0.0, end - time.monotonic()))):
            raise Cancelled(ctx.cancel_reason)


@mux.handle("flaky")
@recorded
async def flaky(ctx: qsync.Context, task: qsync.LeasedTask, p: dict[str, Any]) -> None:
    if task.retried < int(p.get("fail_times", 1)):
        raise RuntimeError(f"flaky failure on attempt {task.retried}")


@mux.handle("raising")
@recorded
async def raising(ctx: qsync.Context, task: qsync.LeasedTask, p: dict[str, Any]) -> None:
    raise RuntimeError(f"boom on attempt {task.retried}")


@mux.handle("poison")
@recorded
async def poison(ctx: qsync.Context, task: qsync.LeasedTask, p: dict[str, Any]) -> None:
    os._exit(139)


@mux.handle("blocking")
@recorded
async def blocking(ctx: qsync.Context, task: qsync.LeasedTask, p: dict[str, Any]) -> None:
    hold = p.get("hold_attempts")
    if hold is None or task.retried < int(hold):
        time.sleep(float(p["secs"]))  # on purpose: blocks the worker's event loop


@mux.handle("cancellable")
@recorded
async def cancellable(ctx: qsync.Context, task: qsync.LeasedTask, p: dict[str, Any]) -> None:
    gate = p.get("gate")
    end = time.monotonic() + float(p.get("secs", 3600))
    if gate is None:
        await asyncio.sleep(end - time.monotonic())
        return
    while time.monotonic() < end and not os.path.exists(gate):
        await asyncio.sleep(0.02)

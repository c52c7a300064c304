"""Mux: routing by task type (exact, prefix, longest prefix), not-found, middleware order, and
where handlers run (plain ``def`` in a thread, ``async def`` on the loop)."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import qsync
from qsync import Context, LeasedTask, Mux
from qsync.errors import InvalidArgument, InvalidArgumentType, UnknownTaskType
from qsync.mux import AsyncHandler


def make_task(task_type: str, payload: bytes = b"") -> LeasedTask:
    return LeasedTask(
        id="id-1", token="tok", queue="default", type=task_type, payload=payload,
        retried=0, max_retry=3, timeout_ms=0, deadline_ms=0, retry_delay_ms=-1,
    )  # fmt: skip


def make_ctx() -> Context:
    return Context("id-1", "default", 30.0)


def named(name: str) -> Any:
    def handler(ctx: Context, task: LeasedTask) -> str:
        return name

    handler.__name__ = name
    return handler


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-handler")
    yield pool
    pool.shutdown(wait=True)


# --- routing --------------------------------------------------------------------------------


def test_exact_pattern_matches_only_itself() -> None:
    mux = Mux()
    h = named("send")
    mux.handle_func("email:send", h)
    assert mux.match("email:send") is h
    assert mux.match("email:send:x") is not h
    assert mux.match("email:sen") is not h


def test_prefix_pattern_matches_types_that_start_with_it() -> None:
    mux = Mux()
    h = named("email")
    mux.handle_func("email:", h)
    assert mux.match("email:send") is h
    assert mux.match("email:bulk:x") is h
    assert mux.match("email") is not h  # the prefix includes the colon
    assert mux.match("emailsend") is not h


def test_exact_beats_prefix() -> None:
    mux = Mux()
    prefix, exact = named("prefix"), named("exact")
    mux.handle_func("email:", prefix)
    mux.handle_func("email:send", exact)
    assert mux.match("email:send") is exact
    assert mux.match("email:other") is prefix


@pytest.mark.parametrize("reverse", [False, True])
def test_longest_prefix_wins_whatever_the_registration_order(reverse: bool) -> None:
    handlers = {p: named(p) for p in ("a:", "a:b:", "a:b:c:")}
    mux = Mux()
    for pattern in reversed(list(handlers)) if reverse else handlers:
        mux.handle_func(pattern, handlers[pattern])
    assert mux.match("a:x") is handlers["a:"]
    assert mux.match("a:b:x") is handlers["a:b:"]
    assert mux.match("a:b:c:x") is handlers["a:b:c:"]
    assert mux.match("a:b:c:") is handlers["a:b:c:"]


def test_handle_decorator_registers_and_returns_the_function() -> None:
    mux = Mux()

    @mux.handle("report:build")
    def build(ctx: Context, task: LeasedTask) -> None: ...

    assert mux.match("report:build") is build
    assert callable(build) and build.__name__ == "build"
    assert mux.patterns == ["report:build"]


def test_patterns_lists_exact_and_prefix_patterns() -> None:
    mux = Mux()
    mux.handle_func("a", named("a"))
    mux.handle_func("b:", named("b"))
    mux.handle_func("b:c:", named("bc"))
    assert sorted(mux.patterns) == ["a", "b:", "b:c:"]


@pytest.mark.parametrize("pattern", ["email:send", "email:"])
def test_duplicate_pattern_is_invalid(pattern: str) -> None:
    mux = Mux()
    mux.handle_func(pattern, named("first"))
    with pytest.raises(InvalidArgument) as info:
        mux.handle_func(pattern, named("second"))
    assert isinstance(info.value, ValueError)
    assert pattern in str(info.value)
    assert mux.match(pattern + "x" if pattern.endswith(":") else pattern).__name__ == "first"


@pytest.mark.parametrize("pattern", ["", "   ", None, 3])
def test_bad_pattern_is_invalid(pattern: Any) -> None:
    with pytest.raises(InvalidArgument):
        Mux().handle_func(pattern, named("h"))


def test_non_callable_handler_or_middleware_is_a_type_error() -> None:
    mux = Mux()
    with pytest.raises(InvalidArgumentType):
        mux.handle_func("a", "not a function")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType):
        mux.use(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType):
        mux.not_found(None)  # type: ignore[arg-type]


# --- not found ------------------------------------------------------------------------------


async def test_unknown_type_fails_with_unknown_task_type() -> None:
    mux = Mux()
    mux.handle_func("known", named("known"))
    with pytest.raises(UnknownTaskType) as info:
        await mux.chain("nobody:handles")(make_ctx(), make_task("nobody:handles"))
    assert "nobody:handles" in str(info.value)
    assert isinstance(info.value, qsync.errors.QsyncError)


async def test_not_found_handler_can_be_replaced() -> None:
    mux = Mux()
    seen: list[str] = []

    @mux.not_found
    async def fallback(ctx: Context, task: LeasedTask) -> None:
        seen.append(task.type)

    assert mux.match("whatever") is fallback
    await mux(make_ctx(), make_task("whatever"))
    assert seen == ["whatever"]


async def test_middleware_wraps_the_not_found_handler_too() -> None:
    mux = Mux()
    seen: list[str] = []

    def mw(next_: AsyncHandler) -> AsyncHandler:
        async def h(ctx: Context, task: LeasedTask) -> None:
            seen.append("mw")
            await next_(ctx, task)

        return h

    mux.use(mw)
    with pytest.raises(UnknownTaskType):
        await mux(make_ctx(), make_task("nope"))
    assert seen == ["mw"]


# --- middleware -----------------------------------------------------------------------------


def recorder(name: str, log: list[str]) -> Any:
    def middleware(next_: AsyncHandler) -> AsyncHandler:
        async def wrapped(ctx: Context, task: LeasedTask) -> None:
            log.append(f"{name} before")
            try:
                await next_(ctx, task)
            finally:
                log.append(f"{name} after")

        return wrapped

    return middleware


async def test_first_middleware_added_is_outermost() -> None:
    log: list[str] = []
    mux = Mux()

    @mux.handle("job")
    async def job(ctx: Context, task: LeasedTask) -> None:
        log.append("handler")

    mux.use(recorder("first", log), recorder("second", log))
    mux.use(recorder("third", log))
    await mux(make_ctx(), make_task("job"))
    assert log == [
        "first before", "second before", "third before", "handler",
        "third after", "second after", "first after",
    ]  # fmt: skip


async def test_middleware_sees_handler_errors_in_reverse_order() -> None:
    log: list[str] = []
    mux = Mux()

    @mux.handle("job")
    def job(ctx: Context, task: LeasedTask) -> None:
        log.append("handler")
        raise ValueError("bad payload")

    mux.use(recorder("outer", log), recorder("inner", log))
    with pytest.raises(ValueError, match="bad payload"):
        await mux(make_ctx(), make_task("job"))
    assert log == ["outer before", "inner before", "handler", "inner after", "outer after"]


async def test_middleware_added_later_applies_to_cached_chains() -> None:
    log: list[str] = []
    mux = Mux()
    mux.handle_func("job", named("job"))
    await mux(make_ctx(), make_task("job"))  # builds and caches the chain
    mux.use(recorder("late", log))
    await mux(make_ctx(), make_task("job"))
    assert log == ["late before", "late after"]


async def test_handler_registered_later_replaces_a_cached_not_found_chain() -> None:
    mux = Mux()
    with pytest.raises(UnknownTaskType):
        await mux(make_ctx(), make_task("late:type"))
    seen: list[str] = []

    @mux.handle("late:")
    async def late(ctx: Context, task: LeasedTask) -> None:
        seen.append(task.type)

    await mux(make_ctx(), make_task("late:type"))
    assert seen == ["late:type"]


async def test_middleware_can_short_circuit() -> None:
    called: list[str] = []
    mux = Mux()

    @mux.handle("job")
    async def job(ctx: Context, task: LeasedTask) -> None:
        called.append("handler")

    def skip_all(next_: AsyncHandler) -> AsyncHandler:
        async def h(ctx: Context, task: LeasedTask) -> None:
            called.append("skipped")

        return h

    mux.use(skip_all)
    await mux(make_ctx(), make_task("job"))
    assert called == ["skipped"]


# --- where handlers run ---------------------------------------------------------------------


async def test_sync_handler_runs_in_a_worker_thread(executor: ThreadPoolExecutor) -> None:
    loop_thread = threading.current_thread()
    seen: list[threading.Thread] = []
    mux = Mux()
    mux.bind(executor)

    @mux.handle("sync")
    def handler(ctx: Context, task: LeasedTask) -> None:
        seen.append(threading.current_thread())
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()  # no event loop in the handler's thread

    await mux(make_ctx(), make_task("sync"))
    assert len(seen) == 1
    assert seen[0] is not loop_thread
    assert seen[0].name.startswith("test-handler")  # the bound executor is used


async def test_sync_handler_without_bound_executor_still_runs_off_the_loop() -> None:
    loop_thread = threading.current_thread()
    seen: list[threading.Thread] = []
    mux = Mux()
    mux.handle_func("sync", lambda ctx, task: seen.append(threading.current_thread()))
    await mux(make_ctx(), make_task("sync"))
    assert seen and seen[0] is not loop_thread


async def test_async_handler_runs_on_the_loop(executor: ThreadPoolExecutor) -> None:
    loop = asyncio.get_running_loop()
    loop_thread = threading.current_thread()
    seen: list[tuple[threading.Thread, asyncio.AbstractEventLoop]] = []
    mux = Mux()
    mux.bind(executor)

    @mux.handle("async")
    async def handler(ctx: Context, task: LeasedTask) -> None:
        seen.append((threading.current_thread(), asyncio.get_running_loop()))

    await mux(make_ctx(), make_task("async"))
    assert seen == [(loop_thread, loop)]


async def test_partial_and_callable_objects_of_async_functions_run_on_the_loop(
    executor: ThreadPoolExecutor,
) -> None:
    loop_thread = threading.current_thread()
    seen: list[tuple[str, threading.Thread]] = []

    async def base(tag: str, ctx: Context, task: LeasedTask) -> None:
        seen.append((tag, threading.current_thread()))

    class AsyncCallable:
        async def __call__(self, ctx: Context, task: LeasedTask) -> None:
            seen.append(("object", threading.current_thread()))

    mux = Mux()
    mux.bind(executor)
    mux.handle_func("partial", functools.partial(base, "partial"))
    mux.handle_func("object", AsyncCallable())
    await mux(make_ctx(), make_task("partial"))
    await mux(make_ctx(), make_task("object"))
    assert seen == [("partial", loop_thread), ("object", loop_thread)]


async def test_plain_def_returning_a_coroutine_is_awaited(executor: ThreadPoolExecutor) -> None:
    done: list[str] = []

    async def later() -> None:
        done.append("awaited")

    mux = Mux()
    mux.bind(executor)
    mux.handle_func("wrapped", lambda ctx, task: later())
    await mux(make_ctx(), make_task("wrapped"))
    assert done == ["awaited"]


async def test_sync_handler_errors_propagate(executor: ThreadPoolExecutor) -> None:
    mux = Mux()
    mux.bind(executor)

    @mux.handle("explode")
    def explode(ctx: Context, task: LeasedTask) -> None:
        raise qsync.SkipRetry("invalid address")

    with pytest.raises(qsync.SkipRetry, match="invalid address"):
        await mux(make_ctx(), make_task("explode"))


async def test_handler_receives_context_and_task(executor: ThreadPoolExecutor) -> None:
    got: list[tuple[str, str, bytes]] = []
    mux = Mux()
    mux.bind(executor)
    mux.handle_func("t", lambda ctx, task: got.append((ctx.task_id, task.type, task.payload)))
    await mux(make_ctx(), make_task("t", b"\x00data"))
    assert got == [("id-1", "t", b"\x00data")]

"""Mux: routes each task to its handler by task type, through middleware."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from ._ops import LeasedTask
from .context import Context
from .errors import InvalidArgument, InvalidArgumentType, UnknownTaskType

__all__ = ["AsyncHandler", "Handler", "Middleware", "Mux"]

Handler = Callable[[Context, LeasedTask], Any]
"""A handler: ``def h(ctx, task) -> None`` (runs in a thread pool) or ``async def h(ctx, task)``
(runs on the worker's event loop). Returning acks the task; raising fails the attempt."""

AsyncHandler = Callable[[Context, LeasedTask], Awaitable[None]]
Middleware = Callable[[AsyncHandler], AsyncHandler]
"""Middleware wraps the (async) handler chain: ``def mw(next): async def h(ctx, task): ...
await next(ctx, task) ...; return h``. The first middleware added is the outermost."""

H = TypeVar("H", bound=Handler)


class Mux:
    """Routes tasks to handlers.

    A pattern is an exact task type (``"email:send"``), or, when it ends with ``":"``, a prefix
    (``"email:"`` matches ``"email:send"`` and ``"email:bulk:x"``). An exact match wins; among
    prefixes the longest wins. A task no pattern matches goes to the not-found handler, which
    by default fails the attempt with UnknownTaskType (so the task retries, then is archived:
    it is never dropped).
    """

    def __init__(self) -> None:
        self._exact: dict[str, Handler] = {}
        self._prefixes: list[tuple[str, Handler]] = []
        self._middleware: list[Middleware] = []
        self._not_found: Handler = _unknown_type
        self._chains: dict[str, AsyncHandler] = {}
        self._executor: Executor | None = None

    def handle(self, pattern: str) -> Callable[[H], H]:
        """Decorator form of :meth:`handle_func`: ``@mux.handle("email:send")``."""

        def register(handler: H) -> H:
            self.handle_func(pattern, handler)
            return handler

        return register

    def handle_func(self, pattern: str, handler: Handler) -> None:
        """Register ``handler`` for ``pattern``.

        Raises:
            InvalidArgument: the pattern is empty or already registered.
            InvalidArgumentType: the handler is not callable.
        """
        if not isinstance(pattern, str) or not pattern.strip():
            raise InvalidArgument(f"a pattern must be a non-empty str, got {pattern!r}")
        if not callable(handler):
            raise InvalidArgumentType(
                f"handler for {pattern!r} must be callable, got {type(handler).__name__}"
            )
        if pattern in self._exact or any(p == pattern for p, _ in self._prefixes):
            raise InvalidArgument(f"a handler for pattern {pattern!r} is already registered")
        if pattern.endswith(":"):
            self._prefixes.append((pattern, handler))
            self._prefixes.sort(key=lambda item: -len(item[0]))
        else:
            self._exact[pattern] = handler
        self._chains.clear()

    def not_found(self, handler: Handler) -> Handler:
        """Replace the handler for tasks no pattern matches (decorator or plain call)."""
        if not callable(handler):
            raise InvalidArgumentType("the not-found handler must be callable")
        self._not_found = handler
        self._chains.clear()
        return handler

    def use(self, *middleware: Middleware) -> None:
        """Add middleware; each wraps every handler. The first added runs outermost."""
        for mw in middleware:
            if not callable(mw):
                raise InvalidArgumentType(f"middleware must be callable, got {type(mw).__name__}")
            self._middleware.append(mw)
        self._chains.clear()

    def match(self, task_type: str) -> Handler:
        """The handler for ``task_type`` (the not-found handler when none matches)."""
        handler = self._exact.get(task_type)
        if handler is not None:
            return handler
        for prefix, candidate in self._prefixes:
            if task_type.startswith(prefix):
                return candidate
        return self._not_found

    @property
    def patterns(self) -> list[str]:
        """Every registered pattern."""
        return [*self._exact, *(p for p, _ in self._prefixes)]

    def bind(self, executor: Executor) -> None:
        """Set the thread pool for plain ``def`` handlers (done by the worker server)."""
        self._executor = executor
        self._chains.clear()

    def chain(self, task_type: str) -> AsyncHandler:
        """The awaitable handler for ``task_type``, wrapped in the middleware (cached)."""
        chain = self._chains.get(task_type)
        if chain is None:
            chain = _as_async(self.match(task_type), self._executor)
            for mw in reversed(self._middleware):
                chain = mw(chain)
            self._chains[task_type] = chain
        return chain

    async def __call__(self, ctx: Context, task: LeasedTask) -> None:
        """Process one task: route it and run the chain (so a Mux is itself a handler)."""
        await self.chain(task.type)(ctx, task)


def _is_async(handler: Handler) -> bool:
    target = handler
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    # A callable object whose __call__ is async.
    return not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__)


def _as_async(handler: Handler, executor: Executor | None) -> AsyncHandler:
    if _is_async(handler):
        return handler

    async def in_thread(ctx: Context, task: LeasedTask) -> None:
        result = await asyncio.get_running_loop().run_in_executor(executor, handler, ctx, task)
        if inspect.isawaitable(result):  # a plain def that returned a coroutine
            await result

    return in_thread


async def _unknown_type(ctx: Context, task: LeasedTask) -> None:
    raise UnknownTaskType(f"no handler is registered for task type {task.type!r}")

"""Handlers for the command-line tests (tests/integration/test_cli.py), loaded by a real
``python -m qsync worker tests.integration.cli_app:mux`` subprocess."""

from __future__ import annotations

import asyncio

import qsync

mux = qsync.Mux()


@mux.handle("cli:sync")
def sync_handler(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """A plain def handler (runs in the worker's thread pool)."""


@mux.handle("cli:async")
async def async_handler(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """An async handler (runs on the worker's loop)."""


@mux.handle("cli:slow")
async def slow_handler(ctx: qsync.Context, task: qsync.LeasedTask) -> None:
    """Runs until cancelled: a graceful stop hands it back to its queue."""
    await asyncio.sleep(3600)


not_a_handler = 42

"""The ``qsync`` command line (also ``python -m qsync``).

    qsync worker myapp.tasks:mux --queues critical=6,default=3,low=1 --concurrency 50
    qsync enqueue email:send '{"to": "a@example.com"}' --queue default
    qsync info <task id> --queue default

Every command takes ``--redis-url`` (env ``QSYNC_REDIS_URL``) and ``--prefix`` (env
``QSYNC_PREFIX``); ``worker`` also reads ``QSYNC_QUEUES``, ``QSYNC_CONCURRENCY`` and
``QSYNC_LEASE_DURATION``. A ``.env`` file in the current folder is read first when present.
Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import redis
import redis.asyncio as aioredis

from .errors import QsyncError
from .mux import Mux
from .server.config import parse_queues
from .task import Task

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"qsync: {message} (see '{self.prog} --help')\n")


def _env_file() -> None:
    try:
        from dotenv import load_dotenv
    except ImportError:  # python-dotenv is a dependency; tolerate a trimmed install
        return
    load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=os.environ.get("QSYNC_REDIS_URL", "redis://localhost:6379/0"),
        help="Redis URL, e.g. redis://user:pass@host:6379/0 or rediss://... (env QSYNC_REDIS_URL)",
    )
    common.add_argument(
        "--prefix", default=os.environ.get("QSYNC_PREFIX", "qsync"), help="key prefix (env QSYNC_PREFIX)"
    )
    common.add_argument("--log-level", default=os.environ.get("QSYNC_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])  # fmt: skip
    parser = _Parser(prog="qsync", description="qsync: a Redis task queue with at-least-once delivery")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    worker = sub.add_parser("worker", parents=[common], help="run a worker server")
    worker.add_argument("app", help="MODULE:ATTR naming a qsync.Mux (or one handler callable)")
    worker.add_argument(
        "--queues",
        type=_queues,
        default=os.environ.get("QSYNC_QUEUES", "default=1"),
        help="queues and weights, e.g. critical=6,default=3,low=1 (env QSYNC_QUEUES)",
    )
    worker.add_argument(
        "--concurrency",
        type=_positive_int,
        default=os.environ.get("QSYNC_CONCURRENCY", "10"),
        help="tasks run at once (env QSYNC_CONCURRENCY)",
    )
    worker.add_argument(
        "--lease-duration",
        type=_positive_float,
        default=os.environ.get("QSYNC_LEASE_DURATION", "30"),
        help="seconds (env QSYNC_LEASE_DURATION)",
    )
    worker.add_argument(
        "--shutdown-timeout",
        type=_positive_float,
        default="8",
        help="seconds running tasks may finish on SIGTERM before they are handed back",
    )
    worker.add_argument("--strict", action="store_true", help="always drain higher-weight queues first")
    worker.add_argument("--poll-interval", type=_positive_float, default="1", help=argparse.SUPPRESS)

    enqueue = sub.add_parser("enqueue", parents=[common], help="enqueue one task")
    enqueue.add_argument("type")
    enqueue.add_argument("payload", help="the payload, as UTF-8 text")
    enqueue.add_argument("--queue", default="default")
    enqueue.add_argument("--delay", type=_positive_float, default=None, help="seconds")
    enqueue.add_argument("--retry", type=int, default=None)

    info = sub.add_parser("info", parents=[common], help="show one task")
    info.add_argument("task_id")
    info.add_argument("--queue", default="default")
    return parser


def _queues(text: str) -> dict[str, int]:
    try:
        return parse_queues(text)
    except QsyncError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _load_app(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise QsyncError(f"app must look like 'package.module:mux', got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise QsyncError(f"cannot import {module_name!r}: {exc}") from None
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise QsyncError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(app, Mux) and not callable(app):
        raise QsyncError(f"{spec} is a {type(app).__name__}, not a qsync.Mux or a handler")
    return app


async def _worker(args: argparse.Namespace) -> None:
    import qsync

    app = _load_app(args.app)
    client = aioredis.Redis.from_url(args.redis_url)
    queue = qsync.new(client, prefix=args.prefix)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        logging.getLogger("qsync").info("received %s, stopping gracefully", signal.Signals(signum).name)
        if stopping:
            logging.getLogger("qsync").info("already stopping; waiting for running tasks to finish")
            return
        stopping.append(loop.create_task(queue.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await queue.run(
            app, queues=args.queues, concurrency=args.concurrency, lease_duration=args.lease_duration,
            shutdown_timeout=args.shutdown_timeout, strict=args.strict, poll_interval=args.poll_interval,
        )  # fmt: skip
    finally:
        await client.aclose()


def _enqueue(args: argparse.Namespace) -> None:
    import qsync

    options: dict[str, Any] = {}
    if args.delay is not None:
        options["delay"] = args.delay
    if args.retry is not None:
        options["retry"] = args.retry
    with redis.Redis.from_url(args.redis_url) as client:
        info = qsync.new(client, prefix=args.prefix).enqueue(
            Task(args.type, args.payload.encode(), **options), queue=args.queue
        )
    print(f"{info.id} {info.state.value}")


def _info(args: argparse.Namespace) -> None:
    import qsync

    with redis.Redis.from_url(args.redis_url) as client:
        info = qsync.new(client, prefix=args.prefix).info(args.task_id, queue=args.queue)
    for name in ("id", "queue", "type", "state", "retried", "max_retry", "last_error", "created_at",
                 "next_process_at", "finished_at"):  # fmt: skip
        print(f"{name:16} {getattr(info, name)}")
    print(f"{'payload':16} <{len(info.payload)} bytes>")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    _env_file()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "worker":
            asyncio.run(_worker(args))
        elif args.command == "enqueue":
            _enqueue(args)
        else:
            _info(args)
    except (QsyncError, redis.RedisError, OSError, ValueError) as exc:
        print(f"qsync: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())

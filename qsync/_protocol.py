"""How calls travel, written once for both I/O shells: pipelining, NOSCRIPT reload, cluster
re-routing, and the mapping of Redis failures to qsync errors.

:func:`exchange_calls` is a generator. It yields :class:`Exchange` objects (commands to send on
one connection); the driver sends them, reads one reply per command (a Redis error reply comes
back as the ``ResponseError`` object, not raised) and sends the replies back in, handing each
reply to the exchange's ``on_reply`` as soon as it is read (the decoding of one script call's
reply then runs while Redis still works on the calls sent after it). Connection failures are
thrown into the generator. Its return value has one item per call: the decoded
result or the QsyncError for that call. Nothing is ever re-sent blindly: only NOSCRIPT and
MOVED/ASK replies (the script did not run), and connection errors for idempotent calls.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import hiredis
from redis import exceptions as rex
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._ops import Call
from .errors import (
    EnqueueUncertain,
    NotApplied,
    NotEnqueued,
    OutcomeUnknown,
    QsyncError,
    ScriptError,
)

__all__ = [
    "REPLY_ERRORS",
    "ConnectFailed",
    "Exchange",
    "absorb_replies",
    "decoded",
    "exchange_calls",
    "not_applied",
    "only_result",
    "outcome_unknown",
    "packed_pieces",
    "raise_first",
    "single_exchange",
]

# Replies that mean the command was refused before the script ran (or, for OOM, before its
# first write: every qsync script writes last and its first write is checked for memory).
_NOT_APPLIED = ("OOM", "READONLY", "BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
                "NOREPLICAS", "MISCONF", "NOPERM", "NOAUTH", "WRONGPASS", "EXECABORT")  # fmt: skip
_REROUTE = ("MOVED", "ASK")
MAX_ROUNDS = 4

# Error replies that redis-py raises as a ConnectionError subclass although the connection is
# fine: a driver must treat them as the command's reply (the command was refused), not as a
# broken connection (outcome unknown).
REPLY_ERRORS = (ResponseError, rex.BusyLoadingError, rex.AuthenticationError)

# redis-py strips the code from the message of the errors it has a class for; put it back.
# Subclasses come before their bases (MovedError is an AskError, MasterDownError a ClusterDownError).
_CODES: tuple[tuple[type[Exception], str], ...] = (
    (rex.MovedError, "MOVED"), (rex.AskError, "ASK"), (rex.TryAgainError, "TRYAGAIN"),
    (rex.MasterDownError, "MASTERDOWN"), (rex.ClusterDownError, "CLUSTERDOWN"),
    (rex.ReadOnlyError, "READONLY"), (rex.OutOfMemoryError, "OOM"), (rex.BusyLoadingError, "LOADING"),
    (rex.AuthenticationError, "NOAUTH"), (rex.NoPermissionError, "NOPERM"),
    (rex.ExecAbortError, "EXECABORT"), (rex.NoScriptError, "NOSCRIPT"),
)  # fmt: skip


def error_code(err: Exception) -> str:
    """The Redis error code of an error reply (``"MOVED"``, ``"OOM"``, ``"ERR"``, ...)."""
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return str(err).split(" ", 1)[0]


class ConnectFailed(Exception):
    """Raised by a driver when no connection could be made: nothing was sent."""


class Exchange(NamedTuple):
    """Commands to send on one connection, to the node that owns ``route_key``'s slot.

    ``on_reply(position, reply)``, when set, is called by the driver with each reply as it is
    read, before the next is read; it never raises.
    """

    commands: list[tuple[Any, ...]]
    route_key: str
    refresh_routes: bool = False
    on_reply: Callable[[int, Any], None] | None = None


# An exchange goes out in pieces of about this size, packed one after another while Redis
# already runs the commands of the pieces sent before (an enqueue_many of 1,000 tasks is four
# script calls, so packing overlaps the scripts). Smaller exchanges are one write, as before.
SEND_PIECE_BYTES = 16 * 1024


def packed_pieces(commands: Sequence[tuple[Any, ...]]) -> Iterable[bytes]:
    """The RESP bytes of ``commands``, packed by hiredis (redis-py's asyncio connection packs
    in Python, a tenth of a worker's time at full speed), in pieces of at least
    SEND_PIECE_BYTES but the last. Arguments are str (UTF-8), bytes or int, checked when each
    call was built, so packing does not fail on user input."""
    if len(commands) == 1:
        return (hiredis.pack_command(commands[0]),)
    return _pieces(commands)


def _pieces(commands: Sequence[tuple[Any, ...]]) -> Iterator[bytes]:
    piece: list[bytes] = []
    size = 0
    for command in commands:
        packed = hiredis.pack_command(command)
        piece.append(packed)
        size += len(packed)
        if size >= SEND_PIECE_BYTES:
            yield b"".join(piece)
            piece, size = [], 0
    if piece:
        yield b"".join(piece)


def outcome_unknown(call: Call[Any], reason: str) -> QsyncError:
    """The error of a call whose reply was lost: it may or may not have happened."""
    return _failure(call, None, reason)


def not_applied(call: Call[Any], reason: str) -> QsyncError:
    """The error of a call that surely did not happen (NotEnqueued for an enqueue)."""
    return _failure(call, False, reason)


def _failure(call: Call[Any], applied: bool | None, reason: str) -> QsyncError:
    """applied=False: certainly not applied; None: unknown."""
    enqueue = call.op == "enqueue"
    where = f" on queue {call.queue!r}" if call.queue else ""
    message = f"{call.op}{where}: {reason}"
    if applied is False:
        return NotEnqueued(message, op=call.op) if enqueue else NotApplied(message, op=call.op)
    message += "; the outcome is unknown"
    if enqueue:
        message += " (enqueue again with the same task ids: it is idempotent)"
        return EnqueueUncertain(message, op=call.op)
    return OutcomeUnknown(message, op=call.op)


def _classify_reply_error(call: Call[Any], err: Exception, resent: bool) -> QsyncError:
    code = error_code(err)
    text = str(err)
    if not text.startswith(code):
        text = f"{code} {text}"
    if code in _NOT_APPLIED or "OOM command not allowed" in text:
        if resent:  # the refusal is of the re-send; the send on the broken connection may have run
            return _failure(call, None, f"connection to Redis lost, then Redis refused the re-send: {text}")
        return _failure(call, False, f"Redis refused it: {text}")
    return ScriptError(f"{call.op} on queue {call.queue!r}: Redis answered an error: {text}")


def _group(calls: Sequence[Call[Any]], by_slot: bool) -> list[list[int]]:
    if not by_slot:
        return [list(range(len(calls)))]
    groups: dict[str, list[int]] = {}
    for i, call in enumerate(calls):
        tag = call.keys[0].split("}", 1)[0]
        groups.setdefault(tag, []).append(i)
    return list(groups.values())


def exchange_calls(calls: Sequence[Call[Any]], *, by_slot: bool) -> Generator[Exchange, list[Any], list[Any]]:
    """Run ``calls``; see the module docstring for the driver's side of the contract."""
    results: list[Any] = [None] * len(calls)
    for group in _group(calls, by_slot):
        todo, loads, reroute = group, _NO_LOADS, False
        resent: set[int] = set()
        for _ in range(MAX_ROUNDS):
            if not todo:
                break
            commands = [calls[i].command() for i in todo]
            if loads:  # NOSCRIPT answered before: load each script first, in the same exchange
                commands[:0] = _script_loads(calls, todo, loads)
            settled: set[int] = set()
            on_reply = None
            if len(todo) > 1:
                on_reply = _settler(calls, todo, len(commands) - len(todo), results, settled)
            try:
                replies = yield Exchange(commands, calls[todo[0]].keys[0], reroute, on_reply)
            except ConnectFailed as exc:
                _cannot_connect(calls, todo, exc, resent, results)
                todo = []
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Replies read before the connection broke are results already: never re-sent.
                todo = [i for i in todo if i not in settled]
                todo = _after_broken_connection(calls, todo, exc, resent, results)
                loads, reroute = _NO_LOADS, False
                continue
            todo, replies = _unsettled(todo, replies, settled)
            todo, loads, reroute = absorb_replies(calls, todo, replies, results, resent)
        for i in todo:
            # A call also sent on a connection that broke may have run there.
            applied = None if i in resent else False
            results[i] = _failure(calls[i], applied, "Redis kept redirecting or reloading; giving up")
    return results


_NO_LOADS: frozenset[str] = frozenset()


def _cannot_connect(
    calls: Sequence[Call[Any]], todo: list[int], exc: Exception, resent: set[int], results: list[Any]
) -> None:
    for i in todo:
        if i in resent:  # sent once already, on the connection that broke
            results[i] = _failure(calls[i], None, f"connection to Redis lost, then: {exc}")
        else:
            results[i] = _failure(calls[i], False, f"cannot connect to Redis: {exc}")


def _unsettled(todo: list[int], replies: list[Any], settled: set[int]) -> tuple[list[int], list[Any]]:
    """The calls not settled as their replies arrived, with their replies (the SCRIPT LOAD
    replies in front dropped)."""
    if len(replies) > len(todo):
        replies = replies[len(replies) - len(todo) :]
    if not settled:
        return todo, replies
    left = [(i, r) for i, r in zip(todo, replies, strict=True) if i not in settled]
    return [i for i, _ in left], [r for _, r in left]


def _script_loads(
    calls: Sequence[Call[Any]], todo: list[int], loads: frozenset[str]
) -> list[tuple[Any, ...]]:
    scripts = {s.sha: s for s in (calls[i].script for i in todo) if s is not None and s.sha in loads}
    return [("SCRIPT", "LOAD", s.source) for s in scripts.values()]


def _after_broken_connection(
    calls: Sequence[Call[Any]], todo: list[int], exc: Exception, resent: set[int], results: list[Any]
) -> list[int]:
    """The connection broke after sending, so a reply may be lost. Idempotent calls are sent
    once more (a connection error, not a timeout: a stalled server would stall them again);
    the others are reported as of unknown outcome. Returns the calls to send again."""
    timeout = isinstance(exc, RedisTimeoutError)
    again = [i for i in todo if calls[i].idempotent and not timeout and i not in resent]
    for i in todo:
        if i not in again:
            results[i] = _failure(calls[i], None, f"connection to Redis lost: {exc}")
    resent.update(again)
    return again


def _settler(
    calls: Sequence[Call[Any]], todo: list[int], loads: int, results: list[Any], settled: set[int]
) -> Callable[[int, Any], None]:
    """An exchange's ``on_reply``: decodes each call's reply as it arrives into ``results`` and
    adds the call to ``settled``. Error replies (NOSCRIPT, MOVED, refusals) are left for
    :func:`absorb_replies`, which decides on them once the whole exchange is read. ``loads`` is
    the number of SCRIPT LOAD commands in front of the calls."""

    def on_reply(position: int, reply: Any) -> None:
        if position >= loads and not isinstance(reply, REPLY_ERRORS):
            i = todo[position - loads]
            results[i] = decoded(calls[i], reply)
            settled.add(i)

    return on_reply


def single_exchange(call: Call[Any]) -> Exchange:
    """The exchange :func:`exchange_calls` yields first for ``call`` alone on one node.

    A driver's fast path for a single call sends it without the generator; only when the
    reply is an error reply, or the connection fails, does it start ``exchange_calls`` and
    hand it that first outcome (see the transports' ``run``)."""
    return Exchange([call.command()], call.keys[0])


def decoded(call: Call[Any], reply: Any) -> Any:
    """A call's result from its reply (not an error reply), or the error that stands for it."""
    try:
        return call.decode(reply)
    except QsyncError as exc:
        return exc.with_traceback(None)  # a result: its frames would hold the queue
    except (ValueError, TypeError, OverflowError, OSError, IndexError, KeyError) as exc:
        # Data qsync cannot read (damaged, or written by a newer version): this call's error,
        # never an exception that would lose the other calls' results. The exception's text is
        # left out: it may quote payload bytes.
        return ScriptError(
            f"{call.op} on queue {call.queue!r}: cannot read Redis's reply "
            f"({type(exc).__name__}); the task's data is damaged or from a newer qsync"
        )


def absorb_replies(
    calls: Sequence[Call[Any]],
    todo: list[int],
    replies: list[Any],
    results: list[Any],
    resent: Collection[int] = (),
) -> tuple[list[int], frozenset[str], bool]:
    """Decode replies into results; return the calls to send again (NOSCRIPT: load the script
    first; MOVED/ASK: refresh the routes first). Neither reply means the script ran. A call in
    ``resent`` was also sent on a connection that broke: a refusal of it now is of unknown
    outcome (OutcomeUnknown), not NotApplied."""
    again: list[int] = []
    loads: frozenset[str] = _NO_LOADS
    reroute = False
    for i, reply in zip(todo, replies, strict=True):
        call = calls[i]
        if not isinstance(reply, REPLY_ERRORS):
            results[i] = decoded(call, reply)
        elif isinstance(reply, NoScriptError) and call.script is not None:
            loads |= {call.script.sha}
            again.append(i)
        elif error_code(reply) in _REROUTE:
            reroute = True
            again.append(i)
        else:
            results[i] = _classify_reply_error(call, reply, i in resent)
    return again, loads, reroute


def raise_first(results: list[Any]) -> None:
    """Raise the first error among results (for single operations)."""
    for r in results:
        if isinstance(r, QsyncError):
            try:
                raise r
            finally:
                del r, results  # see only_result


def only_result(results: list[Any]) -> Any:
    """The result of a single call, raised if it is an error.

    No frame keeps a reference to the error it raises (callers pass the results straight in),
    so its traceback does not hold the queue in a reference cycle: a queue dropped after an
    error gives its connection back at once, not at the next garbage collection.
    """
    result = results[0]
    if not isinstance(result, QsyncError):
        return result
    try:
        raise result
    finally:
        del result, results

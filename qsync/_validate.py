"""Argument checks shared by every public entry point: durations, times, counts, text."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from .errors import InvalidArgument, InvalidArgumentType, InvalidName

__all__ = ["count", "duration_ms", "epoch_ms", "printable_text"]

# 100 years: a bound that catches unit mistakes (ms passed as seconds twice over) without
# getting in the way of any real schedule.
MAX_DURATION_MS = 100 * 365 * 24 * 3600 * 1000


def duration_ms(value: object, what: str, *, allow_zero: bool = False) -> int:
    """Seconds (int/float) or a timedelta, as whole milliseconds (rounded up, so 0.0004 s
    is 1 ms, never 0 meaning 'none')."""
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise InvalidArgumentType(
            f"{what} must be seconds (int or float) or a timedelta, not {type(value).__name__}"
        )
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidArgument(f"{what} must be a finite number of seconds, got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgument(f"{what} must be {bound} seconds, got {value!r}")
    ms = math.ceil(seconds * 1000)
    if ms > MAX_DURATION_MS:
        raise InvalidArgument(f"{what} of {seconds} seconds is over 100 years; is the unit right?")
    return ms


def epoch_ms(value: object, what: str) -> int:
    """A timezone-aware datetime as milliseconds since the epoch."""
    if not isinstance(value, datetime):
        raise InvalidArgumentType(f"{what} must be a timezone-aware datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise InvalidArgument(
            f"{what} must be timezone-aware (e.g. datetime.now(timezone.utc)); a naive datetime "
            "is ambiguous across the hosts of a fleet"
        )
    return math.floor(value.timestamp() * 1000)


def count(value: object, what: str, *, low: int, high: int) -> int:
    """An int in [low, high]; bool is refused although Python counts it as an int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"{what} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidArgument(f"{what} must be between {low} and {high}, got {value}")
    return value


def printable_text(value: object, what: str, max_bytes: int) -> str:
    """A non-empty str of printable characters (spaces allowed inside), at most max_bytes."""
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{what} must be a str, not {type(value).__name__}")
    if not value.strip():
        raise InvalidName(f"{what} must not be empty or only whitespace")
    if not value.isprintable():
        raise InvalidName(f"{what} {value!r} must not contain control characters")
    size = len(value.encode())
    if size > max_bytes:
        raise InvalidName(f"{what} must be at most {max_bytes} bytes, got {size}")
    return value

"""Retry delay policies (``qsync.backoff.exponential()`` ...): pure functions from the number of
failed attempts so far and the error to seconds."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from . import _validate as check
from .errors import InvalidArgument

__all__ = ["Backoff", "exponential", "fixed", "immediate", "linear", "resolve_delay_ms"]

Backoff = Callable[[int, BaseException], float]
"""A retry policy: given the number of failed attempts before this one (0 for the first
failure) and the error, the seconds to wait before the next attempt."""

MAX_BACKOFF_S = 30 * 24 * 3600.0


def fixed(seconds: float) -> Backoff:
    """The same delay before every retry."""
    delay = check.duration_ms(seconds, "seconds", allow_zero=True) / 1000
    return lambda retried, error: delay


def immediate() -> Backoff:
    """Retry at once."""
    return fixed(0)


def linear(base: float, step: float) -> Backoff:
    """``base + step * retried`` seconds."""
    b = check.duration_ms(base, "base", allow_zero=True) / 1000
    s = check.duration_ms(step, "step", allow_zero=True) / 1000
    return lambda retried, error: b + s * retried


def exponential(base: float = 1.0, factor: float = 2.0, cap: float = 3600.0, jitter: bool = True) -> Backoff:
    """``base * factor ** retried`` seconds, at most ``cap``; with ``jitter`` a random share
    (up to half) is taken off, so a crowd of failed tasks does not retry in lock step."""
    b = check.duration_ms(base, "base", allow_zero=True) / 1000
    c = check.duration_ms(cap, "cap") / 1000
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1 <= factor <= 100:
        raise InvalidArgument(f"factor must be a number from 1 to 100, got {factor!r}")

    def policy(retried: int, error: BaseException) -> float:
        delay = min(c, b * factor ** min(retried, 64))
        return delay * (1 - random.random() / 2) if jitter else delay

    return policy


def resolve_delay_ms(policy: Backoff, retried: int, error: BaseException) -> tuple[int, str | None]:
    """Run a policy defensively: a user function that raises or returns a negative, NaN or huge
    value is clamped to [0, 30 days]. Returns the delay and a warning to log, if any."""
    try:
        value = policy(retried, error)
    except Exception as exc:  # a user policy must not lose the task
        return 0, f"retry policy raised {type(exc).__name__}; retrying at once"
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float is surely beyond the cap
        seconds = math.inf
    except (TypeError, ValueError):
        return 0, f"retry policy returned {type(value).__name__}, not seconds; retrying at once"
    if math.isnan(seconds) or seconds < 0:
        return 0, f"retry policy returned {seconds!r}; using 0"
    if seconds > MAX_BACKOFF_S:
        return int(MAX_BACKOFF_S * 1000), f"retry policy returned {seconds!r}; clamped to 30 days"
    return math.ceil(seconds * 1000), None

"""Weighted queue priority, as a pure function: how many free slots to offer each queue."""

from __future__ import annotations

import random
from collections.abc import Mapping

__all__ = ["allocate", "strict_order"]


def allocate(free: int, weights: Mapping[str, int], rng: random.Random) -> dict[str, int]:
    """Split ``free`` slots among queues in proportion to their weights.

    Each queue gets the whole part of its share; the slots left over are dealt by systematic
    sampling over the parts lost to rounding (``free * w % total``): each queue wins one more
    slot with probability exactly its lost fraction. So over many rounds every queue's share
    matches its weight even when only a few slots are free at a time, and none starves.
    """
    total = sum(weights.values())
    shares = {q: free * w // total for q, w in weights.items()}
    if free - sum(shares.values()):
        # Points offset, offset + total, ... (in units of 1/total of a slot) fall into the
        # queues' fraction intervals laid end to end; as each interval is shorter than total,
        # it holds at most one point, and the points number exactly the slots left.
        offset = rng.randrange(total)
        start = 0
        for q, w in weights.items():
            end = start + free * w % total
            shares[q] += _points_below(end, offset, total) - _points_below(start, offset, total)
            start = end
    return {q: n for q, n in shares.items() if n}


def _points_below(x: int, offset: int, step: int) -> int:
    """How many of offset, offset + step, offset + 2 * step, ... are below ``x``."""
    return max(0, -((offset - x) // step))


def strict_order(weights: Mapping[str, int]) -> list[str]:
    """Queues by weight, highest first (ties in the given order): strict priority drains each
    queue before offering slots to the next."""
    return sorted(weights, key=lambda q: -weights[q])

"""Weighted queue priority, as a pure function: how many free slots to offer each queue."""

from __future__ import annotations

import random
from collections.abc import Mapping

__all__ = ["allocate", "strict_order"]


def allocate(free: int, weights: Mapping[str, int], rng: random.Random) -> dict[str, int]:
    """Split ``free`` slots among queues in proportion to their weights.

    Each queue gets the whole part of its share; the slots left over go one at a time to
    queues drawn at random by weight, so over many rounds every queue's share matches its weight
    even when only one slot is free at a time, and no queue with a weight starves.
    """
    total = sum(weights.values())
    shares = {q: free * w // total for q, w in weights.items()}
    left = free - sum(shares.values())
    if left:
        names, ws = list(weights), list(weights.values())
        for name in rng.choices(names, ws, k=left):
            shares[name] += 1
    return {q: n for q, n in shares.items() if n}


def strict_order(weights: Mapping[str, int]) -> list[str]:
    """Queues by weight, highest first (ties in the given order): strict priority drains each
    queue before offering slots to the next."""
    return sorted(weights, key=lambda q: -weights[q])

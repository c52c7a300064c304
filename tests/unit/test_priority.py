"""Weighted queue priority (qsync._priority): proportional shares, no starvation, strict order.

The statistical checks use a seeded Random, so they are deterministic; their tolerances are
still several standard deviations wide, so a change of seed or of the drawing order cannot make
them flaky."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from qsync._priority import allocate, strict_order

WEIGHTS = {"critical": 6, "default": 3, "low": 1}


def _run_rounds(free: int, weights: dict[str, int], rounds: int, seed: int = 1) -> Counter[str]:
    rng = random.Random(seed)
    totals: Counter[str] = Counter()
    for _ in range(rounds):
        shares = allocate(free, weights, rng)
        assert sum(shares.values()) == free, shares
        assert set(shares) <= set(weights)
        assert all(n > 0 for n in shares.values()), "queues with no slots are left out"
        totals.update(shares)
    return totals


@pytest.mark.parametrize("free", [1, 2, 7, 13])
def test_shares_follow_weights_over_many_rounds(free: int) -> None:
    rounds = 20_000 // free
    totals = _run_rounds(free, WEIGHTS, rounds)
    given = free * rounds
    total_weight = sum(WEIGHTS.values())
    for name, weight in WEIGHTS.items():
        expected = weight / total_weight
        # One slot at a time, 20,000 draws: the standard deviation of a share is at most 0.35
        # points; 3 points of tolerance is more than 8 of them.
        assert abs(totals[name] / given - expected) < 0.03, (name, totals)


def test_whole_shares_are_given_without_drawing() -> None:
    class NoDraws(random.Random):
        def choices(self, *args: object, **kwargs: object) -> list[str]:  # type: ignore[override]
            raise AssertionError("no slot was left over; nothing should be drawn")

    assert allocate(10, WEIGHTS, NoDraws()) == {"critical": 6, "default": 3, "low": 1}
    assert allocate(20, WEIGHTS, NoDraws()) == {"critical": 12, "default": 6, "low": 2}


def test_leftover_slots_go_one_by_one_and_whole_parts_stay() -> None:
    rng = random.Random(7)
    for _ in range(1000):
        shares = allocate(15, WEIGHTS, rng)  # whole parts 9, 4, 1; one slot left over
        assert sum(shares.values()) == 15
        assert shares["critical"] >= 9 and shares["default"] >= 4 and shares["low"] >= 1


def test_no_queue_starves_with_one_free_slot() -> None:
    # Every weighted queue gets slots even when only one slot is free at a time, and even when
    # its weight is tiny next to the others'.
    totals = _run_rounds(1, WEIGHTS, 1000, seed=3)
    assert set(totals) == set(WEIGHTS)
    assert totals["low"] > 50  # expected 100

    skewed = {"huge": 1000, "tiny": 1}
    totals = _run_rounds(1, skewed, 50_000, seed=5)
    assert totals["tiny"] > 0  # expected ~50; P(0) = e^-50

    # The weight-1 queue is served in every window, not only on average.
    rng = random.Random(11)
    window = [next(iter(allocate(1, WEIGHTS, rng))) for _ in range(5000)]
    for start in range(0, 5000, 250):
        assert "low" in window[start : start + 250]  # expected 25 per window


def test_single_queue_gets_everything() -> None:
    rng = random.Random(0)
    for free in (1, 5, 100):
        assert allocate(free, {"only": 4}, rng) == {"only": free}


def test_no_free_slots_gives_nothing() -> None:
    assert allocate(0, WEIGHTS, random.Random(0)) == {}


def test_equal_weights_split_evenly() -> None:
    totals = _run_rounds(1, {"a": 1, "b": 1, "c": 1, "d": 1}, 20_000, seed=9)
    for name in "abcd":
        assert abs(totals[name] / 20_000 - 0.25) < 0.03, totals


def test_seeded_rng_makes_allocation_reproducible() -> None:
    first = [allocate(3, WEIGHTS, rng) for rng in [random.Random(42)] for _ in range(200)]
    second = [allocate(3, WEIGHTS, rng) for rng in [random.Random(42)] for _ in range(200)]
    assert first == second


def test_strict_order_is_by_weight_highest_first() -> None:
    assert strict_order({"low": 1, "critical": 6, "default": 3}) == ["critical", "default", "low"]


def test_strict_order_keeps_the_given_order_on_ties() -> None:
    assert strict_order({"b": 2, "a": 2, "c": 5, "d": 2}) == ["c", "b", "a", "d"]
    assert strict_order({"x": 1}) == ["x"]

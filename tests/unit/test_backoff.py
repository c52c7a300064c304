"""Retry delay policies (qsync.backoff) and the defensive runner for user policies."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

import qsync
from qsync.backoff import MAX_BACKOFF_S, exponential, fixed, immediate, linear, resolve_delay_ms
from qsync.errors import InvalidArgument, InvalidArgumentType

ERR = RuntimeError("boom")
THIRTY_DAYS_MS = 30 * 24 * 3600 * 1000


def test_public_names() -> None:
    assert qsync.backoff.exponential is exponential
    assert MAX_BACKOFF_S * 1000 == THIRTY_DAYS_MS


def test_fixed_is_the_same_every_time() -> None:
    policy = fixed(2.5)
    assert [policy(n, ERR) for n in (0, 1, 10, 10_000)] == [2.5] * 4
    assert fixed(0)(3, ERR) == 0
    assert fixed(timedelta(milliseconds=1500))(0, ERR) == 1.5


def test_immediate_is_zero() -> None:
    assert immediate()(0, ERR) == 0
    assert immediate()(99, ERR) == 0


def test_linear_grows_by_step() -> None:
    policy = linear(1, 2)
    assert [policy(n, ERR) for n in range(4)] == [1, 3, 5, 7]
    assert linear(0, 0.5)(4, ERR) == 2


def test_exponential_without_jitter_doubles_up_to_the_cap() -> None:
    policy = exponential(base=1, factor=2, cap=10, jitter=False)
    assert [policy(n, ERR) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert exponential(base=0.5, factor=3, cap=100, jitter=False)(2, ERR) == 4.5


def test_exponential_survives_huge_attempt_counts() -> None:
    # No OverflowError for a task retried ten thousand times: the exponent is bounded.
    policy = exponential(base=1, factor=100, cap=3600, jitter=False)
    assert policy(10_000, ERR) == 3600
    assert exponential(jitter=False)(10**9, ERR) == 3600


def test_exponential_jitter_takes_off_at_most_half() -> None:
    policy = exponential(base=1, factor=2, cap=3600, jitter=True)
    samples = [policy(3, ERR) for _ in range(2000)]  # 8 s before jitter
    assert all(4 <= s <= 8 for s in samples)
    assert len(set(samples)) > 100, "jitter should spread the delays"
    assert 5.5 < sum(samples) / len(samples) < 6.5  # mean of uniform [4, 8] is 6


def test_exponential_defaults() -> None:
    policy = exponential(jitter=False)
    assert [policy(n, ERR) for n in range(3)] == [1, 2, 4]
    assert policy(20, ERR) == 3600


@pytest.mark.parametrize(
    "make",
    [
        lambda: fixed(-1),
        lambda: fixed(math.nan),
        lambda: fixed(math.inf),
        lambda: linear(-1, 1),
        lambda: linear(1, -1),
        lambda: exponential(base=-1),
        lambda: exponential(cap=0),
        lambda: exponential(factor=0.5),
        lambda: exponential(factor=101),
        lambda: exponential(factor=math.nan),
        lambda: exponential(factor=True),
        lambda: exponential(factor="2"),
    ],
)
def test_bad_policy_arguments_are_refused(make: object) -> None:
    with pytest.raises(InvalidArgument):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("make", [lambda: fixed("1"), lambda: fixed(None), lambda: linear(True, 1)])
def test_wrong_types_are_type_errors(make: object) -> None:
    with pytest.raises(InvalidArgumentType) as info:
        make()  # type: ignore[operator]
    assert isinstance(info.value, TypeError)


# --- resolve_delay_ms: a user's policy must never lose or stall a task ----------------------


def test_resolve_passes_attempts_and_error_to_the_policy() -> None:
    seen: list[tuple[int, BaseException]] = []

    def policy(retried: int, error: BaseException) -> float:
        seen.append((retried, error))
        return 1.5

    assert resolve_delay_ms(policy, 4, ERR) == (1500, None)
    assert seen == [(4, ERR)]


def test_resolve_rounds_up_to_whole_milliseconds() -> None:
    assert resolve_delay_ms(lambda n, e: 0.0004, 0, ERR) == (1, None)
    assert resolve_delay_ms(lambda n, e: 0, 0, ERR) == (0, None)
    assert resolve_delay_ms(lambda n, e: 2, 0, ERR) == (2000, None)


def test_resolve_accepts_the_built_in_policies() -> None:
    assert resolve_delay_ms(fixed(3), 0, ERR) == (3000, None)
    assert resolve_delay_ms(exponential(jitter=False), 2, ERR) == (4000, None)
    assert resolve_delay_ms(immediate(), 7, ERR) == (0, None)


@pytest.mark.parametrize("value", [-1, -0.001, -math.inf, math.nan])
def test_negative_or_nan_is_clamped_to_zero_with_a_warning(value: float) -> None:
    delay, warning = resolve_delay_ms(lambda n, e: value, 0, ERR)
    assert delay == 0
    assert warning is not None and "retry policy" in warning


@pytest.mark.parametrize("value", [MAX_BACKOFF_S + 1, 1e300, math.inf])
def test_huge_is_clamped_to_thirty_days_with_a_warning(value: float) -> None:
    delay, warning = resolve_delay_ms(lambda n, e: value, 0, ERR)
    assert delay == THIRTY_DAYS_MS
    assert warning is not None and "30 days" in warning


def test_exactly_thirty_days_is_not_clamped() -> None:
    assert resolve_delay_ms(lambda n, e: MAX_BACKOFF_S, 0, ERR) == (THIRTY_DAYS_MS, None)


def test_huge_int_is_clamped_to_thirty_days_not_zero() -> None:
    # A policy computing e.g. 10 ** attempts returns a Python int too big for a float. It is a
    # "huge" value and should be clamped like 1e300, not turned into an immediate retry.
    delay, warning = resolve_delay_ms(lambda n, e: 10**400, 0, ERR)
    assert delay == THIRTY_DAYS_MS, warning


@pytest.mark.parametrize(
    "policy",
    [
        lambda n, e: 1 / 0,
        lambda n, e: None,
        lambda n, e: "soon",
        lambda n, e: [1],
    ],
)
def test_raising_or_garbage_policy_retries_at_once_with_a_warning(policy: object) -> None:
    delay, warning = resolve_delay_ms(policy, 0, ERR)  # type: ignore[arg-type]
    assert delay == 0
    assert warning is not None and "retry" in warning


def test_raising_policy_warning_names_the_exception() -> None:
    def policy(retried: int, error: BaseException) -> float:
        raise KeyError("nope")

    delay, warning = resolve_delay_ms(policy, 0, ERR)
    assert delay == 0
    assert warning is not None and "KeyError" in warning


def test_numeric_strings_and_bools_are_read_as_numbers() -> None:
    # float() accepts them; documented here so a change is noticed.
    assert resolve_delay_ms(lambda n, e: "2", 0, ERR) == (2000, None)
    assert resolve_delay_ms(lambda n, e: True, 0, ERR) == (1000, None)

"""ServerConfig: every worker option is validated once, with clear errors of the right class."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest

import qsync
from qsync.backoff import fixed
from qsync.errors import InvalidArgument, InvalidArgumentType, InvalidName
from qsync.server.config import ServerConfig, parse_queues


def test_defaults() -> None:
    config = ServerConfig()
    assert config.queues == {"default": 1}
    assert config.concurrency == 10
    assert config.strict is False
    assert config.lease_duration == 30.0
    assert config.shutdown_timeout == 8.0
    assert config.heartbeat_interval == 10.0
    assert config.recover_interval == 5.0
    assert qsync.ServerConfig is ServerConfig


def test_recover_interval_follows_a_short_lease() -> None:
    config = ServerConfig(lease_duration=1)
    assert config.recover_interval == 0.5
    assert math.isclose(config.heartbeat_interval, 1 / 3)
    assert ServerConfig(lease_duration=1, recover_interval=0.2).recover_interval == 0.2


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ServerConfig({"a": 1})  # type: ignore[misc]


# --- queues ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a=6,b=3", {"a": 6, "b": 3}),
        ("critical=6,default=3,low=1", {"critical": 6, "default": 3, "low": 1}),
        (" a = 6 , b=3 ", {"a": 6, "b": 3}),
        ("only=1000", {"only": 1000}),
        ({"a": 2, "b": 1}, {"a": 2, "b": 1}),
        (["a", "b"], {"a": 1, "b": 1}),
        (("x",), {"x": 1}),
        ("email:out=2", {"email:out": 2}),
    ],
)
def test_queues_are_parsed(value: Any, expected: dict[str, int]) -> None:
    assert ServerConfig(queues=value).queues == expected
    assert list(ServerConfig(queues=value).queues) == list(expected)  # order is kept


@pytest.mark.parametrize(
    "value",
    ["a", "a=", "=", "a=x", "a=1.5", "a=-1", "a=6,,b=3", "a=6;b=3", "", "a=6,b"],
)
def test_malformed_queue_strings_are_invalid(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        ServerConfig(queues=value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", ["a=²", "a=6,b=³"])
def test_superscript_digits_in_queue_strings_are_invalid_argument(value: str) -> None:
    # str.isdigit() accepts "²", which int() refuses: the user must get qsync's InvalidArgument
    # (a QsyncError), not a bare ValueError from int().
    with pytest.raises(InvalidArgument):
        ServerConfig(queues=value)


@pytest.mark.parametrize("weight", [0, -1, 1001, 10**9])
def test_weights_out_of_range_are_invalid(weight: int) -> None:
    with pytest.raises(InvalidArgument, match="weight"):
        ServerConfig(queues={"a": weight})
    with pytest.raises(InvalidArgument):
        ServerConfig(queues=f"a={weight}")


@pytest.mark.parametrize("weight", [1.5, "3", True, None])
def test_weights_of_the_wrong_type_are_type_errors(weight: Any) -> None:
    with pytest.raises(InvalidArgumentType) as info:
        ServerConfig(queues={"a": weight})
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("name", ["", "a b", "a{b", "b}", "tab\there", "x" * 129, "new\nline"])
def test_bad_queue_names_are_invalid(name: str) -> None:
    with pytest.raises(InvalidName):
        ServerConfig(queues={name: 1})


def test_bad_queue_name_in_a_string_is_invalid() -> None:
    with pytest.raises(InvalidName):
        ServerConfig(queues="a{x}=1")
    with pytest.raises(InvalidName):
        ServerConfig(queues="=3")


def test_non_str_queue_name_is_a_type_error() -> None:
    with pytest.raises(InvalidArgumentType):
        ServerConfig(queues={1: 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("value", [{}, []])
def test_no_queues_is_invalid(value: Any) -> None:
    with pytest.raises(InvalidArgument, match="at least one queue"):
        ServerConfig(queues=value)


@pytest.mark.parametrize("value", [5, None, 1.0])
def test_queues_of_the_wrong_type_are_type_errors(value: Any) -> None:
    with pytest.raises(InvalidArgumentType):
        ServerConfig(queues=value)


def test_parse_queues_is_the_same_parser() -> None:
    assert parse_queues("a=6,b=3") == {"a": 6, "b": 3}
    assert parse_queues(["q"]) == {"q": 1}


# --- concurrency ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 50, 100_000])
def test_concurrency_bounds_accepted(value: int) -> None:
    assert ServerConfig(concurrency=value).concurrency == value


@pytest.mark.parametrize("value", [0, -1, 100_001])
def test_concurrency_out_of_bounds_is_invalid(value: int) -> None:
    with pytest.raises(InvalidArgument, match="concurrency"):
        ServerConfig(concurrency=value)


@pytest.mark.parametrize("value", [1.5, "10", True, None])
def test_concurrency_of_the_wrong_type_is_a_type_error(value: Any) -> None:
    with pytest.raises(InvalidArgumentType, match="concurrency"):
        ServerConfig(concurrency=value)


# --- durations ------------------------------------------------------------------------------

DURATIONS = ["lease_duration", "default_timeout", "poll_interval", "registry_interval", "archived_max_age"]


@pytest.mark.parametrize("name", DURATIONS)
def test_durations_take_seconds_or_timedelta(name: str) -> None:
    assert getattr(ServerConfig(**{name: 2}), name) == 2.0
    assert getattr(ServerConfig(**{name: 1.5}), name) == 1.5
    assert getattr(ServerConfig(**{name: timedelta(seconds=3)}), name) == 3.0


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, -math.inf])
def test_bad_durations_are_invalid(name: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=name):
        ServerConfig(**{name: value})


@pytest.mark.parametrize("name", [*DURATIONS, "shutdown_timeout", "recover_interval"])
@pytest.mark.parametrize("value", ["30", True, [1]])
def test_durations_of_the_wrong_type_are_type_errors(name: str, value: Any) -> None:
    with pytest.raises(InvalidArgumentType, match=name):
        ServerConfig(**{name: value})


def test_durations_are_rounded_up_to_milliseconds() -> None:
    assert ServerConfig(lease_duration=0.0501).lease_duration == 0.051
    assert ServerConfig(poll_interval=0.0001).poll_interval == 0.001


def test_lease_duration_has_a_floor() -> None:
    assert ServerConfig(lease_duration=0.05).lease_duration == 0.05
    with pytest.raises(InvalidArgument, match="lease_duration"):
        ServerConfig(lease_duration=0.04)


def test_shutdown_timeout_may_be_zero_but_not_negative() -> None:
    assert ServerConfig(shutdown_timeout=0).shutdown_timeout == 0.0
    assert ServerConfig(shutdown_timeout=timedelta(milliseconds=200)).shutdown_timeout == 0.2
    with pytest.raises(InvalidArgument, match="shutdown_timeout"):
        ServerConfig(shutdown_timeout=-0.1)


@pytest.mark.parametrize("value", [0, -1, math.nan])
def test_bad_recover_interval_is_invalid(value: float) -> None:
    with pytest.raises(InvalidArgument, match="recover_interval"):
        ServerConfig(recover_interval=value)


def test_durations_over_a_century_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="100 years"):
        ServerConfig(default_timeout=200 * 365 * 24 * 3600)


# --- the rest -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, "yes", None])
def test_strict_must_be_a_bool(value: Any) -> None:
    with pytest.raises(InvalidArgumentType, match="strict"):
        ServerConfig(strict=value)
    assert ServerConfig(strict=True).strict is True


@pytest.mark.parametrize(("name", "low"), [("max_recoveries", 1), ("archived_max_count", 0)])
def test_counts_have_lower_bounds(name: str, low: int) -> None:
    assert getattr(ServerConfig(**{name: low}), name) == low
    with pytest.raises(InvalidArgument, match=name):
        ServerConfig(**{name: low - 1})
    with pytest.raises(InvalidArgumentType, match=name):
        ServerConfig(**{name: 1.0})


def test_policies_must_be_callable() -> None:
    assert ServerConfig(retry_policy=fixed(1)).retry_policy(0, RuntimeError()) == 1
    assert ServerConfig(should_retry=lambda e: False).should_retry is not None
    with pytest.raises(InvalidArgumentType, match="retry_policy"):
        ServerConfig(retry_policy=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType, match="should_retry"):
        ServerConfig(should_retry="never")  # type: ignore[arg-type]


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        ServerConfig(concurency=5)  # type: ignore[call-arg]

"""Key names: every Redis key qsync uses is built here, from one hash-tagged prefix per queue.

All keys of a queue start with ``{<prefix>:<queue>}`` so that every script touches one cluster
slot. Names that could break the tag (braces, whitespace, control characters) are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import InvalidArgumentType, InvalidName

__all__ = ["QueueKeys", "keys_for", "registry_key", "validate_name", "validate_prefix"]

MAX_QUEUE_NAME = 128
MAX_PREFIX = 64
# Printable, no whitespace, no braces: a brace would move or split the hash tag (a queue
# named "a}b" would hash like queue "a"), and whitespace invites quoting mistakes in tools.
_NAME = re.compile(r"[^\s{}\x00-\x1f\x7f]+")


def validate_name(value: object, what: str, max_bytes: int) -> str:
    """Return ``value`` if it is a usable name, else raise InvalidName / InvalidArgumentType."""
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidName(f"{what} must not be empty")
    if not _NAME.fullmatch(value) or not value.isprintable():
        raise InvalidName(
            f"{what} {value!r} is not allowed: use printable characters without whitespace or braces "
            "({ and } would break the Redis Cluster hash tag)"
        )
    if len(value.encode()) > max_bytes:
        raise InvalidName(f"{what} must be at most {max_bytes} bytes, got {len(value.encode())}")
    return value


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The keys of one queue. Every key starts with :attr:`tag`, so all hash to one slot."""

    prefix: str
    queue: str
    tag: str
    pending: str
    active: str
    scheduled: str
    retry: str
    archived: str
    completed: str
    paused: str
    wake: str
    task_prefix: str
    unique_prefix: str

    def task(self, task_id: str) -> str:
        """The hash key of one task."""
        return self.task_prefix + task_id

    def unique(self, unique_key: str) -> str:
        """The string key of one unique lock."""
        return self.unique_prefix + unique_key

    def listener_wake(self, listener: str) -> str:
        """One wake-up listener's own list, beside :attr:`wake` in the same slot: a token there
        ends that listener's blocking wait at once (lua/unblock.lua)."""
        return self.wake + ":" + listener

    def owns(self, key: str) -> bool:
        """True when ``key`` carries this queue's hash tag (so it is in the queue's slot)."""
        return key.startswith(self.tag)


def validate_prefix(value: object) -> str:
    """A usable key prefix: a name without ":", which separates it from the queue name in
    the hash tag (else prefix "a:b" with queue "c" and prefix "a" with queue "b:c" would share
    every key)."""
    if not isinstance(value, str):
        return validate_name(value, "prefix", MAX_PREFIX)  # raises InvalidArgumentType
    return _validate_str_prefix(str(value))  # cached: str(value) is hashable, a str subclass too


@lru_cache(maxsize=1024)
def _validate_str_prefix(value: str) -> str:
    prefix = validate_name(value, "prefix", MAX_PREFIX)
    if ":" in prefix:
        raise InvalidName(
            f"prefix {prefix!r} must not contain ':' (it separates the prefix from the queue name "
            "in every key); use '-', '_' or '.' instead"
        )
    return prefix


def keys_for(prefix: str, queue: str) -> QueueKeys:
    """The keys of ``queue`` under ``prefix`` (both validated)."""
    if type(prefix) is str and type(queue) is str:
        return _cached_keys(prefix, queue)  # every enqueue asks: validate a name once
    return _build_keys(prefix, queue)  # raises InvalidArgumentType


@lru_cache(maxsize=1024)
def _cached_keys(prefix: str, queue: str) -> QueueKeys:
    return _build_keys(prefix, queue)


def _build_keys(prefix: str, queue: str) -> QueueKeys:
    validate_prefix(prefix)
    validate_name(queue, "queue name", MAX_QUEUE_NAME)
    tag = "{" + prefix + ":" + queue + "}"
    return QueueKeys(
        prefix=prefix,
        queue=queue,
        tag=tag,
        pending=tag + ":pending",
        active=tag + ":active",
        scheduled=tag + ":scheduled",
        retry=tag + ":retry",
        archived=tag + ":archived",
        completed=tag + ":completed",
        paused=tag + ":paused",
        wake=tag + ":wake",
        task_prefix=tag + ":t:",
        unique_prefix=tag + ":u:",
    )


def registry_key(prefix: str, what: str) -> str:
    """A key that spans queues (the set of known queues, live servers). Only an index, never
    the truth, and never touched by a per-queue script (it lives in another slot)."""
    return "{" + prefix + "}:" + what

"""Fault points for the chaos tests: ``QSYNC_FAULTPOINT=<name>[:<probability>]`` makes the
worker process exit at once (``os._exit(137)``, as a SIGKILL would) when it reaches that point.
Unset (always, outside tests) it costs one attribute check."""

from __future__ import annotations

import os
import random

__all__ = ["POINTS", "hit"]

POINTS = ("after_lease", "before_handler", "after_handler_before_ack", "during_heartbeat")

_spec = os.environ.get("QSYNC_FAULTPOINT", "")
_name, _, _prob = _spec.partition(":")
_armed = _name in POINTS
_probability = float(_prob) if _prob else 1.0


def hit(name: str) -> None:
    """Exit the process if the fault point ``name`` is armed (and the dice say so)."""
    if _armed and name == _name and random.random() < _probability:
        os.write(2, f"qsync: fault point {name} hit, exiting\n".encode())
        os._exit(137)

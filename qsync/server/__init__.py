"""The worker server: processes tasks from weighted queues with leases, heartbeats,
recovery, timeouts, retries and graceful shutdown. Start it with ``Queue.start`` or
``await AsyncQueue.run``; ``qsync worker`` runs it from the command line."""

from __future__ import annotations

from .config import ServerConfig, parse_queues
from .server import Server

__all__ = ["Server", "ServerConfig", "parse_queues"]

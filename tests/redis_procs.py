"""Real redis-server processes for tests: started on free ports in temporary folders, stopped
by pid. A test never touches a Redis it did not start."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

__all__ = ["RedisCluster", "RedisServer", "free_port", "out_of_memory", "require_redis_server"]


def require_redis_server() -> str:
    """The path of redis-server, or a clear error (not a traceback) telling how to get it."""
    path = shutil.which("redis-server")
    if path is None:
        raise SystemExit(
            "qsync tests need Redis 7's redis-server on PATH (e.g. 'apt-get install redis-server'); "
            "the suite starts its own servers and never uses one it did not start"
        )
    return path


def free_port(max_port: int = 65535) -> int:
    """A free TCP port on 127.0.0.1, at most ``max_port`` (a cluster node also needs port + 10000
    for its bus, so cluster nodes ask for ports <= 55535; the kernel's ephemeral range may reach
    60999)."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= max_port:
            return port
    raise RuntimeError(f"no free port <= {max_port} found")


def _wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def out_of_memory(r: redis.Redis) -> None:
    """Make a noeviction Redis refuse every write that needs memory (OOM), as a full one does.

    The limit is one byte rather than "a little under used_memory after filling it": used_memory
    includes buffers Redis does not count against maxmemory (``mem_not_counted_for_evict``: the
    AOF buffer, which grows to megabytes while a slow disk postpones its write), so a limit
    taken from it can stay above the memory Redis compares, and writes go on succeeding."""
    if r.config_get("maxmemory-policy").get("maxmemory-policy") != "noeviction":
        raise RuntimeError("out_of_memory needs a Redis started with --maxmemory-policy noeviction")
    r.config_set("maxmemory", 1)
    try:
        r.set("qsync-test:probe", b"x")
    except redis.exceptions.OutOfMemoryError:
        return
    raise RuntimeError("Redis accepted a write with maxmemory at 1 byte")


class RedisServer:
    """One redis-server on 127.0.0.1:<port> with AOF on and DEBUG allowed (for fault tests).

    The AOF is written before each reply and its fsync left to the kernel (``appendfsync no``):
    a SIGKILL of Redis still keeps every write, and a slow disk cannot make Redis hold its AOF
    writes back (what ``everysec`` does while an fsync lags)."""

    def __init__(self, *extra: str, port: int | None = None, folder: Path | None = None) -> None:
        self.binary = require_redis_server()
        self.folder = folder or Path(tempfile.mkdtemp(prefix="qsync-redis-"))
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--appendonly", "yes", "--appendfsync", "no", "--save", "",
            "--enable-debug-command", "local", "--logfile", str(self.folder / "redis.log"), *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(self.ping, 10, f"redis-server on port {self.port}")
        return self

    def ping(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=0.2) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, **kwargs)  # type: ignore[arg-type]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process (SIGKILL by default) and wait for it."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


# Redis refuses cluster mode on ports above 55535: the cluster bus listens on port + 10000.
_MAX_CLUSTER_PORT = 55535


class RedisCluster:
    """A local Redis Cluster of three masters (optionally with replicas), all started here."""

    def __init__(self, replicas: int = 0) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="qsync-cluster-"))
        self.replicas = replicas
        self.nodes: list[RedisServer] = []

    def start(self) -> RedisCluster:
        count = 3 * (1 + self.replicas)
        for i in range(count):
            folder = self.folder / str(i)
            folder.mkdir()
            config = str(folder / "nodes.conf")
            # A long node timeout: no test here fails a node over, and with a short one a node
            # stalled for two seconds on a loaded machine would be marked failed, its slots
            # CLUSTERDOWN.
            options = (
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "15000",
                "--cluster-config-file",
                config,
            )
            node = RedisServer(*options, port=free_port(_MAX_CLUSTER_PORT), folder=folder)
            self.nodes.append(node.start())
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip

        def ready() -> bool:
            # Every node, not only the first: a node that has not yet learnt the slot map
            # answers CLUSTERDOWN for the slots it does not know.
            for node in self.nodes:
                with node.client() as r:
                    if b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
                        return False
            return True

        _wait_until(ready, 30, "cluster_state:ok on every node")
        return self

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

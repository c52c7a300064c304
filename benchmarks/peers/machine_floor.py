"""The machine's floor for a pick-up: a raw socket blocked in ``BRPOP``, no queue at all.

The producer side (``compare.py``) pushes its ``time.time()`` with ``LPUSH``; this process
receives it with the least Python there is (one ``recv``) and pushes the difference back. What
is left over this path in a queue's latency is the queue's own work, on this machine as it is
that minute (its cores idle or warm).

Usage: ``python machine_floor.py PORT WAKE_KEY LATENCY_KEY``; runs until killed.
"""

from __future__ import annotations

import socket
import sys
import time


def command(*words: str) -> bytes:
    """One command in the Redis protocol (RESP)."""
    out = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def main(port: int, wake_key: str, latency_key: str) -> None:
    waiter = socket.create_connection(("127.0.0.1", port))
    reporter = socket.create_connection(("127.0.0.1", port))
    for sock in (waiter, reporter):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print("ready", flush=True)
    while True:
        waiter.sendall(command("BRPOP", wake_key, "0"))
        reply = waiter.recv(4096)  # *2 $key key $stamp stamp: one small reply, one recv
        now = time.time()
        stamp = float(reply.split(b"\r\n")[-2])
        reporter.sendall(command("RPUSH", latency_key, repr(now - stamp)))
        reporter.recv(64)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])

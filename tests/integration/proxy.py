"""A small TCP proxy between a Redis client and a Redis server, for fault tests (threads, no
asyncio, so it serves the sync and the asyncio client alike).

It forwards bytes both ways and counts the ``EVALSHA`` commands it forwards (in all, and per
connection in ``links``, in the order they were accepted). Three faults:

- ``drop_replies = n``: the next ``n`` connections that send an EVALSHA have it forwarded to
  Redis, but when Redis answers the reply is thrown away and the client's side of the connection
  is closed (the script ran: "applied, reply lost"). The server side is drained until Redis has
  answered everything it was sent, so every command that reached Redis runs.
- ``hold_replies(k)``: replies are held back until the client has sent ``k`` EVALSHA commands
  (a client that pipelines them gets its replies at once; a client that waits for each reply
  before sending the next never sends the k-th, and after ``hold_timeout`` seconds the replies
  are released and ``hold_timed_out`` is set).
- ``cut_replies(n1, n2, ...)``: the next connections that send an EVALSHA get only the first
  n1, n2, ... bytes of Redis's replies from then on; then ``on_cut`` runs (if set) and the
  connection is closed towards the client, which reads what it was given, then the end. Redis
  still gets and runs everything the client sends (its replies are drained).
  ``replies_before_cut`` lists, per cut connection, the complete replies it got before its cut.

Start with ``Proxy(port).start()`` (or ``with Proxy(port) as proxy:``), stop with ``stop()``:
it closes every socket it opened and joins its threads."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from types import TracebackType

import hiredis

__all__ = ["Proxy"]

MARKER = b"EVALSHA"


class _Link:
    """One client connection and its connection to Redis."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.dropping = False
        self.evalsha = 0  # EVALSHA commands forwarded on this connection
        self.cut_at: int | None = None  # bytes of replies it gets from its first EVALSHA on


class Proxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port>; see the module docstring."""

    def __init__(self, target_port: int, *, hold_timeout: float = 10.0) -> None:
        self.target_port = target_port
        self.hold_timeout = hold_timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._links: list[_Link] = []
        self.drop_replies = 0
        self.evalsha_forwarded = 0
        self.replies_dropped = 0
        self.connections = 0
        self._hold_target = 0
        self._hold_seen = 0
        self._hold_released = threading.Event()
        self._hold_released.set()
        self.hold_timed_out = False
        self._cuts: list[int] = []
        self.on_cut: Callable[[], None] | None = None
        self.replies_before_cut: list[int] = []

    # --- control -------------------------------------------------------------------------

    def hold_replies(self, evalsha_count: int) -> None:
        """Hold every reply back until the client has sent ``evalsha_count`` more EVALSHAs."""
        with self._lock:
            self._hold_target = evalsha_count
            self._hold_seen = 0
            self.hold_timed_out = False
            self._hold_released.clear()

    def release(self) -> None:
        """Stop holding replies."""
        with self._lock:
            self._hold_target = 0
            self._hold_released.set()

    def cut_replies(self, *byte_counts: int) -> None:
        """Cut the next connections that send an EVALSHA after so many bytes of replies each."""
        with self._lock:
            self._cuts = list(byte_counts)

    @property
    def links(self) -> list[_Link]:
        """Every connection accepted so far, in order."""
        with self._lock:
            return list(self._links)

    # --- life ----------------------------------------------------------------------------

    def start(self) -> Proxy:
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._hold_released.set()
        with self._lock:
            links = list(self._links)
        for link in links:
            _shutdown(link.client)
            _shutdown(link.server)
        for thread in list(self._threads):
            thread.join(timeout=10)
        self._listener.close()
        for link in links:
            link.client.close()
            link.server.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- threads -------------------------------------------------------------------------

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
                self.connections += 1
            self._spawn(self._client_to_server, link)
            self._spawn(self._server_to_client, link)

    def _client_to_server(self, link: _Link) -> None:
        tail = b""
        try:
            while True:
                data = link.client.recv(65536)
                if not data:
                    break
                window = tail + data
                # The tail is shorter than the marker, so a marker is never counted twice.
                found = window.count(MARKER)
                tail = window[-(len(MARKER) - 1) :]
                if found:
                    self._saw_evalsha(link, found)
                link.server.sendall(data)
        except OSError:
            pass
        # The client is gone: let Redis finish what it was sent, then see the end.
        _shutdown(link.server, socket.SHUT_WR)

    def _saw_evalsha(self, link: _Link, found: int) -> None:
        with self._lock:
            self.evalsha_forwarded += found
            link.evalsha += found
            if self._cuts and link.cut_at is None:
                link.cut_at = self._cuts.pop(0)
            if self.drop_replies > 0 and not link.dropping:
                self.drop_replies -= 1
                link.dropping = True
            if self._hold_target:
                self._hold_seen += found
                if self._hold_seen >= self._hold_target:
                    self._hold_released.set()

    def _server_to_client(self, link: _Link) -> None:
        forwarded = b""  # the replies since the cut was armed
        try:
            while True:
                data = link.server.recv(65536)
                if not data:
                    break
                if link.cut_at is not None:
                    if len(forwarded) + len(data) >= link.cut_at:
                        self._cut(link, forwarded, data[: link.cut_at - len(forwarded)])
                        return
                    forwarded += data
                if link.dropping:
                    # Applied, reply lost: the client sees its connection closed, no reply.
                    with self._lock:
                        self.replies_dropped += 1
                    _shutdown(link.client)
                    self._drain(link)
                    return
                if not self._hold_released.is_set():
                    if not self._hold_released.wait(self.hold_timeout):
                        self.hold_timed_out = True
                        self._hold_released.set()
                link.client.sendall(data)
        except OSError:
            pass
        _shutdown(link.client)

    def _cut(self, link: _Link, forwarded: bytes, last: bytes) -> None:
        """Give the client ``last`` (the replies up to the cut, after the ``forwarded`` ones),
        then its end of the stream; Redis runs the rest of what it was sent, replies drained."""
        link.client.sendall(last)
        reader = hiredis.Reader()
        reader.feed(forwarded + last)
        complete = 0
        while reader.gets() is not False:
            complete += 1
        with self._lock:
            self.replies_before_cut.append(complete)
        if self.on_cut is not None:
            self.on_cut()
        _shutdown(link.client, socket.SHUT_WR)
        self._drain(link)

    def _drain(self, link: _Link) -> None:
        try:
            while link.server.recv(65536):
                pass
        except OSError:
            pass


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass

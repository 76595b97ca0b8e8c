"""How the sync listener reads its pub/sub connection: straight off the socket when it can.

Every time a thread comes back from a blocking call it must take the GIL again, and on a busy
host each take can cost a context switch of the thread that holds it. redis-py reads a reply
with a poll (``can_read``) and then a recv, each its own take; this process' own writes echo
back on the channel, so each write paid for them in the writing thread (~75 µs per write
measured on a 2-core host). ``SocketWire`` blocks in a single ``recv`` with a kernel receive
timeout (``SO_RCVTIMEO``), so a wake-up is one take, and parses every reply that arrived with
hiredis in one go. TLS sockets (and platforms without ``SO_RCVTIMEO``) keep ``ConnectionWire``,
redis-py's own reading.

Given an ``EchoFilter`` (``_wire``, compiled, or its twin ``_wire_py``), ``SocketWire`` reads
through it: the process' own set/delete echoes pass there, without the GIL in the compiled
build, and only the other replies reach hiredis (the caller syncs its positions, see
tiercache.listener). ``TIERCACHE_NO_EXTENSIONS=1`` selects the twin.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from typing import Any

import hiredis
import redis

if os.environ.get("TIERCACHE_NO_EXTENSIONS"):
    from ._wire_py import EchoFilter
else:
    try:
        from ._wire import EchoFilter
    except ImportError:
        if os.environ.get("TIERCACHE_REQUIRE_EXTENSIONS"):
            raise
        from ._wire_py import EchoFilter

__all__ = ["ConnectionWire", "EchoFilter", "SocketWire", "open_wire"]

_CHUNK = 65536


class ConnectionWire:
    """Replies read through the redis-py connection (``can_read`` + ``read_response``)."""

    echoes = None  # no echo filter: every reply comes through

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def send(self, *args: Any) -> None:
        """Send one command."""
        self._conn.send_command(*args)

    def read(self, timeout: float) -> list[Any]:
        """The replies that arrive within ``timeout`` seconds (none: an empty list)."""
        if not self._conn.can_read(timeout=max(0.0, timeout)):
            return []
        return [self._conn.read_response()]


class SocketWire:
    """Replies read off the connection's plain socket with one ``recv`` per wake-up."""

    def __init__(self, conn: Any, echoes: EchoFilter | None = None) -> None:
        self._sock: socket.socket = conn._sock
        self._reader = hiredis.Reader()
        self._rcvtimeo = -1.0
        self._sock.settimeout(None)  # blocking at the OS level: the kernel times the wait
        self.echoes = echoes
        if echoes is not None:
            echoes.reset()  # a new connection: nothing passes until the caller arms it

    def send(self, *args: Any) -> None:
        """Send one command."""
        self._sock.sendall(hiredis.pack_command(args))

    def read(self, timeout: float) -> list[Any]:
        """The replies that arrive within ``timeout`` seconds (none: an empty list)."""
        replies = self._parsed()
        if replies:  # a previous chunk held more than one reply
            return replies
        if timeout <= 0:
            return []
        if timeout != self._rcvtimeo:
            seconds = int(timeout)
            micros = int((timeout - seconds) * 1_000_000) or (0 if seconds else 1)  # 0 0: forever
            self._sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros)
            )
            self._rcvtimeo = timeout
        if self.echoes is not None:
            data = self.echoes.read(self._sock.fileno(), timeout)
            if data == b"":
                return []
        else:
            try:
                data = self._sock.recv(_CHUNK)
            except BlockingIOError:  # the receive timeout passed
                return []
        if not data:
            raise redis.ConnectionError("the server closed the pub/sub connection")
        self._reader.feed(data)
        return self._parsed()

    def _parsed(self) -> list[Any]:
        out: list[Any] = []
        try:
            while (reply := self._reader.gets()) is not False:
                if isinstance(reply, hiredis.ReplyError):
                    raise redis.ResponseError(str(reply))
                out.append(reply)
        except hiredis.ProtocolError as err:
            raise redis.ConnectionError(f"unreadable pub/sub reply: {err}") from err
        return out


def open_wire(conn: Any, echoes: EchoFilter | None = None) -> SocketWire | ConnectionWire:
    """The fastest way to read ``conn`` (connected, nothing sent on it yet); ``echoes`` filters
    a plain socket's replies (a TLS connection does without)."""
    sock = getattr(conn, "_sock", None)
    if (
        isinstance(sock, socket.socket)
        and not isinstance(sock, ssl.SSLSocket)
        and hasattr(socket, "SO_RCVTIMEO")
        and struct.calcsize("ll") == 16
    ):
        return SocketWire(conn, echoes)
    return ConnectionWire(conn)

"""An in-process TCP proxy for fault injection: latency, blackhole (half-open link), cut.

One daemon thread runs a selector loop over every socket; other threads only post commands to it, so
no socket is ever touched by two threads. ``close()`` stops the thread within a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import pytest

from tiercache.server import RedisServer

__all__ = ["TcpProxy", "proxy"]

log = logging.getLogger(__name__)

_CHUNK = 65536
_MAX_QUEUED = 4 * 1024 * 1024  # per direction: stop reading the source beyond this (backpressure)
_IDLE_WAKE = 0.5
_EOF = b""


class _Pipe:
    """One direction of a link: bytes read from ``src`` wait in ``queue`` until due on ``dst``."""

    __slots__ = ("dst", "latency_name", "queue", "queued", "src", "src_eof")

    def __init__(self, src: socket.socket, dst: socket.socket, latency_name: str) -> None:
        """Create an empty pipe."""
        self.src = src
        self.dst = dst
        self.latency_name = latency_name
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.src_eof = False


class _Link:
    """A proxied connection: the client's socket, the upstream socket and the two pipes."""

    __slots__ = ("client", "down", "server", "up")

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        """Create the link and its two directions."""
        self.client = client
        self.server = server
        self.up = _Pipe(client, server, "upstream")
        self.down = _Pipe(server, client, "downstream")


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target_host:target_port`` with injectable faults."""

    def __init__(self, target_host: str, target_port: int, *, connect_timeout: float = 1.0) -> None:
        """Bind a free loopback port and start the forwarding thread."""
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self.host = "127.0.0.1"
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = int(self._listener.getsockname()[1])
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()
        self._commands: list[tuple[Callable[[], None], threading.Event]] = []
        self._links: list[_Link] = []
        self._owner: dict[socket.socket, _Link] = {}
        self._latency = {"upstream": 0.0, "downstream": 0.0}
        self._blackholed = False
        self._stopping = False
        self._closed = False
        self.connections_accepted = 0
        self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._registered: dict[socket.socket, int] = {}
        self._thread = threading.Thread(
            target=self._run, name=f"TcpProxy-{self.port}->{target_port}", daemon=True
        )
        self._thread.start()

    # -- public API ------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) clients should connect to."""
        return self.host, self.port

    @property
    def active_connections(self) -> int:
        """How many proxied connections are open now."""
        return len(self._links)

    @property
    def blackholed(self) -> bool:
        """True while forwarding is stopped."""
        return self._blackholed

    def set_latency(self, seconds: float, *, direction: str = "both") -> None:
        """Delay every chunk by ``seconds`` in ``direction`` ("both": a round trip gains 2x)."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        if direction not in ("both", "upstream", "downstream"):
            raise ValueError("direction must be 'both', 'upstream' or 'downstream'")
        with self._lock:
            for name in ("upstream", "downstream"):
                if direction in ("both", name):
                    self._latency[name] = float(seconds)
        self._wake()

    def blackhole(self) -> None:
        """Stop forwarding in both directions, keeping every socket open (a half-open link)."""
        self._call(lambda: setattr(self, "_blackholed", True))

    def restore(self) -> None:
        """Forward again after :meth:`blackhole` (held bytes then flow, as TCP resends them)."""
        self._call(lambda: setattr(self, "_blackholed", False))

    def cut(self, *, reset: bool = False) -> int:
        """Close every current connection (RST with ``reset``), keep accepting; return how many."""
        closed: list[int] = []

        def _cut() -> None:
            closed.append(len(self._links))
            for link in list(self._links):
                self._close_link(link, reset=reset)

        self._call(_cut)
        return closed[0] if closed else 0

    def close(self, timeout: float = 5.0) -> None:
        """Close every socket and stop the thread; raise if it is not stopped within ``timeout``."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} did not stop within {timeout}s")

    def __enter__(self) -> TcpProxy:
        """Return the running proxy."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the proxy."""
        self.close()

    def __repr__(self) -> str:
        """Describe the proxy."""
        return (
            f"<TcpProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port}"
            f" links={len(self._links)} blackholed={self._blackholed}>"
        )

    # -- command plumbing --------------------------------------------------------------------------

    def _wake(self) -> None:
        """Interrupt the selector."""
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def _call(self, fn: Callable[[], None], timeout: float = 5.0) -> None:
        """Run ``fn`` on the proxy thread and wait until it has run."""
        if self._closed:
            raise RuntimeError("proxy is closed")
        done = threading.Event()
        with self._lock:
            self._commands.append((fn, done))
        self._wake()
        if not done.wait(timeout):
            raise TimeoutError(f"proxy thread did not run a command within {timeout}s")

    # -- the loop (proxy thread only) --------------------------------------------------------------

    def _run(self) -> None:
        """Select over every socket until closed, then close them all."""
        try:
            while not self._stopping:
                self._run_commands()
                timeout = self._update_interest(time.monotonic())
                for key, events in self._sel.select(timeout):
                    self._dispatch(key, events)
        except Exception:  # pragma: no cover - a bug in the proxy must not pass silently
            log.exception("proxy loop crashed")
        finally:
            self._run_commands()
            for link in list(self._links):
                self._close_link(link)
            for sock in (self._listener, self._wake_r, self._wake_w):
                with contextlib.suppress(Exception):
                    self._sel.unregister(sock)
                sock.close()
            self._sel.close()

    def _run_commands(self) -> None:
        """Run the posted commands and signal their callers."""
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, done in commands:
            try:
                fn()
            finally:
                done.set()

    def _update_interest(self, now: float) -> float:
        """Set each socket's selector events; return how long the selector may sleep."""
        wanted: dict[socket.socket, int] = {}
        timeout = _IDLE_WAKE
        for link in self._links:
            for pipe in (link.up, link.down):
                if self._blackholed:
                    continue
                if not pipe.src_eof and pipe.queued < _MAX_QUEUED:
                    wanted[pipe.src] = wanted.get(pipe.src, 0) | selectors.EVENT_READ
                if pipe.queue:
                    due = pipe.queue[0][0]
                    if due <= now:
                        wanted[pipe.dst] = wanted.get(pipe.dst, 0) | selectors.EVENT_WRITE
                    else:
                        timeout = min(timeout, due - now)
        for sock, events in list(self._registered.items()):
            if sock not in wanted:
                self._sel.unregister(sock)
                del self._registered[sock]
            elif wanted[sock] != events:
                self._sel.modify(sock, wanted[sock], sock)
                self._registered[sock] = wanted[sock]
        for sock, events in wanted.items():
            if sock not in self._registered:
                self._sel.register(sock, events, sock)
                self._registered[sock] = events
        return max(timeout, 0.0)

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        """Handle one ready socket."""
        if key.data == "wake":
            with contextlib.suppress(BlockingIOError, OSError):
                while self._wake_r.recv(4096):
                    pass
            return
        if key.data == "listener":
            self._accept()
            return
        sock: socket.socket = key.data
        link = self._owner.get(sock)
        if link is None:
            return
        if events & selectors.EVENT_READ:
            pipe = link.up if sock is link.client else link.down
            if not self._read(link, pipe):
                return
        if events & selectors.EVENT_WRITE:
            pipe = link.down if sock is link.client else link.up
            self._write(link, pipe)

    def _accept(self) -> None:
        """Accept pending clients and connect each to the target."""
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.connections_accepted += 1
            try:
                server = socket.create_connection(
                    (self.target_host, self.target_port), timeout=self.connect_timeout
                )
            except OSError as exc:
                log.debug("proxy %s: upstream connect failed: %s", self.port, exc)
                client.close()
                continue
            for s in (client, server):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server)
            self._links.append(link)
            self._owner[client] = self._owner[server] = link

    def _read(self, link: _Link, pipe: _Pipe) -> bool:
        """Read what the source has and queue it; return False if the link was closed."""
        try:
            data = pipe.src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self._close_link(link)
            return False
        with self._lock:
            delay = self._latency[pipe.latency_name]
        due = time.monotonic() + delay
        if not data:
            pipe.src_eof = True  # forwarded as a close of the whole link once due
        pipe.queue.append((due, data))
        pipe.queued += len(data)
        return True

    def _write(self, link: _Link, pipe: _Pipe) -> None:
        """Send the due chunks; close the link at a forwarded EOF or an error."""
        now = time.monotonic()
        while pipe.queue and pipe.queue[0][0] <= now:
            due, data = pipe.queue[0]
            if data == _EOF:
                self._close_link(link)
                return
            try:
                sent = pipe.dst.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.debug("proxy %s: send failed: %s", self.port, exc)
                self._close_link(link)
                return
            pipe.queued -= sent
            if sent < len(data):
                pipe.queue[0] = (due, data[sent:])
                return
            pipe.queue.popleft()

    def _close_link(self, link: _Link, *, reset: bool = False) -> None:
        """Close both sockets of a link (RST instead of FIN with ``reset``)."""
        if link in self._links:
            self._links.remove(link)
        self._owner.pop(link.client, None)
        self._owner.pop(link.server, None)
        for sock in (link.client, link.server):
            if sock in self._registered:
                with contextlib.suppress(Exception):
                    self._sel.unregister(sock)
                del self._registered[sock]
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    """A :class:`TcpProxy` in front of the test's ``redis_server``, closed after the test."""
    p = TcpProxy(redis_server.host, redis_server.port)
    try:
        yield p
    finally:
        p.close()

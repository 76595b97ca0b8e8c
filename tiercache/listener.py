"""The invalidation listener of the sync driver: one named pub/sub connection in a daemon thread.

It keeps the local tier honest. While it is subscribed, has replayed what it missed and hears its
PINGs answered, it reports the channel healthy; on any trouble (an error, EOF, a PONG that does not
come back within ``health_timeout``, a gap in a partition's sequence) it reports it unhealthy
first, then recovers: resubscribe if the connection is gone, replay the missed messages from the
log, or have the cache flush when the log no longer covers them, and only then report healthy.
The decisions (what is a gap, what to replay) are tiercache.protocol's.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import redis

from .driver import SyncDriver
from .protocol import (
    MAX_MESSAGE_BYTES,
    Invalidation,
    SequenceTracker,
    Verdict,
    parse_message,
    replay_plan,
)
from .wire import ConnectionWire, EchoFilter, SocketWire, open_wire

log = logging.getLogger("tiercache.listener")


class ListenerHandler(Protocol):
    """What the listener tells its cache."""

    def on_unhealthy(self, reason: str) -> None:
        """Stop serving from the local tier (called before anything else on trouble)."""

    def on_healthy(self, recovered: bool) -> None:
        """The channel is whole again: the local tier may serve (``recovered``: after trouble)."""

    def apply(self, msg: Invalidation) -> None:
        """Apply one invalidation (in sequence order)."""

    def own_echo(self, msg: Invalidation) -> bool:
        """Whether ``msg`` (next in sequence) is an echo of this process' write to let pass."""

    def echo_origin(self) -> str | None:
        """The origin whose next-in-sequence set/delete echoes may pass the socket's filter
        without reaching ``apply`` or ``own_echo`` (None: every message reaches them)."""

    def echoes_passed(self, versions: list[int]) -> None:
        """The echoes of these versions passed the filter since the last report, in order."""

    def flush(self, reason: str) -> None:
        """Messages were lost beyond what the log holds: forget the whole local tier."""

    def tick(self) -> None:
        """Called about once per health interval from the listener thread (e.g. heartbeats)."""


class HealthCheckFailed(ConnectionError):
    """A PING on the pub/sub connection got no PONG in time (a dead or half-open link)."""


class Listener:
    """Subscribes to the partitions' channels and feeds invalidations to a handler."""

    def __init__(
        self,
        driver: SyncDriver,
        handler: ListenerHandler,
        *,
        partitions: Sequence[int] = (0,),
        health_interval: float = 1.0,
        health_timeout: float = 1.0,
        subscribe_timeout: float = 2.0,
        max_backoff: float = 1.0,
        name: str = "tiercache-listener",
    ) -> None:
        self._driver = driver
        self._handler = handler
        self._channels = {driver.keys.channel(p): p for p in partitions}
        self._trackers = {p: SequenceTracker() for p in partitions}
        # This process' own echoes pass in the socket's filter (without the GIL when compiled):
        # the writing thread then never waits for this one (see tiercache.wire).
        origin = handler.echo_origin()
        self._echoes = (
            EchoFilter(origin.encode(), list(self._channels), MAX_MESSAGE_BYTES)
            if origin is not None
            else None
        )
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._subscribe_timeout = subscribe_timeout
        self._max_backoff = max_backoff
        self._name = name
        self._stop = threading.Event()
        self._healthy = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._synced_once = False
        self._was_healthy = False
        self._pumping = False
        self.malformed = 0
        self.gaps = 0
        self.disconnects = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close its connection, waiting at most ``timeout`` seconds."""
        self._stop.set()
        self._healthy.clear()
        sock = getattr(self._conn, "_sock", None)
        if sock is not None:  # wake a read that would wait for its timeout; the thread closes
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def healthy(self) -> bool:
        """Whether the channel is whole (subscribed, synced, answering)."""
        return self._healthy.is_set()

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wait_healthy(self, timeout: float) -> bool:
        """Block until healthy or ``timeout`` seconds pass; returns whether healthy."""
        return self._healthy.wait(timeout)

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.02
        while not self._stop.is_set():
            self._was_healthy = False
            try:
                self._session()
            except (redis.RedisError, OSError, ValueError) as err:
                self.disconnects += 1
                reason = f"{type(err).__name__}: {err}"
                self._set_unhealthy(reason)
                log.debug("listener %s lost its channel: %s", self._name, reason)
            finally:
                self._close_connection()
            if self._was_healthy:  # a session that worked: the next reconnect starts quick
                backoff = 0.02
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self._max_backoff)
        self._close_connection()

    def _session(self) -> None:
        """One connection's life: subscribe, catch up, then pump messages until trouble."""
        conn = self._conn = self._driver.listener_connection(self._name)
        wire = open_wire(conn, self._echoes)
        wire.send("SUBSCRIBE", *self._channels)
        self._await_subscriptions(wire)
        if self._stop.is_set():
            return
        for partition in self._trackers:
            self._catch_up(partition)
        self._arm_echoes(wire)
        self._set_healthy()
        self._pumping = True
        try:
            self._pump(wire)
        finally:
            self._pumping = False
            if wire.echoes is not None:  # what passed before the trouble counts
                self._take_echoes(wire.echoes)

    def _await_subscriptions(self, wire: SocketWire | ConnectionWire) -> None:
        pending = set(self._channels)
        deadline = time.monotonic() + self._subscribe_timeout
        while pending and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("no subscription acknowledgement in time")
            for reply in wire.read(min(left, 0.1)):
                if reply[0] == b"subscribe":
                    pending.discard(reply[1])
                elif reply[0] == b"message":  # possible before the last ack (redis#13645)
                    self._on_message(reply[1], reply[2])

    def _pump(self, wire: SocketWire | ConnectionWire) -> None:
        last_ping = time.monotonic()
        pong_due: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            wait = (pong_due if pong_due is not None else last_ping + self._health_interval) - now
            replies = wire.read(min(wait, 0.1))
            if wire.echoes is not None:
                self._take_echoes(wire.echoes)
            for reply in replies:
                kind = reply[0]
                if kind == b"message":
                    self._on_message(reply[1], reply[2])
                elif kind == b"pong":
                    pong_due = None
            if replies:  # positions may have moved (applied, or caught up after a gap)
                self._arm_echoes(wire)
            now = time.monotonic()
            if pong_due is not None and now > pong_due:
                raise HealthCheckFailed(f"no PONG within {self._health_timeout}s")
            if pong_due is None and now - last_ping >= self._health_interval:
                wire.send("PING")
                last_ping = now
                pong_due = now + self._health_timeout
                self._tick()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        partition = self._channels.get(channel)
        if partition is None:
            return
        try:
            inv = parse_message(data)
        except ValueError:
            # Dropped, not fatal: if it hid a genuine message, the next one shows the gap.
            self.malformed += 1
            return
        verdict = self._trackers[partition].classify(inv)
        if verdict is Verdict.APPLY and self._handler.own_echo(inv):
            return
        if verdict is not Verdict.GAP:
            # A STALE number is applied too: dropping a copy is idempotent and costs a miss at
            # most, while ignoring it would lose a genuine message whose number a forged one took.
            self._handler.apply(inv)
        else:
            self.gaps += 1
            self._set_unhealthy(f"{verdict.value} in partition {partition}")
            self._catch_up(partition)
            if self._pumping:  # (while subscribing, the session turns healthy when all caught up)
                self._set_healthy()

    def _catch_up(self, partition: int) -> None:
        """Bring one partition up to its counter: replay from the log, else have the cache flush."""
        tracker = self._trackers[partition]
        current = self._driver.position(partition)
        plan: list[Invalidation] | None = []
        if current != tracker.seq:
            logged = self._driver.logged_since(partition, tracker.seq) if current else []
            plan = replay_plan(tracker.seq, current, logged)
        if plan is None:
            if self._synced_once:  # before the first sync nothing local exists to flush
                self._handler.flush(f"partition {partition}: messages lost beyond the log")
        else:
            for inv in plan:
                self._handler.apply(inv)
        tracker.seq = current

    def _arm_echoes(self, wire: SocketWire | ConnectionWire) -> None:
        """Let the filter pass own echoes from the partitions' current positions."""
        if wire.echoes is not None:
            wire.echoes.arm([self._trackers[p].seq for p in self._channels.values()])

    def _take_echoes(self, echoes: EchoFilter) -> None:
        """Take the positions of the echoes the filter passed (they precede what it handed on)."""
        passed = echoes.take_passed()
        if passed:
            for index, partition in enumerate(self._channels.values()):
                self._trackers[partition].seq = echoes.position(index)
            self._handler.echoes_passed(passed)

    def heard(self, version: int) -> bool:
        """Whether the echo of this process' write at ``version`` passed the filter lately."""
        return self._echoes is not None and self._echoes.heard(version)

    def _tick(self) -> None:
        try:
            self._handler.tick()
        except Exception:  # a heartbeat that fails must not cost the channel
            log.debug("listener tick failed", exc_info=True)

    # -- state ---------------------------------------------------------------------------------

    def _set_unhealthy(self, reason: str) -> None:
        if self._healthy.is_set() or not self._synced_once:
            self._healthy.clear()
            self._handler.on_unhealthy(reason)

    def _set_healthy(self) -> None:
        self._was_healthy = True
        if not self._healthy.is_set() and not self._stop.is_set():
            self._handler.on_healthy(recovered=self._synced_once)
            self._synced_once = True
            self._healthy.set()

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:  # closing a broken connection may fail; nothing to recover
                pass

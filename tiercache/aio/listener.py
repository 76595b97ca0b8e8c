"""The invalidation listener of the asyncio driver: one named pub/sub connection in a task.

The twin of tiercache.listener (same health checks, gap detection and recovery; the decisions
are tiercache.protocol's), as an asyncio task that stops cleanly on ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import redis

from ..listener import HealthCheckFailed
from ..protocol import Invalidation, SequenceTracker, Verdict, parse_message, replay_plan
from .driver import AsyncDriver

log = logging.getLogger("tiercache.listener")


class AsyncListenerHandler(Protocol):
    """What the listener tells its cache."""

    def on_unhealthy(self, reason: str) -> None:
        """Stop serving from the local tier (called before anything else on trouble)."""

    async def on_healthy(self, recovered: bool) -> None:
        """The channel is whole again: the local tier may serve."""

    def apply(self, msg: Invalidation) -> None:
        """Apply one invalidation (in sequence order)."""

    def flush(self, reason: str) -> None:
        """Messages were lost beyond what the log holds: forget the whole local tier."""

    def tick(self) -> None:
        """Called about once per health interval."""


class AsyncListener:
    """Subscribes to the partitions' channels and feeds invalidations to a handler."""

    def __init__(
        self,
        driver: AsyncDriver,
        handler: AsyncListenerHandler,
        *,
        partitions: Sequence[int] = (0,),
        health_interval: float = 1.0,
        health_timeout: float = 1.0,
        subscribe_timeout: float = 5.0,
        max_backoff: float = 1.0,
        name: str = "tiercache-listener",
    ) -> None:
        self._driver = driver
        self._handler = handler
        self._channels = {driver.keys.channel(p): p for p in partitions}
        self._trackers = {p: SequenceTracker() for p in partitions}
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._subscribe_timeout = subscribe_timeout
        self._max_backoff = max_backoff
        self._name = name
        self._stopping = False
        self._healthy = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._synced_once = False
        self._was_healthy = False
        self._pumping = False
        self.malformed = 0
        self.gaps = 0
        self.disconnects = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the task (once), in the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the task and close its connection, waiting at most ``timeout`` seconds."""
        self._stopping = True
        self._healthy.clear()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout)
        await self._close_connection()

    @property
    def healthy(self) -> bool:
        """Whether the channel is whole (subscribed, synced, answering)."""
        return self._healthy.is_set()

    @property
    def alive(self) -> bool:
        """Whether the task runs."""
        return self._task is not None and not self._task.done()

    async def wait_healthy(self, timeout: float) -> bool:
        """Wait until healthy or ``timeout`` seconds pass; returns whether healthy."""
        try:
            await asyncio.wait_for(self._healthy.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.02
        while not self._stopping:
            self._was_healthy = False
            try:
                await self._session()
            except (redis.RedisError, OSError, ValueError) as err:
                self.disconnects += 1
                reason = f"{type(err).__name__}: {err}"
                self._set_unhealthy(reason)
                log.debug("listener %s lost its channel: %s", self._name, reason)
            finally:
                await self._close_connection()
            if self._stopping:
                break
            if self._was_healthy:
                backoff = 0.02
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _session(self) -> None:
        conn = self._conn = await self._driver.listener_connection(self._name)
        await conn.send_command("SUBSCRIBE", *self._channels)
        await self._await_subscriptions(conn)
        for partition in self._trackers:
            await self._catch_up(partition)
        await self._set_healthy()
        self._pumping = True
        try:
            await self._pump(conn)
        finally:
            self._pumping = False

    async def _await_subscriptions(self, conn: Any) -> None:
        pending = set(self._channels)
        deadline = time.monotonic() + self._subscribe_timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("no subscription acknowledgement in time")
            reply = await conn.read_response(timeout=min(left, 0.1))
            if reply is None:
                continue
            if reply[0] == b"subscribe":
                pending.discard(reply[1])
            elif reply[0] == b"message":
                await self._on_message(reply[1], reply[2])

    async def _pump(self, conn: Any) -> None:
        last_ping = time.monotonic()
        pong_due: float | None = None
        while not self._stopping:
            now = time.monotonic()
            wait = (pong_due if pong_due is not None else last_ping + self._health_interval) - now
            reply = await conn.read_response(timeout=max(0.001, min(wait, 0.1)))
            if reply is not None:
                kind = reply[0]
                if kind == b"message":
                    await self._on_message(reply[1], reply[2])
                elif kind == b"pong":
                    pong_due = None
            now = time.monotonic()
            if pong_due is not None and now > pong_due:
                raise HealthCheckFailed(f"no PONG within {self._health_timeout}s")
            if pong_due is None and now - last_ping >= self._health_interval:
                await conn.send_command("PING")
                last_ping = now
                pong_due = now + self._health_timeout
                self._tick()

    async def _on_message(self, channel: bytes, data: bytes) -> None:
        partition = self._channels.get(channel)
        if partition is None:
            return
        try:
            inv = parse_message(data)
        except ValueError:
            self.malformed += 1
            return
        verdict = self._trackers[partition].classify(inv)
        if verdict is not Verdict.GAP:  # STALE too: see tiercache.listener
            self._handler.apply(inv)
        else:
            self.gaps += 1
            self._set_unhealthy(f"{verdict.value} in partition {partition}")
            await self._catch_up(partition)
            if self._pumping:
                await self._set_healthy()

    async def _catch_up(self, partition: int) -> None:
        tracker = self._trackers[partition]
        current = await self._driver.position(partition)
        plan: list[Invalidation] | None = []
        if current != tracker.seq:
            logged = await self._driver.logged_since(partition, tracker.seq) if current else []
            plan = replay_plan(tracker.seq, current, logged)
        if plan is None:
            if self._synced_once:
                self._handler.flush(f"partition {partition}: messages lost beyond the log")
        else:
            for inv in plan:
                self._handler.apply(inv)
        tracker.seq = current

    def _tick(self) -> None:
        try:
            self._handler.tick()
        except Exception:
            log.debug("listener tick failed", exc_info=True)

    # -- state ---------------------------------------------------------------------------------

    def _set_unhealthy(self, reason: str) -> None:
        if self._healthy.is_set() or not self._synced_once:
            self._healthy.clear()
            self._handler.on_unhealthy(reason)

    async def _set_healthy(self) -> None:
        self._was_healthy = True
        if not self._healthy.is_set() and not self._stopping:
            await self._handler.on_healthy(recovered=self._synced_once)
            self._synced_once = True
            self._healthy.set()

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

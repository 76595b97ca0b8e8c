"""Stampede protection inside one event loop: single-flight loads and background refreshes.

The asyncio twins of tiercache.stampede. A shared load runs as a task of its own, which its
callers await through ``asyncio.shield``: a caller that is cancelled (or times out) leaves the
load running for the others, and no caller's cancellation reaches it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from ..errors import CacheUnavailable

log = logging.getLogger("tiercache.stampede")


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation request pending (Python >= 3.11)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


class AsyncSingleFlight:
    """Concurrent calls for one key share one task's result (or exception)."""

    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Task[Any]] = {}
        self._closed = False

    async def run(
        self,
        key: Hashable,
        fn: Callable[[], Awaitable[Any]],
        wait: float,
        fallback: Callable[[], Awaitable[Any]] | None = None,
    ) -> Any:
        """``await fn()`` once for all concurrent callers of ``key``.

        The first caller starts the load as a task and waits for it; a caller that joins it
        waits at most ``wait`` seconds, then runs ``fallback()`` (default ``fn()``) itself, so a
        stuck load cannot strand the others. A cancelled caller (the first included) does not
        cancel the load. If the load itself is cancelled while callers still wait, the next of
        them starts it again; after ``close()`` they get CacheUnavailable.
        """
        while True:
            if self._closed:
                raise CacheUnavailable("the cache was closed")
            task = self._calls.get(key)
            leader = task is None
            if task is None:
                task = asyncio.ensure_future(fn())
                self._calls[key] = task
                task.add_done_callback(lambda t, key=key: self._done(key, t))
            try:
                if leader:
                    return await asyncio.shield(task)
                return await asyncio.wait_for(asyncio.shield(task), wait)
            except asyncio.TimeoutError:
                return await (fallback or fn)()
            except asyncio.CancelledError:
                if task.cancelled() and not _being_cancelled():
                    # The load was cancelled, not this caller: lead a new one (the done callback
                    # may not have run yet: a cancelled task must not be awaited again).
                    if self._calls.get(key) is task:
                        del self._calls[key]
                    continue
                raise

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._calls.get(key) is task:  # (the in-flight map never keeps a finished load)
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved: a load nobody awaits any more must not log an error

    async def close(self, timeout: float = 2.0) -> None:
        """Cancel the loads in flight and wait for them (at most ``timeout`` seconds)."""
        self._closed = True
        tasks = list(self._calls.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def __len__(self) -> int:
        return len(self._calls)


class AsyncRefresher:
    """Runs background refreshes as tasks, one at a time per key, at most ``backlog`` at once."""

    def __init__(self, backlog: int = 1000) -> None:
        self._backlog = backlog
        self._pending: set[Hashable] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def submit(self, key: Hashable, fn: Callable[[], Awaitable[None]]) -> bool:
        """Start ``fn()`` unless a refresh of ``key`` runs; whether it was started."""
        if self._closed or key in self._pending or len(self._pending) >= self._backlog:
            return False
        self._pending.add(key)
        task = asyncio.ensure_future(self._work(key, fn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _work(self, key: Hashable, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except Exception:  # a refresh failure must not surface; the value stays
            log.debug("background refresh of %r failed", key, exc_info=True)
        finally:
            self._pending.discard(key)

    async def close(self, timeout: float = 2.0) -> None:
        """Cancel the refreshes that run and wait for them (at most ``timeout`` seconds)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    @property
    def pending(self) -> int:
        """Refreshes running."""
        return len(self._pending)

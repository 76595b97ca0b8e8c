"""Stampede protection inside one process: single-flight loads and background refreshes.

Across processes the fill lease (lua/lease.lua, lua/fill.lua) and the refresh marker do the same
job; this module keeps one process from sending N identical loads to begin with.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

log = logging.getLogger("tiercache.stampede")


class SingleFlight:
    """Concurrent calls for one key share the first caller's result (or exception)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, Future[Any]] = {}

    def run(
        self,
        key: Hashable,
        fn: Callable[[], Any],
        wait: float,
        fallback: Callable[[], Any] | None = None,
    ) -> Any:
        """``fn()`` once for all concurrent callers of ``key``.

        A caller that joins a call in flight waits at most ``wait`` seconds for it, then runs
        ``fallback()`` (default ``fn()``) itself, so a stuck leader cannot strand the others.
        The leader's exception reaches every waiter and is not remembered: the next call tries
        again.
        """
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = self._calls[key] = Future()
        if not leader:
            try:
                return call.result(timeout=wait)
            except FutureTimeout:
                return (fallback or fn)()
        try:
            result = fn()
        except BaseException as err:
            call.set_exception(err)
            raise
        else:
            call.set_result(result)
            return result
        finally:
            with self._lock:
                if self._calls.get(key) is call:
                    del self._calls[key]

    def __len__(self) -> int:
        return len(self._calls)


class Refresher:
    """Runs background refreshes on a few daemon threads, one at a time per key.

    Bounded: at most ``backlog`` refreshes wait; more are dropped (the value is still served,
    and the next read asks again).
    """

    def __init__(self, workers: int = 2, backlog: int = 1000, name: str = "tiercache") -> None:
        self._queue: queue.Queue[tuple[Hashable, Callable[[], None]] | None] = queue.Queue(backlog)
        self._pending: set[Hashable] = set()
        self._lock = threading.Lock()
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._name = name
        self._closed = False

    def submit(self, key: Hashable, fn: Callable[[], None]) -> bool:
        """Queue ``fn`` unless a refresh of ``key`` is already pending; whether it was queued."""
        with self._lock:
            if self._closed or key in self._pending:
                return False
            self._pending.add(key)
            if len(self._threads) < self._workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}-refresh", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        try:
            self._queue.put_nowait((key, fn))
        except queue.Full:
            with self._lock:
                self._pending.discard(key)
            return False
        return True

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, fn = item
            try:
                fn()
            except Exception:  # a refresh failure must not kill the worker; the value stays
                log.debug("background refresh of %r failed", key, exc_info=True)
            finally:
                with self._lock:
                    self._pending.discard(key)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the workers (waiting at most ``timeout`` seconds for running refreshes)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                break
        for thread in threads:
            thread.join(timeout)

    @property
    def pending(self) -> int:
        """Refreshes queued or running."""
        return len(self._pending)

"""AsyncTieredCache behind TieredCache's sync API, so one test body runs against both drivers.

``SyncFacade(url, **options)`` makes an AsyncTieredCache on a private event loop in a thread of
its own and runs every call's coroutine there (``run_coroutine_threadsafe`` with a deadline).
Calls from several threads become concurrent tasks of that one loop, which is how an asyncio
service meets its cache. The loop records what asyncio would only log (a task destroyed while
pending, an exception nobody retrieved), and ``close()`` fails the test if anything was.

``make_cache(impl, url, **options)`` is what the parametrized fixtures call (``impl``: "sync" or
"async").
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from typing import Any, TypeVar

from tiercache.aio import AsyncTieredCache
from tiercache.tiered import TieredCache

T = TypeVar("T")

CALL_DEADLINE = 60.0  # no call of a test waits longer than this for the loop
_MISS: Any = object()


def _as_caller(loader: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``loader``, run (in the cache's worker thread) under its caller's thread name.

    TieredCache calls a loader in the calling thread; tests tell callers apart by thread name.
    A background refresh runs in the cache's own threads (named ``tiercache...``), as there.
    """
    if asyncio.iscoroutinefunction(loader):
        return loader
    name = threading.current_thread().name

    def call(key: Any) -> Any:
        thread = threading.current_thread()
        if thread.name.startswith("tiercache"):
            return loader(key)
        own, thread.name = thread.name, name
        try:
            return loader(key)
        finally:
            thread.name = own

    return call


class LoopThread:
    """A private event loop running in a daemon thread, with loop errors recorded."""

    def __init__(self, name: str = "tiercache-test-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise TimeoutError("the test's event loop did not start")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_DEADLINE) -> T:
        """Run ``coro`` on the loop and return its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what is left, shut the default executor, stop and close the loop."""
        if self.loop.is_closed():
            return

        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            await self.loop.shutdown_default_executor()

        try:
            self.run(finish(), 15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
        gc.collect()  # a pending task destroyed now would still reach the handler

    def check(self) -> None:
        """Fail if the loop reported an error (a pending task destroyed, an unretrieved one)."""
        if self.errors:
            raise AssertionError(f"the event loop reported: {self.errors!r}")


class SyncFacade(MutableMapping):  # type: ignore[type-arg]
    """An AsyncTieredCache used through TieredCache's sync API."""

    def __init__(self, redis: Any = None, **options: Any) -> None:
        self._loop = LoopThread()

        async def make() -> AsyncTieredCache:
            cache = AsyncTieredCache(redis, **options)
            await cache.start()  # TieredCache waits for its channel in __init__ too
            return cache

        try:
            self.impl: AsyncTieredCache = self._loop.run(make())
        except BaseException:
            self._loop.close()
            raise
        self._closed = False

    _OWN = frozenset({"_loop", "impl", "_closed"})

    def __setattr__(self, name: str, value: Any) -> None:
        # Tests replace internals (``cache._random = ...``): on the cache, not on the facade.
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.impl, name, value)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_DEADLINE) -> T:
        return self._loop.run(coro, timeout)

    # -- TieredCache's API ----------------------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        value = self._run(self.impl.get(key, _MISS))
        if value is _MISS:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._run(self.impl.get(key, default))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._run(self.impl.set(key, value))

    def set(self, key: Any, value: Any, ttl: Any = None, **kwargs: Any) -> None:
        self._run(self.impl.set(key, value, ttl, **kwargs))

    def __delitem__(self, key: Any) -> None:
        self._run(self.impl.delete(key))

    def invalidate(self, key: Any) -> bool:
        return self._run(self.impl.invalidate(key))

    def write_around(self, key: Any) -> bool:
        return self._run(self.impl.write_around(key))

    def invalidate_tag(self, tag: str) -> None:
        self._run(self.impl.invalidate_tag(tag))

    def bump_namespace(self) -> int:
        return self._run(self.impl.bump_namespace())

    def get_or_load(
        self, key: Any, loader: Callable[[Any], Any], ttl: Any = None, **kwargs: Any
    ) -> Any:
        return self._run(self.impl.get_or_load(key, _as_caller(loader), ttl, **kwargs))

    def get_many(self, keys: Any) -> dict[Any, Any]:
        return self._run(self.impl.get_many(keys))

    def get_or_load_many(self, keys: Any, loader_many: Any, ttl: float | None = None) -> Any:
        return self._run(self.impl.get_or_load_many(keys, loader_many, ttl))

    def clear(self) -> None:
        self._run(self.impl.clear())

    def clear_prefix(self, prefix: bytes) -> None:
        self._run(self.impl.clear_prefix(prefix))

    def __contains__(self, key: object) -> bool:
        return self._run(self.impl.contains(key))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._run(self.impl.count())

    def __iter__(self) -> Iterator[Any]:
        async def keys() -> list[Any]:
            return [k async for k in self.impl]

        return iter(self._run(keys()))

    def wait_ready(self, timeout: float = 5.0) -> bool:
        return self._run(self.impl.wait_ready(timeout), timeout + CALL_DEADLINE)

    def heartbeat(self) -> None:
        self._run(self.impl.heartbeat())

    def stats(self) -> dict[str, Any]:
        return self.impl.stats()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self.impl.aclose())
        finally:
            self._loop.close()
        self._loop.check()

    def __enter__(self) -> SyncFacade:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _driver(self) -> Any:
        """The async driver, its coroutine methods run to completion (tests call it directly)."""
        return _Awaited(self.impl._driver, self._loop)

    def __getattr__(self, name: str) -> Any:
        # Properties and internals the tests inspect (local, namespace, _guard, _flights...).
        return getattr(self.impl, name)

    def __repr__(self) -> str:
        return f"SyncFacade({self.impl!r})"


class _Awaited:
    """An object whose methods' coroutines are run on ``loop`` and their results returned."""

    def __init__(self, target: Any, loop: LoopThread) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            return self._loop.run(result) if asyncio.iscoroutine(result) else result

        return call


def make_cache(impl: str, redis: Any = None, **options: Any) -> Any:
    """A TieredCache ("sync") or an AsyncTieredCache behind a SyncFacade ("async")."""
    if impl == "sync":
        return TieredCache(redis, **options)
    if impl == "async":
        return SyncFacade(redis, **options)
    raise ValueError(f"unknown cache implementation {impl!r}")

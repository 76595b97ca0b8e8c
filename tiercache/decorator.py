"""``@tiered_cache``: memoize a function in a TieredCache, coherent across processes.

Each decorated function has its own local tier, keyed as ``functools.lru_cache`` keys it (a
single str or int argument is its own key), so a local hit costs about what an lru_cache hit
does; the hit path is in C (tiercache.local.CallFront). In Redis, a call is the key
``(CALL_MARK, qualified name, args, kwargs)`` (or ``(CALL_MARK, name, "key=", key(...))`` with a
``key=`` function); the cache routes invalidations of those keys to the function's local tier.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import types
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

from ._sentinel import MISSING
from .aio.stampede import AsyncSingleFlight
from .aio.tiered import AsyncTieredCache
from .errors import CacheUnavailable
from .keys import encode_key
from .local import CallFront, LocalCache, install_fast_call
from .tiered import CALL_MARK, TieredCache, _PendingLoad

_KEY_FN = "key="  # the third element of a Redis call key made by a key= function
# Separators inside local keys: objects no argument can equal, so the parts of a key can never
# be confused (as functools' kwd_mark).
_KW_MARK = object()
_KEY_MARK = object()


class CacheInfo(NamedTuple):
    """functools' cache_info fields, then the split of hits between the two tiers."""

    hits: int
    misses: int
    maxsize: int
    currsize: int
    local_hits: int
    remote_hits: int
    loads: int


class _CallKey(list):  # type: ignore[type-arg]
    """A local key of several parts: a list never equals a str or an int key (as in functools)."""

    __slots__ = ("hashvalue",)

    def __init__(self, parts: tuple[Any, ...]) -> None:
        super().__init__(parts)
        self.hashvalue = hash(parts)

    def __hash__(self) -> int:  # type: ignore[override]
        return self.hashvalue


class _CallError(Exception):
    """Carries the decorated function's own exception through the cache's loader machinery."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def _canonical(value: Any) -> Any:
    """The representative of ``value`` among the values equal to it (1, 1.0 and True: 1)."""
    t = type(value)
    if t is bool:
        return int(value)
    if t is float and value.is_integer():
        return int(value)
    if t is tuple:
        return tuple(_canonical(v) for v in value)
    return value


class _Keys:
    """How a function's calls become local keys and Redis keys.

    Arguments are bound to the function's parameters first, so ``f(1)``, ``f(x=1)`` and
    ``f(*[1])`` are one call; keyword-only arguments go in any order. Defaults are not filled
    in: ``f(1)`` and ``f(1, y=2)`` are two keys even when 2 is y's default (as in functools).
    """

    def __init__(
        self,
        name: str,
        typed: bool,
        key: Callable[..., Any] | None,
        signature: inspect.Signature | None,
    ) -> None:
        self.name = name
        self.typed = typed
        self.key = key
        self.signature = signature

    def of_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Hashable, tuple]:
        """(local key, Redis key) of a call."""
        if self.key is not None:
            k = self.key(*args, **kwargs)
            return self.local(_KEY_FN, k), (CALL_MARK, self.name, _KEY_FN, k)
        if kwargs and self.signature is not None:
            bound = self.signature.bind(*args, **kwargs)  # TypeError, as the call would
            args, kwargs = bound.args, bound.kwargs
        if not self.typed:
            args = tuple(_canonical(a) for a in args)
            kwargs = {k: _canonical(v) for k, v in kwargs.items()}
        kw = tuple(part for item in sorted(kwargs.items()) for part in item)
        return self.local(args, kw), (CALL_MARK, self.name, args, kw)

    def local(self, args: Any, kw: Any) -> Hashable:
        """The local key of the Redis key ``(CALL_MARK, name, args, kw)``."""
        if type(args) is str:  # the Redis key was (CALL_MARK, name, "key=", key)
            t = type(kw)
            return kw if t is str or t is int else _CallKey((_KEY_MARK, kw))
        if not kw and len(args) == 1 and type(args[0]) in (str, int):
            return args[0]  # as CallFront looks it up: the argument itself
        parts = (*args, _KW_MARK, *kw) if kw else args
        if self.typed:
            parts += tuple(type(p) for p in parts)
        return _CallKey(parts)


class _Memoized:
    """What the three kinds of cached function share: their set-up, keys and bookkeeping."""

    _fn: Callable[..., Any]
    _tiered: Any
    _keys: _Keys
    local: LocalCache

    def __init__(
        self,
        fn: Callable[..., Any],
        cache: Any,
        *,
        ttl: float | None,
        key: Callable[..., Any] | None,
        typed: bool,
        local_maxsize: int,
        name: str | None,
        owns_cache: bool,
    ) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._tiered = cache
        self._ttl = ttl
        self._owns_cache = owns_cache
        self._keys = _Keys(name or _qualified(fn), typed, key, _signature(fn))
        self._local_maxsize = local_maxsize
        self._remote_hits = 0
        self._loads = 0
        self._start()
        cache.register_subtier(self._keys.name, self)

    def _start(self) -> None:
        """The kind's own set-up (its local tier first), before it is registered."""
        self._rebind_local()

    def _rebind_local(self) -> None:
        """A fresh local tier (at creation, and in a forked child)."""
        self.local = LocalCache(self._local_maxsize, **self._tiered._l1_args)

    def local_key_of(self, key: tuple[Any, ...]) -> Hashable:
        """The local key of a call key (for the cache's invalidation routing)."""
        return self._keys.local(key[2], key[3])

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else types.MethodType(self, obj)

    def cache_info(self) -> CacheInfo:
        """Hits and misses (functools' fields), and the hits of each tier."""
        local = self.local.stats()
        return CacheInfo(
            hits=local["hits"] + self._remote_hits,
            misses=self._loads,
            maxsize=self.local.maxsize,
            currsize=len(self.local),
            local_hits=local["hits"],
            remote_hits=self._remote_hits,
            loads=self._loads,
        )

    def __repr__(self) -> str:
        return f"<tiered_cache {self._keys.name} of {self._tiered!r}>"


@install_fast_call
class CachedFunction(CallFront, _Memoized):
    """A function memoized in a TieredCache (see ``tiered_cache``)."""

    def _start(self) -> None:
        self._lock = threading.Lock()
        self._rebind_local()

    def _rebind_local(self) -> None:
        """A fresh local tier (at creation, and in a forked child)."""
        l1 = LocalCache(self._local_maxsize, **self._tiered._l1_args)
        self._call_front_init(l1, self._tiered, self._keys.key is None)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> Any:
        """A call the C front did not answer from the local tier."""
        kwargs = kwargs or {}
        _, rkey = self._keys.of_call(args, kwargs)
        cache = self._tiered
        if cache._local_usable:  # a local hit the C path could not take: counted once, here
            lkey = cache._slot(rkey, encode_key(rkey)).key
            e = self.local.entry(lkey)
            if e is not None and e.fresh_until > self.local.timer():
                return self.local.get(lkey, e.value)
        loaded = False

        def load(_key: Any) -> Any:
            nonlocal loaded
            loaded = True
            try:
                return self._fn(*args, **kwargs)
            except Exception as err:  # a KeyError of the function is not a cache miss
                raise _CallError(err) from err

        try:
            value = self._tiered._read(rkey, load, self._ttl)
        except _CallError as err:
            self._count(True)  # a call that raised is a miss, as in functools
            raise err.error from None
        self._count(loaded)
        return value

    def _count(self, loaded: bool) -> None:
        with self._lock:
            if loaded:
                self._loads += 1
            else:
                self._remote_hits += 1

    def cache_clear(self) -> None:
        """Forget this function's results in Redis and in every process' local tier."""
        self._tiered.clear_prefix(encode_key((CALL_MARK, self._keys.name)))

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Forget the result of one call, everywhere; whether it was cached anywhere."""
        _, rkey = self._keys.of_call(args, kwargs)
        return self._tiered.invalidate(rkey)

    def close(self) -> None:
        """Close the cache if this decorator created it."""
        self._tiered.unregister_subtier(self._keys.name)
        if self._owns_cache:
            self._tiered.close()


class AsyncCachedFunction(_Memoized):
    """An ``async def`` function memoized in a TieredCache.

    A local hit answers at once; a miss reads Redis and, on a miss there, runs the coroutine
    once per process (concurrent callers await the same task, which a cancelled caller does
    not cancel) under the cache's fill lease, with the Redis calls in a worker thread.
    """

    def _start(self) -> None:
        self._rebind_local()
        self._flights: dict[Hashable, asyncio.Future[Any]] = {}
        _mark_coroutine_function(self)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lkey, rkey = self._keys.of_call(args, kwargs)
        if self._tiered._local_usable:
            e = self.local.entry(lkey)
            if e is not None and e.fresh_until > self.local.timer() and e.value is not MISSING:
                return self.local.get(lkey, e.value)
        flight = self._flights.get(rkey)
        if flight is None:
            flight = asyncio.ensure_future(self._miss(rkey, args, kwargs))
            self._flights[rkey] = flight
            flight.add_done_callback(lambda _f: self._flights.pop(rkey, None))
        return await asyncio.shield(flight)

    async def _miss(self, rkey: tuple[Any, ...], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        cache = self._tiered
        try:
            value = await asyncio.to_thread(cache._read, rkey, None, self._ttl)
        except CacheUnavailable:
            # Redis failed the read and no recent local copy stands in (stale_if_error): the
            # function answers, as the sync path's loader does (SPEC 3.6); once per process.
            self._loads += 1
            return await self._fn(*args, **kw)
        if value is not MISSING:
            self._remote_hits += 1
            return value
        encoded = encode_key(rkey)
        slot = cache._slot(rkey, encoded)
        pending = await asyncio.to_thread(cache._begin_load, rkey, encoded, slot, self._ttl)
        if not isinstance(pending, _PendingLoad):  # a value arrived while we waited the lease
            self._remote_hits += 1
            return pending
        self._loads += 1
        try:
            value = await self._fn(*args, **kw)
        except BaseException:
            await asyncio.to_thread(_release_pending, cache, pending)
            raise
        return await asyncio.to_thread(cache._finish_load, pending, value)

    cache_clear = CachedFunction.cache_clear  # the same calls: a TieredCache does them
    invalidate = CachedFunction.invalidate
    close = CachedFunction.close


class AioCachedFunction(_Memoized):
    """An ``async def`` function memoized in an AsyncTieredCache (no worker threads).

    A local hit answers at once; concurrent misses of one call share one task (a cancelled
    caller does not cancel it) that reads Redis and, on a miss there, awaits the function under
    the fill lease. ``cache_clear()`` and ``invalidate(...)`` are coroutines.
    """

    def _start(self) -> None:
        self._rebind_local()
        self._flights = AsyncSingleFlight()
        _mark_coroutine_function(self)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        lkey, rkey = self._keys.of_call(args, kwargs)
        cache = self._tiered
        if cache._local_usable:
            e = self.local.entry(lkey)
            if e is not None and e.fresh_until > self.local.timer() and e.value is not MISSING:
                return self.local.get(lkey, e.value)
        # Concurrent calls share one miss, Redis read included (a task no caller's
        # cancellation reaches); a caller that joined waits at most lease_wait, then runs its
        # own miss, whose load the cache's own single-flight and the fill lease still share.
        return await self._flights.run(
            rkey, lambda: self._miss(rkey, args, kwargs), wait=cache._lease_wait
        )

    async def _miss(self, rkey: tuple[Any, ...], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        """Redis, then the function under the fill lease; counted once per shared miss."""
        loaded = False

        async def load(_key: Any) -> Any:
            nonlocal loaded
            loaded = True
            try:
                return await self._fn(*args, **kw)
            except Exception as err:  # a KeyError of the function is not a cache miss
                raise _CallError(err) from err

        try:
            value = await self._tiered._read(rkey, load, self._ttl)
        except _CallError as err:
            self._loads += 1  # a call that raised is a miss, as in functools
            raise err.error from None
        if loaded:
            self._loads += 1
        else:
            self._remote_hits += 1
        return value

    async def cache_clear(self) -> None:
        """Forget this function's results in Redis and in every process' local tier."""
        await self._tiered.clear_prefix(encode_key((CALL_MARK, self._keys.name)))

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Forget the result of one call, everywhere; whether it was cached anywhere."""
        _, rkey = self._keys.of_call(args, kwargs)
        return await self._tiered.invalidate(rkey)

    async def aclose(self) -> None:
        """Close the cache if this decorator created it."""
        self._tiered.unregister_subtier(self._keys.name)
        if self._owns_cache:
            await self._tiered.aclose()


def _mark_coroutine_function(wrapper: Any) -> None:
    """Make ``inspect``/``asyncio.iscoroutinefunction`` recognise an async cached function."""
    if hasattr(inspect, "markcoroutinefunction"):  # Python >= 3.12
        inspect.markcoroutinefunction(wrapper)
    else:  # the marker asyncio.iscoroutinefunction looks for
        wrapper._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: arguments are taken as given
        return None


def _release_pending(cache: TieredCache, pending: Any) -> None:
    lease = pending.lease
    if lease is not None and lease.envelope is not None:
        cache._release(pending.encoded, lease.envelope)


def tiered_cache(
    cache: TieredCache | AsyncTieredCache | None = None,
    *,
    ttl: float | None = None,
    key: Callable[..., Any] | None = None,
    typed: bool = False,
    local_maxsize: int = 1024,
    name: str | None = None,
    **cache_options: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """Memoize a function (or ``async def`` function) in ``cache``, or in a cache of its own.

    ``@tiered_cache(cache, ttl=60)`` or ``@tiered_cache(redis="redis://...", ttl=60)``. Keys are
    the function's qualified name and its arguments (which must be key types: str, bytes, int,
    float, bool, None, tuples), kwargs in any order; ``typed=True`` keeps ``1`` and ``1.0``
    apart; ``key=fn(*args, **kwargs)`` computes the key instead (e.g. to leave ``self`` out of
    a method's). The wrapper has ``cache_info()``, ``cache_clear()`` and ``invalidate(...)``.
    With an AsyncTieredCache, the function must be ``async def``, and ``cache_clear()`` and
    ``invalidate(...)`` are coroutines.
    """
    if cache is not None and not isinstance(cache, (TieredCache, AsyncTieredCache)):
        raise TypeError(
            "tiered_cache() takes a TieredCache or an AsyncTieredCache "
            "(use @tiered_cache(cache, ...))"
        )
    if cache is not None and cache_options:
        raise TypeError(f"options for a new cache given with a cache: {sorted(cache_options)}")

    def decorate(fn: Callable[..., Any]) -> Any:
        owns = cache is None
        target = TieredCache(**cache_options) if cache is None else cache
        is_async = inspect.iscoroutinefunction(fn)
        cls: type[Any]
        if isinstance(target, AsyncTieredCache):
            if not is_async:
                raise TypeError("an AsyncTieredCache memoizes `async def` functions only")
            cls = AioCachedFunction
        else:
            cls = AsyncCachedFunction if is_async else CachedFunction
        return cls(
            fn,
            target,
            ttl=ttl,
            key=key,
            typed=typed,
            local_maxsize=local_maxsize,
            name=name,
            owns_cache=owns,
        )

    return decorate

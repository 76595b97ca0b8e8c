"""AsyncTieredCache: TieredCache for asyncio, over redis.asyncio.

The same local tier, envelopes, versions, leases, fill compare-and-set, tombstones, negative
caching, XFetch, stale-while-revalidate, fail-safe, signing and limits as TieredCache: every
decision is tiercache.core's (shared with the sync cache); this module only awaits the Redis
calls around them. The listener is an asyncio task (tiercache.aio.listener), single-flight loads
are shared tasks (tiercache.aio.stampede), and loaders may be ``async def`` or plain functions
(run in a worker thread).

Its Redis connections belong to the event loop it first runs in: use one cache per loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import redis as redis_lib
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from .. import checks
from .. import cluster as cluster_mod
from .. import server as server_mod
from .. import tags as tagmod
from .._sentinel import MISSING
from ..codec import Codec
from ..commands import LeaseResult, WriteResult
from ..core import (
    _NOT_LOCAL,
    _POLL_FIRST,
    _POLL_MAX,
    _REJECTED,
    CacheCore,
    _Hit,
    _key_in_block,
    _PendingLoad,
    _Slot,
    _url_error,
)
from ..envelope import HEADER_SIZE, Envelope
from ..errors import CacheUnavailable
from ..keys import MAX_KEY_BYTES, decode_key, encode_key
from ..local import LocalCache, TieredFront
from ..protocol import OP_CLEAR, OP_CLEAR_PREFIX, OP_DELETE, OP_SET, FillGuard, OwnWrites
from ..signing import Secret
from ..tags import TagsArg, TagState, TtlArg
from .driver import AsyncDriver, make_async_client
from .listener import AsyncListener
from .stampede import AsyncRefresher, AsyncSingleFlight
from .tagging import AsyncTaggingMixin

log = logging.getLogger("tiercache")

Loader = Callable[[Any], Any]  # a plain function, or one returning an awaitable (async def)

_front_get = TieredFront.get  # the C local-hit path: a str key answered without the loop


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives an awaitable to await (an ``async def``, or a callable one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004  (an object whose __call__ is async def)
    )


async def _call_loader(loader: Loader, key: Any, pool: Executor | None = None) -> Any:
    """``loader(key)``: awaited if async, else run in a thread of ``pool`` (default: the loop's
    default executor); a KeyError from it becomes ``MISSING``."""
    try:
        if _is_async(loader):
            return await loader(key)
        call = functools.partial(contextvars.copy_context().run, loader, key)
        value = await asyncio.get_running_loop().run_in_executor(pool, call)
        if inspect.isawaitable(value):
            value = await value
        return value
    except KeyError:
        return MISSING


class AsyncTieredCache(AsyncTaggingMixin, TieredFront, CacheCore):  # type: ignore[misc]
    """TieredCache's API as coroutines: a local tier per process in front of a shared Redis.

    ``await cache.get(k)``, ``await cache.set(k, v)``, ``await cache.get_or_load(k, loader)``,
    ``await cache.invalidate(k)``, ``await cache.delete(k)``, ``get_many``, ``get_or_load_many``,
    ``clear``, ``stats()`` (plain), ``await cache.aclose()`` or ``async with``. Takes the options
    of TieredCache but ``bloom=``; ``redis`` is a URL, a ``redis.asyncio.Redis``, or None for an
    embedded development server (Redis Cluster and Sentinel are not supported yet: they raise
    NotImplementedError). Plain loaders run in the loop's default executor; their background
    refreshes in at most ``refresh_workers`` threads of the cache's own.

    Tags (``set(..., tags=)``, ``invalidate_tag``), ``bump_namespace``, sliding and adaptive TTL
    and ``set(..., write_behind=True)`` work as in TieredCache and interoperate with it on one
    namespace; ``warm`` is TieredCache's only (NotImplementedError here).
    """

    def __init__(
        self,
        redis: str | aioredis.Redis | None = None,
        *,
        namespace: str = "tc",
        local_maxsize: int = 10_000,
        local_policy: str = "lru",
        local_ttl: float = 60.0,
        local_maxbytes: int | None = None,
        ttl: TtlArg = None,
        loader: Loader | None = None,
        serializer: str | Codec | None = None,
        secret: Secret | None = None,
        max_value_bytes: int = 1 << 20,
        compress_over: int | None = None,
        negative_ttl: float = 30.0,
        stale_ttl: float = 0.0,
        ttl_jitter: float = 0.0,
        xfetch_beta: float = 1.0,
        stale_if_error: float = 0.0,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        retries: int = 1,
        health_interval: float = 1.0,
        health_timeout: float = 1.0,
        startup_timeout: float = 2.0,
        lease_ttl: float = 10.0,
        lease_wait: float | None = None,
        refresh_workers: int = 2,
        tombstone_ttl: float = 60.0,
        log_maxlen: int = 10_000,
        on_write_error: str = "raise",
        on_invalidate: Callable[[Any, int], None] | None = None,
        on_resync: Callable[[str], None] | None = None,
        on_evict: Callable[[Any, Any, str], None] | None = None,
        heartbeat_interval: float = 5.0,
        partitions: int | None = None,
        max_key_bytes: int = MAX_KEY_BYTES,
        timer: Callable[[], float] | None = None,
        tags: TagsArg = None,
        sliding: bool = False,
        sliding_interval: float | None = None,
    ) -> None:
        if isinstance(redis, AsyncRedisCluster) or (
            isinstance(redis, str)
            and (cluster_mod.is_cluster(redis) or cluster_mod.is_sentinel(redis))
        ):
            raise NotImplementedError(
                "AsyncTieredCache does not support Redis Cluster or Sentinel yet: use TieredCache "
                "(docs/cluster.md, docs/asyncio.md)"
            )
        partitions = 1 if partitions is None else partitions
        self._configure(
            namespace=namespace,
            local_maxsize=local_maxsize,
            local_policy=local_policy,
            local_ttl=local_ttl,
            local_maxbytes=local_maxbytes,
            ttl=ttl,
            loader=loader,
            serializer=serializer,
            secret=secret,
            max_value_bytes=max_value_bytes,
            compress_over=compress_over,
            negative_ttl=negative_ttl,
            stale_ttl=stale_ttl,
            ttl_jitter=ttl_jitter,
            xfetch_beta=xfetch_beta,
            stale_if_error=stale_if_error,
            health_interval=health_interval,
            health_timeout=health_timeout,
            startup_timeout=startup_timeout,
            lease_ttl=lease_ttl,
            lease_wait=lease_wait,
            refresh_workers=refresh_workers,
            tombstone_ttl=tombstone_ttl,
            on_write_error=on_write_error,
            on_invalidate=on_invalidate,
            on_resync=on_resync,
            on_evict=on_evict,
            heartbeat_interval=heartbeat_interval,
            partitions=partitions,
            max_key_bytes=max_key_bytes,
            timer=timer,
            tags=tags,
            sliding=sliding,
            sliding_interval=sliding_interval,
        )
        self._flights = AsyncSingleFlight()
        self._refresher = AsyncRefresher()
        self._refresh_pool: ThreadPoolExecutor | None = None  # sync loaders' refreshes
        self._listener: AsyncListener | None = None
        self._server: server_mod.RedisServer | None = None
        self._owns_client = not isinstance(redis, aioredis.Redis)
        if redis is None:
            self._server = server_mod.RedisServer()
            self._server.start()
            redis = self._server.url
        if isinstance(redis, str):
            try:
                client = make_async_client(
                    redis,
                    socket_timeout=socket_timeout,
                    connect_timeout=connect_timeout,
                    retries=retries,
                )
            except ValueError as err:  # (redis-py's text may quote pieces of a password)
                raise ValueError(_url_error(redis, err)) from None
        elif isinstance(redis, aioredis.Redis):
            client = redis
        else:
            raise TypeError("AsyncTieredCache takes a URL or a redis.asyncio.Redis client")
        self._driver = AsyncDriver(client, self._keys, log_maxlen=log_maxlen)
        self._checked = False  # the server's configuration (checks.check_server_async)
        tagmod.install_scripts(self._driver.commands)
        self._fresh_local_tier()

    # -- set-up and lifecycle -----------------------------------------------------------------

    def _fresh_local_tier(self) -> None:
        self._l1 = LocalCache(self._local_maxsize, on_evict=self._l1_on_evict, **self._l1_args)
        self._guard = FillGuard()
        self._own = OwnWrites()  # stays empty: the async listener applies every echo in full
        self._tags = TagState()  # the tag versions known here, the local copies' tags
        self._front_init(self._l1)

    def _ensure_listener(self) -> None:
        """Start the listener task in the running loop (once)."""
        if self._listener is None and not self._closed:
            self._listener = AsyncListener(
                self._driver,
                self,
                partitions=range(self._keys.partitions),
                name=f"tiercache:listener:{self._keys.namespace}:{self._origin}",
                **self._listener_args,
            )
            self._listener.start()

    async def start(self) -> AsyncTieredCache:
        """Start the listener and wait (at most ``startup_timeout``) until local copies serve."""
        if self._server is None and not self._checked:  # (the embedded server is not checked)
            self._checked = True
            await checks.check_server_async(
                self._driver.client, entries_expire=self._ttl is not None
            )
        if not await self.wait_ready(self._startup_timeout):
            log.warning(
                "tiercache %r: invalidation channel not ready after %.1fs; the local tier "
                "stays off until it is",
                self._keys.namespace,
                self._startup_timeout,
            )
        return self

    async def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait until the local tier may serve (the channel is whole); whether it may."""
        if self._closed:
            return False
        self._ensure_listener()
        listener = self._listener
        return listener is not None and await listener.wait_healthy(timeout)

    async def aclose(self) -> None:
        """Stop the listener and background tasks, close connections it opened, stop its server."""
        if self._closed:
            return
        self._closed = True
        self._set_usable(False)
        if self._listener is not None:
            await self._listener.stop()
        await self._refresher.close()
        await self._flights.close()
        pool, self._refresh_pool = self._refresh_pool, None
        if pool is not None:  # a refresh's loader still running is waited for, 2 s at most
            pool.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(pool.shutdown, True), 2.0)
        if self._heartbeat_interval and self._listener is not None:
            try:  # a closed process leaves the fleet view at once
                await self._driver.client.delete(self._keys.heartbeat(self._origin))
            except redis_lib.RedisError:
                pass
        if self._owns_client:
            await self._driver.client.aclose()
        if self._server is not None:
            self._server.stop()

    async def __aenter__(self) -> AsyncTieredCache:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __getitem__(self, key: Hashable) -> Any:
        raise TypeError("AsyncTieredCache: use `await cache.get(key)`")

    def __repr__(self) -> str:
        return (
            f"AsyncTieredCache(namespace={self._keys.namespace!r}, local_size={len(self._l1)}, "
            f"local_usable={self._local_usable})"
        )

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client this cache uses."""
        return self._driver.client

    @property
    def bloom(self) -> None:
        """No negative filter (the asyncio cache has none yet)."""
        return None

    # -- the listener's reports (tiercache.aio.listener.AsyncListenerHandler) -----------------

    async def on_healthy(self, recovered: bool) -> None:
        """The channel is whole: local copies may be served again."""
        try:
            self._clock.calibrate(*await self._driver.server_time())
        except redis_lib.RedisError:
            pass  # versions stay monotone without it; the next recovery tries again
        try:  # a bump may have been missed, or the generation lost with the data: Redis says
            await self._reload_generation(force=True)
        except redis_lib.RedisError:
            pass  # reads and writes check it themselves until the channel is whole
        if recovered:
            self._counters.add("resyncs")
            self._hook(self._on_resync, "resynced")
        self._set_usable(True)

    def tick(self) -> None:
        """From the listener task, each health interval: send the heartbeat when due."""
        if self._heartbeat_interval and (
            time.monotonic() - self._last_heartbeat >= self._heartbeat_interval
        ):
            self._last_heartbeat = time.monotonic()
            self._refresher.submit(("heartbeat",), self.heartbeat)

    async def heartbeat(self) -> None:
        """Publish this process' stats under the namespace (a hash that expires by itself)."""
        fields = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
            "stats": json.dumps(self.stats(), default=str),
        }
        ttl_ms = int(max(self._heartbeat_interval, 1.0) * 3000)
        await self._driver.heartbeat(self._origin, fields, ttl_ms)

    # -- reads --------------------------------------------------------------------------------

    def _get_slow(self, key: Hashable, default: Any) -> Any:
        return default  # (the C front's miss: ``get`` below goes on asynchronously)

    async def get(self, key: Hashable, default: Any = None) -> Any:  # type: ignore[override]
        """The value of ``key`` (read-through when a loader is set), else ``default``."""
        value = _front_get(self, key, _NOT_LOCAL)
        if value is not _NOT_LOCAL:
            return value
        value = await self._read(key, self._loader, self._ttl)
        return default if value is MISSING else value

    async def get_or_load(
        self,
        key: Hashable,
        loader: Loader,
        ttl: TtlArg = None,
        *,
        tags: TagsArg = None,
        sliding: bool | None = None,
    ) -> Any:
        """The value of ``key``; on a miss, ``loader(key)`` once across processes, then stored.

        As TieredCache.get_or_load; ``loader`` may be ``async def`` or a plain function (run in
        a worker thread). KeyError when the loader finds nothing (cached for negative_ttl).
        """
        value = _front_get(self, key, _NOT_LOCAL)
        if value is _NOT_LOCAL:
            value = await self._read(key, loader, self._policy(ttl, tags, sliding))
        if value is MISSING:
            raise KeyError(key)
        return value

    async def _read(self, key: Hashable, loader: Loader | None, ttl: Any) -> Any:
        """The value of ``key`` from the first tier that has it; ``MISSING`` if none has it."""
        encoded = encode_key(key)
        self._ensure_listener()
        if not self._local_usable:
            await self._check_generation()
        slot = self._slot(key, encoded)
        if self._local_usable:
            e = slot.l1.entry(slot.key)
            if e is not None and e.fresh_until > slot.l1.timer():
                return slot.l1.get(slot.key, e.value)
        ticket = self._guard.ticket()
        floor = self._floor(slot.guard)
        try:
            raw = await self._driver.get(self._keys.value(encoded))
        except redis_lib.RedisError as err:
            return await self._read_failed(err, key, encoded, slot, loader)
        hit = (
            await self._vet(self._decode(raw, encoded, floor), encoded) if raw is not None else None
        )
        if hit is not None and hit is not _REJECTED:
            self._counters.add("remote_hits")
            return self._serve(key, encoded, slot, ticket, hit, loader, ttl)
        self._counters.add("misses")
        if loader is None:
            return MISSING
        rejected = raw if hit is _REJECTED else None  # the next fill overwrites it
        return await self._flights.run(
            encoded,
            lambda: self._load(key, encoded, slot, loader, ttl, rejected),
            wait=self._lease_wait,
            # The shared load holds the fill lease: do not wait for it again.
            fallback=lambda: self._load_unleased(key, loader),
        )

    async def _load_unleased(self, key: Hashable, loader: Loader) -> Any:
        """``loader(key)`` without the fill lease: its value is returned, not stored."""
        self._counters.add("loads")
        return await _call_loader(loader, key)

    async def _read_failed(
        self,
        err: redis_lib.RedisError,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Loader | None,
    ) -> Any:
        """Redis failed a read: a recent local copy (fail-safe), the loader, or the error."""
        self._counters.add("read_errors")
        stale = self._stale_local(slot)
        if stale is not _NOT_LOCAL:
            return stale
        if loader is not None:  # once per process for concurrent callers, Redis or not
            return await self._flights.run(
                encoded, lambda: self._load_unleased(key, loader), wait=self._lease_wait
            )
        raise CacheUnavailable(f"Redis read of {key!r} failed: {err}") from err

    async def _load(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Loader,
        ttl: Any,
        rejected: bytes | None = None,
    ) -> Any:
        """Load a missing key once across processes: take its lease or wait for its value."""
        pending = await self._begin_load(key, encoded, slot, ttl, rejected)
        if not isinstance(pending, _PendingLoad):
            return pending
        try:
            value = await _call_loader(loader, key)
        except asyncio.CancelledError:
            await asyncio.shield(self._release_pending(pending))
            raise
        except BaseException:
            await self._release_pending(pending)
            stale = self._stale_local(pending.slot)
            if stale is not _NOT_LOCAL:
                return stale  # fail-safe: the loader failed, a recent copy is served
            raise
        return await self._finish_load(pending, value)

    async def _begin_load(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        ttl: Any,
        rejected: bytes | None = None,
    ) -> _PendingLoad | Any:
        """Before calling a loader: our lease (a ``_PendingLoad``), or the value that arrived."""
        ticket = self._guard.ticket()  # before the lease script reads Redis, as in _read
        floor = self._floor(slot.guard)
        lease = await self._acquire_lease(encoded, rejected)
        for _ in range(2):  # a value that arrives while we wait to replace a bad one is served
            if lease is None or lease.kind != "v":
                break
            hit = await self._vet(self._lease_value(lease, encoded, floor), encoded)
            if hit is not None:
                return self._serve(key, encoded, slot, ticket, hit, None, ttl)
            lease = await self._acquire_lease(encoded, lease.envelope)  # unreadable, or expired
        # (still a value: unreadable, rewritten meanwhile; loaded without storing)
        return self._pending_load(lease, encoded, slot, ticket, ttl)

    async def _finish_load(self, pending: _PendingLoad, value: Any) -> Any:
        """After the loader returned ``value``: store it if our lease still stands; return it."""
        lease = pending.lease
        if lease is None or lease.envelope is None:
            return value
        try:
            made = self._loaded_envelope(pending, value)
        except BaseException:
            await self._release(pending.encoded, lease.envelope)
            raise
        if made is not None:
            await self._fill(pending, made, value)
        return value

    async def _release_pending(self, pending: _PendingLoad) -> None:
        if pending.lease is not None and pending.lease.envelope is not None:
            await self._release(pending.encoded, pending.lease.envelope)

    async def _acquire_lease(
        self, encoded: bytes, rejected: bytes | None = None
    ) -> LeaseResult | None:
        """Our fill lease, a value that arrived meanwhile, or None (load without storing)."""
        token = secrets.token_bytes(16)
        deadline = time.monotonic() + self._lease_wait
        delay = _POLL_FIRST
        waited = False
        while True:
            try:
                lease = await self._driver.lease(encoded, token, self._lease_ms, rejected)
            except redis_lib.RedisError:
                return None
            if lease.kind != "w":
                return lease
            if not waited:
                self._counters.add("lease_waits")
                waited = True
            left = deadline - time.monotonic()
            if left <= 0:
                self._counters.add("lease_timeouts")
                return None
            await asyncio.sleep(self._lease_delay(lease, delay, left))
            delay = min(delay * 1.5, _POLL_MAX)

    async def _fill(self, pending: _PendingLoad, env: Envelope, value: Any) -> None:
        lease = pending.lease
        assert lease is not None and lease.envelope is not None
        encoded = pending.encoded
        ext = self._ext_of(env, encoded)
        try:
            stored = await self._driver.call(self._fill_call(encoded, lease.envelope, env, ext))
        except redis_lib.RedisError as err:
            self._counters.add("write_errors")
            self._warn(f"fill of {encoded[:60]!r} failed: {err}")
            return
        if self._filled(stored, pending.slot, pending.ticket, env, value, encoded, ext):
            await self._release(encoded, lease.envelope)  # refused for a tag: our lease may stay

    async def _release(self, encoded: bytes, lease: bytes) -> None:
        try:
            await self._driver.release(encoded, lease)
        except redis_lib.RedisError:
            pass  # the lease expires by itself

    def _schedule_refresh(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Callable[[Any], Any],
        ttl: float | None,
        version: int,
    ) -> None:
        def refresh() -> Awaitable[None]:
            return self._refresh(key, encoded, slot, loader, ttl, version)

        self._refresher.submit(encoded, refresh)

    async def _refresh(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Loader,
        ttl: float | None,
        version: int,
    ) -> None:
        """Reload ``key`` in the background; store it only if the key still holds ``version``."""
        token = secrets.token_bytes(16)
        if not await self._driver.mark_refresh(encoded, token, self._lease_ms, version):
            return  # another process refreshes it, or already did (the "refreshing" marker)
        ticket = self._guard.ticket()
        started = time.monotonic()
        self._counters.add("loads")
        if self._refresh_pool is None:  # TieredCache's refresh threads, named alike
            self._refresh_pool = ThreadPoolExecutor(
                max(1, self._refresh_workers),
                thread_name_prefix=f"tiercache:{self._keys.namespace}-refresh",
            )
        value = await _call_loader(loader, key, self._refresh_pool)
        payload, flags = self._payload(value)
        load_ms = (time.monotonic() - started) * 1000.0
        env = self._value_envelope(payload, flags, ttl, version, load_ms, encoded, value)
        ext = self._ext_of(env, encoded)
        if await self._driver.call(self._refresh_call(encoded, version, env, ext, token)):
            self._counters.add("refreshes")
            self._install(ticket, slot, env.version, self._local_fresh(env), value, ext)
        else:
            self._counters.add("stale_fills_rejected")  # a write or delete landed meanwhile

    # -- batches --------------------------------------------------------------------------------

    async def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """The values of the keys present, from the local tier, then one round trip to Redis."""
        found, _, _ = await self._read_many(list(keys))
        return found

    async def get_or_load_many(
        self,
        keys: Iterable[Hashable],
        loader_many: Callable[[list[Any]], Any],
        ttl: float | None = None,
    ) -> dict[Hashable, Any]:
        """The values of ``keys``; those missing everywhere come from one ``loader_many`` call.

        As TieredCache.get_or_load_many; ``loader_many`` may be ``async def``.
        """
        ttl = self._ttl if ttl is None else ttl
        found, missing, tickets = await self._read_many(list(keys))
        if not missing:
            return found
        encoded = [encode_key(k) for k in missing]
        floors = [
            self._floor(self._slot(k, e).guard) for k, e in zip(missing, encoded, strict=True)
        ]
        token = secrets.token_bytes(16)
        try:
            leases: list[LeaseResult | None] = list(
                await self._driver.leases(encoded, token, self._lease_ms)
            )
        except redis_lib.RedisError:
            leases = [None] * len(missing)
        to_load = []
        for key, enc, floor, lease in zip(missing, encoded, floors, leases, strict=True):
            if lease is not None and lease.kind == "v":
                hit = await self._vet(self._lease_value(lease, enc, floor), enc)
                if hit is not None:
                    if hit[5] is not MISSING:
                        found[key] = hit[5]
                    continue
                # Unreadable or expired by our clock: a lease that replaces exactly those bytes,
                # so the fill below overwrites them (as the single-key path does).
                lease = await self._acquire_lease(enc, lease.envelope)
            to_load.append((key, enc, lease))
        if not to_load:
            return found
        self._counters.add("loads")
        started = time.monotonic()
        loaded: Mapping[Any, Any] = await _call_loader(loader_many, [k for k, _, _ in to_load])
        load_ms = (time.monotonic() - started) * 1000.0
        fills = []
        for key, enc, lease in to_load:
            value = loaded.get(key, MISSING)
            if value is not MISSING:
                found[key] = value
            if lease is None or lease.kind != "l" or lease.envelope is None:
                continue
            payload, flags = self._payload(value)
            env = self._value_envelope(payload, flags, ttl, lease.version, load_ms, enc, value)
            fills.append((key, enc, lease.envelope, env, value))
        if fills:
            await self._fill_many(fills, tickets)
        return found

    async def _read_many(
        self, keys: list[Hashable]
    ) -> tuple[dict[Hashable, Any], list[Hashable], dict[Hashable, int]]:
        """(found values, keys missing everywhere, the read tickets) for a batch of keys."""
        self._ensure_listener()
        found: dict[Hashable, Any] = {}
        pending: list[tuple[Hashable, bytes, _Slot]] = []
        now = self._l1.timer()
        for key in keys:
            encoded = encode_key(key)
            slot = self._slot(key, encoded)
            e = slot.l1.entry(slot.key) if self._local_usable else None
            if e is not None and e.fresh_until > now:
                value = slot.l1.get(slot.key, e.value)
                if value is not MISSING:
                    found[key] = value
                continue
            pending.append((key, encoded, slot))
        if pending and not self._local_usable:
            await self._check_generation()
        ticket = self._guard.ticket()
        floors = [self._floor(slot.guard) for _, _, slot in pending]
        tickets = {key: ticket for key, _, _ in pending}
        if not pending:
            return found, [], tickets
        try:
            raws = await self._driver.mget([self._keys.value(enc) for _, enc, _ in pending])
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis read failed: {err}") from err
        missing = []
        for (key, encoded, slot), floor, raw in zip(pending, floors, raws, strict=True):
            hit: _Hit | None = None
            if raw is not None:
                hit = await self._vet(self._decode(raw, encoded, floor), encoded)
            if hit is None or hit is _REJECTED:
                self._counters.add("misses")
                missing.append(key)
                continue
            self._counters.add("remote_hits")
            value = self._serve(key, encoded, slot, ticket, hit, None, None)
            if value is not MISSING:
                found[key] = value
        return found, missing, tickets

    async def _fill_many(
        self,
        fills: list[tuple[Hashable, bytes, bytes, Envelope, Any]],
        tickets: dict[Hashable, int],
    ) -> None:
        exts = [self._ext_of(env, e) for _, e, _, env, _ in fills]
        try:
            calls = [
                self._fill_call(e, lease, env, ext)
                for (_, e, lease, env, _), ext in zip(fills, exts, strict=True)
            ]
            stored = [r is True for r in await self._driver.call_many(calls)]
        except redis_lib.RedisError as err:
            self._counters.add("write_errors")
            self._warn(f"batch fill failed: {err}")
            return
        for (key, enc, _, env, value), ext, ok in zip(fills, exts, stored, strict=True):
            self._filled(ok, self._slot(key, enc), tickets.get(key, -1), env, value, enc, ext)

    # -- writes -------------------------------------------------------------------------------

    async def set(
        self,
        key: Hashable,
        value: Any,
        ttl: TtlArg = None,
        *,
        tags: TagsArg = None,
        sliding: bool | None = None,
        write_behind: bool = False,
    ) -> None:
        """Write ``value`` through to Redis (for ``ttl`` seconds, default the cache's) and here.

        ``ttl``, ``tags``, ``sliding`` and ``write_behind`` as for TieredCache.set (the queued
        writes are flushed by a tiercache.writebehind.WriteBehind, which is synchronous).
        """
        encoded, slot, env = self._set_envelope(key, value, ttl, tags, sliding)
        self._ensure_listener()
        if not self._local_usable:
            await self._check_generation()
        ticket = self._guard.ticket()
        applied = await self._write(key, encoded, slot, OP_SET, env, write_behind)
        if applied is not None:
            self._set_done(ticket, slot, applied, env, value, encoded)

    async def _write(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        op: str,
        env: Envelope,
        behind: bool = False,
    ) -> WriteResult | None:
        """Run the write script for ``op``; the local copy is dropped before, and after a failure.

        A cancelled write is a write of unknown outcome: the key is distrusted here, as after
        a timeout, before the cancellation propagates. The caller ends an applied write
        (``_write_done``).
        """
        slot.l1.pop(slot.key, None)  # read-your-writes: the old local copy goes first
        ext = self._ext_of(env, encoded)
        try:
            for attempt in range(self._write_attempts(ext)):
                call = self._write_call(encoded, op, env, ext, behind)
                result: WriteResult = await self._driver.call(call)
                if result.applied:
                    break
                env = self._write_retry(result, env, ext, attempt)
            else:
                raise redis_lib.ResponseError("concurrent writers kept overtaking this one")
        except redis_lib.RedisError as err:
            self._write_unknown(key, slot, env, err, behind)
            return None
        except asyncio.CancelledError:
            with self._guard.lock:
                self._guard.observe(slot.guard, env.version, applied=False)
                slot.l1.pop(slot.key, None)
            raise
        return result

    async def delete(self, key: Hashable) -> None:
        """Remove ``key`` everywhere; KeyError if it was nowhere (as ``del cache[key]``)."""
        if not await self._delete(key):
            raise KeyError(key)

    async def invalidate(self, key: Hashable) -> bool:
        """Remove ``key`` everywhere (Redis and every local tier); whether it was anywhere."""
        return await self._delete(key)

    async def write_around(self, key: Hashable) -> bool:
        """After the caller wrote ``key`` to the origin: drop it everywhere (versioned tombstone).

        As TieredCache.write_around; whether it was cached.
        """
        return await self._delete(key)

    async def warm(self, *args: Any, **kwargs: Any) -> Any:
        """Not available on the asyncio cache: use TieredCache.warm (tiercache.warm)."""
        raise NotImplementedError(
            "AsyncTieredCache.warm is not implemented: warm the namespace with a TieredCache "
            "(its entries serve every cache of the namespace)"
        )

    async def _delete(self, key: Hashable, behind: bool = False) -> bool:
        encoded, slot, env, was_local = self._delete_envelope(key)
        self._ensure_listener()
        if not self._local_usable:
            await self._check_generation()
        result = await self._write(key, encoded, slot, OP_DELETE, env, behind)
        if result is None:
            return True  # Redis failed and the failure was swallowed: it may have been there
        self._write_done(slot, result)
        self._counters.add("deletes")
        return was_local or result.existed

    async def clear(self) -> None:
        """Empty the namespace in Redis and in every process' local tier."""
        await self.clear_prefix(b"")

    async def clear_prefix(self, prefix: bytes) -> None:
        """Remove, everywhere, the keys whose encoding starts with ``prefix`` (b"": all)."""
        self._ensure_listener()
        forget = self._forget_prefix if prefix else lambda _p: self._forget_local()
        forget(prefix)
        op = OP_CLEAR_PREFIX if prefix else OP_CLEAR
        try:
            partitions = range(self._keys.partitions)
            await self._driver.unlink_partitions(partitions, self._keys.clip(prefix))
            for partition in partitions:
                version = self._clock.next()
                sig = self._sign_message(prefix, version, op)
                await self._driver.announce_clear(partition, version, self._origin, prefix, sig)
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis clear failed: {err}") from err
        finally:
            forget(prefix)  # what a reader of this process installed meanwhile, too

    # -- the namespace ----------------------------------------------------------------------

    async def contains(self, key: Hashable) -> bool:
        """Whether Redis holds a value for ``key`` (``key in cache`` of TieredCache)."""
        encoded = encode_key(key)
        try:
            return await self._driver.has_value(encoded)
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis read failed: {err}") from err

    async def keys(self) -> AsyncIterator[Any]:
        """The keys stored in Redis for this namespace (SCAN-based: not a snapshot, not O(1))."""
        seen: set[bytes] = set()
        try:
            async for name in self._driver.scan_values_of(range(self._keys.partitions)):
                if name in seen:
                    continue
                seen.add(name)
                stored = self._keys.encoded_of_value_key(name)
                try:
                    if self._keys.is_digest(stored):  # a long key: it is inside the value
                        raw = await self._driver.get(name) or b""
                        inner = raw[HEADER_SIZE + raw[5] :] if len(raw) > 5 else b""
                        stored = _key_in_block(inner)
                        if self._keys.value(stored) != name:
                            continue
                    key = decode_key(stored)
                except ValueError:
                    continue  # not one of ours
                yield key
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis scan failed: {err}") from err

    def __aiter__(self) -> AsyncIterator[Any]:
        """``async for key in cache``: the keys stored in Redis (see ``keys``)."""
        return self.keys()

    async def count(self) -> int:
        """How many keys Redis holds for this namespace (a full SCAN: O(n))."""
        return sum([1 async for _ in self.keys()])

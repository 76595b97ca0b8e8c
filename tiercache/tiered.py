"""TieredCache: a local tier in front of Redis, kept coherent across processes.

Reads go to the local tier, then Redis, then the loader; writes go to Redis first (versioned, the
invalidation published by the same Lua script), then to the local tier. The guarantees and how
they are kept:

* No stale resurrection: a fill from the loader commits in Redis only while the fill lease taken
  before the load still stands (any write or delete removes it), and a value read from Redis or
  loaded enters the local tier only if no newer version of the key was invalidated since the read
  began (tiercache.protocol.FillGuard); the local tier never replaces a newer version by an older.
* Read-your-writes: a write drops the writer's local copy before it is sent and again if the
  outcome is unknown, then installs the written version.
* Loss is detected: invalidations are numbered per partition; the listener reports any gap, error
  or unanswered PING, and the local tier is not used until it has caught up from the log or been
  flushed (tiercache.listener).
* Bounded staleness: a local copy is served for at most ``local_ttl`` seconds without Redis.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Protocol

import redis as redis_lib
from redis.cluster import RedisCluster

from . import checks
from . import cluster as cluster_mod
from . import server as server_mod
from . import tags as tagmod
from ._sentinel import MISSING
from .codec import Codec
from .core import (  # noqa: F401  (importable from here too)
    _NOT_LOCAL,
    _POLL_FIRST,
    _POLL_MAX,
    _REJECTED,
    _WRITE_ATTEMPTS,
    CALL_MARK,
    CacheCore,
    SubTier,
    _absent_to_missing,
    _Counters,
    _Hit,
    _key_in_block,
    _PendingLoad,
    _Slot,
    _url_error,
    _Window,
)
from .driver import LeaseResult, SyncDriver, make_client
from .envelope import (
    FLAG_EXT,
    HEADER_SIZE,
    Envelope,
)
from .errors import CacheUnavailable
from .keys import MAX_KEY_BYTES, decode_key, encode_key
from .listener import Listener
from .local import LocalCache, TieredFront
from .protocol import (
    OP_CLEAR,
    OP_CLEAR_PREFIX,
    OP_DELETE,
    OP_SET,
    FillGuard,
    OwnWrites,
)
from .signing import Secret
from .stampede import Refresher, SingleFlight
from .tagging import TaggingMixin
from .tags import TagsArg, TagState, TtlArg
from .warm import Progress, WarmResult, warm

log = logging.getLogger("tiercache")


class NegativeFilter(Protocol):
    """What the cache asks of a negative filter (tiercache.bloom): the keys that may exist.

    It must never call a registered key absent; when it cannot be sure (its Redis key is gone,
    a registration failed), ``probe`` returns None and the cache does not filter.
    """

    def probe(self, encoded: bytes) -> tuple[Any, ...] | None:
        """A Redis command whose reply tells whether ``encoded`` may exist, or None (off)."""

    def absent(self, reply: Any) -> bool:
        """Whether the probe's reply proves the key absent from the origin."""

    def register(self, encoded: bytes) -> None:
        """Note that ``encoded`` exists in the origin (called before its value is stored)."""

    def note(self, event: str) -> None:
        """Count an event: "avoided" (a load the filter spared), "false_positive"."""


class FilterFactory(Protocol):
    """A negative filter's configuration (tiercache.bloom.BloomConfig)."""

    def open(self, driver: SyncDriver) -> NegativeFilter:
        """The filter of the cache that ``driver`` serves."""


# Keyed by id: a TieredCache compares by content, as a mapping does, so it is not hashable.
_live_caches: weakref.WeakValueDictionary[int, TieredCache] = weakref.WeakValueDictionary()


def _after_fork_in_child() -> None:
    for cache in list(_live_caches.values()):
        cache._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class TieredCache(TaggingMixin, TieredFront, CacheCore, MutableMapping):  # type: ignore[misc]
    """A dict-like cache: a local tier per process in front of a shared Redis."""

    def __init__(
        self,
        redis: str | redis_lib.Redis | RedisCluster | None = None,
        *,
        namespace: str = "tc",
        local_maxsize: int = 10_000,
        local_policy: str = "lru",
        local_ttl: float = 60.0,
        local_maxbytes: int | None = None,
        ttl: TtlArg = None,
        loader: Callable[[Any], Any] | None = None,
        serializer: str | Codec | None = None,
        secret: Secret | None = None,
        bloom: FilterFactory | None = None,
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
        partitions = cluster_mod.default_partitions(redis, partitions)
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
        self._flights = SingleFlight()
        self._refresher = Refresher(refresh_workers, name=f"tiercache:{namespace}")
        self._server: server_mod.RedisServer | None = None
        self._owns_client = not isinstance(redis, (redis_lib.Redis, RedisCluster))
        self._listener: Listener | cluster_mod.ShardedListener | None = None
        self._listener_lock = threading.Lock()

        if redis is None:
            self._server = server_mod.RedisServer()
            self._server.start()
            redis = self._server.url
        if isinstance(redis, str):
            try:
                client = cluster_mod.make_any_client(
                    redis,
                    socket_timeout=socket_timeout,
                    connect_timeout=connect_timeout,
                    retries=retries,
                ) or make_client(
                    redis,
                    socket_timeout=socket_timeout,
                    connect_timeout=connect_timeout,
                    retries=retries,
                )
            except ValueError as err:  # (redis-py's text may quote pieces of a password)
                raise ValueError(_url_error(redis, err)) from None
        else:
            client = redis
        self._driver = cluster_mod.open_driver(client, self._keys, log_maxlen=log_maxlen)
        if bloom is not None and cluster_mod.is_cluster(client):
            raise ValueError("bloom= is not supported on Redis Cluster yet (docs/cluster.md)")
        if self._server is None:  # (the embedded development server is not checked)
            checks.check_server(client, entries_expire=ttl is not None)
        tagmod.install_scripts(self._driver.commands)
        self._bloom = bloom.open(self._driver) if bloom is not None else None
        self._fresh_local_tier()
        _live_caches[id(self)] = self
        self._ensure_listener()
        if self._listener is not None and not self._listener.wait_healthy(startup_timeout):
            log.warning(
                "tiercache %r: invalidation channel not ready after %.1fs; the local tier "
                "stays off until it is",
                namespace,
                startup_timeout,
            )

    # -- set-up ---------------------------------------------------------------------------------

    def _fresh_local_tier(self) -> None:
        self._l1 = LocalCache(self._local_maxsize, on_evict=self._l1_on_evict, **self._l1_args)
        self._guard = FillGuard()
        self._own = OwnWrites()  # own writes in flight (their echo passes the listener)
        self._tags = TagState()  # the tag versions known here, the local copies' tags
        self._front_init(self._l1)

    def _ensure_listener(self) -> None:
        if self._listener is not None or self._closed:
            return  # (a forked child has none: the at-fork hook dropped the parent's)
        with self._listener_lock:
            if self._listener is None and not self._closed:
                make_listener = getattr(self._driver, "listener_class", lambda: Listener)
                self._listener = make_listener()(
                    self._driver,
                    self,
                    partitions=range(self._keys.partitions),
                    name=f"tiercache:listener:{self._keys.namespace}:{self._origin}",
                    **self._listener_args,
                )
                self._listener.start()

    def _after_fork(self) -> None:
        """In a forked child: no thread, no trusted local copy; connections are redone lazily.

        Every lock and flag a parent's thread may have held at the fork is made anew.
        """
        self._set_usable(False)
        self._listener = None
        self._listener_lock = threading.Lock()
        self._counters = _Counters()
        self._origin = secrets.token_hex(6)
        self._clock = self._clock.copy()
        self._flights = SingleFlight()
        self._refresher = Refresher(self._refresh_workers, name=f"tiercache:{self.namespace}")
        self._touch_lock = threading.Lock()
        self._gen_lock = threading.Lock()
        self._fresh_local_tier()  # the parent's locks and flags may have been held mid-write
        for sub in list(self._subtiers.values()):
            sub._rebind_local()

    # -- the listener's reports (tiercache.listener.ListenerHandler) ----------------------------

    def on_healthy(self, recovered: bool) -> None:
        """The channel is whole: local copies may be served again."""
        try:
            self._clock.calibrate(*self._driver.server_time())
        except redis_lib.RedisError:
            pass  # versions stay monotone without it; the next recovery tries again
        try:  # a bump may have been missed, or the generation lost with the data: Redis says
            self._reload_generation(force=True)
        except redis_lib.RedisError:
            pass  # reads and writes check it themselves until the channel is whole
        if recovered:
            self._counters.add("resyncs")
            self._hook(self._on_resync, "resynced")
        self._set_usable(True)

    def tick(self) -> None:
        """From the listener thread, each health interval: have the heartbeat sent when due.

        Sent by a background worker: the listener thread never waits on the data connection.
        """
        if self._heartbeat_interval and (
            time.monotonic() - self._last_heartbeat >= self._heartbeat_interval
        ):
            self._last_heartbeat = time.monotonic()
            self._refresher.submit(("heartbeat",), self.heartbeat)

    def heartbeat(self) -> None:
        """Publish this process' stats under the namespace (a hash that expires by itself).

        ``tiercache stats`` reads them to show a fleet without touching its processes.
        """
        fields = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
            "stats": json.dumps(self.stats(), default=str),
        }
        ttl_ms = int(max(self._heartbeat_interval, 1.0) * 3000)
        self._driver.heartbeat(self._origin, fields, ttl_ms)

    def clear_prefix(self, prefix: bytes) -> None:
        """Remove, everywhere, the keys whose encoding starts with ``prefix`` (SCAN-based)."""
        self._ensure_listener()
        self._forget_prefix(prefix)
        try:
            partitions = range(self._keys.partitions)
            self._driver.unlink_partitions(partitions, self._keys.clip(prefix))
            for partition in partitions:
                version = self._clock.next()
                sig = self._sign_message(prefix, version, OP_CLEAR_PREFIX)
                self._driver.announce_clear(partition, version, self._origin, prefix, sig)
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis clear failed: {err}") from err
        finally:
            self._forget_prefix(prefix)

    # -- local tiers ------------------------------------------------------------------------------

    # -- reads ----------------------------------------------------------------------------------

    def _getitem_slow(self, key: Hashable) -> Any:
        value = self._read(key, self._loader, self._ttl)
        if value is MISSING:
            raise KeyError(key)
        return value

    def _get_slow(self, key: Hashable, default: Any) -> Any:
        value = self._read(key, self._loader, self._ttl)
        return default if value is MISSING else value

    def get_or_load(
        self,
        key: Hashable,
        loader: Callable[[Any], Any],
        ttl: TtlArg = None,
        *,
        tags: TagsArg = None,
        sliding: bool | None = None,
    ) -> Any:
        """The value of ``key``; on a miss, ``loader(key)`` once across processes, then stored.

        Concurrent misses share one loader call per process (single-flight) and one across
        processes (the fill lease); the others wait for its value, at most ``lease_ttl``. A loader
        that returns ``MISSING`` or raises ``KeyError`` makes this raise ``KeyError``, and the
        absence is cached for ``negative_ttl``; other exceptions propagate and are not cached.
        ``ttl``, ``tags`` and ``sliding`` are as for ``set`` (a callable gets the loaded value).
        """
        value = self._local_value(key)
        if value is _NOT_LOCAL:
            value = self._read(key, loader, self._policy(ttl, tags, sliding))
        if value is MISSING:
            raise KeyError(key)
        return value

    def _local_value(self, key: Hashable) -> Any:
        """A fresh local copy of a str key (the C front's job for ``[]`` and ``get``)."""
        if not self._local_usable or type(key) is not str:
            return _NOT_LOCAL
        e = self._l1.entry(key)
        if e is None or e.fresh_until <= self._l1.timer():
            return _NOT_LOCAL
        return self._l1.get(key, e.value)

    def _decode(self, raw: bytes, encoded: bytes, floor: int = 0) -> _Hit | None:
        """CacheCore._decode, with the round trips it may need: a hit whose tags are not all
        known here is checked against Redis, and a read of a sliding value extends its TTL."""
        hit = CacheCore._decode(self, raw, encoded, floor)
        if hit is None or hit is _REJECTED or hit[6] is None:
            return hit
        version, ext = hit[0], hit[6]
        if ext.tags and not self._tags_valid(version, ext):
            return None  # invalidated by one of its tags
        if ext.sliding_ms:
            self._slide(encoded, version, ext)
        return hit

    def _read(self, key: Hashable, loader: Callable[[Any], Any] | None, ttl: Any) -> Any:
        """The value of ``key`` from the first tier that has it; ``MISSING`` if none has it."""
        encoded = encode_key(key)
        self._ensure_listener()
        if not self._local_usable:
            self._check_generation()
        slot = self._slot(key, encoded)
        if self._local_usable:
            e = slot.l1.entry(slot.key)
            if e is not None and e.fresh_until > slot.l1.timer():
                return slot.l1.get(slot.key, e.value)
        ticket = self._guard.ticket()
        floor = self._floor(slot.guard)
        probe = self._bloom.probe(encoded) if self._bloom is not None else None
        try:
            if probe is None:
                raw = self._driver.get(self._keys.value(encoded))
            else:  # the filter is asked in the same round trip
                raw, verdict = self._driver.get_and(self._keys.value(encoded), probe)
        except redis_lib.RedisError as err:
            return self._read_failed(err, key, encoded, slot, loader)
        hit = self._decode(raw, encoded, floor) if raw is not None else None
        if hit is not None and hit is not _REJECTED:
            self._counters.add("remote_hits")
            return self._serve(key, encoded, slot, ticket, hit, loader, ttl)
        self._counters.add("misses")
        if loader is None:
            return MISSING
        if probe is not None and self._bloom is not None and self._bloom.absent(verdict):
            self._counters.add("filtered")
            self._bloom.note("avoided")
            return MISSING
        rejected = raw if hit is _REJECTED else None  # the next fill overwrites it
        return self._flights.run(
            encoded,
            lambda: self._load(key, encoded, slot, loader, ttl, rejected),
            wait=self._lease_wait,
            # The leader (this process) holds the fill lease: do not wait for it again.
            fallback=lambda: self._load_unleased(key, loader),
        )

    def _load_unleased(self, key: Hashable, loader: Callable[[Any], Any]) -> Any:
        """``loader(key)`` without the fill lease: its value is returned, not stored."""
        self._counters.add("loads")
        return _absent_to_missing(loader, key)

    def _read_failed(
        self,
        err: redis_lib.RedisError,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Callable[[Any], Any] | None,
    ) -> Any:
        """Redis failed a read: a recent local copy (fail-safe), the loader, or the error."""
        self._counters.add("read_errors")
        stale = self._stale_local(slot)
        if stale is not _NOT_LOCAL:
            return stale
        if loader is not None:  # once per process for concurrent callers, Redis or not
            return self._flights.run(
                encoded, lambda: self._load_unleased(key, loader), wait=self._lease_wait
            )
        raise CacheUnavailable(f"Redis read of {key!r} failed: {err}") from err

    def _load(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Callable[[Any], Any],
        ttl: Any,
        rejected: bytes | None = None,
    ) -> Any:
        """Load a missing key once across processes: take its lease or wait for its value."""
        pending = self._begin_load(key, encoded, slot, ttl, rejected)
        if not isinstance(pending, _PendingLoad):
            return pending
        try:
            value = _absent_to_missing(loader, key)
        except BaseException:
            return self._load_failed(pending)
        return self._finish_load(pending, value)

    def _begin_load(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        ttl: Any,
        rejected: bytes | None = None,
    ) -> _PendingLoad | Any:
        """Before calling a loader: our lease (a ``_PendingLoad``), or the value that arrived.

        ``rejected``: bytes of this key that did not verify or parse; the lease replaces them.
        """
        ticket = self._guard.ticket()  # before the lease script reads Redis, as in _read
        floor = self._floor(slot.guard)
        lease = self._acquire_lease(encoded, rejected)
        for _ in range(2):  # a value that arrives while we wait to replace a bad one is served
            if lease is None or lease.kind != "v":
                break
            hit = self._lease_value(lease, encoded, floor)
            if hit is not None:
                return self._serve(key, encoded, slot, ticket, hit, None, ttl)
            lease = self._acquire_lease(encoded, lease.envelope)  # unreadable, or expired
        # (still a value: unreadable, rewritten meanwhile; loaded without storing)
        return self._pending_load(lease, encoded, slot, ticket, ttl)

    def _finish_load(self, pending: _PendingLoad, value: Any) -> Any:
        """After the loader returned ``value``: store it if our lease still stands; return it."""
        lease = pending.lease
        if lease is None or lease.envelope is None:
            return value
        try:
            made = self._loaded_envelope(pending, value)
        except BaseException:
            self._release(pending.encoded, lease.envelope)
            raise
        self._filter_learns(pending.encoded, value)
        if made is not None:
            self._fill(pending.encoded, pending.slot, lease.envelope, pending.ticket, made, value)
        return value

    def _filter_learns(self, encoded: bytes, value: Any) -> None:
        """Tell the negative filter what a load found: a key that exists, or a false positive."""
        if self._bloom is None:
            return
        if value is MISSING:
            self._bloom.note("false_positive")
            return
        try:
            self._bloom.register(encoded)
        except redis_lib.RedisError:
            pass  # the filter switches itself off when it may have missed a key

    def _load_failed(self, pending: _PendingLoad) -> Any:
        """The loader raised (the exception is being handled): a recent copy, or re-raise."""
        if pending.lease is not None and pending.lease.envelope is not None:
            self._release(pending.encoded, pending.lease.envelope)
        stale = self._stale_local(pending.slot)
        if stale is not _NOT_LOCAL:
            return stale  # fail-safe: the loader failed, a recent copy is served
        raise  # (the loader's exception, which the caller is handling)

    def _acquire_lease(self, encoded: bytes, rejected: bytes | None = None) -> LeaseResult | None:
        """Our fill lease, a value that arrived meanwhile, or None (load without storing).

        While another process holds the lease, poll for its value with backoff, at most
        ``lease_wait`` seconds; a holder that died leaves a lease that expires, and then we
        take it. None when Redis fails or the wait runs out.
        """
        token = secrets.token_bytes(16)
        deadline = time.monotonic() + self._lease_wait
        delay = _POLL_FIRST
        waited = False
        while True:
            try:
                lease = self._driver.lease(encoded, token, self._lease_ms, rejected)
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
            time.sleep(self._lease_delay(lease, delay, left))
            delay = min(delay * 1.5, _POLL_MAX)

    def _fill(
        self,
        encoded: bytes,
        slot: _Slot,
        lease: bytes,
        ticket: int,
        env: Envelope,
        value: Any,
    ) -> None:
        ext = self._ext_of(env, encoded)
        try:
            stored = self._driver.call(self._fill_call(encoded, lease, env, ext))
        except redis_lib.RedisError as err:
            self._counters.add("write_errors")
            self._warn(f"fill of {encoded[:60]!r} failed: {err}")
            return
        if self._filled(stored, slot, ticket, env, value, encoded, ext):
            self._release(encoded, lease)  # refused for a tag: our lease may still be there

    def _release(self, encoded: bytes, lease: bytes) -> None:
        try:
            self._driver.release(encoded, lease)
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
        def refresh() -> None:
            self._refresh(key, encoded, slot, loader, ttl, version)

        self._refresher.submit(encoded, refresh)

    def _refresh(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Callable[[Any], Any],
        ttl: float | None,
        version: int,
    ) -> None:
        """Reload ``key`` in the background; store it only if the key still holds ``version``."""
        token = secrets.token_bytes(16)
        if not self._driver.mark_refresh(encoded, token, self._lease_ms, version):
            return  # another process refreshes it, or already did (the "refreshing" marker)
        ticket = self._guard.ticket()
        started = time.monotonic()
        self._counters.add("loads")
        value = _absent_to_missing(loader, key)
        payload, flags = self._payload(value)
        load_ms = (time.monotonic() - started) * 1000.0
        env = self._value_envelope(payload, flags, ttl, version, load_ms, encoded, value)
        ext = self._ext_of(env, encoded)
        if self._driver.call(self._refresh_call(encoded, version, env, ext, token)):
            self._counters.add("refreshes")
            self._install(ticket, slot, env.version, self._local_fresh(env), value, ext)
        else:
            self._counters.add("stale_fills_rejected")  # a write or delete landed meanwhile

    # -- batches ----------------------------------------------------------------------------

    def get_many(self, keys: Iterable[Hashable]) -> dict[Hashable, Any]:
        """The values of the keys present, from the local tier, then one round trip to Redis."""
        found, _, _ = self._read_many(list(keys))
        return found

    def get_or_load_many(
        self,
        keys: Iterable[Hashable],
        loader_many: Callable[[list[Any]], Mapping[Any, Any]],
        ttl: float | None = None,
    ) -> dict[Hashable, Any]:
        """The values of ``keys``; those missing everywhere come from one ``loader_many`` call.

        ``loader_many(keys)`` returns a mapping; a key it leaves out does not exist (cached as
        absent for ``negative_ttl``). The leases of all missing keys are taken in one round
        trip, and the values stored in another.
        """
        ttl = self._ttl if ttl is None else ttl
        found, missing, tickets = self._read_many(list(keys))
        if not missing:
            return found
        encoded = [encode_key(k) for k in missing]
        floors = [
            self._floor(self._slot(k, e).guard) for k, e in zip(missing, encoded, strict=True)
        ]
        token = secrets.token_bytes(16)
        try:
            leases: list[LeaseResult | None] = list(
                self._driver.leases(encoded, token, self._lease_ms)
            )
        except redis_lib.RedisError:
            leases = [None] * len(missing)
        to_load = []
        for key, enc, floor, lease in zip(missing, encoded, floors, leases, strict=True):
            if lease is not None and lease.kind == "v":
                hit = self._decode(lease.envelope or b"", enc, floor)
                if hit is not None and hit is not _REJECTED:
                    if hit[5] is not MISSING:
                        found[key] = hit[5]
                    continue
                # Unreadable or expired by our clock: a lease that replaces exactly those bytes,
                # so the fill below overwrites them (as the single-key path does).
                lease = self._acquire_lease(enc, lease.envelope)
            to_load.append((key, enc, lease))
        if not to_load:
            return found
        self._counters.add("loads")
        started = time.monotonic()
        loaded = loader_many([key for key, _, _ in to_load])
        load_ms = (time.monotonic() - started) * 1000.0
        fills = []
        for key, enc, lease in to_load:
            value = loaded.get(key, MISSING)
            if value is not MISSING:
                found[key] = value
            if lease is None or lease.kind != "l" or lease.envelope is None:
                continue
            payload, flags = self._payload(value)
            self._filter_learns(enc, value)
            env = self._value_envelope(payload, flags, ttl, lease.version, load_ms, enc, value)
            fills.append((key, enc, lease.envelope, env, value))
        if fills:
            self._fill_many(fills, tickets)
        return found

    def _read_many(
        self, keys: list[Hashable]
    ) -> tuple[dict[Hashable, Any], list[Hashable], dict[Hashable, int]]:
        """(found values, keys missing everywhere, the read tickets) for a batch of keys."""
        self._ensure_listener()
        found: dict[Hashable, Any] = {}
        pending: list[tuple[Hashable, bytes, Hashable]] = []
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
            self._check_generation()
        ticket = self._guard.ticket()
        floors = [self._floor(slot.guard) for _, _, slot in pending]
        tickets = {key: ticket for key, _, _ in pending}
        if not pending:
            return found, [], tickets
        try:
            raws = self._driver.mget([self._keys.value(enc) for _, enc, _ in pending])
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis read failed: {err}") from err
        missing = []
        for (key, encoded, slot), floor, raw in zip(pending, floors, raws, strict=True):
            hit = self._decode(raw, encoded, floor) if raw is not None else None
            if hit is None or hit is _REJECTED:
                self._counters.add("misses")
                missing.append(key)
                continue
            self._counters.add("remote_hits")
            value = self._serve(key, encoded, slot, ticket, hit, None, None)
            if value is not MISSING:
                found[key] = value
        return found, missing, tickets

    def _fill_many(
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
            stored = [r is True for r in self._driver.call_many(calls)]
        except redis_lib.RedisError as err:
            self._counters.add("write_errors")
            self._warn(f"batch fill failed: {err}")
            return
        for (key, enc, _, env, value), ext, ok in zip(fills, exts, stored, strict=True):
            self._filled(ok, self._slot(key, enc), tickets.get(key, -1), env, value, enc, ext)

    # -- writes ---------------------------------------------------------------------------------

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.set(key, value)

    def set(
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

        ``ttl`` may be a callable(key, value) returning seconds or None (adaptive TTL); ``tags``
        names the groups ``invalidate_tag`` drops it with (or a callable(key, value) giving
        them); ``sliding`` makes reads push its Redis TTL back (see tiercache.tags);
        ``write_behind``: also queue the write for the origin, atomically (tiercache.writebehind).
        """
        encoded, slot, env = self._set_envelope(key, value, ttl, tags, sliding)
        if self._listener is None:
            self._ensure_listener()
        if not self._local_usable:
            self._check_generation()
        if self._bloom is not None:  # before the value exists anywhere
            try:
                self._bloom.register(encoded)
            except redis_lib.RedisError as err:
                raise CacheUnavailable(f"Redis write of {key!r} failed: {err}") from err
        ticket = self._guard.ticket()
        applied = self._write(key, encoded, slot, OP_SET, env, behind=write_behind)
        if applied is not None:
            self._set_done(ticket, slot, applied, env, value, encoded)

    def _write(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        op: str,
        env: Envelope,
        behind: bool = False,
    ) -> Any:
        """Run the write script for ``op``; the local copy is dropped before, and after a failure.

        Returns the driver's result (the caller ends an applied write: ``_write_done``), or
        None when the failure is swallowed (on_write_error).
        ``behind``: the write-behind script, which also queues the write for the origin.
        """
        slot.l1.pop(slot.key, None)  # read-your-writes: the old local copy goes first
        ext = self._ext_of(env, encoded) if env.flags & FLAG_EXT else None
        own = self._own
        try:
            for attempt in range(self._write_attempts(ext)):
                own.begin(env.version)
                result = self._driver.call(self._write_call(encoded, op, env, ext, behind))
                if result.applied:
                    break
                own.end(env.version, applied=False)
                env = self._write_retry(result, env, ext, attempt)
            else:
                raise redis_lib.ResponseError("concurrent writers kept overtaking this one")
        except redis_lib.RedisError as err:
            landed = own.end(env.version, applied=False)  # its echo came: it landed
            if not landed and self._listener is not None:  # (or passed the socket's filter)
                landed = self._listener.heard(env.version)
            self._write_unknown(key, slot, env, err, behind, landed=landed)
            return None
        own.end(env.version, applied=True)
        return result

    def __delitem__(self, key: Hashable) -> None:
        if not self._delete(key):
            raise KeyError(key)

    def invalidate(self, key: Hashable) -> bool:
        """Remove ``key`` everywhere (Redis and every local tier); whether it was anywhere."""
        return self._delete(key)

    def write_around(self, key: Hashable) -> bool:
        """After the caller wrote ``key`` to the origin: drop it everywhere (versioned tombstone).

        The next read of any process loads the origin's value; a fill that read the origin
        before is discarded (the tombstone replaced its lease). Whether it was cached.
        """
        return self._delete(key)

    def warm(
        self,
        keys: Iterable[Hashable],
        loader_many: Callable[[list[Any]], Mapping[Any, Any]],
        *,
        batch_size: int = 500,
        progress: Progress | None = None,
        ttl: float | None = None,
    ) -> WarmResult:
        """Pre-load the missing ``keys`` into Redis in batches, never over a newer value.

        ``loader_many(keys)`` returns a mapping; ``progress(done, total)`` follows each batch
        (total None for an iterator). See tiercache.warm.
        """
        return warm(self, keys, loader_many, batch_size=batch_size, progress=progress, ttl=ttl)

    def _delete(self, key: Hashable, behind: bool = False) -> bool:
        encoded, slot, env, was_local = self._delete_envelope(key)
        self._ensure_listener()
        if not self._local_usable:
            self._check_generation()
        result = self._write(key, encoded, slot, OP_DELETE, env, behind=behind)
        if result is None:
            return True  # Redis failed and the failure was swallowed: it may have been there
        self._write_done(slot, result)
        self._counters.add("deletes")
        return was_local or result.existed

    def clear(self) -> None:
        """Empty the namespace in Redis and in every process' local tier."""
        self._ensure_listener()
        self._forget_local()
        try:
            partitions = range(self._keys.partitions)
            self._driver.unlink_partitions(partitions)
            for partition in partitions:
                version = self._clock.next()
                sig = self._sign_message(b"", version, OP_CLEAR)
                self._driver.announce_clear(partition, version, self._origin, sig=sig)
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis clear failed: {err}") from err
        finally:
            self._forget_local()  # what a reader of this process installed meanwhile, too

    # -- the namespace as a mapping ---------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        encoded = encode_key(key)
        try:
            return self._driver.has_value(encoded)
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis read failed: {err}") from err

    def _value_names(self) -> Iterator[bytes]:
        seen: set[bytes] = set()
        try:
            for name in self._driver.scan_values_of(range(self._keys.partitions)):
                if name not in seen:
                    seen.add(name)
                    yield name
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis scan failed: {err}") from err

    def __iter__(self) -> Iterator[Any]:
        """The keys stored in Redis for this namespace (SCAN-based: not a snapshot, not O(1))."""
        for name in self._value_names():
            stored = self._keys.encoded_of_value_key(name)
            try:
                if self._keys.is_digest(stored):  # a long key: it is inside the value
                    stored = self._long_key(name)
                key = decode_key(stored)
            except ValueError:
                continue  # not one of ours
            yield key

    def _long_key(self, name: bytes) -> bytes:
        """The encoded key inside the value stored under the digest name ``name``."""
        try:
            raw = self._driver.get(name) or b""
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis scan failed: {err}") from err
        encoded = _key_in_block(raw[HEADER_SIZE + raw[5] :] if len(raw) > 5 else b"")
        if self._keys.value(encoded) != name:
            raise ValueError("not the key this name stands for")
        return encoded

    def __len__(self) -> int:
        """How many keys Redis holds for this namespace (a full SCAN: O(n))."""
        return sum(1 for _ in self._value_names())

    # -- introspection and lifecycle ---------------------------------------------------------

    @property
    def bloom(self) -> NegativeFilter | None:
        """The negative filter (``bloom=``), or None."""
        return self._bloom

    @property
    def redis(self) -> redis_lib.Redis:
        """The Redis client this cache uses."""
        return self._driver.client

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """Block until the local tier may serve (the channel is whole); whether it may."""
        self._ensure_listener()
        listener = self._listener
        return listener is not None and listener.wait_healthy(timeout)

    def close(self) -> None:
        """Stop the listener, close connections this cache opened, stop its own server."""
        if self._closed:
            return
        self._closed = True
        self._set_usable(False)
        _live_caches.pop(id(self), None)
        if self._listener is not None:
            self._listener.stop()
        self._refresher.close()
        if self._heartbeat_interval:
            try:  # a closed process leaves the fleet view at once
                self._driver.client.delete(self._keys.heartbeat(self._origin))
            except redis_lib.RedisError:
                pass
        self._driver.close()
        if self._owns_client:
            self._driver.client.close()
        if self._server is not None:
            self._server.stop()

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TieredCache(namespace={self._keys.namespace!r}, local_size={len(self._l1)}, "
            f"local_usable={self._local_usable})"
        )

    # -- helpers --------------------------------------------------------------------------------

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

import logging
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, MutableMapping
from typing import Any

import redis as redis_lib

from . import server as server_mod
from .codec import Codec, resolve_codec
from .driver import SyncDriver, make_client
from .envelope import FLAG_TOMBSTONE, Envelope, EnvelopeError, unpack
from .errors import CacheUnavailable
from .keys import KeySpace, decode_key, encode_key, local_key, local_key_of
from .listener import Listener
from .local import LocalCache, TieredFront
from .protocol import OP_CLEAR, OP_DELETE, OP_SET, FillGuard, Invalidation, VersionClock

log = logging.getLogger("tiercache")

_MISSING: Any = object()
_WRITE_ATTEMPTS = 3
_LOG_INTERVAL = 10.0


class _Counters:
    """The cache's event counters (slow paths only; local hits are counted by the local tier)."""

    NAMES = (
        "remote_hits",
        "misses",
        "loads",
        "writes",
        "deletes",
        "invalidations_received",
        "stale_fills_rejected",
        "local_fills_rejected",
        "resyncs",
        "flushes",
        "rejected_payloads",
        "stale_served",
        "read_errors",
        "write_errors",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


# Keyed by id: a TieredCache compares by content, as a mapping does, so it is not hashable.
_live_caches: weakref.WeakValueDictionary[int, TieredCache] = weakref.WeakValueDictionary()


def _after_fork_in_child() -> None:
    for cache in list(_live_caches.values()):
        cache._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class TieredCache(TieredFront, MutableMapping):  # type: ignore[misc]
    """A dict-like cache: a local tier per process in front of a shared Redis."""

    def __init__(
        self,
        redis: str | redis_lib.Redis | None = None,
        *,
        namespace: str = "tc",
        local_maxsize: int = 10_000,
        local_policy: str = "lru",
        local_ttl: float = 60.0,
        local_maxbytes: int | None = None,
        ttl: float | None = None,
        loader: Callable[[Any], Any] | None = None,
        serializer: str | Codec | None = None,
        stale_if_error: float = 0.0,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        retries: int = 1,
        health_interval: float = 1.0,
        health_timeout: float = 1.0,
        startup_timeout: float = 2.0,
        lease_ttl: float = 10.0,
        tombstone_ttl: float = 60.0,
        log_maxlen: int = 10_000,
        on_write_error: str = "raise",
        partitions: int = 1,
        timer: Callable[[], float] | None = None,
    ) -> None:
        if not local_ttl > 0 or math.isinf(local_ttl):
            raise ValueError("local_ttl must be a finite number of seconds > 0")
        if stale_if_error < 0:
            raise ValueError("stale_if_error must be >= 0")
        if ttl is not None and not ttl > 0:
            raise ValueError("ttl must be > 0 or None")
        if on_write_error not in ("raise", "invalidate_local"):
            raise ValueError("on_write_error must be 'raise' or 'invalidate_local'")
        self._keys = KeySpace(namespace, partitions)
        self._codec = resolve_codec(serializer)
        self._loader = loader
        self._ttl = ttl
        self._local_ttl = local_ttl
        self._stale_if_error = stale_if_error
        self._lease_ms = int(lease_ttl * 1000)
        self._tombstone_ttl = tombstone_ttl
        self._on_write_error = on_write_error
        self._l1_args = {
            "policy": local_policy,
            "ttl": max(local_ttl, stale_if_error),
            "maxbytes": local_maxbytes,
            "timer": timer,
        }
        self._local_maxsize = local_maxsize
        self._listener_args = {
            "health_interval": health_interval,
            "health_timeout": health_timeout,
            "subscribe_timeout": max(startup_timeout, 1.0),
        }
        self._startup_timeout = startup_timeout
        self._origin = secrets.token_hex(6)
        self._counters = _Counters()
        self._clock = VersionClock()
        self._closed = False
        self._server: server_mod.RedisServer | None = None
        self._owns_client = not isinstance(redis, redis_lib.Redis)
        self._listener: Listener | None = None
        self._listener_lock = threading.Lock()
        self._last_warning = 0.0

        if redis is None:
            self._server = server_mod.RedisServer()
            self._server.start()
            redis = self._server.url
        if isinstance(redis, str):
            client = make_client(
                redis,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                retries=retries,
            )
        else:
            client = redis
        self._driver = SyncDriver(client, self._keys, log_maxlen=log_maxlen)
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
        self._l1 = LocalCache(self._local_maxsize, **self._l1_args)
        self._guard = FillGuard()
        self._front_init(self._l1)

    def _ensure_listener(self) -> None:
        if self._listener is not None or self._closed:
            return  # (a forked child has none: the at-fork hook dropped the parent's)
        with self._listener_lock:
            if self._listener is None and not self._closed:
                self._listener = Listener(
                    self._driver,
                    self,
                    partitions=range(self._keys.partitions),
                    name=f"tiercache:listener:{self._keys.namespace}:{self._origin}",
                    **self._listener_args,
                )
                self._listener.start()

    def _after_fork(self) -> None:
        """In a forked child: no thread, no trusted local copy; connections are redone lazily."""
        self._set_usable(False)
        self._listener = None
        self._listener_lock = threading.Lock()
        self._counters = _Counters()
        self._fresh_local_tier()  # the parent's locks and flags may have been held mid-write

    # -- the listener's reports (tiercache.listener.ListenerHandler) ----------------------------

    def on_unhealthy(self, reason: str) -> None:
        """The invalidation channel may have lost messages: stop serving local copies."""
        self._set_usable(False)
        self._warn(f"local tier off: {reason}")

    def on_healthy(self, recovered: bool) -> None:
        """The channel is whole: local copies may be served again."""
        try:
            self._clock.calibrate(*self._driver.server_time())
        except redis_lib.RedisError:
            pass  # versions stay monotone without it; the next recovery tries again
        if recovered:
            self._counters.add("resyncs")
        self._set_usable(True)

    def apply(self, msg: Invalidation) -> None:
        """Apply one invalidation from another process (or this one's own echo)."""
        self._counters.add("invalidations_received")
        self._clock.observe(msg.version)
        if msg.op == OP_CLEAR:
            self._forget_local()
            return
        key = local_key_of(msg.key)
        with self._guard.lock:
            self._guard.observe(key, msg.version)
            e = self._l1.entry(key)
            if e is not None and e.version < msg.version:
                self._l1.pop(key, None)

    def flush(self, reason: str) -> None:
        """Messages were lost beyond the log: forget every local copy."""
        self._counters.add("flushes")
        self._warn(f"local tier flushed: {reason}")
        self._forget_local()

    def _forget_local(self) -> None:
        with self._guard.lock:
            self._guard.forget_all()
            self._l1.clear()

    # -- reads ----------------------------------------------------------------------------------

    def _getitem_slow(self, key: Hashable) -> Any:
        value = self._read(key, self._loader)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def _get_slow(self, key: Hashable, default: Any) -> Any:
        try:
            value = self._read(key, self._loader)
        except KeyError:
            return default
        return default if value is _MISSING else value

    def _read(self, key: Hashable, loader: Callable[[Any], Any] | None) -> Any:
        """The value of ``key`` from the first tier that has it, else ``_MISSING``."""
        encoded = encode_key(key)
        lkey = local_key(key, encoded)
        self._ensure_listener()
        if self._local_usable:
            e = self._l1.entry(lkey)
            if e is not None and e.fresh_until > self._l1.timer():
                return self._l1.get(lkey, e.value)
        ticket = self._guard.ticket()
        try:
            raw = self._driver.get(self._keys.value(encoded))
        except redis_lib.RedisError as err:
            return self._read_failed(err, key, lkey, loader)
        if raw is not None:
            decoded = self._decode(raw, encoded)
            if decoded is not None:
                env, value = decoded
                self._install(ticket, lkey, env, value)
                self._counters.add("remote_hits")
                return value
        self._counters.add("misses")
        if loader is None:
            return _MISSING
        return self._load(key, encoded, lkey, loader)

    def _read_failed(
        self,
        err: redis_lib.RedisError,
        key: Hashable,
        lkey: Hashable,
        loader: Callable[[Any], Any] | None,
    ) -> Any:
        """Redis failed a read: a recent local copy (fail-safe), the loader, or the error."""
        self._counters.add("read_errors")
        if self._stale_if_error > 0:
            e = self._l1.entry(lkey)
            if e is not None:
                age = self._l1.timer() - (e.expires - self._l1_args["ttl"])
                if age <= self._stale_if_error:
                    self._counters.add("stale_served")
                    return e.value
        if loader is not None:
            self._counters.add("loads")
            return loader(key)
        raise CacheUnavailable(f"Redis read of {key!r} failed: {err}") from err

    def _decode(self, raw: bytes, encoded: bytes) -> tuple[Envelope, Any] | None:
        """The envelope and value in ``raw``, or None (counted) if it does not verify or parse."""
        try:
            env = unpack(raw)
            if env.absent or not env.is_value:
                return None  # (a tombstone or a fill lease in the entry: a miss)
            if env.expires_at and env.expires_at <= self._clock.now_us() / 1e6:
                return None
            if env.codec != self._codec.id or env.compression:
                # Only this cache's own codec may read a payload: a pickle payload planted in
                # Redis must never reach pickle.loads.
                raise ValueError(f"payload of codec {env.codec}, this cache reads {self._codec.id}")
            return env, self._codec.loads(env.payload)
        except (EnvelopeError, ValueError, TypeError) as err:
            self._counters.add("rejected_payloads")
            self._warn(f"rejected the payload of {encoded[:60]!r}: {err}")
            return None

    def _install(self, ticket: int, lkey: Hashable, env: Envelope, value: Any) -> None:
        """Install a value read under ``ticket`` locally, unless it could bring back old data."""
        if not self._local_usable:
            return
        fresh = self._local_ttl
        if env.expires_at:
            fresh = min(fresh, env.expires_at - self._clock.now_us() / 1e6)
            if fresh <= 0:
                return
        with self._guard.lock:
            current = self._l1.entry(lkey)
            if current is not None and current.version >= env.version:
                return
            if not self._guard.admit(ticket, lkey, env.version):
                self._counters.add("local_fills_rejected")
                return
            self._put_local(lkey, value, env.version, fresh)

    def _put_local(self, lkey: Hashable, value: Any, version: int, fresh: float) -> None:
        """Store a local copy fresh for ``fresh`` seconds (caller holds the guard's lock)."""
        try:
            self._l1.set(lkey, value, version=version, fresh_until=self._l1.timer() + fresh)
        except ValueError:  # heavier than local_maxbytes: it lives in Redis only
            self._l1.pop(lkey, None)

    def _load(
        self, key: Hashable, encoded: bytes, lkey: Hashable, loader: Callable[[Any], Any]
    ) -> Any:
        """Call the loader for a missing key; store its value only if no write overtook it."""
        try:
            lease = self._driver.lease(encoded, secrets.token_bytes(16), self._lease_ms)
        except redis_lib.RedisError:
            lease = None  # no way to coordinate: load, but do not store
        if lease is not None and lease.kind == "v" and lease.envelope is not None:
            ticket = self._guard.ticket()
            decoded = self._decode(lease.envelope, encoded)
            if decoded is not None:
                self._install(ticket, lkey, *decoded)
                self._counters.add("remote_hits")
                return decoded[1]
        ours = lease.envelope if lease is not None and lease.kind == "l" else None
        ticket = self._guard.ticket()
        started = time.monotonic()
        try:
            self._counters.add("loads")
            value = loader(key)
            payload = self._codec.dumps(value) if ours is not None else b""
        except BaseException:
            if ours is not None:
                self._release(encoded, ours)
            raise
        if ours is not None and lease is not None:
            load_ms = (time.monotonic() - started) * 1000.0
            version = self._clock.next(after=lease.version)
            env = self._envelope(payload, self._ttl, version, load_ms)
            self._fill(encoded, lkey, ours, ticket, env, value)
        return value

    def _fill(
        self, encoded: bytes, lkey: Hashable, lease: bytes, ticket: int, env: Envelope, value: Any
    ) -> None:
        try:
            stored = self._driver.fill(encoded, lease, env.pack(), self._ttl_ms(self._ttl))
        except redis_lib.RedisError as err:
            self._counters.add("write_errors")
            self._warn(f"fill of {encoded[:60]!r} failed: {err}")
            return
        if not stored:
            self._counters.add("stale_fills_rejected")
            return
        self._install(ticket, lkey, env, value)

    def _release(self, encoded: bytes, lease: bytes) -> None:
        try:
            self._driver.release(encoded, lease)
        except redis_lib.RedisError:
            pass  # the lease expires by itself

    # -- writes ---------------------------------------------------------------------------------

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.set(key, value)

    def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Write ``value`` through to Redis (for ``ttl`` seconds, default the cache's) and here."""
        if ttl is not None and not ttl > 0:
            raise ValueError("ttl must be > 0 or None")
        encoded = encode_key(key)
        lkey = local_key(key, encoded)
        payload = self._codec.dumps(value)  # a value that cannot be stored changes nothing
        ttl = self._ttl if ttl is None else ttl
        env = self._envelope(payload, ttl, self._clock.next(after=self._guard.newest(lkey)), 0.0)
        self._ensure_listener()
        applied = self._write(key, encoded, lkey, OP_SET, env, ttl)
        if applied is None:
            return
        self._counters.add("writes")
        if not self._local_usable:
            return
        fresh = self._local_ttl if ttl is None else min(self._local_ttl, ttl)
        with self._guard.lock:
            if self._guard.newest(lkey) <= applied.version:
                self._put_local(lkey, value, applied.version, fresh)

    def _write(
        self,
        key: Hashable,
        encoded: bytes,
        lkey: Hashable,
        op: str,
        env: Envelope,
        ttl: float | None,
    ) -> Any:
        """Run the write script for ``op``; the local copy is dropped before, and after a failure.

        Returns the driver's result, or None when the failure is swallowed (on_write_error).
        """
        self._l1.pop(lkey, None)  # read-your-writes: the old local copy goes first
        try:
            for _ in range(_WRITE_ATTEMPTS):
                result = self._driver.write(
                    encoded,
                    op,
                    env.version,
                    env.pack(),
                    ttl_ms=self._ttl_ms(ttl),
                    origin=self._origin,
                )
                if result.applied:
                    break
                self._clock.observe(result.version)
                env = env.with_version(self._clock.next(after=result.version))
            else:
                raise redis_lib.ResponseError("concurrent writers kept overtaking this one")
        except redis_lib.RedisError as err:
            # The outcome is unknown (Redis may apply it later): no local copy of this key may
            # be trusted, and a fill that read the old value must not install it.
            with self._guard.lock:
                self._guard.observe(lkey, env.version)
                self._l1.pop(lkey, None)
            self._counters.add("write_errors")
            if self._on_write_error == "invalidate_local":
                self._warn(f"write of {key!r} failed, only invalidated locally: {err}")
                return None
            raise CacheUnavailable(f"Redis write of {key!r} failed: {err}") from err
        with self._guard.lock:
            self._guard.observe(lkey, result.version)
        return result

    def __delitem__(self, key: Hashable) -> None:
        if not self._delete(key):
            raise KeyError(key)

    def invalidate(self, key: Hashable) -> bool:
        """Remove ``key`` everywhere (Redis and every local tier); whether it was anywhere."""
        return self._delete(key)

    def _delete(self, key: Hashable) -> bool:
        encoded = encode_key(key)
        lkey = local_key(key, encoded)
        was_local = self._l1.peek(lkey, _MISSING) is not _MISSING
        version = self._clock.next(after=self._guard.newest(lkey))
        env = Envelope(version, self._codec.id, b"", flags=FLAG_TOMBSTONE)
        self._ensure_listener()
        result = self._write(key, encoded, lkey, OP_DELETE, env, self._tombstone_ttl)
        if result is None:
            return was_local
        self._counters.add("deletes")
        return was_local or result.existed

    def clear(self) -> None:
        """Empty the namespace in Redis and in every process' local tier."""
        self._ensure_listener()
        self._forget_local()
        try:
            for partition in range(self._keys.partitions):
                self._driver.unlink_partition(partition)
                self._driver.announce_clear(partition, self._clock.next(), self._origin)
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis clear failed: {err}") from err

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
            for partition in range(self._keys.partitions):
                for name in self._driver.scan_values(partition):
                    if name not in seen:
                        seen.add(name)
                        yield name
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"Redis scan failed: {err}") from err

    def __iter__(self) -> Iterator[Any]:
        """The keys stored in Redis for this namespace (SCAN-based: not a snapshot, not O(1))."""
        for name in self._value_names():
            try:
                yield decode_key(self._keys.encoded_of_value_key(name))
            except ValueError:
                continue  # not one of ours

    def __len__(self) -> int:
        """How many keys Redis holds for this namespace (a full SCAN: O(n))."""
        return sum(1 for _ in self._value_names())

    # -- introspection and lifecycle ---------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since creation, per tier and per event."""
        local = self._l1.stats()
        out: dict[str, Any] = {"local_hits": local["hits"], "local_misses": local["misses"]}
        out.update(self._counters.snapshot())
        out["local_size"] = local["currsize"]
        out["local_evictions"] = local["evictions"]
        out["local_usable"] = self._local_usable
        listener = self._listener
        out["gaps"] = listener.gaps if listener else 0
        out["malformed_messages"] = listener.malformed if listener else 0
        out["disconnects"] = listener.disconnects if listener else 0
        return out

    @property
    def local(self) -> LocalCache:
        """The local tier (for inspection; writes to it bypass Redis and coherence)."""
        return self._l1

    @property
    def namespace(self) -> str:
        """The namespace of this cache's keys in Redis."""
        return self._keys.namespace

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

    def _envelope(
        self, payload: bytes, ttl: float | None, version: int, load_ms: float
    ) -> Envelope:
        expires_at = self._clock.now_us() / 1e6 + ttl if ttl else 0.0
        return Envelope(version, self._codec.id, payload, expires_at=expires_at, load_ms=load_ms)

    @staticmethod
    def _ttl_ms(ttl: float | None) -> int:
        return 0 if ttl is None else max(1, int(ttl * 1000))

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _LOG_INTERVAL:
            self._last_warning = now
            log.warning("tiercache %r: %s", self._keys.namespace, message)
        else:
            log.debug("tiercache %r: %s", self._keys.namespace, message)

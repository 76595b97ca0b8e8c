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

import collections
import dataclasses
import json
import logging
import math
import os
import random
import secrets
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, NamedTuple, Protocol

import redis as redis_lib
from redis.cluster import RedisCluster

from . import checks, writebehind
from . import cluster as cluster_mod
from . import server as server_mod
from . import tags as tagmod
from ._sentinel import MISSING
from .codec import Codec, compress, decompress, resolve_codec
from .driver import LeaseResult, SyncDriver, make_client
from .envelope import (
    COMPRESSION_MASK,
    COMPRESSION_SHIFT,
    FLAG_ABSENT,
    FLAG_EXT,
    FLAG_NOT_A_VALUE,
    FLAG_TOMBSTONE,
    FORMAT,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    Envelope,
)
from .errors import CacheUnavailable
from .keys import MAX_KEY_BYTES, KeySpace, decode_key, encode_key, local_key, local_key_of
from .listener import Listener
from .local import LocalCache, TieredFront
from .protocol import (
    OP_CLEAR,
    OP_CLEAR_PREFIX,
    OP_DELETE,
    OP_NAMESPACE,
    OP_SET,
    OP_TAG,
    FillGuard,
    Invalidation,
    VersionClock,
    jittered,
    xfetch_due,
)
from .signing import SIGNATURE_SIZE, Secret, Signer
from .stampede import Refresher, SingleFlight
from .tagging import TAG_ATTEMPTS, TAG_STEP_US, TaggingMixin
from .tags import Ext, Policy, TagsArg, TagState, TtlArg
from .warm import Progress, WarmResult, warm

log = logging.getLogger("tiercache")

_NOT_LOCAL: Any = object()
_WRITE_ATTEMPTS = 3
_LOG_INTERVAL = 10.0
_POLL_FIRST = 0.002  # first wait for another process' fill, then x1.5 up to _POLL_MAX
_POLL_MAX = 0.05
_FLOOR_LEAD_US = 1_000_000  # see TieredCache._floor
_MAX_CLOCK_LEAD_US = 3_600_000_000  # a version more than 1 h ahead of Redis time is not believed
_INFLATION = 32  # a compressed payload may decode to at most this many times max_value_bytes
_REJECTED: Any = object()  # what _decode says of bytes that do not verify or parse
_XFETCH_HORIZON = math.log(1000.0)  # beyond this many beta*delta an early refresh is < 0.1%

# What a read of Redis found: (version, flags, expires_at, fresh_until, load_ms, value, ext).
_Hit = tuple[int, int, float, float, float, Any, Ext | None]


class _Slot(NamedTuple):
    """Where a key lives locally: its local tier, its key there, its key in the FillGuard."""

    l1: LocalCache
    key: Hashable
    guard: Hashable


class _PendingLoad(NamedTuple):
    """A load in progress: where it goes, its lease (None: do not store), its read ticket."""

    encoded: bytes
    slot: _Slot
    lease: LeaseResult | None
    ticket: int
    started: float
    ttl: Any  # seconds, None, a callable or a tags.Policy


# A decorated function's calls are keys ``(CALL_MARK, qualified name, ...)``; they live in the
# function's own local tier (see tiercache.decorator), found by the encoded key's prefix.
CALL_MARK = "tiercache.call"
_CALL_PREFIX = encode_key((CALL_MARK,))


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


class SubTier(Protocol):
    """A decorated function's local tier, as the cache sees it."""

    local: LocalCache

    def local_key_of(self, key: tuple[Any, ...]) -> Hashable:
        """The local key of a call key ``(CALL_MARK, name, ...)``."""

    def _rebind_local(self) -> None:
        """Replace the local tier by a fresh one (in a forked child)."""


class _Window:
    """The last ``size`` samples of a duration, for percentiles in stats() and the metrics."""

    def __init__(self, size: int = 1024) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, value: float) -> None:
        with self._lock:
            self._samples.append(value)
            self.count += 1

    def since(self, seen: int) -> tuple[list[float], int]:
        """(the samples added after the first ``seen`` ones, as far as kept; the total count)."""
        with self._lock:
            new = min(self.count - seen, len(self._samples))
            return (list(self._samples)[-new:] if new > 0 else []), self.count

    def percentiles(self) -> dict[str, float | None]:
        data = sorted(self._samples)
        if not data:
            return {"p50": None, "p99": None, "max": None}
        return {
            "p50": data[len(data) // 2],
            "p99": data[min(len(data) - 1, int(len(data) * 0.99))],
            "max": data[-1],
        }


def _user_key(encoded: bytes) -> Any:
    try:
        return decode_key(encoded)
    except ValueError:
        return encoded


def _local_evict_hook(hook: Callable[[Any, Any, str], None]) -> Callable[[Any, Any, str], None]:
    """The local tier's on_evict for a user's ``hook(key, value, cause)``: user keys, values only
    (a cached absence is not one). It holds no reference to the cache, so makes no cycle."""
    if not callable(hook):
        raise TypeError(f"on_evict must be callable or None, not {type(hook).__name__}")

    def evicted(lkey: Hashable, value: Any, cause: str) -> None:
        if value is not MISSING:
            hook(lkey if type(lkey) is str else _user_key(lkey), value, cause)  # type: ignore[arg-type]

    return evicted


def _encoded_local(lkey: Hashable) -> bytes:
    """The encoding behind a main-tier local key (the inverse of ``local_key``)."""
    return encode_key(lkey) if type(lkey) is str else lkey  # type: ignore[return-value]


def _key_in_block(payload: bytes) -> bytes:
    """The encoded key at the start of a long key's payload (see ``TieredCache._pack``)."""
    size = int.from_bytes(payload[:4], "big")
    if len(payload) < 4 + size:
        raise ValueError("payload without the key it should start with")
    return payload[4 : 4 + size]


def _url_error(url: str, err: ValueError) -> str:
    """The text of a bad Redis URL error, with nothing of the URL's credentials in it."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return f"invalid Redis URL: {err}"
    return (
        f"invalid Redis URL {scheme}://***@{rest[at + 1 :]} (credentials hidden): check its "
        "syntax, and percent-encode the user name's and password's special characters"
    )


def _absent_to_missing(loader: Callable[[Any], Any], key: Any) -> Any:
    """``loader(key)``, with a ``KeyError`` from it turned into ``MISSING``."""
    try:
        return loader(key)
    except KeyError:
        return MISSING


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
        "stale_reads_refused",
        "unsigned_messages",
        "filtered",
        "stale_served",
        "refreshes",
        "lease_waits",
        "lease_timeouts",
        "read_errors",
        "write_errors",
        "slides",
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


class TieredCache(TaggingMixin, TieredFront, MutableMapping):  # type: ignore[misc]
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
        if not local_ttl > 0 or math.isinf(local_ttl):
            raise ValueError("local_ttl must be a finite number of seconds > 0")
        if stale_if_error < 0:
            raise ValueError("stale_if_error must be >= 0")
        if ttl is not None and not callable(ttl) and not ttl > 0:
            raise ValueError("ttl must be > 0, None or a callable(key, value)")
        if on_write_error not in ("raise", "invalidate_local"):
            raise ValueError("on_write_error must be 'raise' or 'invalidate_local'")
        if not negative_ttl > 0 or stale_ttl < 0 or not 0 <= ttl_jitter < 1 or xfetch_beta < 0:
            raise ValueError(
                "negative_ttl must be > 0, stale_ttl >= 0, 0 <= ttl_jitter < 1, xfetch_beta >= 0"
            )
        partitions = cluster_mod.default_partitions(redis, partitions)
        self._keys = KeySpace(namespace, partitions, max_key_bytes)
        self._codec = resolve_codec(serializer)
        if self._codec.name == "pickle" and secret is None:
            raise ValueError(
                "serializer='pickle' needs secret=: pickle runs code from the bytes it loads, so "
                "every payload must be signed and verified before it is loaded"
            )
        self._signer = Signer(secret, namespace) if secret is not None else None
        if max_value_bytes < 1 or (compress_over is not None and compress_over < 1):
            raise ValueError("max_value_bytes and compress_over must be >= 1")
        self._max_value_bytes = max_value_bytes
        self._compress_over = compress_over
        self._loader = loader
        self._ttl = ttl
        self._tagging_init(tags, sliding, sliding_interval)
        self._local_ttl = local_ttl
        self._stale_if_error = stale_if_error
        self._lease_ms = int(lease_ttl * 1000)
        self._lease_wait = lease_ttl + 1.0 if lease_wait is None else lease_wait
        self._tombstone_ttl = tombstone_ttl
        self._negative_ttl = negative_ttl
        self._stale_ttl = stale_ttl
        self._jitter = ttl_jitter
        self._beta = xfetch_beta
        self._random = random.Random().random
        self._flights = SingleFlight()
        self._subtiers: weakref.WeakValueDictionary[str, SubTier] = weakref.WeakValueDictionary()
        self._refresh_workers = refresh_workers
        self._refresher = Refresher(refresh_workers, name=f"tiercache:{namespace}")
        self._on_write_error = on_write_error
        self._on_invalidate = on_invalidate
        self._on_resync = on_resync
        self._l1_on_evict = None if on_evict is None else _local_evict_hook(on_evict)
        self._heartbeat_interval = heartbeat_interval
        self._last_heartbeat = 0.0
        self._lags = _Window()  # invalidation lag (ms): Redis time of the write to its arrival
        self._load_times = _Window()  # loader durations (ms)
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
            "subscribe_timeout": max(startup_timeout, 5.0),
        }
        self._startup_timeout = startup_timeout
        self._origin = secrets.token_hex(6)
        self._counters = _Counters()
        self._clock = VersionClock()
        self._closed = False
        self._server: server_mod.RedisServer | None = None
        self._owns_client = not isinstance(redis, (redis_lib.Redis, RedisCluster))
        self._listener: Listener | cluster_mod.ShardedListener | None = None
        self._listener_lock = threading.Lock()
        self._last_warning = 0.0

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
        try:  # a bump may have been missed, or the generation lost with the data: Redis says
            self._reload_generation(force=True)
        except redis_lib.RedisError:
            pass  # reads and writes check it themselves until the channel is whole
        if recovered:
            self._counters.add("resyncs")
            self._hook(self._on_resync, "resynced")
        self._set_usable(True)

    def apply(self, msg: Invalidation) -> None:
        """Apply one invalidation from another process (or this one's own echo)."""
        self._counters.add("invalidations_received")
        now_us = self._clock.now_us()
        plausible = msg.version <= now_us + _MAX_CLOCK_LEAD_US
        if msg.origin != self._origin and msg.version <= now_us + _FLOOR_LEAD_US:
            # Versions are Redis microseconds; this clock's offset to Redis time is an estimate,
            # so a version slightly ahead of it counts as no lag rather than as no sample.
            self._lags.add(max(0.0, (now_us - msg.version) / 1000.0))
        if self._signer is not None and not self._signer.verify_message(
            msg.key, msg.version, msg.op, msg.origin, msg.sig
        ):
            # Unauthenticated: still obeyed as "drop this", which costs at most a miss, but its
            # version is not believed.
            self._counters.add("unsigned_messages")
            plausible = False
        if plausible:  # a version far in the future (forged) must not poison the clock
            self._clock.observe(msg.version)
        if msg.op == OP_CLEAR:
            self._forget_local()
            return
        if msg.op == OP_CLEAR_PREFIX:
            self._forget_prefix(msg.key)
            return
        if msg.op == OP_TAG:
            self._tag_invalidated(msg.key, msg.version if plausible else None)
            return
        if msg.op == OP_NAMESPACE:
            self._generation_seen(msg.version if plausible else None)
            return
        slot = self._slot(None, msg.key)
        with self._guard.lock:
            if plausible:  # nor make the key uncacheable here: it only costs a miss
                self._guard.observe(slot.guard, msg.version)
            e = slot.l1.entry(slot.key)
            if e is not None and (e.version < msg.version or not plausible):
                slot.l1.pop(slot.key, None)
        if self._on_invalidate is not None:
            self._hook(self._on_invalidate, _user_key(msg.key), msg.version)

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

    def _hook(self, hook: Callable[..., None] | None, *args: Any) -> None:
        """Call a user hook; its exceptions are logged, never raised into the cache."""
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("tiercache %r: a hook raised", self._keys.namespace)

    def flush(self, reason: str, keep_versions: bool = False) -> None:
        """Messages were lost beyond the log: forget every local copy.

        ``keep_versions``: the newest version seen per key stays known, so an older value (from a
        promoted replica that missed writes) never enters the local tier (tiercache.cluster).
        """
        self._counters.add("flushes")
        self._warn(f"local tier flushed: {reason}")
        self._forget_local(keep_versions)
        self._hook(self._on_resync, f"flushed: {reason}")

    def _forget_local(self, keep_versions: bool = False) -> None:
        with self._guard.lock:
            if keep_versions:
                self._guard.refuse_pending()
            else:
                self._guard.forget_all()
            self._tags.forget_all()
            self._l1.clear()
            for sub in list(self._subtiers.values()):
                sub.local.clear()

    def _forget_prefix(self, prefix: bytes) -> None:
        """Forget the local copies of the keys whose encoding starts with ``prefix``."""
        sub = self._subtier_of(prefix)
        with self._guard.lock:
            self._guard.forget_all()  # rare: simpler than tracking the prefix's pending reads
            if sub is not None:
                sub.local.clear()
            else:
                for lkey in [k for k in self._l1 if _encoded_local(k).startswith(prefix)]:
                    self._l1.pop(lkey, None)

    def _subtier_of(self, encoded: bytes) -> SubTier | None:
        """The decorated function a call key (or call-key prefix) belongs to, if registered."""
        if not encoded.startswith(_CALL_PREFIX) or not self._subtiers:
            return None
        try:
            call = decode_key(encoded)
        except ValueError:
            return None
        if not isinstance(call, tuple) or len(call) < 2 or not isinstance(call[1], str):
            return None
        return self._subtiers.get(call[1])

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

    def _slot(self, key: Hashable | None, encoded: bytes) -> _Slot:
        """The local home of a key (``key`` may be None when only the encoding is known)."""
        sub = self._subtier_of(encoded)
        if sub is not None:
            return _Slot(sub.local, sub.local_key_of(decode_key(encoded)), encoded)  # type: ignore[arg-type]
        lkey = local_key(key, encoded) if key is not None else local_key_of(encoded)
        return _Slot(self._l1, lkey, lkey)

    def register_subtier(self, name: str, sub: SubTier) -> None:
        """Route the invalidations of calls ``(CALL_MARK, name, ...)`` to ``sub``'s local tier."""
        if name in self._subtiers and self._subtiers[name] is not sub:
            raise ValueError(f"two cached functions share the name {name!r} in one cache")
        self._subtiers[name] = sub

    def unregister_subtier(self, name: str) -> None:
        """Stop routing to the sub-tier ``name``."""
        self._subtiers.pop(name, None)

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
            policy: Any = self._ttl if ttl is None else ttl
            if tags is not None or sliding is not None:
                policy = Policy(policy, tags, sliding)
            value = self._read(key, loader, policy)
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

    def _read(self, key: Hashable, loader: Callable[[Any], Any] | None, ttl: float | None) -> Any:
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

    def _serve(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        ticket: int,
        hit: _Hit,
        loader: Callable[[Any], Any] | None,
        ttl: float | None,
    ) -> Any:
        """Return a value read from Redis; refresh it early or in the background when due."""
        version, _, _, fresh_until, load_ms, value, ext = hit
        now = self._clock.now_us() / 1e6
        if fresh_until and now >= fresh_until:
            # Stale, within its stale_ttl: served at once while one refresh runs (SWR).
            if loader is not None:
                self._schedule_refresh(key, encoded, slot, loader, ttl, version)
            self._counters.add("stale_served")
            return value
        horizon = 0.0
        if fresh_until and load_ms and self._beta > 0:
            delta = load_ms / 1000.0
            if loader is not None and xfetch_due(
                now, fresh_until, delta, self._beta, self._random()
            ):
                self._schedule_refresh(key, encoded, slot, loader, ttl, version)
            # Local copies stop short of the window where an early refresh may be drawn, so the
            # reads near expiry come here and draw.
            horizon = self._beta * delta * _XFETCH_HORIZON
        fresh = self._local_ttl
        if fresh_until:
            fresh = min(fresh, fresh_until - now - horizon)
        if ext is not None and ext.sliding_ms:  # reads reach Redis (and extend) once per interval
            fresh = min(fresh, self._slide_interval(ext))
        if fresh > 0:
            self._install(ticket, slot, version, fresh, value, ext)
        return value

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

    def _stale_local(self, slot: _Slot) -> Any:
        """A local copy at most ``stale_if_error`` seconds old (counted), else ``_NOT_LOCAL``."""
        if self._stale_if_error <= 0:
            return _NOT_LOCAL
        e = slot.l1.entry(slot.key)
        if e is None:
            return _NOT_LOCAL
        age = slot.l1.timer() - (e.expires - self._l1_args["ttl"])
        if age > self._stale_if_error:
            return _NOT_LOCAL
        self._counters.add("stale_served")
        return e.value

    def _decode(self, raw: bytes, encoded: bytes, floor: int = 0) -> _Hit | None:
        """What ``raw`` holds: a value or a cached absence, None for a miss, or ``_REJECTED``.

        A tombstone or a fill lease is a miss. A payload that does not verify (when a secret is
        set), is too large or does not parse is rejected: counted, logged, treated as a miss,
        and never handed to a deserializer unverified. So is an entry older than ``floor``, the
        newest version of the key this process knew applied when the read began (a replayed or
        rolled-back entry must not undo an invalidation already applied: SPEC 3.3).
        """
        try:
            magic, fmt, flags, codec, sig, version, expires_at, fresh_until, load_ms = (
                HEADER.unpack_from(raw)
            )
            if magic != MAGIC or fmt != FORMAT:
                raise ValueError("not a tiercache envelope")
            if flags & FLAG_NOT_A_VALUE:
                return None
            payload = raw[HEADER_SIZE + sig :]
            if self._signer is not None and (
                sig != SIGNATURE_SIZE
                or not self._signer.verify_envelope(
                    encoded, raw[:HEADER_SIZE], payload, raw[HEADER_SIZE : HEADER_SIZE + sig]
                )
            ):
                raise ValueError("signature missing or wrong")
            if len(encoded) > self._keys.max_key_bytes:
                if _key_in_block(payload) != encoded:
                    raise ValueError("the key inside the payload is another key")
                payload = payload[4 + len(encoded) :]
            ext = None
            if flags & FLAG_EXT:
                ext, payload = tagmod.split_ext(payload, self._keys.partition(encoded))
            if expires_at and expires_at <= self._clock.now_us() / 1e6:
                return None
            if ext is not None and ext.tags and not self._tags_valid(version, ext):
                return None  # invalidated by one of its tags
            if not flags & FLAG_ABSENT:
                if codec != self._codec.id:
                    # Only this cache's own codec may read a payload: a pickle payload planted
                    # in Redis must never reach pickle.loads.
                    raise ValueError(f"payload of codec {codec}, this cache reads {self._codec.id}")
                if len(payload) > self._max_value_bytes:
                    raise ValueError(f"payload of {len(payload)} bytes > max_value_bytes")
            if version < floor:
                self._counters.add("stale_reads_refused")
                return _REJECTED  # type: ignore[no-any-return]
            if ext is not None and ext.sliding_ms:
                self._slide(encoded, version, ext)
            if flags & FLAG_ABSENT:
                return version, flags, expires_at, fresh_until, load_ms, MISSING, ext
            method = (flags & COMPRESSION_MASK) >> COMPRESSION_SHIFT
            if method:
                payload = decompress(payload, method, self._max_value_bytes * _INFLATION)
            value = self._codec.loads(payload)
        except (struct.error, ValueError, TypeError) as err:
            self._counters.add("rejected_payloads")
            self._warn(f"rejected the payload of {encoded[:60]!r}: {err}")
            return _REJECTED  # type: ignore[no-any-return]
        return version, flags, expires_at, fresh_until, load_ms, value, ext

    def _floor(self, guard: Hashable) -> int:
        """The oldest version of a key a read starting now may serve (see ``_decode``).

        A version more than a second ahead of this clock (forged, with no secret to tell) does
        not count: it costs misses for a second at most, never a dead key. (Genuine versions may
        run a little ahead: this clock's offset to Redis time is an estimate.)
        """
        newest = self._guard.applied(guard)
        return newest if newest <= self._clock.now_us() + _FLOOR_LEAD_US else 0

    def _payload(self, value: Any) -> tuple[bytes, int]:
        """(payload, flags) of a value: encoded, compressed when large; ValueError if too big."""
        if value is MISSING:
            return b"", FLAG_ABSENT
        data = self._codec.dumps(value)
        flags = 0
        if len(data) > self._max_value_bytes * _INFLATION:  # no reader would inflate it
            raise ValueError(
                f"value too large: {len(data)} bytes encoded > {_INFLATION} x max_value_bytes "
                f"{self._max_value_bytes} (the most a compressed payload may inflate to)"
            )
        if self._compress_over is not None and len(data) >= self._compress_over:
            data, method = compress(data, self._compress_over)
            flags = method << COMPRESSION_SHIFT
        if len(data) > self._max_value_bytes:
            raise ValueError(
                f"value too large: {len(data)} bytes encoded > max_value_bytes "
                f"{self._max_value_bytes}"
            )
        return data, flags

    def _pack(self, env: Envelope, encoded: bytes) -> bytes:
        """The bytes stored for ``env`` under ``encoded``: signed when a secret is set.

        A long key, stored under a digest name (tiercache.keys), travels at the start of the
        payload (4-byte length, the encoding), so iteration can give it back.
        """
        if len(encoded) > self._keys.max_key_bytes:
            block = len(encoded).to_bytes(4, "big") + encoded
            env = dataclasses.replace(env, payload=block + env.payload)
        if self._signer is None:
            return env.pack()
        placeholder = dataclasses.replace(env, signature=bytes(SIGNATURE_SIZE))
        header = placeholder.header()
        return header + self._signer.sign_envelope(encoded, header, env.payload) + env.payload

    def _sign_message(self, encoded: bytes, version: int, op: str) -> str:
        if self._signer is None:
            return "-"
        return self._signer.sign_message(encoded, version, op, self._origin)

    def _install(
        self,
        ticket: int,
        slot: _Slot,
        version: int,
        fresh: float,
        value: Any,
        ext: Ext | None = None,
    ) -> None:
        """Install a value read under ``ticket`` locally, unless it could bring back old data."""
        if not self._local_usable:
            # Not serving locally now, but a copy older than what was just read must not be
            # served again once the tier is back on (monotonic reads).
            with self._guard.lock:
                current = slot.l1.entry(slot.key)
                if current is not None and current.version < version:
                    slot.l1.pop(slot.key, None)
            return
        with self._guard.lock:
            current = slot.l1.entry(slot.key)
            # The same version no longer fresh (a sliding value read again) is renewed.
            if current is not None and (
                current.version > version
                or (current.version == version and current.fresh_until > slot.l1.timer())
            ):
                return
            if not self._guard.admit(ticket, slot.guard, version):
                self._counters.add("local_fills_rejected")
                return
            tags = ext.tags if ext is not None else ()
            if tags and not self._tags.admit(ext.partition, tags, version):  # type: ignore[union-attr]
                self._counters.add("local_fills_rejected")  # a tag invalidated since (or unknown)
                return
            self._put_local(slot, value, version, fresh)
            if tags:
                self._tags.index(slot.guard, slot.l1, slot.key, version, ext.partition, tags)  # type: ignore[union-attr]
            else:
                self._tags.unindex(slot.guard)

    def _put_local(self, slot: _Slot, value: Any, version: int, fresh: float) -> None:
        """Store a local copy fresh for ``fresh`` seconds (caller holds the guard's lock)."""
        try:
            slot.l1.set(slot.key, value, version=version, fresh_until=slot.l1.timer() + fresh)
        except ValueError:  # heavier than local_maxbytes: it lives in Redis only
            slot.l1.pop(slot.key, None)

    def _load(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Callable[[Any], Any],
        ttl: float | None,
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
        ttl: float | None,
        rejected: bytes | None = None,
    ) -> _PendingLoad | Any:
        """Before calling a loader: our lease (a ``_PendingLoad``), or the value that arrived.

        ``rejected``: bytes of this key that did not verify or parse; the lease replaces them.
        """
        ticket = self._guard.ticket()  # before the lease script reads Redis, as in _read
        floor = self._floor(slot.guard)
        lease = self._acquire_lease(encoded, rejected)
        if lease is not None and lease.kind == "v":
            hit = self._decode(lease.envelope or b"", encoded, floor)
            if hit is _REJECTED or hit is None:  # unreadable, or expired by our clock
                lease = self._acquire_lease(encoded, lease.envelope)
            else:
                return self._serve(key, encoded, slot, ticket, hit, None, ttl)
        if lease is not None and lease.kind == "v":
            lease = None  # still unreadable (rewritten meanwhile): load, without storing
        ours = lease if lease is not None and lease.kind == "l" else None
        self._counters.add("loads")
        return _PendingLoad(encoded, slot, ours, ticket, time.monotonic(), ttl)

    def _finish_load(self, pending: _PendingLoad, value: Any) -> Any:
        """After the loader returned ``value``: store it if our lease still stands; return it."""
        lease = pending.lease
        if lease is None or lease.envelope is None:
            return value
        try:
            payload, flags = self._payload(value)
        except BaseException:
            self._release(pending.encoded, lease.envelope)
            raise
        self._filter_learns(pending.encoded, value)
        load_ms = (time.monotonic() - pending.started) * 1000.0
        self._load_times.add(load_ms)
        env = self._value_envelope(
            payload, flags, pending.ttl, lease.version, load_ms, pending.encoded, value
        )
        self._fill(
            pending.encoded,
            pending.slot,
            lease.envelope,
            pending.ticket,
            env,
            value,
        )
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
            time.sleep(max(0.0005, min(delay, lease.wait_ms / 1000.0, left)))
            delay = min(delay * 1.5, _POLL_MAX)

    def _value_envelope(
        self,
        payload: bytes,
        flags: int,
        ttl: Any,
        after: int,
        load_ms: float,
        encoded: bytes = b"",
        value: Any = MISSING,
    ) -> Envelope:
        """The envelope to store for a loaded value, or for a loaded absence (FLAG_ABSENT).

        ``ttl``: seconds, None, a callable(key, value) or a tags.Policy (with tags, sliding).
        """
        version = self._clock.next(after=after)
        return self._tagged_envelope(payload, flags, ttl, version, load_ms, encoded, value)

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
            call = self._fill_call(encoded, lease, env, ext)
            stored = self._driver.call(call)
        except redis_lib.RedisError as err:
            self._counters.add("write_errors")
            self._warn(f"fill of {encoded[:60]!r} failed: {err}")
            return
        if not stored:
            self._counters.add("stale_fills_rejected")
            if ext is not None and ext.tags:  # refused for a tag: our lease may still be there
                self._release(encoded, lease)
            return
        self._slid(encoded, ext)
        self._install(ticket, slot, env.version, self._local_fresh(env), value, ext)

    def _fill_call(self, encoded: bytes, lease: bytes, env: Envelope, ext: Ext | None) -> Any:
        """The fill of ``env`` under ``lease`` (guarded by its tags, if any)."""
        ttl_ms = self._redis_ttl_ms(env)
        cmds = self._driver.commands
        call = cmds.fill(encoded, lease, self._pack(env, encoded), ttl_ms)
        if ext is not None and ext.tags:
            tkeys = tagmod.tag_keys(cmds, ext)
            call = tagmod.tagged_fill(call, tkeys, ttl_ms, env.version, self._lease_ms)
        return call

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
        packed = self._pack(env, encoded)
        ttl_ms = self._redis_ttl_ms(env)
        ext = self._ext_of(env, encoded)
        call = self._driver.commands.refresh(encoded, version, packed, ttl_ms, token)
        if ext is not None and ext.tags:
            tkeys = tagmod.tag_keys(self._driver.commands, ext)
            call = tagmod.tagged_fill(call, tkeys, ttl_ms, env.version, self._lease_ms)
        if self._driver.call(call):
            self._counters.add("refreshes")
            self._install(ticket, slot, env.version, self._local_fresh(env), value, ext)
        else:
            self._counters.add("stale_fills_rejected")  # a write or delete landed meanwhile

    def _local_fresh(self, env: Envelope) -> float:
        """How long a local copy of ``env`` may be served from now."""
        fresh = self._local_ttl
        if env.fresh_until:
            horizon = 0.0
            if env.load_ms and self._beta > 0:  # reads in the XFetch window must reach Redis
                horizon = self._beta * env.load_ms / 1000.0 * _XFETCH_HORIZON
            fresh = min(fresh, env.fresh_until - self._clock.now_us() / 1e6 - horizon)
        if env.flags & FLAG_EXT:
            ext = tagmod.split_ext(env.payload)[0]
            if ext.sliding_ms:
                fresh = min(fresh, self._slide_interval(ext))
        return fresh

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
            if not ok:
                self._counters.add("stale_fills_rejected")
                continue
            slot = self._slot(key, enc)
            self._slid(enc, ext)
            fresh = self._local_fresh(env)
            self._install(tickets.get(key, -1), slot, env.version, fresh, value, ext)

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
        if ttl is not None and not callable(ttl) and not ttl > 0:
            raise ValueError("ttl must be > 0, None or a callable(key, value)")
        encoded = encode_key(key)
        slot = self._slot(key, encoded)
        payload, flags = self._payload(value)  # a value that cannot be stored changes nothing
        policy: Any = self._ttl if ttl is None else ttl
        if tags is not None or sliding is not None:
            policy = Policy(policy, tags, sliding)
        version = self._clock.next(after=self._guard.newest(slot.guard))
        env = self._tagged_envelope(payload, flags, policy, version, 0.0, encoded, value)
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
        if applied is None:
            return
        self._counters.add("writes")
        ext = self._ext_of(env, encoded)
        self._slid(encoded, ext)
        fresh = self._local_fresh(env)
        if fresh > 0:
            # Admitted like a read: a flush or a newer write since the write began wins.
            self._install(ticket, slot, applied.version, fresh, value, ext)

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

        Returns the driver's result, or None when the failure is swallowed (on_write_error).
        ``behind``: the write-behind script, which also queues the write for the origin.
        """
        slot.l1.pop(slot.key, None)  # read-your-writes: the old local copy goes first
        ext = self._ext_of(env, encoded)
        try:
            for attempt in range(_WRITE_ATTEMPTS + (TAG_ATTEMPTS if ext is not None else 0)):
                call = self._driver.commands.write(
                    encoded,
                    op,
                    env.version,
                    self._pack(env, encoded),
                    ttl_ms=self._redis_ttl_ms(env),
                    origin=self._origin,
                    sig=self._sign_message(encoded, env.version, op),
                    ceiling=self._clock.now_us() + _MAX_CLOCK_LEAD_US,
                )
                if ext is not None and ext.tags:  # refused below the tags' versions: retried
                    call = tagmod.tagged_write(call, tagmod.tag_keys(self._driver.commands, ext))
                if behind:  # the same script, which also queues the write for the origin
                    call = writebehind.behind(self._driver.commands, call, encoded)
                result = self._driver.call(call)
                if result.applied:
                    break
                self._clock.observe(result.version)
                after = result.version
                if ext is not None and ext.tags:  # get ahead of a stream of invalidations
                    after += min(TAG_STEP_US << (2 * attempt), 1_000_000)
                env = env.with_version(self._clock.next(after=after))
            else:
                raise redis_lib.ResponseError("concurrent writers kept overtaking this one")
        except redis_lib.RedisError as err:
            # The outcome is unknown (Redis may apply it later): no local copy of this key may
            # be trusted, and a fill that read the old value must not install it.
            with self._guard.lock:
                self._guard.observe(slot.guard, env.version, applied=False)
                slot.l1.pop(slot.key, None)
            self._counters.add("write_errors")
            if self._on_write_error == "invalidate_local" and not behind:
                self._warn(f"write of {key!r} failed, only invalidated locally: {err}")
                return None
            raise CacheUnavailable(f"Redis write of {key!r} failed: {err}") from err
        with self._guard.lock:
            self._guard.observe(slot.guard, result.version)
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
        encoded = encode_key(key)
        slot = self._slot(key, encoded)
        local = slot.l1.peek(slot.key, _NOT_LOCAL)
        was_local = local is not _NOT_LOCAL and local is not MISSING
        version = self._clock.next(after=self._guard.newest(slot.guard))
        env = self._envelope(b"", self._tombstone_ttl, version, 0.0, flags=FLAG_TOMBSTONE)
        self._ensure_listener()
        if not self._local_usable:
            self._check_generation()
        result = self._write(key, encoded, slot, OP_DELETE, env, behind=behind)
        if result is None:
            return True  # Redis failed and the failure was swallowed: it may have been there
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

    def stats(self) -> dict[str, Any]:
        """Counters since creation, per tier and per event."""
        local = self._l1.stats()
        out: dict[str, Any] = {"local_hits": local["hits"], "local_misses": local["misses"]}
        out.update(self._counters.snapshot())
        out["local_size"] = local["currsize"]
        out["local_evictions"] = local["evictions"]
        out["local_usable"] = self._local_usable
        out["generation"] = self._keys.generation
        listener = self._listener
        out["invalidation_lag_ms"] = self._lags.percentiles()
        out["load_ms"] = self._load_times.percentiles()
        out["gaps"] = listener.gaps if listener else 0
        out["malformed_messages"] = listener.malformed if listener else 0
        out["disconnects"] = listener.disconnects if listener else 0
        return out

    @property
    def duration_windows(self) -> dict[str, _Window]:
        """The recent invalidation lags and load times (for tiercache.metrics)."""
        return {"invalidation_lag_ms": self._lags, "load_ms": self._load_times}

    @property
    def bloom(self) -> NegativeFilter | None:
        """The negative filter (``bloom=``), or None."""
        return self._bloom

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

    def _envelope(
        self, payload: bytes, ttl: float | None, version: int, load_ms: float, flags: int = 0
    ) -> Envelope:
        """An envelope fresh for ``ttl`` seconds (jittered), then stale for ``stale_ttl``."""
        fresh_until = expires_at = 0.0
        if ttl:
            now = self._clock.now_us() / 1e6
            fresh_until = now + jittered(ttl, self._jitter, self._random())
            expires_at = fresh_until if flags & FLAG_ABSENT else fresh_until + self._stale_ttl
        return Envelope(
            version,
            self._codec.id,
            payload,
            flags,
            expires_at=expires_at,
            fresh_until=fresh_until,
            load_ms=load_ms,
        )

    def _redis_ttl_ms(self, env: Envelope) -> int:
        """The Redis TTL in ms of an envelope (0: none)."""
        if not env.expires_at:
            if env.flags & FLAG_EXT:  # a sliding TTL, if any, is in the tags block
                return tagmod.split_ext(env.payload)[0].sliding_ms
            return 0
        return max(1, int((env.expires_at - self._clock.now_us() / 1e6) * 1000))

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _LOG_INTERVAL:
            self._last_warning = now
            log.warning("tiercache %r: %s", self._keys.namespace, message)
        else:
            log.debug("tiercache %r: %s", self._keys.namespace, message)

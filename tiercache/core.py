"""The cache's decisions, shared by TieredCache and AsyncTieredCache. No I/O.

``CacheCore`` holds the configuration, the local tier, the version clock and the FillGuard, and
decides everything that does not need a round trip: what bytes to store (envelopes, signatures,
compression, limits), what a read found, whether a value read or loaded may enter the local
tier, how an invalidation changes it, when to refresh early. The sync driver's cache
(tiercache.tiered) and the asyncio one (tiercache.aio.tiered) only add the I/O around it.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Protocol

from . import tags as tagmod
from . import writebehind
from ._sentinel import MISSING
from .codec import Codec, compress, decompress, resolve_codec
from .commands import Call, LeaseResult, WriteResult
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
from .keys import KeySpace, decode_key, encode_key, local_key, local_key_of
from .local import LocalCache
from .protocol import (
    OP_CLEAR,
    OP_CLEAR_PREFIX,
    OP_DELETE,
    OP_NAMESPACE,
    OP_SET,
    OP_TAG,
    Invalidation,
    VersionClock,
    jittered,
    xfetch_due,
)
from .signing import SIGNATURE_SIZE, Secret, Signer
from .tagging import TAG_ATTEMPTS, TAG_STEP_US, TagCore
from .tags import Ext, Policy, TagsArg, TtlArg

log = logging.getLogger("tiercache")

_WRITE_ATTEMPTS = 3
_LOG_INTERVAL = 10.0
_POLL_FIRST = 0.002  # first wait for another process' fill, then x1.5 up to _POLL_MAX
_POLL_MAX = 0.05
_FLOOR_LEAD_US = 1_000_000  # see CacheCore._floor
_MAX_CLOCK_LEAD_US = 3_600_000_000  # a version more than 1 h ahead of Redis time is not believed
_INFLATION = 32  # a compressed payload may decode to at most this many times max_value_bytes
_REJECTED: Any = object()  # what _decode says of bytes that do not verify or parse
_XFETCH_HORIZON = math.log(1000.0)  # beyond this many beta*delta an early refresh is < 0.1%

# What a read of Redis found: (version, flags, expires_at, fresh_until, load_ms, value, ext).
_Hit = tuple[int, int, float, float, float, Any, Ext | None]


_NOT_LOCAL: Any = object()


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


# A decorated function's calls are keys ``(CALL_MARK, qualified name, ...)``; they live in the
# function's own local tier (see tiercache.decorator), found by the encoded key's prefix.
CALL_MARK = "tiercache.call"
_CALL_PREFIX = encode_key((CALL_MARK,))


class CacheCore(TagCore):
    """The I/O-free half of a two-tier cache (mixed into TieredCache and AsyncTieredCache).

    The class that mixes it in provides ``_l1`` and ``_local_usable`` (tiercache.local's
    TieredFront), ``_listener`` (or None), ``_schedule_refresh``, ``_driver`` (whose
    ``commands`` build the calls) and the round trips of tags and generations
    (tiercache.tagging: ``_check_generation``, and the tag check of ``_decode``'s hits).
    """

    _l1: LocalCache
    _listener: Any
    _local_usable: bool

    def _configure(
        self,
        *,
        namespace: str,
        local_maxsize: int,
        local_policy: str,
        local_ttl: float,
        local_maxbytes: int | None,
        ttl: TtlArg,
        loader: Callable[[Any], Any] | None,
        serializer: str | Codec | None,
        secret: Secret | None,
        max_value_bytes: int,
        compress_over: int | None,
        negative_ttl: float,
        stale_ttl: float,
        ttl_jitter: float,
        xfetch_beta: float,
        stale_if_error: float,
        health_interval: float,
        health_timeout: float,
        startup_timeout: float,
        lease_ttl: float,
        lease_wait: float | None,
        refresh_workers: int,
        tombstone_ttl: float,
        on_write_error: str,
        on_invalidate: Callable[[Any, int], None] | None,
        on_resync: Callable[[str], None] | None,
        heartbeat_interval: float,
        on_evict: Callable[[Any, Any, str], None] | None = None,
        partitions: int,
        max_key_bytes: int,
        timer: Callable[[], float] | None,
        tags: TagsArg = None,
        sliding: bool = False,
        sliding_interval: float | None = None,
    ) -> None:
        """Check the options and set up everything but the I/O (TieredCache's parameters)."""
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
        self._subtiers: weakref.WeakValueDictionary[str, SubTier] = weakref.WeakValueDictionary()
        self._refresh_workers = refresh_workers
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
        self._last_warning = 0.0
        self._bloom: Any = None

    # -- writes: the decisions around the write script --------------------------------------

    def _set_envelope(
        self,
        key: Hashable,
        value: Any,
        ttl: TtlArg,
        tags: TagsArg = None,
        sliding: bool | None = None,
    ) -> tuple[bytes, _Slot, Envelope]:
        """(encoded key, local slot, envelope) of a write; a value that cannot be stored raises.

        ``ttl`` may be a callable(key, value) (adaptive TTL); ``tags`` and ``sliding`` as for
        ``set`` (tiercache.tags).
        """
        if ttl is not None and not callable(ttl) and not ttl > 0:
            raise ValueError("ttl must be > 0, None or a callable(key, value)")
        encoded = encode_key(key)
        slot = self._slot(key, encoded)
        payload, flags = self._payload(value)  # a value that cannot be stored changes nothing
        version = self._clock.next(after=self._guard.newest(slot.guard))
        if tags is None and sliding is None:  # (what _policy gives then, one call less)
            policy = self._ttl if ttl is None else ttl
        else:
            policy = self._policy(ttl, tags, sliding)
        env = self._tagged_envelope(payload, flags, policy, version, 0.0, encoded, value)
        return encoded, slot, env

    def _policy(self, ttl: TtlArg, tags: TagsArg, sliding: bool | None) -> Any:
        """What a per-call ``ttl``, ``tags`` and ``sliding`` make of the cache's defaults."""
        policy: Any = self._ttl if ttl is None else ttl
        if tags is not None or sliding is not None:
            policy = Policy(policy, tags, sliding)
        return policy

    def _set_done(
        self,
        ticket: int,
        slot: _Slot,
        applied: WriteResult,
        env: Envelope,
        value: Any,
        encoded: bytes = b"",
    ) -> None:
        """A write applied: ``_write_done`` and the local install of the value, in one step."""
        self._counters.add("writes")
        ext = self._ext_of(env, encoded) if env.flags & FLAG_EXT else None
        if ext is not None:
            self._slid(encoded, ext)
        fresh = self._local_fresh(env) if env.fresh_until or ext is not None else self._local_ttl
        version = applied.version
        with self._guard.lock:
            self._guard.observe(slot.guard, version)
            # Admitted like a read: a flush or a newer write since the write began wins.
            if not (fresh > 0 and self._install(ticket, slot, version, fresh, value, ext)):
                self._drop_older(slot, version)  # not installed: no older copy stays

    def _delete_envelope(self, key: Hashable) -> tuple[bytes, _Slot, Envelope, bool]:
        """(encoded key, local slot, tombstone, whether a local copy existed) of a delete."""
        encoded = encode_key(key)
        slot = self._slot(key, encoded)
        local = slot.l1.peek(slot.key, _NOT_LOCAL)
        was_local = local is not _NOT_LOCAL and local is not MISSING
        version = self._clock.next(after=self._guard.newest(slot.guard))
        env = self._envelope(b"", self._tombstone_ttl, version, 0.0, flags=FLAG_TOMBSTONE)
        return encoded, slot, env, was_local

    def _write_attempts(self, ext: Ext | None) -> int:
        """How many times a write is proposed (tagged writes race tag invalidations more)."""
        return _WRITE_ATTEMPTS + (TAG_ATTEMPTS if ext is not None else 0)

    def _write_call(
        self, encoded: bytes, op: str, env: Envelope, ext: Ext | None, behind: bool = False
    ) -> Call:
        """The write script's call for ``env``: tagged, and write-behind, when asked."""
        cmds = self._driver.commands
        now_us = self._clock.now_us()
        plain = self._signer is None and len(encoded) <= self._keys.max_key_bytes
        call = cmds.write(
            encoded,
            op,
            env.version,
            # (_pack, that is env.pack(), and _redis_ttl_ms inlined where they have nothing to do:
            # every write runs here, and a call costs ~1 µs after the blocking round trip)
            env.header() + env.signature + env.payload if plain else self._pack(env, encoded),
            ttl_ms=self._redis_ttl_ms(env, now_us) if env.expires_at or env.flags else 0,
            origin=self._origin,
            sig="-" if self._signer is None else self._sign_message(encoded, env.version, op),
            ceiling=now_us + _MAX_CLOCK_LEAD_US,
        )
        if ext is not None and ext.tags:  # refused below the tags' versions: retried
            call = tagmod.tagged_write(call, tagmod.tag_keys(cmds, ext))
        if behind:  # the same script, which also queues the write for the origin
            call = writebehind.behind(cmds, call, encoded)
        return call

    def _write_retry(
        self, result: WriteResult, env: Envelope, ext: Ext | None = None, attempt: int = 0
    ) -> Envelope:
        """A concurrent writer holds a newer version: the envelope to try again with."""
        self._clock.observe(result.version)
        after = result.version
        if ext is not None and ext.tags:  # get ahead of a stream of invalidations
            after += min(TAG_STEP_US << (2 * attempt), 1_000_000)
        return env.with_version(self._clock.next(after=after))

    def _write_unknown(
        self,
        key: Hashable,
        slot: _Slot,
        env: Envelope,
        err: Exception,
        behind: bool = False,
        landed: bool = False,
    ) -> None:
        """A write's outcome is unknown (Redis may apply it later): distrust the key here.

        No local copy of it may be trusted, and a fill that read the old value must not install
        it. Returns (None: swallowed) when ``on_write_error="invalidate_local"``, else raises
        CacheUnavailable from ``err`` (always for a write-behind write: its queueing failed).
        ``landed``: its echo was heard, so Redis holds it (the caller still gets the error).
        """
        with self._guard.lock:
            self._guard.observe(slot.guard, env.version, applied=landed)
            slot.l1.pop(slot.key, None)
        self._counters.add("write_errors")
        if self._on_write_error == "invalidate_local" and not behind:
            self._warn(f"write of {key!r} failed, only invalidated locally: {err}")
            return
        raise CacheUnavailable(f"Redis write of {key!r} failed: {err}") from err

    def _write_done(self, slot: _Slot, result: WriteResult) -> None:
        """A write applied at ``result.version``: older fills of the key may not install, and
        an older copy a concurrent fill installed since the write began goes (what applying
        the write's echo would do: the listener lets the echo pass, see OwnWrites)."""
        with self._guard.lock:
            self._guard.observe(slot.guard, result.version)
            self._drop_older(slot, result.version)

    @staticmethod
    def _drop_older(slot: _Slot, version: int) -> None:
        """Drop the local copy of ``slot`` if it is older than ``version`` (guard's lock held)."""
        current = slot.l1.entry(slot.key)
        if current is not None and current.version < version:
            slot.l1.pop(slot.key, None)

    # -- loads: what a lease reply means ----------------------------------------------------

    def _lease_value(
        self, lease: LeaseResult | None, encoded: bytes, floor: int = 0
    ) -> _Hit | None:
        """The value a lease reply brought (kind "v") if it reads, else None (see _decode)."""
        if lease is None or lease.kind != "v":
            return None
        hit = self._decode(lease.envelope or b"", encoded, floor)
        return None if hit is _REJECTED else hit

    def _pending_load(
        self, lease: LeaseResult | None, encoded: bytes, slot: _Slot, ticket: int, ttl: float | None
    ) -> _PendingLoad:
        """The load to run: with our lease when we hold it, else without storing."""
        ours = lease if lease is not None and lease.kind == "l" else None
        self._counters.add("loads")
        return _PendingLoad(encoded, slot, ours, ticket, time.monotonic(), ttl)

    def _loaded_envelope(self, pending: _PendingLoad, value: Any) -> Envelope | None:
        """The envelope to fill for a loaded value, or None when not ours to store.

        Raises what encoding the value raises (the caller releases the lease).
        """
        lease = pending.lease
        if lease is None or lease.envelope is None:
            return None
        payload, flags = self._payload(value)
        load_ms = (time.monotonic() - pending.started) * 1000.0
        self._load_times.add(load_ms)
        return self._value_envelope(
            payload, flags, pending.ttl, lease.version, load_ms, pending.encoded, value
        )

    def _fill_call(self, encoded: bytes, lease: bytes, env: Envelope, ext: Ext | None) -> Call:
        """The fill of ``env`` under ``lease`` (guarded by its tags, if any)."""
        ttl_ms = self._redis_ttl_ms(env)
        cmds = self._driver.commands
        call = cmds.fill(encoded, lease, self._pack(env, encoded), ttl_ms)
        if ext is not None and ext.tags:
            tkeys = tagmod.tag_keys(cmds, ext)
            call = tagmod.tagged_fill(call, tkeys, ttl_ms, env.version, self._lease_ms)
        return call

    def _refresh_call(
        self, encoded: bytes, expected: int, env: Envelope, ext: Ext | None, token: bytes
    ) -> Call:
        """The store of a refreshed ``env`` if the key still holds ``expected`` (tag-guarded)."""
        ttl_ms = self._redis_ttl_ms(env)
        cmds = self._driver.commands
        call = cmds.refresh(encoded, expected, self._pack(env, encoded), ttl_ms, token)
        if ext is not None and ext.tags:
            tkeys = tagmod.tag_keys(cmds, ext)
            call = tagmod.tagged_fill(call, tkeys, ttl_ms, env.version, self._lease_ms)
        return call

    def _filled(
        self,
        stored: bool,
        slot: _Slot,
        ticket: int,
        env: Envelope,
        value: Any,
        encoded: bytes,
        ext: Ext | None,
    ) -> bool:
        """The fill script's answer: install the value, or count a fill a write overtook.

        Returns whether our lease may still be in the key (a fill refused for a tag): the
        caller then releases it.
        """
        if not stored:
            self._counters.add("stale_fills_rejected")
            return ext is not None and bool(ext.tags)
        self._slid(encoded, ext)
        self._install(ticket, slot, env.version, self._local_fresh(env), value, ext)
        return False

    def _lease_delay(self, lease: LeaseResult, delay: float, left: float) -> float:
        """How long to wait before asking for the lease again (another fill holds it)."""
        return max(0.0005, min(delay, lease.wait_ms / 1000.0, left))

    def _schedule_refresh(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        loader: Callable[[Any], Any],
        ttl: float | None,
        version: int,
    ) -> None:
        """Have ``key`` reloaded in the background (the driver's job)."""
        raise NotImplementedError

    # -- reads, invalidations, envelopes -----------------------------------------------------

    def on_unhealthy(self, reason: str) -> None:
        """The invalidation channel may have lost messages: stop serving local copies."""
        self._set_usable(False)
        self._warn(f"local tier off: {reason}")

    def own_echo(self, msg: Invalidation) -> bool:
        """Whether ``msg`` is the echo of a write of ours that needs no applying (counted as
        received, as ``apply`` would); an ``on_invalidate`` hook sees every message applied."""
        if (
            msg.origin != self._origin
            or self._on_invalidate is not None
            or not self._own.heard(msg.version)
        ):
            return False
        self._counters.add("invalidations_received")
        return True

    def echo_origin(self) -> str | None:
        """The origin whose next-in-sequence set/delete echoes the listener may let pass
        without telling this cache (None: an ``on_invalidate`` hook must see every one)."""
        return self._origin if self._on_invalidate is None else None

    def echoes_passed(self, versions: list[int]) -> None:
        """Own echoes of these versions passed the listener's filter (received, as
        ``own_echo`` would have let them pass)."""
        self._counters.add("invalidations_received", len(versions))
        self._own.passed(versions)

    def apply(self, msg: Invalidation) -> None:
        """Apply one invalidation from another process (or this one's own echo)."""
        # The local copy goes first, the bookkeeping after: this runs on the listener thread
        # once per message, mostly with cold caches (several times slower than in a loop).
        version, op = msg.version, msg.op
        now_us = self._clock.now_us()
        plausible = version <= now_us + _MAX_CLOCK_LEAD_US
        if self._signer is not None and not self._signer.verify_message(
            msg.key, version, op, msg.origin, msg.sig
        ):
            # Unauthenticated: still obeyed as "drop this", which costs at most a miss, but its
            # version is not believed.
            self._counters.add("unsigned_messages")
            plausible = False
        keyed = op in (OP_SET, OP_DELETE)
        if keyed:
            slot = self._slot(None, msg.key)
            with self._guard.lock:
                if plausible:  # nor make the key uncacheable here: it only costs a miss
                    self._guard.observe(slot.guard, version)
                e = slot.l1.entry(slot.key)
                if e is not None and (e.version < version or not plausible):
                    slot.l1.pop(slot.key, None)
        if plausible:  # a version far in the future (forged) must not poison the clock
            self._clock.observe(version)
        self._counters.add("invalidations_received")
        if msg.origin == self._origin:
            self._own.discard(version)
        elif version <= now_us + _FLOOR_LEAD_US:
            # Versions are Redis microseconds; this clock's offset to Redis time is an estimate,
            # so a version slightly ahead of it counts as no lag rather than as no sample.
            self._lags.add(max(0.0, (now_us - version) / 1000.0))
        if not keyed:
            self._apply_broad(msg, plausible)
        elif self._on_invalidate is not None:
            self._hook(self._on_invalidate, _user_key(msg.key), version)

    def _apply_broad(self, msg: Invalidation, plausible: bool) -> None:
        """Apply a clear, a prefix clear, a tag or a namespace invalidation."""
        if msg.op == OP_CLEAR:
            self._forget_local()
        elif msg.op == OP_CLEAR_PREFIX:
            self._forget_prefix(msg.key)
        elif msg.op == OP_TAG:
            self._tag_invalidated(msg.key, msg.version if plausible else None)
        elif msg.op == OP_NAMESPACE:
            self._generation_seen(msg.version if plausible else None)

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

    def _slot(self, key: Hashable | None, encoded: bytes) -> _Slot:
        """The local home of a key (``key`` may be None when only the encoding is known)."""
        if type(key) is str:  # (no call key: those are tuples; local_key keeps a str as is)
            return _Slot(self._l1, key, key)
        sub = self._subtier_of(encoded)
        if sub is not None:
            # The caller's own key when there is one: a cached function's local tier then holds
            # its argument objects, which its callers' next calls match by identity.
            call = key if key is not None else decode_key(encoded)
            return _Slot(sub.local, sub.local_key_of(call), encoded)  # type: ignore[arg-type]
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

    def _serve(
        self,
        key: Hashable,
        encoded: bytes,
        slot: _Slot,
        ticket: int,
        hit: _Hit,
        loader: Callable[[Any], Any] | None,
        ttl: Any,
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

        No I/O: a value with tags that a tag version known here invalidates is a miss, but a
        hit whose tags are not all known (or not trusted: the channel is not whole) must still
        be checked against Redis, and a sliding value's read extends its TTL: the caches' own
        ``_decode`` (TieredCache) or ``_vet`` (AsyncTieredCache) do both (tiercache.tagging).

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
            if ext is not None and ext.tags and not self._tags_verdict(version, ext)[0]:
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
            env = env._replace(payload=block + env.payload)
        if self._signer is None:
            return env.pack()
        placeholder = env._replace(signature=bytes(SIGNATURE_SIZE))
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
    ) -> bool:
        """Install a value read under ``ticket`` locally, unless it could bring back old data;
        whether the local tier now holds it (or a newer copy, or the same one still fresh)."""
        with self._guard.lock:  # (reentrant: _set_done holds it across observe and install)
            if not self._local_usable:
                # Not serving locally now, but a copy older than what was just read must not be
                # served again once the tier is back on (monotonic reads).
                self._drop_older(slot, version)
                return False
            current = slot.l1.entry(slot.key)
            # The same version no longer fresh (a sliding value read again) is renewed.
            if current is not None and (
                current.version > version
                or (current.version == version and current.fresh_until > slot.l1.timer())
            ):
                return True
            if not self._guard.admit(ticket, slot.guard, version):
                self._counters.add("local_fills_rejected")
                return False
            tags = ext.tags if ext is not None else ()
            if tags and not self._tags.admit(ext.partition, tags, version):  # type: ignore[union-attr]
                self._counters.add("local_fills_rejected")  # a tag invalidated since (or unknown)
                return False
            try:
                slot.l1.set(slot.key, value, version=version, fresh_until=slot.l1.timer() + fresh)
            except ValueError:  # heavier than local_maxbytes: it lives in Redis only
                slot.l1.pop(slot.key, None)
            if tags:
                self._tags.index(slot.guard, slot.l1, slot.key, version, ext.partition, tags)  # type: ignore[union-attr]
            else:
                self._tags.unindex(slot.guard)
            return True

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
    def local(self) -> LocalCache:
        """The local tier (for inspection; writes to it bypass Redis and coherence)."""
        return self._l1

    @property
    def namespace(self) -> str:
        """The namespace of this cache's keys in Redis."""
        return self._keys.namespace

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

    def _redis_ttl_ms(self, env: Envelope, now_us: int | None = None) -> int:
        """The Redis TTL in ms of an envelope (0: none), at ``now_us`` (default: now)."""
        if not env.expires_at:
            if env.flags & FLAG_EXT:  # a sliding TTL, if any, is in the tags block
                return tagmod.split_ext(env.payload)[0].sliding_ms
            return 0
        if now_us is None:
            now_us = self._clock.now_us()
        return max(1, int((env.expires_at - now_us / 1e6) * 1000))

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _LOG_INTERVAL:
            self._last_warning = now
            log.warning("tiercache %r: %s", self._keys.namespace, message)
        else:
            log.debug("tiercache %r: %s", self._keys.namespace, message)

"""Durable write-behind: writes acknowledged by Redis, applied to the origin later, in batches.

A write-behind write (``cache.set(k, v, write_behind=True)``, or ``WriteBehind.set``) is a normal
cache write (versioned, its invalidation published) whose Lua script also appends it to the
namespace's write-behind stream (``lua/write_behind.lua``): once the call returns, the write is
both in the cache and queued for the origin, or neither. A flusher (``WriteBehind``) takes batches
from the stream through a consumer group, keeps the last version of each key, calls the user's
``writer(batch)``, and acknowledges (and deletes) the entries only after it returned.

Redis layout, per partition ``p`` of namespace ``ns`` (same hash slot as the partition's entries,
outside the ``ns:{ns:p}:`` prefix so that ``clear()`` never drops queued writes)::

    ns:wb:{ns:p}        stream of queued writes (fields o, k, v, e), group "tiercache-flush"
    ns:wbdead:{ns:p}    dead-letter stream: writes the writer failed max_attempts times
    ns:wblock:{ns:p}    the flush lock: one flusher at a time writes a partition
    ns:wbhw:{ns:p}      hash: per key with writes in flight, the highest version handed out

Order. The writes of one key enter the stream in version order (the write script rejects a
version that is not above the stored one, and appends in the same step). One flusher at a time
holds a partition's lock (renewed while its writer runs), and takes entries in stream order: its
own failed batch first, then the entries of a dead flusher (claimed with XAUTOCLAIM once idle
``claim_idle`` seconds), and new entries only when no other flusher's entries are pending
(``lua/wb_take.lua``). A batch carries one item per key, its last version. So the origin sees the
versions of a key in increasing order; the one exception is a flusher frozen (not dead) for longer
than ``lock_ttl`` that wakes up and finishes its writer call after its successor wrote a newer
version. Writers that must be exact even then apply an item only if its version is above the one
the origin holds (each item carries ``version``): see docs/strategies.md.

Durability is Redis's: the stream lives in Redis memory, so a Redis crash without AOF loses the
writes not yet flushed, and an ``allkeys-*`` eviction policy may evict the stream
(tiercache.checks warns about both when a WriteBehind starts).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis as redis_lib

from .checks import check_write_behind
from .codec import decompress
from .commands import Call, Commands, load_script_source
from .envelope import FLAG_EXT, FLAG_NOT_A_VALUE, HEADER_SIZE, EnvelopeError, unpack
from .keys import KeySpace, decode_key
from .tags import split_ext

if TYPE_CHECKING:
    from .tiered import TieredCache

log = logging.getLogger("tiercache.writebehind")

GROUP = b"tiercache-flush"
_WRITE_MARKER = "--@WRITE@"
_INFLATION = 32  # as in tiercache.tiered: a compressed payload decodes to at most this factor
MAX_BATCH = 1000  # entry ids travel as script arguments (Lua's unpack has limits)


# -- names and calls (no I/O) ---------------------------------------------------------------------


def _name(keys: KeySpace, kind: str, partition: int) -> bytes:
    """``ns:<kind>:{ns:p}``: outside the partition's prefix, in its hash slot."""
    ns = keys.namespace
    return f"{ns}:{kind}:{{{ns}:{partition}}}".encode()


def stream_key(keys: KeySpace, partition: int) -> bytes:
    """The write-behind stream of a partition."""
    return _name(keys, "wb", partition)


def dead_key(keys: KeySpace, partition: int) -> bytes:
    """The dead-letter stream of a partition."""
    return _name(keys, "wbdead", partition)


def lock_key(keys: KeySpace, partition: int) -> bytes:
    """The flush lock of a partition."""
    return _name(keys, "wblock", partition)


def mark_key(keys: KeySpace, partition: int) -> bytes:
    """The high-water hash of a partition: per key, the highest version handed to a writer."""
    return _name(keys, "wbhw", partition)


def write_behind_source(write_source: str | None = None) -> str:
    """``lua/write_behind.lua`` with the write script inserted (so both stay one write path).

    ``write_source``: the write script's source (default ``lua/write.lua``; the tagged write of
    tiercache.tags is ``write.lua`` behind a prelude).
    """
    wrapper = load_script_source("write_behind")
    source = load_script_source("write") if write_source is None else write_source
    return wrapper.replace(_WRITE_MARKER, source, 1)


def _register(commands: Commands, script: str) -> str:
    """The name of the write-behind form of ``script``, made known to ``commands`` (by SHA)."""
    name = "write_behind" if script == "write" else f"{script}_behind"
    if name not in commands.sources:
        base = commands.sources.get(script) or load_script_source(script)
        source = write_behind_source(base)
        commands.shas[name] = hashlib.sha1(source.encode("utf-8")).hexdigest()
        commands.sources[name] = source
    return name


def behind(commands: Commands, write: Call, encoded: bytes) -> Call:
    """The write-behind form of a write call (``Commands.write``, tagged or not): the same
    script, plus the queueing."""
    assert write.script is not None
    name = _register(commands, write.script)
    stream = stream_key(commands.keys, commands.keys.partition(encoded))
    return Call(name, write.args, (*write.keys, stream), write.parse)


def write(driver: Any, encoded: bytes, op: str, version: int, envelope: bytes, **kw: Any) -> Any:
    """Run a write-behind write on ``driver`` (the signature of ``SyncDriver.write``)."""
    commands = driver.commands
    call = commands.write(encoded, op, version, envelope, **kw)
    return driver.call(behind(commands, call, encoded))


class FlushCommands:
    """The flusher's calls for one namespace."""

    def __init__(self, keys: KeySpace) -> None:
        self.keys = keys

    def take(self, partition: int, consumer: bytes, count: int, lock_ms: int, idle_ms: int) -> Call:
        """The next batch for ``consumer`` (which is also the lock token): see wb_take.lua."""
        keys = (stream_key(self.keys, partition), lock_key(self.keys, partition))
        args = (GROUP, consumer, consumer, lock_ms, count, idle_ms)
        return Call("wb_take", args, keys)

    def begin(self, partition: int, items: list[tuple[bytes, int]]) -> Call:
        """Raise the high-water marks of (encoded, version) items; which ones may go out."""
        args = tuple(part for item in items for part in item)
        keys = (mark_key(self.keys, partition),)
        return Call("wb_begin", args, keys, lambda r: [int(x) == 1 for x in r])

    def done(
        self,
        partition: int,
        entries: list[tuple[bytes, bytes, int]],
        *,
        dead: bool = False,
        error: str = "",
        attempts: int = 0,
    ) -> Call:
        """Acknowledge and delete (id, encoded, version) entries; ``dead``: dead-letter them."""
        keys = (
            stream_key(self.keys, partition),
            dead_key(self.keys, partition),
            mark_key(self.keys, partition),
        )
        ids = [e[0] for e in entries]
        marks = [part for _, enc, version in entries for part in (enc, version)]
        args = (GROUP, "dead" if dead else "ack", error[:1000], attempts, len(ids), *ids, *marks)
        return Call("wb_done", args, keys, int)

    def lock(self, partition: int, token: bytes, ttl_ms: int) -> Call:
        """Take or renew the flush lock (True: ours)."""
        return Call("wb_lock", (token, ttl_ms), (lock_key(self.keys, partition),), _is_one)

    def bye(self, partition: int, consumer: bytes) -> Call:
        """Release the lock if ours; drop the consumer's record if it holds no entry."""
        keys = (stream_key(self.keys, partition), lock_key(self.keys, partition))
        return Call("wb_bye", (GROUP, consumer), keys, _is_one)

    def length(self, partition: int) -> Call:
        """How many writes of the partition are queued (taken or not)."""
        return Call(None, ("XLEN", stream_key(self.keys, partition)), parse=int)

    def dead_length(self, partition: int) -> Call:
        """How many writes of the partition are in the dead-letter stream."""
        return Call(None, ("XLEN", dead_key(self.keys, partition)), parse=int)

    def dead_range(self, partition: int, count: int) -> Call:
        """The first ``count`` dead letters of the partition."""
        return Call(None, ("XRANGE", dead_key(self.keys, partition), "-", "+", "COUNT", count))


def _is_one(reply: Any) -> bool:
    """Whether a reply is the integer 1."""
    return int(reply) == 1


# -- the flusher ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteBehindItem:
    """One key's last queued write: apply ``value`` (or delete, if ``deleted``) at ``version``."""

    key: Any
    value: Any
    version: int
    deleted: bool = False


@dataclass(slots=True)
class _Entry:
    """One stream entry as taken."""

    id: bytes
    op: str
    encoded: bytes
    version: int
    envelope: bytes
    deliveries: int


def _fields(raw: Any) -> dict[bytes, bytes]:
    """A stream entry's fields as a dict (redis-py parses some replies, Lua's come flat)."""
    if isinstance(raw, dict):
        return raw
    it = iter(raw)
    return dict(zip(it, it, strict=False))


def coalesce(entries: list[Any]) -> list[Any]:
    """The last (highest-version) entry of each key, in stream order of those entries."""
    last: dict[bytes, Any] = {}
    for e in entries:
        kept = last.get(e.encoded)
        if kept is None or e.version > kept.version:
            last[e.encoded] = e
    return sorted(last.values(), key=lambda e: _id_order(e.id))


def _id_order(entry_id: bytes) -> tuple[int, int]:
    """The sort key of a stream entry id."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class WriteBehind:
    """Flushes a namespace's write-behind writes to the origin through ``writer(batch)``.

    ``writer`` gets a list of ``WriteBehindItem`` (one per key, its last version) and must raise
    if it did not apply them all: the batch is then retried with exponential backoff
    (``retry_backoff`` doubling up to ``retry_backoff_max`` seconds) and, after ``max_attempts``
    deliveries, moved to the dead-letter stream. A batch is at most ``batch_size`` writes, taken
    every ``flush_interval`` seconds while there are fewer. ``writer=None`` makes a producer only
    (``set``/``delete``/``pending``; another process flushes).
    """

    def __init__(
        self,
        cache: TieredCache,
        writer: Callable[[list[WriteBehindItem]], Any] | None = None,
        *,
        batch_size: int = 100,
        flush_interval: float = 0.1,
        max_attempts: int = 5,
        retry_backoff: float = 0.1,
        retry_backoff_max: float = 5.0,
        lock_ttl: float = 10.0,
        claim_idle: float | None = None,
        start: bool = True,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}")
        if flush_interval <= 0 or max_attempts < 1 or retry_backoff < 0 or lock_ttl <= 0:
            raise ValueError(
                "flush_interval and lock_ttl must be > 0, max_attempts >= 1, retry_backoff >= 0"
            )
        self.cache = cache
        self.writer = writer
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self._lock_ms = max(1, int(lock_ttl * 1000))
        self._idle_ms = self._lock_ms if claim_idle is None else max(0, int(claim_idle * 1000))
        self._driver = cache._driver
        self._keys = cache._keys
        self._calls = FlushCommands(self._keys)
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}".encode()
        self._work = threading.Lock()  # one round at a time (the thread, or flush())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        self._retry_at = 0.0
        self._failures = 0
        self._thread: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        self._counts = dict.fromkeys(
            ("batches", "written", "coalesced", "failures", "dead", "claimed"), 0
        )
        check_write_behind(self._driver.client)
        if start and writer is not None:
            self.start()

    # -- producing ------------------------------------------------------------------------------

    def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """``cache.set(key, value, ttl, write_behind=True)``."""
        self.cache.set(key, value, ttl, write_behind=True)

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.set(key, value)

    def delete(self, key: Hashable) -> bool:
        """Delete ``key`` from the cache now and from the origin by the writer (item.deleted)."""
        return self.cache._delete(key, behind=True)

    # -- inspecting -----------------------------------------------------------------------------

    def pending(self) -> int:
        """How many queued writes are not yet applied (nor dead-lettered), in every process."""
        calls = [self._calls.length(p) for p in range(self._keys.partitions)]
        return sum(self._raise_errors(self._driver.call_many(calls)))

    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """Up to ``count`` dead letters: key, version, deleted, error, attempts, id."""
        out: list[dict[str, Any]] = []
        for p in range(self._keys.partitions):
            for entry_id, raw in self._driver.call(self._calls.dead_range(p, count - len(out))):
                f = _fields(raw)
                out.append(
                    {
                        "key": _user_key(f.get(b"k", b"")),
                        "version": int(f.get(b"v", 0)),
                        "deleted": f.get(b"o") == b"D",
                        "error": f.get(b"error", b"").decode("utf-8", "replace"),
                        "attempts": int(f.get(b"attempts", 0)),
                        "id": f.get(b"id", entry_id),
                    }
                )
            if len(out) >= count:
                break
        return out

    def stats(self) -> dict[str, int]:
        """This flusher's counters, with the namespace-wide ``pending`` and ``dead`` counts."""
        out = dict(self._counts)
        out["pending"] = self.pending()
        calls = [self._calls.dead_length(p) for p in range(self._keys.partitions)]
        out["dead_letters"] = sum(self._raise_errors(self._driver.call_many(calls)))
        return out

    @staticmethod
    def _raise_errors(replies: list[Any]) -> list[Any]:
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    # -- flushing -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher (done by the constructor unless ``start=False``)."""
        if self.writer is None:
            raise ValueError("a WriteBehind without a writer only produces")
        if self._thread is not None:
            return
        name = f"tiercache:writebehind:{self._keys.namespace}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ensure_keeper()

    def _ensure_keeper(self) -> None:
        """Start the thread that keeps our locks (also for flush() without start())."""
        with self._held_lock:
            if self._keeper is not None or self._stop.is_set():
                return
            name = f"tiercache:writebehind:{self._keys.namespace}:lock"
            self._keeper = threading.Thread(target=self._keep, name=name, daemon=True)
            self._keeper.start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Write out every queued write (this process' and others'); whether none is left."""
        deadline = time.monotonic() + timeout
        while True:
            progressed = self.flush_once() if self.writer is not None else 0
            if self.pending() == 0:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not progressed:
                self._wake.set()
                time.sleep(min(0.02, left))

    def flush_once(self) -> int:
        """One round over the partitions; how many queued writes it finished."""
        with self._work:
            if time.monotonic() < self._retry_at:
                return 0
            return sum(self._round(p) for p in range(self._keys.partitions))

    def close(self, flush: bool = False, timeout: float = 30.0) -> None:
        """Stop flushing (after a ``flush`` if asked) and release the locks this flusher holds."""
        if flush and self.writer is not None:
            self.flush(timeout)
        self._stop.set()
        self._wake.set()
        for t in (self._thread, self._keeper):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=max(5.0, self._lock_ms / 1000.0))
        with self._held_lock:
            self._held = set()
        if self.writer is None:
            return  # a producer never read: no lock, no consumer record
        for p in range(self._keys.partitions):
            try:
                self._driver.call(self._calls.bye(p, self.consumer))
            except redis_lib.RedisError:
                pass  # the lock expires by itself; the record goes when another is idle

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        """The background flusher: rounds, then a wait of flush_interval (or the backoff)."""
        while not self._stop.is_set():
            try:
                done = self.flush_once()
            except redis_lib.RedisError as err:
                log.warning("write-behind %r: Redis failed: %s", self._keys.namespace, err)
                done = 0
            except Exception:  # never let the thread die: log, back off
                log.exception("write-behind %r: flush round failed", self._keys.namespace)
                done = 0
            if done < self.batch_size:
                wait = self.flush_interval
                if self._retry_at > time.monotonic():
                    wait = self._retry_at - time.monotonic()
                self._wake.wait(wait)
                self._wake.clear()

    def _keep(self) -> None:
        """Renew the locks held, every third of their TTL (also while the writer runs)."""
        while not self._stop.wait(self._lock_ms / 3000.0):
            with self._held_lock:
                held = sorted(self._held)
            for p in held:
                try:
                    ours = self._driver.call(self._calls.lock(p, self.consumer, self._lock_ms))
                except redis_lib.RedisError:
                    continue
                if not ours:
                    with self._held_lock:
                        self._held.discard(p)
                    log.warning(
                        "write-behind %r: flush lock of partition %d lost", self._keys.namespace, p
                    )

    def _round(self, partition: int) -> int:
        """Take one batch of ``partition`` and write it; how many entries were finished."""
        reply = self._driver.call(
            self._calls.take(
                partition, self.consumer, self.batch_size, self._lock_ms, self._idle_ms
            )
        )
        kind = reply[0]
        with self._held_lock:
            if kind == b"busy":
                self._held.discard(partition)
                return 0
            self._held.add(partition)
        self._ensure_keeper()
        if kind != b"ok":
            return 0
        source, raw_entries, deliveries = reply[1], reply[2], reply[3]
        if source == b"claimed":
            self._counts["claimed"] += len(raw_entries)
            log.info(
                "write-behind %r: claimed %d writes of a flusher that stopped",
                self._keys.namespace,
                len(raw_entries),
            )
        entries: list[_Entry] = []
        bad: list[bytes] = []
        for (entry_id, raw), count in zip(raw_entries, deliveries, strict=True):
            f = _fields(raw)
            try:
                entries.append(
                    _Entry(
                        entry_id,
                        f[b"o"].decode(),
                        f[b"k"],
                        int(f[b"v"]),
                        f[b"e"],
                        int(count),
                    )
                )
            except (KeyError, ValueError):
                bad.append(entry_id)
        if bad:
            self._dead(partition, [(i, b"", 0) for i in bad], "malformed write-behind entry", 1)
        last = coalesce(entries)
        go = self._driver.call(self._calls.begin(partition, [(e.encoded, e.version) for e in last]))
        batch: list[WriteBehindItem] = []
        for e, ok in zip(last, go, strict=True):
            if not ok:  # a newer version of the key was handed out: this one is superseded
                continue
            try:
                batch.append(self._item(e))
            except (ValueError, TypeError) as err:  # a payload this cache cannot read
                same = [_triple(x) for x in entries if x.encoded == e.encoded]
                self._dead(partition, same, f"unreadable value: {err}", e.deliveries)
                entries = [x for x in entries if x.encoded != e.encoded]
        if not entries:
            return len(bad)
        assert self.writer is not None
        try:
            if batch:
                self.writer(batch)
        except Exception as err:
            self._counts["failures"] += 1
            self._failures += 1
            spent = [_triple(e) for e in entries if e.deliveries >= self.max_attempts]
            if spent:
                attempts = max(e.deliveries for e in entries)
                self._dead(partition, spent, f"{type(err).__name__}: {err}", attempts)
            if len(spent) == len(entries):  # all gone: the next batch starts afresh
                self._failures = 0
            delay = min(
                self.retry_backoff * 2 ** max(0, self._failures - 1), self.retry_backoff_max
            )
            self._retry_at = time.monotonic() + delay if self._failures else 0.0
            log.warning(
                "write-behind %r: writer failed (%d writes, attempt %d): %s; %s",
                self._keys.namespace,
                len(batch),
                max(e.deliveries for e in entries),
                err,
                f"{len(spent)} dead-lettered" if spent else f"retry in {delay:.2f}s",
            )
            return len(spent) + len(bad)
        self._failures = 0
        self._retry_at = 0.0
        self._driver.call(self._calls.done(partition, [_triple(e) for e in entries]))
        self._counts["batches"] += 1
        self._counts["written"] += len(batch)
        self._counts["coalesced"] += len(entries) - len(batch)
        return len(entries) + len(bad)

    def _dead(
        self, partition: int, entries: list[tuple[bytes, bytes, int]], error: str, attempts: int
    ) -> None:
        """Move entries to the dead-letter stream (logged as an error)."""
        self._driver.call(
            self._calls.done(partition, entries, dead=True, error=error, attempts=attempts)
        )
        self._counts["dead"] += len(entries)
        log.error(
            "write-behind %r: %d writes moved to the dead-letter stream: %s",
            self._keys.namespace,
            len(entries),
            error,
        )

    def _item(self, e: _Entry) -> WriteBehindItem:
        """The batch item of an entry: its value decoded (and verified) as the cache would."""
        key = _user_key(e.encoded)
        if e.op == "D":
            return WriteBehindItem(key, None, e.version, True)
        return WriteBehindItem(key, decode_value(self.cache, e.encoded, e.envelope), e.version)


def _triple(e: _Entry) -> tuple[bytes, bytes, int]:
    """(id, encoded key, version) of an entry, as wb_done.lua takes them."""
    return e.id, e.encoded, e.version


def _user_key(encoded: bytes) -> Any:
    """The user key of an encoding (the encoding itself if it does not decode)."""
    try:
        return decode_key(encoded)
    except ValueError:
        return encoded


def decode_value(cache: TieredCache, encoded: bytes, raw: bytes) -> Any:
    """The value inside a queued envelope (verified when the cache has a secret; no TTL check)."""
    try:
        env = unpack(raw)
    except EnvelopeError as err:
        raise ValueError(str(err)) from err
    if env.flags & FLAG_NOT_A_VALUE:
        raise ValueError("a queued set holds no value")
    signer = cache._signer
    if signer is not None and not signer.verify_envelope(
        encoded, raw[:HEADER_SIZE], env.payload, env.signature
    ):
        raise ValueError("signature missing or wrong")
    payload = env.payload
    if len(encoded) > cache._keys.max_key_bytes:
        size = int.from_bytes(payload[:4], "big")
        if payload[4 : 4 + size] != encoded:
            raise ValueError("the key inside the payload is another key")
        payload = payload[4 + size :]
    if env.flags & FLAG_EXT:  # the tags/sliding block (tiercache.tags) precedes the value
        _, payload = split_ext(payload)
    if env.codec != cache._codec.id:
        raise ValueError(f"payload of codec {env.codec}, this cache reads {cache._codec.id}")
    if env.compression:
        payload = decompress(payload, env.compression, cache._max_value_bytes * _INFLATION)
    return cache._codec.loads(payload)

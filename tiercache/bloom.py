"""Negative filtering: a Bloom filter of the keys that exist in the origin (SPEC 3.8 and 5, S17).

``TieredCache(..., bloom=BloomConfig(capacity=1_000_000, error_rate=0.01))``: on a full miss (local
tier and Redis), the filter is asked in the same round trip as the Redis read (a pipeline of GET
and one read-only script); when it says "certainly absent", the loader is not called and the read
answers absent. ``cache.bloom`` is the :class:`BloomFilter`: ``add``/``add_many`` register keys that
exist, ``warm`` loads them all and marks the filter complete, ``rebuild`` replaces it, ``stats``.

Backends (chosen at start-up, ``backend="auto"``)
    * RedisBloom (``MODULE LIST`` shows ``bf``, or a ``BF.EXISTS`` probe answers): ``BF.RESERVE``
      with ``EXPANSION`` (a scalable filter: it stays near its error rate past its capacity),
      ``BF.MADD``, ``BF.EXISTS``/``BF.MEXISTS``. Redis Stack and Redis >= 8 have it built in.
    * Pure Redis otherwise ("lua"): bitmaps set and read by Lua scripts. Sizing as a textbook
      Bloom filter: m = -n ln p / (ln 2)^2 bits and k = round(m/n ln 2) hashes for n = capacity,
      p = error_rate; positions (h1 + i h2) mod m from two independent 48-bit hashes (disjoint
      digits of the key's SHA-1, computed in the script). The bitmap is split into equal parts of
      at most ``max_part_bits`` (default 2^26 bits = 8 MiB) in separate keys, so no key is huge.
      It does not grow: past its capacity the error rate rises (``stats()`` estimates it from the
      bits set); ``rebuild(capacity=...)`` resizes it.
    Both are driven by the same scripts (``tiercache/lua/bloom_*.lua``, called by SHA); a filter
    records its backend in its header, so every process uses the filter that exists.

Redis layout and cluster
    The whole filter lives in ONE hash slot, tag ``{<ns>:bf}``: a header hash
    ``<ns>:{<ns>:bf}:meta`` (generation, completeness mark, sizing, counts) and its data keys
    ``<ns>:{<ns>:bf}:g<gen>`` (RedisBloom) or ``...:g<gen>:<part>`` (bitmaps). One slot is what
    makes every check atomic against the header (completeness, loss, a rebuild's swap) in a single
    script; the price is that one shard serves all filter traffic. Sharding by key hash was not
    chosen: the completeness mark and the swap would then span slots.

Soundness (never "absent" for a key that was registered)
    * The check script answers only when the header's completeness mark names the current
      generation AND every data key of it exists; otherwise it says "off" and the cache loads as
      if there were no filter. So a filter that was never warmed, was deleted (DEL of the header
      or of any data key), flushed (FLUSHALL), lost with a restart, or partly evicted, filters
      nothing until ``warm`` runs again. This is decided in the same round trip as the read. A
      server without the module answers a ``bf`` check with an error: also "off".
    * A write to the filter checks the same things first and never re-creates a lost data key by
      writing into it (``BF.MADD``/``SETBIT`` on a missing key would): a lost filter is replaced by
      an empty one without the mark, in which registrations keep landing until ``warm`` completes.
    * A registration that fails (timeout, Redis paused or down) is kept in this process and
      re-sent by a background repair (``sync()`` does it at once); until it went through, this
      process filters nothing, and ``warm`` does not mark the filter complete. Past
      ``max_pending`` lost registrations the repair removes the completeness mark instead.
    * The create race (S17 a). ``cache.set`` registers the key before the value is written
      anywhere, and a registration is one atomic script. A read sends its GET and its check in one
      pipeline, GET first: if the check says absent, the registration had not happened when the
      check ran, so the write had not begun when the GET ran: the read is ordered before the
      create, whose write had not even started. A create acknowledged before a read began was
      registered before it, so that read sees the key. For creates done outside the cache, call
      ``cache.bloom.add(key)`` BEFORE the commit in the origin, then ``cache.set`` or
      ``cache.invalidate`` (which also removes a cached absence). Registering after the commit
      (commit, then ``cache.set``) leaves a window in which a read may still answer absent for
      a key that is committed but whose create has not returned yet, which is allowed.
    * ``warm(keys)`` and ``rebuild(keys)`` create their generation BEFORE reading ``keys``, so a key
      created meanwhile is registered in it: give them an iterable that lists the origin lazily
      (a cursor or a generator), read after the call began, not a list made before it.
    * During a rebuild, registrations go to both the current and the new generation; the current
      one answers until the swap, which sets the new generation current and complete in one
      script: a read sees the old filter or the new one, never none.

Cost: the check rides along with every Redis read of the cache (a hit too, as the read cannot know
beforehand), one more reply in the pipeline and a short script on the server (one header read,
an EXISTS, then BF.EXISTS or a few GETBITs). A registration is one more round trip per write and
per load that found a key.

Known limits
    * A failed registration is repaired by its own process: one that dies, or stays cut off from
      Redis while others still reach it, leaves a key that the others may call absent. Register
      before the commit in the origin, and abandon the create if that raises.
    * A create registered before the filter was lost (or before a rebuild began) and committed in
      the origin after ``warm``/``rebuild`` listed past it is in neither: keep registration and
      commit close together.
    * Asynchronous replication may lose the last registrations on a failover: run ``warm`` after
      one. Keys deleted from the origin stay in the filter (Bloom filters cannot forget): only
      the false-positive rate pays; ``rebuild`` from time to time.
    * A header deleted on its own leaves its data keys behind, unreferenced (the next generations
      get new numbers); delete ``<ns>:{<ns>:bf}:*`` to reclaim them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import KW_ONLY, dataclass
from typing import Any

import redis as redis_lib
from redis.exceptions import NoScriptError, ResponseError

from .driver import SyncDriver, load_script_source
from .errors import CacheUnavailable, TiercacheError
from .keys import encode_key

log = logging.getLogger("tiercache")

__all__ = ["BACKENDS", "BloomConfig", "BloomFilter", "FilterLost", "bloom_size"]

BACKENDS = ("auto", "redisbloom", "lua")
_CODE = {"redisbloom": "bf", "lua": "bits"}  # backend name -> its code in the filter's header
_NAME = {code: name for name, code in _CODE.items()}
_LN2 = math.log(2.0)
_MAX_PART_BITS = 1 << 32  # SETBIT offsets stay below 2^32

# Statuses of the check script (bloom_check.lua).
ON, INCOMPLETE, NO_FILTER, LOST = 1, 0, -1, -2
_STATUS = {ON: "complete", INCOMPLETE: "incomplete", NO_FILTER: "missing", LOST: "lost"}

_SCRIPTS = ("check", "add", "admin")


class FilterLost(TiercacheError):
    """The filter was lost or replaced while ``warm``/``rebuild`` filled it: run it again."""


def bloom_size(capacity: int, error_rate: float) -> tuple[int, int]:
    """(bits m, hashes k) of a Bloom filter for ``capacity`` keys at ``error_rate``.

    m = -n ln p / (ln 2)^2, k = round(m / n * ln 2), at least 1.
    """
    m = math.ceil(-capacity * math.log(error_rate) / (_LN2 * _LN2))
    return m, max(1, round(m / capacity * _LN2))


@dataclass(frozen=True)
class Sizing:
    """How one generation of the filter is made (sent to the scripts that may create it)."""

    backend: str  # "bf" or "bits"
    capacity: int
    error_rate: float
    expansion: int
    bits: int  # "bits": total bits, a multiple of parts
    hashes: int
    parts: int

    def args(self) -> list[Any]:
        return [
            self.backend,
            self.capacity,
            repr(self.error_rate),
            self.expansion,
            self.bits,
            self.hashes,
            self.parts,
        ]


@dataclass(frozen=True)
class BloomConfig:
    """The negative filter of a ``TieredCache`` (``bloom=``); ``open`` makes its filter.

    ``capacity``: keys expected in the origin; ``error_rate``: false-positive rate at that many.
    ``backend``: "auto" (RedisBloom when the server has it, else "lua"), "redisbloom" (an error
    if the server lacks it) or "lua" (bitmaps, any Redis >= 7). ``expansion``: growth factor of a
    RedisBloom filter past its capacity. ``max_part_bits``: largest bitmap key of the "lua"
    backend. ``batch``/``pipeline``: keys per script call and calls per round trip of
    ``warm``/``add_many``. ``recheck``: seconds between checks of a filter found off (a process
    notices another's ``warm`` within it). ``max_pending``: failed registrations kept for repair
    (beyond: the completeness mark is removed). ``repair_for``: seconds the background repair
    keeps retrying before leaving it to the next read.
    """

    capacity: int
    error_rate: float = 0.01
    _: KW_ONLY
    backend: str = "auto"
    expansion: int = 2
    max_part_bits: int = 1 << 26
    batch: int = 500
    pipeline: int = 8
    recheck: float = 1.0
    max_pending: int = 100_000
    repair_for: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int):
            raise TypeError("capacity must be an int")
        if self.capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not 0.0 < self.error_rate < 1.0:
            raise ValueError("error_rate must be between 0 and 1 (exclusive)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.expansion < 1:
            raise ValueError("expansion must be >= 1")
        if not 8 <= self.max_part_bits <= _MAX_PART_BITS:
            raise ValueError(f"max_part_bits must be between 8 and {_MAX_PART_BITS}")
        if self.batch < 1 or self.pipeline < 1 or self.max_pending < 1:
            raise ValueError("batch, pipeline and max_pending must be >= 1")
        if self.recheck < 0 or self.repair_for < 0:
            raise ValueError("recheck and repair_for must be >= 0")

    def sizing(self, backend: str) -> Sizing:
        """The sizing of a generation of this configuration on ``backend`` ("bf" or "bits")."""
        if backend == "bf":
            return Sizing("bf", self.capacity, self.error_rate, self.expansion, 0, 0, 1)
        m, k = bloom_size(self.capacity, self.error_rate)
        parts = -(-m // self.max_part_bits)
        per_part = -(-m // parts)
        return Sizing(
            "bits", self.capacity, self.error_rate, self.expansion, per_part * parts, k, parts
        )

    def open(self, driver: SyncDriver) -> BloomFilter:
        """The filter of the cache that ``driver`` serves (tiercache.tiered.FilterFactory)."""
        return BloomFilter(self, driver)


class _Scripts:
    """The bloom_*.lua scripts (the writers prefixed with bloom_lib.lua), run by SHA."""

    def __init__(self, client: redis_lib.Redis) -> None:
        self.client = client
        lib = load_script_source("bloom_lib")
        self.sources = {n: load_script_source(f"bloom_{n}") for n in _SCRIPTS}
        for n in ("add", "admin"):  # the writers share bloom_lib.lua; the check stands alone
            self.sources[n] = lib + "\n" + self.sources[n]
        self.shas = {
            n: hashlib.sha1(s.encode("utf-8")).hexdigest() for n, s in self.sources.items()
        }

    def load(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for source in self.sources.values():
            pipe.script_load(source)
        pipe.execute()

    def run(self, name: str, meta: bytes, args: list[Any], command: str = "EVALSHA") -> Any:
        sha = self.shas[name]
        try:
            return self.client.execute_command(command, sha, 1, meta, *args)
        except NoScriptError:
            self.load()
            return self.client.execute_command(command, sha, 1, meta, *args)

    def run_many(
        self, name: str, meta: bytes, calls: list[list[Any]], command: str = "EVALSHA"
    ) -> list[Any]:
        """Several calls in one round trip (a pipeline); a call's error is its reply."""
        sha = self.shas[name]
        replies: list[Any] = []
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for args in calls:
                pipe.execute_command(command, sha, 1, meta, *args)
            replies = pipe.execute(raise_on_error=False)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                break
            self.load()
        return replies


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _is_unknown_command(err: BaseException) -> bool:
    text = str(err).lower()
    return "unknown command" in text or "unknown redis command" in text


# Filters alive in this process, to reset their locks and threads in a forked child.
_live: weakref.WeakSet[BloomFilter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for f in list(_live):
        f._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class BloomFilter:
    """The negative filter of one cache namespace (``cache.bloom``).

    The cache's hooks: ``probe``, ``absent``, ``register``, ``note`` (tiercache.tiered's
    ``NegativeFilter``). The user's: ``add``, ``add_many``, ``check``, ``check_many``, ``warm``,
    ``rebuild``, ``sync``, ``stats``, ``status``, ``redis_keys``. Thread-safe.
    """

    def __init__(self, config: BloomConfig, driver: SyncDriver) -> None:
        self.config = config
        self._client = driver.client
        ns = driver.keys.namespace
        self._base = f"{ns}:{{{ns}:bf}}:".encode()
        self._meta = self._base + b"meta"
        self._scripts = _Scripts(self._client)
        self._backend: str | None = None  # "bf" / "bits", once known
        self._check_cmd = "EVALSHA_RO"
        self._on = False  # the last check found the filter complete
        self._checked = -math.inf  # when a check last found it off
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("filtered_lookups", "loads_avoided", "false_positives", "registration_errors"), 0
        )
        self._pending: dict[bytes, None] = {}  # failed registrations, in order
        self._void = False  # too many failed: the completeness mark must go
        self._repairer: threading.Thread | None = None
        self._last_kick = -math.inf
        self._stop = threading.Event()
        self._tls = threading.local()
        _live.add(self)
        try:
            self._start()
        except (redis_lib.RedisError, CacheUnavailable) as err:  # decided when first needed
            log.warning("tiercache bloom %r: not ready at start (%s); filtering is off", ns, err)

    # -- start-up -------------------------------------------------------------------------------

    def _start(self) -> None:
        self._resolve_backend()
        self._scripts.load()
        try:
            self.status()
        except ResponseError as err:
            if "evalsha_ro" not in str(err).lower():
                raise
            self._check_cmd = "EVALSHA"  # a server before 7.0 (no EVALSHA_RO)
            self.status()

    def _resolve_backend(self) -> str:
        """ "bf" or "bits" for the generations this process creates (asks the server once)."""
        if self._backend is not None:
            return self._backend
        wanted = self.config.backend
        if wanted == "lua":
            self._backend = "bits"
            return self._backend
        has = self._server_has_bloom()
        if wanted == "redisbloom" and not has:
            raise TiercacheError(
                "backend='redisbloom' but this server has no RedisBloom (BF.* commands); load "
                "the module, or use backend='auto' or 'lua'"
            )
        self._backend = "bf" if has else "bits"
        return self._backend

    def _server_has_bloom(self) -> bool:
        try:
            modules = self._client.execute_command("MODULE", "LIST") or []
        except ResponseError:  # not allowed (ACL, managed service): the probe below decides
            modules = []
        for entry in modules:
            if isinstance(entry, dict):
                name = entry.get(b"name", entry.get("name"))
            else:  # a flat [name, value, ...] list
                pairs = dict(zip(entry[::2], entry[1::2], strict=False))
                name = pairs.get(b"name", pairs.get("name"))
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            if str(name).lower() in ("bf", "bloom", "redisbloom"):
                return True
        try:
            self._client.execute_command("BF.EXISTS", self._base + b"probe", b"x")
        except ResponseError as err:
            if _is_unknown_command(err):
                return False
            raise
        return True

    @property
    def backend(self) -> str | None:
        """ "redisbloom" or "lua": what this process creates filters with (None: not known yet)."""
        return _NAME.get(self._backend) if self._backend else None

    def _sizing(self, config: BloomConfig | None = None) -> Sizing:
        return (config or self.config).sizing(self._resolve_backend())

    # -- the cache's hooks (tiercache.tiered.NegativeFilter) ------------------------------------

    def probe(self, encoded: bytes) -> tuple[Any, ...] | None:
        """The check of ``encoded`` to send with the read, or None when filtering is off here."""
        self._tls.armed = False
        if self._pending or self._void:
            self._kick()
            return None
        if not self._on and time.monotonic() - self._checked < self.config.recheck:
            return None
        return (self._check_cmd, self._scripts.shas["check"], 1, self._meta, encoded)

    def absent(self, reply: Any) -> bool:
        """Whether the check's reply proves the key absent (anything unclear: False)."""
        if isinstance(reply, BaseException):
            if isinstance(reply, NoScriptError):  # Redis restarted: scripts (and filter) gone
                try:
                    self._scripts.load()
                except redis_lib.RedisError:
                    pass
            else:  # e.g. no RedisBloom on this server for a "bf" filter
                self._learn(NO_FILTER)
            return False
        try:
            status = int(reply[0])
            verdict = int(reply[1]) if status == ON else 1
        except (TypeError, ValueError, IndexError):
            self._learn(NO_FILTER)
            return False
        self._learn(status)
        if status != ON:
            return False
        self._count("filtered_lookups")
        if verdict == 0 and not self._pending and not self._void:
            return True
        self._tls.armed = True  # a load that finds nothing now is a false positive
        return False

    def register(self, encoded: bytes) -> None:
        """Add a key that exists (before its value is stored); a failure raises, and switches
        filtering off here until the registration went through (see ``sync``)."""
        self._tls.armed = False
        self._add_registrations([encoded])

    def note(self, event: str) -> None:
        """Count an event of the cache: "avoided", "false_positive"."""
        if event == "avoided":
            self._count("loads_avoided")
        elif event == "false_positive" and getattr(self._tls, "armed", False):
            self._tls.armed = False
            self._count("false_positives")

    # -- the user's API -------------------------------------------------------------------------

    def add(self, key: Any) -> bool:
        """Register ``key`` (a cache key) as existing in the origin; whether it was new to the
        filter. Call it before committing the key in the origin. CacheUnavailable on failure."""
        try:
            return self._add_registrations([encode_key(key)]) > 0
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"bloom add of {key!r} failed: {err}") from err

    def add_many(self, keys: Iterable[Any]) -> int:
        """Register several keys (pipelined batches); how many were new to the filter."""
        encoded = [encode_key(k) for k in keys]
        new = sent = 0
        sizing = self._sizing_or_unavailable()
        for calls in _chunks(_chunks(encoded, self.config.batch), self.config.pipeline):
            try:
                replies = self._scripts.run_many(
                    "add", self._meta, [[b"", *sizing.args(), *c] for c in calls]
                )
            except redis_lib.RedisError as err:
                self._failed(encoded[sent:])  # this round trip's and the unsent: re-sent later
                raise CacheUnavailable(f"bloom add_many failed: {err}") from err
            sent += sum(len(c) for c in calls)
            errors = [r for r in replies if isinstance(r, Exception)]
            for r in replies:
                if not isinstance(r, Exception):
                    new += int(r[3])
                    self._learn(ON if int(r[2]) else INCOMPLETE)
            if errors:
                failed = [
                    it
                    for c, r in zip(calls, replies, strict=True)
                    if isinstance(r, Exception)
                    for it in c
                ]
                self._failed(failed + encoded[sent:])
                raise CacheUnavailable(f"bloom add_many failed: {errors[0]}") from errors[0]
        return new

    def check(self, key: Any) -> bool | None:
        """True: ``key`` may exist; False: it certainly does not; None: the filter is off."""
        return self.check_many([key])[0]

    def check_many(self, keys: Iterable[Any]) -> list[bool | None]:
        """``check`` of several keys, pipelined."""
        encoded = [encode_key(k) for k in keys]
        out: list[bool | None] = []
        for calls in _chunks(_chunks(encoded, self.config.batch), self.config.pipeline):
            try:
                replies = self._scripts.run_many("check", self._meta, calls, self._check_cmd)
            except redis_lib.RedisError as err:
                raise CacheUnavailable(f"bloom check failed: {err}") from err
            for call, reply in zip(calls, replies, strict=True):
                if isinstance(reply, Exception) or int(reply[0]) != ON:
                    out.extend([None] * len(call))
                else:
                    out.extend(bool(r) for r in reply[1:])
        if self._pending or self._void:  # our own lost registrations are not in it
            out = [None if r is False else r for r in out]
        return out

    def warm(self, keys: Iterable[Any], progress: Callable[[int], Any] | None = None) -> int:
        """Load every key of the origin, then mark the filter complete: negative filtering on.

        ``keys`` is read after the filter exists (a key created meanwhile is registered in it),
        in pipelined batches; ``progress(done)`` is called after each round trip with the number
        of keys sent so far. Returns that number. Keys already in the filter stay.
        """
        try:
            sizing = self._sizing()
            gen = int(self._scripts.run("add", self._meta, [b"", *sizing.args()])[1])
            done = self._fill(gen, sizing, keys, progress)
            if not self.sync():
                raise CacheUnavailable("registrations of this process are still pending")
            if not int(self._scripts.run("admin", self._meta, ["complete", gen])):
                raise FilterLost("the filter was lost or replaced during warm(): run it again")
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"bloom warm failed: {err}") from err
        self._learn(ON)
        return done

    def rebuild(
        self,
        keys: Iterable[Any],
        progress: Callable[[int], Any] | None = None,
        *,
        capacity: int | None = None,
        error_rate: float | None = None,
    ) -> int:
        """Build a new filter of ``keys`` beside the current one, then swap them atomically.

        Registrations during the rebuild go to both; the current filter keeps answering until
        the swap; the new one is complete from the swap on. ``capacity``/``error_rate`` resize
        it (for this process' later rebuilds too). Returns the number of keys sent.
        """
        config = self.config
        if capacity is not None or error_rate is not None:
            config = dataclasses.replace(
                config,
                capacity=config.capacity if capacity is None else capacity,
                error_rate=config.error_rate if error_rate is None else error_rate,
            )
        gen = None
        try:
            sizing = self._sizing(config)
            gen = int(self._scripts.run("admin", self._meta, ["begin", *sizing.args()]))
            done = self._fill(gen, sizing, keys, progress)
            if not self.sync():
                raise CacheUnavailable("registrations of this process are still pending")
            if not int(self._scripts.run("admin", self._meta, ["swap", gen])):
                gen = None
                raise FilterLost("the new filter was lost or replaced during rebuild()")
        except BaseException as exc:
            if gen is not None:
                try:
                    self._scripts.run("admin", self._meta, ["abort", gen])
                except redis_lib.RedisError:
                    pass  # "next" stays; the next rebuild replaces it
            if isinstance(exc, redis_lib.RedisError):
                raise CacheUnavailable(f"bloom rebuild failed: {exc}") from exc
            raise
        self.config = config
        self._learn(ON)
        return done

    def sync(self) -> bool:
        """Re-send this process' failed registrations now; whether none is left pending."""
        return self._repair_once()

    def status(self) -> str:
        """The filter's state in Redis: "complete", "incomplete", "missing" (no filter), "lost"
        (a data key is gone) or "error" (unreadable: a RedisBloom filter, no module)."""
        try:
            reply = self._scripts.run("check", self._meta, [], self._check_cmd)
        except ResponseError as err:
            if "evalsha_ro" in str(err).lower():
                raise  # the command itself is unknown (see _start)
            self._learn(NO_FILTER)
            return "error"
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"bloom status failed: {err}") from err
        status = int(reply[0])
        self._learn(status)
        return _STATUS.get(status, "missing")

    @property
    def complete(self) -> bool:
        """Whether the filter answers "absent" (complete and whole in Redis, nothing pending)."""
        return self.status() == "complete" and not self._pending and not self._void

    def redis_keys(self) -> list[bytes]:
        """The Redis keys of the filter: its header, then the data keys of its generations."""
        names = [self._meta]
        try:
            meta = self._client.hgetall(self._meta)
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"bloom read failed: {err}") from err
        for field in (b"gen", b"next"):
            g = meta.get(field)
            if g is not None:
                names += self._data_keys(meta, g)
        return names

    def _data_keys(self, meta: dict[bytes, bytes], g: bytes) -> list[bytes]:
        backend = meta.get(b"b:" + g)
        if backend == b"bf":
            return [self._base + b"g" + g]
        if backend == b"bits":
            parts = int(meta.get(b"p:" + g, b"0"))
            return [self._base + b"g" + g + b":%d" % i for i in range(parts)]
        return []

    def stats(self) -> dict[str, Any]:
        """Capacity, inserted, estimated false-positive rate, and this process' counters:
        filtered lookups (misses the filter answered), loads avoided, false positives seen (a
        "maybe" whose loader found nothing) and the false-positive rate they show.

        Redis-side figures are None when Redis cannot be read.
        """
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["pending_registrations"] = len(self._pending) + (1 if self._void else 0)
        fp, avoided = out["false_positives"], out["loads_avoided"]
        out["observed_fp_rate"] = fp / (fp + avoided) if fp + avoided else None
        out.update(
            backend=self.backend,
            status=None,
            complete=None,
            generation=None,
            rebuilding=None,
            capacity=None,
            error_rate=None,
            inserted=None,
            estimated_fp_rate=None,
            size_bytes=None,
            hashes=None,
            parts=None,
        )
        try:
            self._server_stats(out)
        except (redis_lib.RedisError, CacheUnavailable):
            pass
        return out

    def _server_stats(self, out: dict[str, Any]) -> None:
        status = self.status()
        out["status"] = status
        out["complete"] = status == "complete" and not out["pending_registrations"]
        meta = self._client.hgetall(self._meta)
        g = meta.get(b"gen")
        if g is None or meta.get(b"b:" + g) is None:
            return
        backend = meta[b"b:" + g]
        capacity = int(meta[b"c:" + g])
        error_rate = float(meta[b"e:" + g])
        out.update(
            backend=_NAME.get(backend.decode(), backend.decode()),
            generation=int(g),
            rebuilding=b"next" in meta,
            capacity=capacity,
            error_rate=error_rate,
        )
        if backend == b"bf":
            key = self._base + b"g" + g
            info = self._client.execute_command("BF.INFO", key)
            if isinstance(info, list):
                info = dict(zip(info[::2], info[1::2], strict=False))
            info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in info.items()}
            inserted = int(info["Number of items inserted"])
            layers = int(info["Number of filters"])
            expansion = int(info.get("Expansion rate") or meta.get(b"x:" + g, b"2"))
            out.update(
                inserted=inserted,
                size_bytes=int(info["Size"]),
                estimated_fp_rate=_scaling_fp_rate(
                    inserted, capacity, error_rate, expansion, layers
                ),
            )
            return
        m, k, parts = int(meta[b"m:" + g]), int(meta[b"k:" + g]), int(meta[b"p:" + g])
        names = self._data_keys(meta, g)
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.bitcount(name)
        ones = sum(pipe.execute())
        out.update(
            inserted=int(meta.get(b"n:" + g, b"0")),
            size_bytes=parts * -(-(m // parts) // 8),
            hashes=k,
            parts=len(names),
            estimated_fp_rate=(ones / m) ** k,
        )

    def close(self) -> None:
        """Stop the background repair (pending registrations stay: ``sync`` still sends them)."""
        self._stop.set()
        t = self._repairer
        if t is not None and t is not threading.current_thread():
            t.join(5.0)

    def __repr__(self) -> str:
        return (
            f"BloomFilter({self._meta.decode('utf-8', 'replace')}, backend={self.backend}, "
            f"on={self._on}, pending={len(self._pending)})"
        )

    # -- internals ------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _learn(self, status: int) -> None:
        """What a reply said of the filter: complete (filter here) or not (recheck later)."""
        if status == ON:
            self._on = True
        else:
            self._on = False
            self._checked = time.monotonic()

    def _sizing_or_unavailable(self) -> Sizing:
        try:
            return self._sizing()
        except redis_lib.RedisError as err:
            raise CacheUnavailable(f"bloom start-up failed: {err}") from err

    def _add_registrations(self, items: list[bytes]) -> int:
        """Add registrations (and, first, any pending ones); RedisError after recording them."""
        with self._lock:
            pending = list(itertools.islice(self._pending, self.config.batch))
        try:
            sizing = self._sizing()
            reply = self._scripts.run("add", self._meta, [b"", *sizing.args(), *pending, *items])
        except redis_lib.RedisError:
            self._failed(items)
            raise
        if pending:
            self._done(pending)
        self._learn(ON if int(reply[2]) else INCOMPLETE)
        return int(reply[3])

    def _fill(
        self,
        gen: int,
        sizing: Sizing,
        keys: Iterable[Any],
        progress: Callable[[int], Any] | None,
    ) -> int:
        """Send ``keys`` to generation ``gen`` in pipelined batches; FilterLost if it went."""
        done = 0
        head = [gen, *sizing.args()]
        encoded = (encode_key(k) for k in keys)
        for calls in _chunks(_chunks(encoded, self.config.batch), self.config.pipeline):
            replies = self._scripts.run_many("add", self._meta, [[*head, *c] for c in calls])
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
                if int(reply[0]) != 1:
                    raise FilterLost(f"filter generation {gen} was lost or replaced while filled")
            done += sum(len(c) for c in calls)
            if progress is not None:
                progress(done)
        return done

    def _failed(self, items: list[bytes]) -> None:
        """Registrations that may not have reached Redis: filter nothing here until re-sent."""
        self._on = False
        self._checked = time.monotonic()
        with self._lock:
            self._counts["registration_errors"] += 1
            for it in items:
                self._pending[it] = None
            if len(self._pending) > self.config.max_pending:
                self._pending.clear()
                self._void = True
        self._kick(force=True)

    def _done(self, items: list[bytes]) -> None:
        with self._lock:
            for it in items:
                self._pending.pop(it, None)

    def _repair_once(self) -> bool:
        """Re-send the pending registrations (or void the mark); whether none is left."""
        with self._lock:
            items = list(self._pending)
            void = self._void
        if not items and not void:
            return True
        try:
            if void:
                self._scripts.run("admin", self._meta, ["void"])
                with self._lock:
                    self._void = False
            if items:
                sizing = self._sizing()
                for chunk in _chunks(items, self.config.batch):
                    self._scripts.run("add", self._meta, [b"", *sizing.args(), *chunk])
                    self._done(chunk)
        except redis_lib.RedisError as err:
            log.debug("tiercache bloom: repair failed: %s", err)
            return False
        with self._lock:
            left = bool(self._pending) or self._void
        if not left:
            log.info("tiercache bloom: lost registrations re-sent; filtering can resume")
            self._checked = -math.inf  # ask the filter again at the next read
        return not left

    def _kick(self, force: bool = False) -> None:
        """Make sure a repair runs (at most one thread; from reads, at most once per recheck)."""
        now = time.monotonic()
        if not force and now - self._last_kick < max(self.config.recheck, 0.05):
            return
        with self._lock:
            t = self._repairer
            if t is not None and t.is_alive():
                return
            self._last_kick = now
            t = threading.Thread(
                target=self._repair_loop, name="tiercache:bloom-repair", daemon=True
            )
            self._repairer = t
        t.start()

    def _repair_loop(self) -> None:
        deadline = time.monotonic() + self.config.repair_for
        delay = 0.01
        while not self._stop.wait(delay):
            if self._repair_once() or time.monotonic() >= deadline:
                return
            delay = min(delay * 2.0, 1.0)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._repairer = None
        self._stop = threading.Event()
        self._tls = threading.local()


def _scaling_fp_rate(
    inserted: int, capacity: int, error_rate: float, expansion: int, layers: int
) -> float:
    """Estimated false-positive rate of a RedisBloom scaling filter holding ``inserted`` keys.

    Layer i holds capacity * expansion^i keys at error_rate * 0.5^i (RedisBloom's tightening);
    the layers fill in order, each a Bloom filter of its own sizing; the filter errs if any errs.
    """
    left, ok = inserted, 1.0
    for i in range(max(1, layers)):
        cap = capacity * expansion**i
        err = error_rate * 0.5**i
        bpe = -math.log(err) / (_LN2 * _LN2)
        k = math.ceil(_LN2 * bpe)
        n = min(left, cap) if i < layers - 1 else left
        if n > 0:
            ok *= 1.0 - (1.0 - math.exp(-k * n / (cap * bpe))) ** k
        left -= n
    return 1.0 - ok

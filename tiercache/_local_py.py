"""The in-process tier in pure Python: the twin of ext/_local.pyx, with the same behaviour.

Semantics shared by both implementations (the test suite runs against each):

* A ``LocalCache`` maps hashable keys to entries. ``c[k]``/``get`` count hits and misses and
  refresh the key for the policy; ``k in c``, ``peek``, ``entry`` and iteration do neither.
* Capacity: at most ``maxsize`` entries and, when ``maxbytes`` is set, a total weight (the sum of
  ``getsizeof(value)``) of at most ``maxbytes``. A write inserts first, then evicts the policy's
  victims until both bounds hold; the entry just written is never its own victim. Expired entries
  are purged before any live entry is evicted. A value heavier than ``maxbytes`` raises
  ``ValueError`` and changes nothing.
* Policies: ``lru`` evicts the least recently used entry; ``lfu`` the least frequently used
  (every read hit and every write of an existing key counts one use), the least recently used of
  those on a tie; ``tinylfu`` is W-TinyLFU: a 1% LRU window in front of a segmented LRU main space
  (20% probation, 80% protected), where an entry leaving the window enters the main space only if
  the frequency sketch rates it above the main space's victim. Given a seed and the same key
  hashes it is deterministic.
* TTL: ``ttl`` seconds per entry (``set(k, v, ttl=...)`` overrides the cache default; ``math.inf``
  means never). An entry is expired once ``timer() >= expires``; expired entries are invisible
  to every read, and ``len`` counts live entries only.
* ``on_evict(key, value, cause)``, when given, is called once for every entry the cache lets go on
  its own: ``cause`` is ``"size"`` for an entry evicted to keep ``maxsize``/``maxbytes`` (counted
  in ``stats()["evictions"]``; with ``maxsize=0`` the value written is that entry) and
  ``"expired"`` for an expired entry removed (counted in ``stats()["expirations"]``). Explicit
  removals (``del``/``pop`` of a live key, ``popitem``, ``clear``) and replaced values are not
  reported. It runs in the thread of the operation that removed the entries, after that
  operation released the cache (so it may use the cache); an exception it raises is logged under
  ``tiercache.local`` and does not reach the operation.
* Threads: every mutation runs under the cache's own mutex; a callback that re-enters a mutation
  of the same cache from the mutating thread (a ``__del__`` or weakref callback fired by the
  garbage collector mid-write, a key's ``__eq__``) gets ``RuntimeError`` rather than a deadlock.
  Iterating while another thread writes may raise ``RuntimeError`` as a dict does. The bounds
  hold between operations: while Python code runs inside a write (a key's ``__eq__``, a Python
  timer), another thread may see ``len`` or ``currbytes`` one write over them.
"""

from __future__ import annotations

import heapq
import logging
import math
import numbers
import operator
import sys
from collections.abc import (
    Callable,
    Hashable,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    ValuesView,
)
from threading import RLock
from typing import Any

from . import _clock
from ._sentinel import MISSING
from ._sketch import MASK64, FrequencySketch, mix64
from ._views import LocalItemsView, LocalValuesView

INF = math.inf
_MISSING: Any = object()
_log = logging.getLogger("tiercache.local")
# What on_evict is told: (key, value, cause) of each entry a mutation let go on its own.
Gone = list[tuple[Hashable, Any, str]]
POLICIES = ("lru", "lfu", "tinylfu")

# W-TinyLFU layout (Caffeine's defaults) and its admission rule.
WINDOW_PERCENT = 1
PROTECTED_PERCENT = 80
ADMIT_HASHDOS_THRESHOLD = 6
# Segments an entry can be in (Entry.segment); NONE means not linked in any policy structure.
NONE, WINDOW, PROBATION, PROTECTED, LRU_RING, LFU_RING = range(6)
_GOLDEN = 0x9E3779B97F4A7C15


class Entry:
    """One cached value and its metadata (read-only outside this module)."""

    __slots__ = (
        "expires",
        "freq",
        "fresh_until",
        "hash",
        "heap_seq",
        "key",
        "next",
        "prev",
        "segment",
        "sketch_epoch",
        "value",
        "version",
        "weight",
    )

    def __init__(self, key: Hashable, value: Any) -> None:
        self.key = key
        self.value = value
        self.expires = INF
        self.fresh_until = INF
        self.version = 0
        self.weight = 0
        self.hash = 0
        self.heap_seq = 0
        self.segment = NONE
        self.sketch_epoch = 0  # the sketch's epoch in which its counters were all at max
        self.freq: _FreqNode | None = None
        self.prev: Any = None
        self.next: Any = None

    def __repr__(self) -> str:
        return f"Entry(key={self.key!r}, version={self.version}, expires={self.expires})"


class _Ring:
    """Circular doubly linked list of entries around a sentinel; the front is the most recent."""

    __slots__ = ("next", "prev", "size")

    def __init__(self) -> None:
        self.prev: Any = self
        self.next: Any = self
        self.size = 0

    def push_front(self, e: Entry) -> None:
        first = self.next
        e.prev = self
        e.next = first
        first.prev = e
        self.next = e
        self.size += 1

    def remove(self, e: Entry) -> None:
        e.prev.next = e.next
        e.next.prev = e.prev
        e.prev = e.next = None
        self.size -= 1

    def move_front(self, e: Entry) -> None:
        if self.next is not e:
            self.remove(e)
            self.push_front(e)

    def back_except(self, protect: Entry | None) -> Entry | None:
        """The least recent entry other than ``protect``, or None."""
        e = self.prev
        if e is protect:
            e = e.prev
        return None if e is self else e


class _LRU:
    """Least recently used."""

    __slots__ = ("ring",)

    def __init__(self, maxsize: int, seed: int) -> None:
        self.ring = _Ring()

    def insert(self, e: Entry) -> None:
        e.segment = LRU_RING
        self.ring.push_front(e)

    def touch(self, e: Entry) -> None:
        self.ring.move_front(e)

    def remove(self, e: Entry) -> None:
        self.ring.remove(e)
        e.segment = NONE

    def evict(self, protect: Entry | None) -> Entry | None:
        return self.ring.back_except(protect)


class _FreqNode:
    """The entries used exactly ``count`` times, most recent first."""

    __slots__ = ("count", "next", "prev", "ring")

    def __init__(self, count: int) -> None:
        self.count = count
        self.ring = _Ring()
        self.prev: _FreqNode = self
        self.next: _FreqNode = self


class _LFU:
    """Least frequently used, least recently used among equals; O(1) per operation."""

    __slots__ = ("head",)

    def __init__(self, maxsize: int, seed: int) -> None:
        self.head = _FreqNode(0)  # sentinel of the ascending list of counts

    def _node_after(self, node: _FreqNode, count: int) -> _FreqNode:
        nxt = node.next
        if nxt is not self.head and nxt.count == count:
            return nxt
        new = _FreqNode(count)
        new.prev = node
        new.next = nxt
        nxt.prev = new
        node.next = new
        return new

    def _unlink_if_empty(self, node: _FreqNode) -> None:
        if node.ring.size == 0:
            node.prev.next = node.next
            node.next.prev = node.prev

    def insert(self, e: Entry) -> None:
        node = self._node_after(self.head, 1)
        node.ring.push_front(e)
        e.freq = node
        e.segment = LFU_RING

    def touch(self, e: Entry) -> None:
        node = e.freq
        assert node is not None
        nxt = self._node_after(node, node.count + 1)
        node.ring.remove(e)
        nxt.ring.push_front(e)
        e.freq = nxt
        self._unlink_if_empty(node)

    def remove(self, e: Entry) -> None:
        node = e.freq
        assert node is not None
        node.ring.remove(e)
        e.freq = None
        e.segment = NONE
        self._unlink_if_empty(node)

    def evict(self, protect: Entry | None) -> Entry | None:
        node = self.head.next
        while node is not self.head:
            victim = node.ring.back_except(protect)
            if victim is not None:
                return victim
            node = node.next
        return None


class _TinyLFU:
    """W-TinyLFU: LRU window, frequency-gated admission, segmented LRU main space."""

    __slots__ = (
        "candidate",
        "main_cap",
        "probation",
        "protected",
        "protected_cap",
        "rng",
        "sketch",
        "window",
        "window_cap",
    )

    def __init__(self, maxsize: int, seed: int) -> None:
        self.window_cap = max(1, maxsize * WINDOW_PERCENT // 100)
        self.main_cap = max(0, maxsize - self.window_cap)
        self.protected_cap = self.main_cap * PROTECTED_PERCENT // 100
        self.window = _Ring()
        self.probation = _Ring()
        self.protected = _Ring()
        self.sketch = FrequencySketch(maxsize)
        self.rng = mix64((seed ^ _GOLDEN) & MASK64) or 1
        self.candidate: Entry | None = None

    def _ring(self, e: Entry) -> _Ring:
        if e.segment == WINDOW:
            return self.window
        return self.probation if e.segment == PROBATION else self.protected

    def _random(self) -> int:
        x = self.rng  # xorshift64*
        x ^= x >> 12
        x = (x ^ (x << 25)) & MASK64
        x ^= x >> 27
        self.rng = x
        return (x * 0x2545F4914F6CDD1D) & MASK64

    def _record(self, e: Entry) -> None:
        """Count a use of ``e``, skipping the sketch while its counters are known saturated."""
        # Counters only grow between two halvings, so once all of an entry's are at the maximum
        # its increments are no-ops until the next halving: hot keys skip the table.
        sketch = self.sketch
        if e.sketch_epoch != sketch.epoch and sketch.increment(e.hash):
            e.sketch_epoch = sketch.epoch

    def insert(self, e: Entry) -> None:
        self._record(e)
        e.segment = WINDOW
        self.window.push_front(e)
        if self.window.size > self.window_cap:
            # The window's LRU entry moves to probation; it competes at the next eviction.
            cand = self.window.prev
            self.window.remove(cand)
            cand.segment = PROBATION
            self.probation.push_front(cand)
            self.candidate = cand

    def touch(self, e: Entry) -> None:
        self._record(e)
        seg = e.segment
        if seg == WINDOW:
            self.window.move_front(e)
        elif seg == PROTECTED:
            self.protected.move_front(e)
        else:
            self.probation.remove(e)
            e.segment = PROTECTED
            self.protected.push_front(e)
            if self.protected.size > self.protected_cap:
                demoted = self.protected.prev
                self.protected.remove(demoted)
                demoted.segment = PROBATION
                self.probation.push_front(demoted)
            if e is self.candidate:
                self.candidate = None

    def remove(self, e: Entry) -> None:
        self._ring(e).remove(e)
        e.segment = NONE
        if e is self.candidate:
            self.candidate = None

    def _admit(self, cand: Entry, victim: Entry) -> bool:
        cand_freq = self.sketch.frequency(cand.hash)
        if cand_freq > self.sketch.frequency(victim.hash):
            return True
        # A popular-looking candidate still gets in now and then, so an attacker cannot pin
        # the victim by inflating its count with colliding keys (as Caffeine does).
        return cand_freq >= ADMIT_HASHDOS_THRESHOLD and (self._random() & 127) == 0

    def evict(self, protect: Entry | None) -> Entry | None:
        victim = self.probation.back_except(protect) or self.protected.back_except(protect)
        if victim is None:
            return self.window.back_except(protect)
        cand = self.candidate
        if cand is None or cand is victim or cand is protect:
            return victim
        return victim if self._admit(cand, victim) else cand


_POLICY_CLASSES = {"lru": _LRU, "lfu": _LFU, "tinylfu": _TinyLFU}


class _Mutex:
    """The cache's mutex: re-entry from the holding thread raises instead of deadlocking.

    An RLock lets the holding thread in again, and the busy flag then refuses it; the flag is
    set only while the lock is held, so a re-entry between acquiring and setting it (or between
    clearing it and releasing) finds no work in progress and is harmless.
    """

    __slots__ = ("_busy", "_lock")

    def __init__(self) -> None:
        self._lock = RLock()
        self._busy = False

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._busy:
            self._lock.release()
            raise RuntimeError("LocalCache mutated from a callback of its own mutation")
        self._busy = True

    def __exit__(self, *exc: object) -> None:
        self._busy = False
        self._lock.release()


def _check_ttl(ttl: float | None, name: str = "ttl") -> float:
    """The TTL as seconds (``inf`` for never); ``ValueError`` unless positive."""
    if ttl is None:
        return INF
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(ttl).__name__}")
    seconds = float(ttl)
    if not seconds > 0:  # also rejects NaN
        raise ValueError(f"{name} must be a positive number of seconds or None, not {ttl!r}")
    return seconds


class LocalCache(MutableMapping):
    """In-process cache with a bounded size, optional weight bound and per-entry TTL."""

    def __init__(
        self,
        maxsize: int = 128,
        *,
        policy: str = "lru",
        ttl: float | None = None,
        maxbytes: int | None = None,
        getsizeof: Callable[[Any], int] | None = None,
        timer: Callable[[], float] | None = None,
        seed: int = 0,
        on_evict: Callable[[Hashable, Any, str], object] | None = None,
    ) -> None:
        maxsize = operator.index(maxsize)
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, not {maxsize}")
        if policy not in _POLICY_CLASSES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if maxbytes is not None:
            maxbytes = operator.index(maxbytes)
            if maxbytes <= 0:
                raise ValueError(f"maxbytes must be > 0 or None, not {maxbytes}")
            if getsizeof is None:
                getsizeof = sys.getsizeof
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable or None, not {type(on_evict).__name__}")
        self._maxsize = maxsize
        self._policy_name = policy
        self._on_evict = on_evict
        self._ttl = _check_ttl(ttl)
        self._maxbytes = maxbytes
        self._getsizeof = getsizeof
        self._timer: Callable[[], float] = timer if timer is not None else _clock.monotonic
        self._seed = operator.index(seed) & MASK64
        self._salt = mix64(self._seed ^ _GOLDEN)
        self._policy: Any = _POLICY_CLASSES[policy](maxsize, self._seed)
        self._hashed = policy == "tinylfu"
        self._map: dict[Hashable, Entry] = {}
        self._heap: list[tuple[float, int, Entry]] = []  # (expires, seq, entry), lazy deletion
        self._heap_seq = 0
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0
        self._mutex = _Mutex()

    # -- reads ------------------------------------------------------------------------------

    def __getitem__(self, key: Hashable) -> Any:
        with self._mutex:
            e = self._map.get(key)
            if e is not None:
                if e.expires == INF or self._timer() < e.expires:
                    self._policy.touch(e)
                    self._hits += 1
                    return e.value
                self._remove(e)
                self._expirations += 1
            self._misses += 1
        if e is not None:
            self._notify([(e.key, e.value, "expired")])
        return self.__missing__(key)

    def __missing__(self, key: Hashable) -> Any:
        raise KeyError(key)

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (counted as a use), else ``default``."""
        with self._mutex:
            e = self._map.get(key)
            if e is not None:
                if e.expires == INF or self._timer() < e.expires:
                    self._policy.touch(e)
                    self._hits += 1
                    return e.value
                self._remove(e)
                self._expirations += 1
            self._misses += 1
        if e is not None:
            self._notify([(e.key, e.value, "expired")])
        return default

    def __contains__(self, key: object) -> bool:
        e = self._map.get(key)  # type: ignore[call-overload]
        return e is not None and (e.expires == INF or self._timer() < e.expires)

    def peek(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` without counting a use or a hit, else ``default``."""
        e = self.entry(key)
        return default if e is None else e.value

    def entry(self, key: Hashable) -> Entry | None:
        """The live entry of ``key`` with its metadata, without counting a use, else None."""
        e = self._map.get(key)
        if e is None or (e.expires != INF and self._timer() >= e.expires):
            return None
        return e

    def __len__(self) -> int:
        if not self._heap:
            return len(self._map)
        with self._mutex:
            return len(self._map) - self._count_expired(self._timer())

    def __iter__(self) -> Iterator[Hashable]:
        for e in self._live_entries():
            yield e.key

    def _live_entries(self) -> Iterator[Entry]:
        now = self._timer() if self._heap else -INF
        for e in self._map.values():
            if e.expires == INF or now < e.expires:
                yield e

    def keys(self) -> KeysView[Hashable]:
        return KeysView(self)

    def values(self) -> ValuesView[Any]:
        return LocalValuesView(self)

    def items(self) -> ItemsView[Hashable, Any]:
        return LocalItemsView(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(maxsize={self._maxsize}, policy={self._policy_name!r}, "
            f"currsize={len(self)})"
        )

    # -- writes -----------------------------------------------------------------------------

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.set(key, value)

    def set(
        self,
        key: Hashable,
        value: Any,
        ttl: float | None = None,
        *,
        version: int = 0,
        fresh_until: float = INF,
    ) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: the cache's default TTL).

        ``version`` and ``fresh_until`` (a time on this cache's timer) are metadata kept with
        the entry for the tier in front of Redis; the local tier itself never reads them.
        """
        version = operator.index(version)
        if not 0 <= version <= MASK64:
            raise OverflowError(f"version must fit in 64 bits unsigned, not {version!r}")
        self._store(key, value, self._ttl if ttl is None else _check_ttl(ttl), version, fresh_until)

    def _store(
        self,
        key: Hashable,
        value: Any,
        seconds: float,
        version: int = 0,
        fresh_until: float = INF,
        only_if_absent: bool = False,
    ) -> Any:
        """Store ``value`` (or, ``only_if_absent``, keep a live value); return the one stored."""
        weight, too_heavy = 0, None
        try:
            weight = self._weigh(value)
        except ValueError as err:
            if not only_if_absent:
                raise
            too_heavy = err  # raised only if the value would be stored (a miss)
        expires = self._timer() + seconds if seconds != INF else INF
        # Replaced and evicted values are dropped after the mutex is released, so finalizers
        # that run then see a consistent cache.
        evicted: Gone = []
        old_value = None
        try:
            with self._mutex:
                e = self._map.get(key)
                live = e is not None and (e.expires == INF or self._timer() < e.expires)
                if only_if_absent:
                    if live:
                        self._policy.touch(e)
                        self._hits += 1
                        return e.value  # type: ignore[union-attr]
                    self._misses += 1
                    if too_heavy is not None:
                        raise too_heavy  # nothing changed, not even an expiry
                if e is not None and not live:
                    self._remove(e)  # an expired entry is replaced by a new one, not updated
                    self._expirations += 1
                    evicted.append((e.key, e.value, "expired"))
                    e = None
                if e is not None:
                    old_value = e.value
                    self._bytes += weight - e.weight
                    e.value = value
                    e.weight = weight
                    e.version = version
                    e.fresh_until = fresh_until
                    self._set_expiry(e, expires)
                    self._policy.touch(e)
                elif self._maxsize == 0:
                    self._evictions += 1
                    evicted.append((key, value, "size"))  # the value written is evicted at once
                    return value
                else:
                    e = Entry(key, value)
                    e.weight = weight
                    e.version = version
                    e.fresh_until = fresh_until
                    if self._hashed:
                        e.hash = mix64((hash(key) ^ self._salt) & MASK64)
                    self._policy.insert(e)  # linked before it is findable, as the C twin needs
                    try:
                        self._map[key] = e
                    except BaseException:  # a key's __eq__ raised, or no memory: undo the link
                        self._policy.remove(e)
                        raise
                    self._bytes += weight
                    self._set_expiry(e, expires)
                self._shrink(e, evicted)
        finally:
            if evicted:
                self._notify(evicted)
        del old_value, evicted
        return value

    def _weigh(self, value: Any) -> int:
        if self._getsizeof is None:
            return 0
        weight = self._getsizeof(value)
        if not isinstance(weight, int) or weight < 0:
            raise ValueError(f"getsizeof must return an int >= 0, not {weight!r}")
        if self._maxbytes is not None and weight > self._maxbytes:
            raise ValueError(f"value too large: weighs {weight} > maxbytes {self._maxbytes}")
        return weight

    def _set_expiry(self, e: Entry, expires: float) -> None:
        if expires == e.expires:
            return
        e.expires = expires
        if expires != INF:
            self._heap_seq += 1
            e.heap_seq = self._heap_seq
            heapq.heappush(self._heap, (expires, self._heap_seq, e))
            if len(self._heap) > 2 * len(self._map) + 64:
                self._compact_heap()
        else:
            e.heap_seq = 0

    def _over(self) -> bool:
        return len(self._map) > self._maxsize or (
            self._maxbytes is not None and self._bytes > self._maxbytes
        )

    def _shrink(self, protect: Entry | None, evicted: Gone) -> None:
        """Evict until both bounds hold: expired entries first, then the policy's victims."""
        if not self._over():
            return
        if self._heap:
            self._purge_expired(self._timer(), evicted)
        while self._over():
            victim = self._policy.evict(protect)
            if victim is None:
                break
            self._remove(victim)
            evicted.append((victim.key, victim.value, "size"))
            self._evictions += 1

    def _remove(self, e: Entry) -> None:
        """Take ``e`` out of the map (first: readers stop finding it) and the policy."""
        del self._map[e.key]
        self._policy.remove(e)
        self._bytes -= e.weight
        e.heap_seq = 0

    def __delitem__(self, key: Hashable) -> None:
        self.pop(key)

    def pop(self, key: Hashable, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value, else ``default`` (``KeyError`` if not given)."""
        with self._mutex:
            e = self._map.get(key)
            if e is not None:
                self._remove(e)
                if e.expires == INF or self._timer() < e.expires:
                    return e.value
                self._expirations += 1
        if e is not None:
            self._notify([(e.key, e.value, "expired")])
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[Hashable, Any]:
        """Remove and return the policy's victim as ``(key, value)``."""
        evicted: Gone = []
        try:
            with self._mutex:
                if self._heap:
                    self._purge_expired(self._timer(), evicted)
                victim = self._policy.evict(None)
                if victim is None:
                    raise KeyError("popitem(): cache is empty")
                self._remove(victim)
                return victim.key, victim.value
        finally:
            self._notify(evicted)

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (counted as a use); if absent, store and return ``default``."""
        return self._store(key, default, self._ttl, only_if_absent=True)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Store every pair of ``other`` (a mapping or pairs) and of ``kwargs``."""
        if isinstance(other, Mapping):
            for key in other:
                self.set(key, other[key])
        elif hasattr(other, "keys"):
            for key in other.keys():  # noqa: SIM118 - a keys() method is what marks a mapping
                self.set(key, other[key])
        else:
            for key, value in other:
                self.set(key, value)
        for key, value in kwargs.items():
            self.set(key, value)

    def clear(self) -> None:
        """Remove every entry (statistics are kept)."""
        with self._mutex:
            old = list(self._map.values())  # released after the mutex
            for e in old:
                e.prev = e.next = e.freq = None
                e.segment = NONE
            self._map.clear()  # in place: an iteration in progress raises, as over a dict
            self._heap = []
            self._bytes = 0
            self._policy = _POLICY_CLASSES[self._policy_name](self._maxsize, self._seed)
        del old

    def expire(self) -> int:
        """Remove every expired entry now; return how many were removed."""
        evicted: Gone = []
        try:
            with self._mutex:
                return self._purge_expired(self._timer(), evicted)
        finally:
            self._notify(evicted)

    def _notify(self, evicted: Gone) -> None:
        """Tell ``on_evict`` what a mutation let go; called once the mutex is released."""
        hook = self._on_evict
        if hook is None:
            return
        for key, value, cause in evicted:
            try:
                hook(key, value, cause)
            except Exception:
                _log.exception("LocalCache on_evict hook raised (cause %s)", cause)

    # -- expiry -----------------------------------------------------------------------------

    def _live_in_heap(self, item: tuple[float, int, Entry]) -> bool:
        return item[2].heap_seq == item[1]

    def _purge_expired(self, now: float, evicted: Gone) -> int:
        heap = self._heap
        removed = 0
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            if self._live_in_heap(item):
                e = item[2]
                self._remove(e)
                evicted.append((e.key, e.value, "expired"))
                removed += 1
        self._expirations += removed
        return removed

    def _count_expired(self, now: float) -> int:
        """Live entries with ``expires <= now``, found by walking the heap's expired prefix."""
        heap = self._heap
        count = 0
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            item = heap[i]
            if item[0] > now:
                continue
            if self._live_in_heap(item):
                count += 1
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap):
                    stack.append(child)
        return count

    def _compact_heap(self) -> None:
        self._heap = [item for item in self._heap if self._live_in_heap(item)]
        heapq.heapify(self._heap)

    # -- introspection ----------------------------------------------------------------------

    @property
    def maxsize(self) -> int:
        """The most entries the cache holds."""
        return self._maxsize

    @property
    def currsize(self) -> int:
        """The number of live entries (same as ``len``)."""
        return len(self)

    @property
    def maxbytes(self) -> int | None:
        """The bound on the total weight of the values, or None."""
        return self._maxbytes

    @property
    def currbytes(self) -> int:
        """The total weight of the stored values (0 unless weights are measured)."""
        return self._bytes

    @property
    def policy(self) -> str:
        """The eviction policy: ``lru``, ``lfu`` or ``tinylfu``."""
        return self._policy_name

    @property
    def ttl(self) -> float | None:
        """The default TTL in seconds, or None."""
        return None if self._ttl == INF else self._ttl

    @property
    def timer(self) -> Callable[[], float]:
        """The clock TTLs are measured on."""
        return self._timer

    @property
    def on_evict(self) -> Callable[[Hashable, Any, str], object] | None:
        """The hook told about evicted and expired entries, or None."""
        return self._on_evict

    def stats(self) -> dict[str, int | None]:
        """Counters since creation: hits, misses, evictions, expirations, and the sizes."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "expirations": self._expirations,
            "currsize": len(self),
            "maxsize": self._maxsize,
            "currbytes": self._bytes,
            "maxbytes": self._maxbytes,
        }


def _policy_class(policy: str) -> Callable[..., LocalCache]:
    def __init__(self: LocalCache, maxsize: int = 128, **kwargs: Any) -> None:
        LocalCache.__init__(self, maxsize, policy=policy, **kwargs)

    return __init__


class LRUCache(LocalCache):
    """LocalCache with the ``lru`` policy."""

    __init__ = _policy_class("lru")


class LFUCache(LocalCache):
    """LocalCache with the ``lfu`` policy."""

    __init__ = _policy_class("lfu")


class TinyLFUCache(LocalCache):
    """LocalCache with the ``tinylfu`` (W-TinyLFU) policy."""

    __init__ = _policy_class("tinylfu")


class TieredFront:
    """The local-hit path of a TieredCache: a str key answered from the local tier alone.

    Everything else (other key types, a stale or missing entry, a local tier that may not serve
    because the invalidation channel is not whole) goes to the subclass's ``_getitem_slow`` and
    ``_get_slow``. The entry's ``fresh_until`` bounds how long a local copy is served.
    """

    _l1: LocalCache
    _usable: bool = False

    def _front_init(self, l1: LocalCache) -> None:
        """Serve from ``l1`` (not until ``_set_usable(True)``)."""
        self._l1 = l1
        self._usable = False

    def _set_usable(self, usable: bool) -> None:
        """Whether local copies may be served."""
        self._usable = usable

    @property
    def _local_usable(self) -> bool:
        return self._usable

    def __getitem__(self, key: Hashable) -> Any:
        value = self._local_hit(key)
        if value is not _MISSING:
            return value
        return self._getitem_slow(key)  # type: ignore[attr-defined]

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (read-through when a loader is set), else ``default``."""
        value = self._local_hit(key)
        if value is not _MISSING:
            return value
        return self._get_slow(key, default)  # type: ignore[attr-defined]

    def _local_hit(self, key: Hashable) -> Any:
        if not self._usable or type(key) is not str:
            return _MISSING
        l1 = self._l1
        e = l1._map.get(key)
        if e is None or e.fresh_until <= l1._timer() or e.value is MISSING:
            return _MISSING  # (a cached absence too: the slow path says so)
        with l1._mutex:
            if e.prev is not None:
                l1._policy.touch(e)
            l1._hits += 1
        return e.value


class CallFront:
    """The local-hit path of a cached function: ``f(x)`` for one str or int ``x``.

    Everything else (other arguments, a miss, a local tier that may not serve) goes to the
    subclass's ``_call(args, kwargs)``.
    """

    _l1: LocalCache
    _cache: TieredFront | None = None
    _fast: bool = False

    def _call_front_init(self, l1: LocalCache, cache: TieredFront, fast: bool) -> None:
        """Serve hits from ``l1`` while ``cache`` may serve local copies."""
        self._l1 = l1
        self._cache = cache
        self._fast = fast

    @property
    def local(self) -> LocalCache:
        """The function's own local tier."""
        return self._l1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self._cache
        if self._fast and not kwargs and len(args) == 1 and cache is not None and cache._usable:
            arg = args[0]
            if type(arg) is str or type(arg) is int:
                l1 = self._l1
                e = l1._map.get(arg)
                if e is not None and e.fresh_until > l1._timer() and e.value is not MISSING:
                    with l1._mutex:
                        if e.prev is not None:
                            l1._policy.touch(e)
                        l1._hits += 1
                    return e.value
        return self._call(args, kwargs or None)  # type: ignore[attr-defined]


def install_fast_call(cls: type) -> type:
    """Nothing to install in pure Python (the C build sets a call slot); returns ``cls``."""
    if not issubclass(cls, CallFront):
        raise TypeError("install_fast_call() takes a CallFront subclass")
    return cls

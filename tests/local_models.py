"""Reference models of ``LocalCache`` and helpers shared by the local-tier tests.

``CacheModel`` restates the semantics of the module docstring of ``tiercache/_local_py.py`` in the
simplest possible Python: a dict of entries (expired ones included until something removes them),
an ``OrderedDict`` of recency and per-entry use counts. For ``lru`` and ``lfu`` it predicts every
victim; for ``tinylfu`` (whose victim depends on the frequency sketch) it is told which keys the
real cache dropped and checks that the drop was legal.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest

INF = math.inf
MISSING: Any = object()
MAX_VERSION = 2**64 - 1  # versions are unsigned 64-bit


class FakeTimer:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def run_with_timeout(fn: Callable[[], Any], seconds: float = 20.0) -> Any:
    """Run ``fn`` in a daemon thread; fail (instead of hanging) if it deadlocks."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(("ok", fn()))
        except BaseException as exc:
            result.append(("raise", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "deadlock: the operation did not finish"
    kind, value = result[0]
    if kind == "raise":
        raise value
    return value


def assert_consistent(c: Any) -> None:
    """The cache's views agree and popitem drains exactly its live entries."""
    keys = list(c)
    assert len(c) == len(keys) == len(set(keys)) <= c.maxsize
    popped = []
    for _ in range(len(keys)):
        popped.append(c.popitem()[0])
    assert sorted(map(id, popped)) == sorted(map(id, keys))  # the very key objects
    assert len(c) == 0 and c.currbytes == 0
    with pytest.raises(KeyError):
        c.popitem()


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """``("ok", result)`` or ``("raise", exception type)``: what a call did, comparable."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as exc:
        return "raise", type(exc)


def check_ttl(ttl: float | None) -> float:
    """A TTL argument as seconds (``inf`` for never), or ``ValueError``."""
    if ttl is None:
        return INF
    seconds = float(ttl)
    if not seconds > 0:
        raise ValueError(ttl)
    return seconds


@dataclass
class ModelEntry:
    """A model entry: value and the metadata the cache exposes, plus the LFU use count."""

    value: Any
    weight: int
    expires: float
    version: int
    fresh_until: float
    count: int = 1


@dataclass
class Oracle:
    """What the real tinylfu cache did, for the model to check and follow."""

    live_after: set[Hashable]  # the cache's live keys right after the operation
    popped: Hashable = MISSING  # the key popitem() returned, if it returned one


class CacheModel:
    """An executable restatement of LocalCache's semantics for one policy."""

    def __init__(
        self,
        maxsize: int,
        *,
        policy: str,
        ttl: float | None = None,
        maxbytes: int | None = None,
        getsizeof: Callable[[Any], int] | None = None,
        timer: Callable[[], float],
    ) -> None:
        self.maxsize = maxsize
        self.policy = policy
        self.default_ttl = check_ttl(ttl)
        self.maxbytes = maxbytes
        self.getsizeof = getsizeof
        self.timer = timer
        self.data: dict[Hashable, ModelEntry] = {}  # physically present, insertion order
        self.recency: OrderedDict[Hashable, None] = OrderedDict()  # least recent first
        self.hits = self.misses = self.evictions = self.expirations = 0
        self.oracle: Oracle | None = None  # required for tinylfu evictions

    # -- state ------------------------------------------------------------------------------

    def is_live(self, e: ModelEntry, now: float | None = None) -> bool:
        """An entry is expired once ``timer() >= expires``."""
        return e.expires == INF or (self.timer() if now is None else now) < e.expires

    def live(self) -> dict[Hashable, ModelEntry]:
        """The live entries, in insertion order."""
        now = self.timer()
        return {k: e for k, e in self.data.items() if self.is_live(e, now)}

    @property
    def currbytes(self) -> int:
        """Total weight of every stored entry, expired-but-not-yet-purged ones included."""
        return sum(e.weight for e in self.data.values())

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
        }

    def _over(self) -> bool:
        return len(self.data) > self.maxsize or (
            self.maxbytes is not None and self.currbytes > self.maxbytes
        )

    def _use(self, key: Hashable) -> None:
        self.data[key].count += 1
        self.recency.move_to_end(key)

    def _drop(self, key: Hashable) -> ModelEntry:
        del self.recency[key]
        return self.data.pop(key)

    def _purge(self) -> int:
        now = self.timer()
        expired = [k for k, e in self.data.items() if not self.is_live(e, now)]
        for k in expired:
            self._drop(k)
        self.expirations += len(expired)
        return len(expired)

    def _victim(self, protect: Hashable) -> Hashable:
        """The policy's victim among the entries other than ``protect`` (lru and lfu)."""
        candidates = [k for k in self.recency if k is not protect]  # least recent first
        assert candidates, "nothing to evict"
        if self.policy == "lru":
            return candidates[0]
        assert self.policy == "lfu"
        return min(candidates, key=lambda k: self.data[k].count)  # first minimum: least recent

    def _shrink(self, protect: Hashable) -> None:
        """Insert-then-evict: expired entries go first, then the policy's victims."""
        if not self._over():
            return
        self._purge()
        if self.policy != "tinylfu":
            while self._over():
                self._drop(self._victim(protect))
                self.evictions += 1
            return
        assert self.oracle is not None, "tinylfu model needs an oracle"
        gone = {k: e for k, e in self.data.items() if k not in self.oracle.live_after}
        assert protect not in gone, f"the key just written ({protect!r}) was its own victim"
        for k in gone:
            self._drop(k)
        self.evictions += len(gone)
        assert not self._over(), f"tinylfu evicted too little: dropped {list(gone)}"
        # Victims go one at a time while a bound is exceeded, so putting the last one back must
        # exceed a bound again; if none does, the cache evicted more than it had to.
        if gone:
            assert any(
                len(self.data) + 1 > self.maxsize
                or (self.maxbytes is not None and self.currbytes + e.weight > self.maxbytes)
                for e in gone.values()
            ), f"tinylfu evicted more than needed: {list(gone)}"

    # -- reads ------------------------------------------------------------------------------

    def _lookup(self, key: Hashable) -> ModelEntry | None:
        """The live entry (counted as a hit and a use) or None (a miss; expired ones removed)."""
        e = self.data.get(key)
        if e is not None:
            if self.is_live(e):
                self._use(key)
                self.hits += 1
                return e
            self._drop(key)
            self.expirations += 1
        self.misses += 1
        return None

    def __getitem__(self, key: Hashable) -> Any:
        e = self._lookup(key)
        if e is None:
            raise KeyError(key)
        return e.value

    def get(self, key: Hashable, default: Any = None) -> Any:
        e = self._lookup(key)
        return default if e is None else e.value

    def __contains__(self, key: Hashable) -> bool:
        e = self.data.get(key)
        return e is not None and self.is_live(e)

    def peek(self, key: Hashable, default: Any = None) -> Any:
        e = self.data.get(key)
        return e.value if e is not None and self.is_live(e) else default

    def __len__(self) -> int:
        return len(self.live())

    # -- writes -----------------------------------------------------------------------------

    def _weigh(self, value: Any) -> int:
        if self.getsizeof is None:
            return 0
        weight = self.getsizeof(value)
        if not isinstance(weight, int) or weight < 0:
            raise ValueError(weight)
        if self.maxbytes is not None and weight > self.maxbytes:
            raise ValueError(weight)
        return weight

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
        if not 0 <= version <= MAX_VERSION:
            raise OverflowError(version)
        hash(key)
        weight = self._weigh(value)
        seconds = self.default_ttl if ttl is None else check_ttl(ttl)
        expires = self.timer() + seconds if seconds != INF else INF
        e = self.data.get(key)
        if e is not None and not self.is_live(e):
            self._drop(key)  # an expired entry is replaced by a fresh one (count 1)
            self.expirations += 1
            e = None
        if e is not None:
            e.value, e.weight, e.expires = value, weight, expires
            e.version, e.fresh_until = version, fresh_until
            self._use(key)
        elif self.maxsize == 0:
            self.evictions += 1
            return
        else:
            self.data[key] = ModelEntry(value, weight, expires, version, fresh_until)
            self.recency[key] = None
        self._shrink(key)

    def update(self, pairs: Iterable[tuple[Hashable, Any]]) -> None:
        for key, value in pairs:
            self.set(key, value)

    def __delitem__(self, key: Hashable) -> None:
        if self.pop(key, MISSING) is MISSING:
            raise KeyError(key)

    def pop(self, key: Hashable, default: Any = MISSING) -> Any:
        e = self.data.get(key)
        if e is not None:
            self._drop(key)
            if self.is_live(e):
                return e.value
            self.expirations += 1
        if default is MISSING:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[Hashable, Any]:
        self._purge()
        if not self.data:
            raise KeyError("popitem(): cache is empty")
        if self.policy == "tinylfu":
            assert self.oracle is not None and self.oracle.popped is not MISSING
            key = self.oracle.popped
            assert key in self.data, f"popitem returned {key!r}, which was not live"
        else:
            key = self._victim(MISSING)
        return key, self._drop(key).value

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        e = self.data.get(key)
        if e is not None and self.is_live(e):
            self._use(key)
            self.hits += 1
            return e.value
        self.misses += 1
        self.set(key, default)
        return default

    def clear(self) -> None:
        self.data.clear()
        self.recency.clear()

    def expire(self) -> int:
        return self._purge()

"""Hypothesis state machines: LocalCache against an executable model, one machine per policy.

Each step runs one operation on the cache and on ``local_models.CacheModel`` and compares the
outcomes (values and exception types); after every step the invariants compare the whole visible
state: live keys and values, per-entry metadata, ``len``/``currsize``, ``stats()`` counters and the
weight bound. Time only moves through a fake ``timer``, often exactly onto an expiry. With ``lru``
and ``lfu`` the model predicts every victim, so any deviation from exact LRU order or from LFU
(least count, then least recent) shows up as a differing key set; ``tinylfu`` is checked for
mapping semantics, legal evictions and determinism (a second cache with the same seed sees the
same operations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.local_models import INF, MISSING, CacheModel, FakeTimer, Oracle, outcome
from tiercache import LocalCache

EXTRA_KEYS: list[Hashable] = ["a", "b", (1, 2), -1, -2, 2**70]  # hash(-1) == hash(-2) in CPython
ALL_KEYS: list[Hashable] = [*range(10), *EXTRA_KEYS]
KEYS = st.one_of(st.integers(0, 9), st.sampled_from(EXTRA_KEYS))
VALUES = st.text("xyz", max_size=10)  # weighed with len() when a weight is measured
TTLS = st.sampled_from([None, 0.5, 1.0, 2.0, 3.5, math.inf])
BAD_TTLS = st.sampled_from([0, 0.0, -1.0, math.nan])
VERSIONS = st.sampled_from([0, 1, 2, 2**64 - 1, -1, 2**64])  # the last two: OverflowError
FRESH = st.sampled_from([math.inf, 1000.5, 1003.0])
STEPS = st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0])

SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    # On failure, shrink one bug only and skip the explain phase (it traces every line): a
    # failing run then reports in seconds rather than minutes.
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


class LocalCacheMachine(RuleBasedStateMachine):
    """Every public operation of LocalCache, compared step by step with the model."""

    policy = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.cache: LocalCache
        self.model: CacheModel
        self.twin: LocalCache | None = None
        self.timer = FakeTimer()

    @initialize(
        maxsize=st.integers(0, 6),
        maxbytes=st.none() | st.integers(1, 16),
        weigh=st.booleans(),
        ttl=st.sampled_from([None, 2.0, 5.0]),
        seed=st.integers(0, 2**64 - 1),
    )
    def make(
        self, maxsize: int, maxbytes: int | None, weigh: bool, ttl: float | None, seed: int
    ) -> None:
        getsizeof: Callable[[Any], int] | None = len if maxbytes is not None or weigh else None
        kwargs: dict[str, Any] = {
            "policy": self.policy,
            "ttl": ttl,
            "maxbytes": maxbytes,
            "getsizeof": getsizeof,
            "timer": self.timer,
        }
        self.evicted: list[tuple[Hashable, Any, str]] = []
        self.cache = LocalCache(
            maxsize,
            seed=seed,
            on_evict=lambda key, value, cause: self.evicted.append((key, value, cause)),
            **kwargs,
        )
        self.model = CacheModel(maxsize, **kwargs)
        if self.policy == "tinylfu":
            self.twin = LocalCache(maxsize, seed=seed, **kwargs)

    def do(self, name: str, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        """Run one operation on the cache (and its twin) and on the model; outcomes must match."""
        got = outcome(getattr(self.cache, name), *args, **kwargs)
        if self.twin is not None:
            again = outcome(getattr(self.twin, name), *args, **kwargs)
            assert again == got, f"same seed, same ops, different outcome: {again} != {got}"
            popped = got[1][0] if name == "popitem" and got[0] == "ok" else MISSING
            self.model.oracle = Oracle(set(self.cache), popped)
        want = outcome(getattr(self.model, name), *args, **kwargs)
        assert got == want, f"{name}{args}{kwargs}: cache gave {got}, model {want}"
        return got

    def wrote(self, key: Hashable, result: tuple[str, Any]) -> None:
        """The entry just written is never its own victim."""
        if result[0] == "ok" and self.cache.maxsize > 0:
            assert key in self.cache

    # -- writes -----------------------------------------------------------------------------

    @rule(key=KEYS, value=VALUES)
    def setitem(self, key: Hashable, value: str) -> None:
        self.wrote(key, self.do("__setitem__", key, value))

    @rule(key=KEYS, value=VALUES, ttl=TTLS, version=VERSIONS, fresh_until=FRESH)
    def set_with_ttl(
        self, key: Hashable, value: str, ttl: float | None, version: int, fresh_until: float
    ) -> None:
        self.wrote(key, self.do("set", key, value, ttl, version=version, fresh_until=fresh_until))

    @rule(key=KEYS, value=VALUES, ttl=BAD_TTLS)
    def set_bad_ttl(self, key: Hashable, value: str, ttl: float) -> None:
        assert self.do("set", key, value, ttl) == ("raise", ValueError)

    @rule(key=KEYS, value=VALUES)
    def setdefault(self, key: Hashable, value: str) -> None:
        self.wrote(key, self.do("setdefault", key, value))

    @rule(pairs=st.lists(st.tuples(KEYS, VALUES), max_size=3))
    def update(self, pairs: list[tuple[Hashable, str]]) -> None:
        if self.policy == "tinylfu":
            pairs = pairs[:1]  # the oracle sees the cache after the whole call: one write at most
        self.do("update", pairs)

    @rule(key=KEYS)
    def delitem(self, key: Hashable) -> None:
        self.do("__delitem__", key)

    @rule(key=KEYS)
    def pop(self, key: Hashable) -> None:
        self.do("pop", key)

    @rule(key=KEYS)
    def pop_default(self, key: Hashable) -> None:
        self.do("pop", key, "default")

    @rule()
    def popitem(self) -> None:
        self.do("popitem")

    @rule()
    def clear(self) -> None:
        self.do("clear")

    # -- reads ------------------------------------------------------------------------------

    @rule(key=KEYS)
    def getitem(self, key: Hashable) -> None:
        self.do("__getitem__", key)

    @rule(key=KEYS)
    def get(self, key: Hashable) -> None:
        self.do("get", key)

    @rule(key=KEYS)
    def contains(self, key: Hashable) -> None:
        self.do("__contains__", key)

    @rule(key=KEYS)
    def peek(self, key: Hashable) -> None:
        self.do("peek", key, "absent")

    # -- time -------------------------------------------------------------------------------

    @rule(step=STEPS)
    def advance(self, step: float) -> None:
        self.timer.advance(step)

    @rule(index=st.integers(0, 7), just_before=st.booleans())
    def advance_to_an_expiry(self, index: int, just_before: bool) -> None:
        """Move the clock exactly onto (or just before) a stored entry's expiry time."""
        now = self.timer()
        expiries = sorted({e.expires for e in self.model.data.values() if now < e.expires < INF})
        if expiries:
            target = expiries[index % len(expiries)]
            self.timer.now = max(now, target - 0.125) if just_before else target

    @rule()
    def expire(self) -> None:
        self.do("expire")

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def same_visible_state(self) -> None:
        """Live keys, values and entry metadata equal the model's; expired keys are invisible."""
        c, live = self.cache, self.model.live()
        assert len(c) == len(live)
        assert c.currsize == len(live) <= c.maxsize
        keys = list(c)
        assert len(keys) == len(set(keys)) == len(live)
        assert set(keys) == set(live)
        assert dict(c.items()) == {k: e.value for k, e in live.items()}
        assert sorted(c.values()) == sorted(e.value for e in live.values())
        for key in ALL_KEYS:
            e = c.entry(key)
            m = live.get(key)
            assert (key in c) == (m is not None)
            if m is None:
                assert e is None
                assert c.peek(key, MISSING) is MISSING
            else:
                assert e is not None
                assert c.peek(key) == m.value
                assert (e.expires, e.version, e.fresh_until) == (
                    m.expires,
                    m.version,
                    m.fresh_until,
                )

    @invariant()
    def same_counters(self) -> None:
        """stats() counts exactly the hits, misses, evictions and expirations of the model."""
        c = self.cache
        stats = c.stats()
        assert {k: stats[k] for k in ("hits", "misses", "evictions", "expirations")} == (
            self.model.stats()
        )
        assert stats["currsize"] == len(c)
        assert stats["maxsize"] == c.maxsize
        assert stats["maxbytes"] == c.maxbytes
        assert stats["currbytes"] == c.currbytes == self.model.currbytes
        if c.maxbytes is not None:
            assert c.currbytes <= c.maxbytes
        causes = [cause for _, _, cause in self.evicted]  # on_evict: once per counted removal
        assert (causes.count("size"), causes.count("expired")) == (
            stats["evictions"],
            stats["expirations"],
        )

    @invariant()
    def twin_agrees(self) -> None:
        """Two tinylfu caches with one seed fed the same operations stay identical."""
        if self.twin is not None:
            assert list(self.twin.items()) == list(self.cache.items())
            assert self.twin.stats() == self.cache.stats()


class LRUMachine(LocalCacheMachine):
    """``lru``: exact least-recently-used victims (the model keeps an OrderedDict)."""

    policy = "lru"


class LFUMachine(LocalCacheMachine):
    """``lfu``: least use count, least recently used on a tie."""

    policy = "lfu"


class TinyLFUMachine(LocalCacheMachine):
    """``tinylfu``: mapping semantics, legal evictions, determinism under a seed."""

    policy = "tinylfu"


TestLRU = LRUMachine.TestCase
TestLRU.settings = SETTINGS
TestLFU = LFUMachine.TestCase
TestLFU.settings = SETTINGS
TestTinyLFU = TinyLFUMachine.TestCase
TestTinyLFU.settings = SETTINGS

SOAK_SETTINGS = settings(SETTINGS, max_examples=3000, stateful_step_count=100)


@pytest.mark.slow
@pytest.mark.timeout(1200)
class TestLRUSoak(LRUMachine.TestCase):
    """The lru machine for longer (make soak)."""

    settings = SOAK_SETTINGS


@pytest.mark.slow
@pytest.mark.timeout(1200)
class TestLFUSoak(LFUMachine.TestCase):
    """The lfu machine for longer (make soak)."""

    settings = SOAK_SETTINGS


@pytest.mark.slow
@pytest.mark.timeout(1200)
class TestTinyLFUSoak(TinyLFUMachine.TestCase):
    """The tinylfu machine for longer (make soak)."""

    settings = SOAK_SETTINGS

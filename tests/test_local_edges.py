"""Edge cases of LocalCache: bounds of 0 and 1, errors like dict's, weights, metadata, re-entry."""

from __future__ import annotations

import collections.abc
import gc
import math
import os
import random
import sys
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import tiercache
from tests.local_models import FakeTimer, assert_consistent, run_with_timeout
from tiercache import EXTENSIONS, LFUCache, LocalCache, LRUCache, TinyLFUCache

POLICIES = ["lru", "lfu", "tinylfu"]
UNHASHABLE: list[Any] = [[1], {"a": 1}, {1}]


@pytest.fixture(params=POLICIES)
def policy(request: pytest.FixtureRequest) -> str:
    return request.param


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"maxsize": -1},
        {"maxsize": 4, "policy": "fifo"},
        {"maxsize": 4, "policy": "LRU"},
        {"maxsize": 4, "ttl": 0},
        {"maxsize": 4, "ttl": -1.5},
        {"maxsize": 4, "ttl": math.nan},
        {"maxsize": 4, "maxbytes": 0},
        {"maxsize": 4, "maxbytes": -10},
    ],
)
def test_invalid_constructor_arguments(kwargs: dict[str, Any]) -> None:
    """Negative maxsize, unknown policy, non-positive or NaN ttl, maxbytes <= 0 → ValueError."""
    with pytest.raises(ValueError):
        LocalCache(**kwargs)


def test_constructor_defaults_and_properties(policy: str) -> None:
    """The keyword arguments are reflected by the read-only properties."""
    timer = FakeTimer()
    c = LocalCache(7, policy=policy, ttl=2.5, maxbytes=100, getsizeof=len, timer=timer)
    assert (c.maxsize, c.policy, c.ttl, c.maxbytes, c.timer) == (7, policy, 2.5, 100, timer)
    assert (c.currsize, c.currbytes, len(c)) == (0, 0, 0)
    plain = LocalCache(3)
    assert (plain.policy, plain.ttl, plain.maxbytes) == ("lru", None, None)


@pytest.mark.parametrize(
    ("cls", "name"), [(LRUCache, "lru"), (LFUCache, "lfu"), (TinyLFUCache, "tinylfu")]
)
def test_policy_subclasses(cls: type[LocalCache], name: str) -> None:
    """LRUCache/LFUCache/TinyLFUCache are LocalCaches with their policy, taking the same kwargs."""
    c = cls(3, ttl=5.0, timer=FakeTimer())
    assert isinstance(c, LocalCache)
    assert isinstance(c, collections.abc.MutableMapping)
    assert c.policy == name and c.maxsize == 3 and c.ttl == 5.0
    c.update(a=1, b=2, c=3, d=4)
    assert len(c) == 3 and c.stats()["evictions"] == 1


def test_is_a_mutable_mapping(policy: str) -> None:
    """LocalCache registers as a MutableMapping."""
    c = LocalCache(2, policy=policy)
    assert isinstance(c, collections.abc.MutableMapping)
    assert isinstance(c, collections.abc.Mapping)


def test_extensions_flag_matches_environment() -> None:
    """tiercache.EXTENSIONS reports the implementation that the environment selected."""
    module = LocalCache.__module__
    if os.environ.get("TIERCACHE_NO_EXTENSIONS"):
        assert EXTENSIONS is False and tiercache.EXTENSIONS is False
        assert module == "tiercache._local_py"
    elif os.environ.get("TIERCACHE_REQUIRE_EXTENSIONS"):
        assert EXTENSIONS is True and tiercache.EXTENSIONS is True
        assert module == "tiercache._local"
    else:
        assert module == ("tiercache._local" if EXTENSIONS else "tiercache._local_py")


# -- maxsize 0 and 1 --------------------------------------------------------------------------


def test_maxsize_zero_stores_nothing(policy: str) -> None:
    """maxsize 0: each write is counted as an eviction, nothing is stored, every read misses."""
    c = LocalCache(0, policy=policy)
    c["a"] = 1
    c.set("b", 2, ttl=10)
    c.update({"c": 3}, d=4)
    assert c.setdefault("e", 5) == 5
    assert len(c) == 0 and list(c) == [] and "a" not in c
    with pytest.raises(KeyError):
        c["a"]
    assert c.get("a", "dflt") == "dflt"
    with pytest.raises(KeyError):
        c.popitem()
    with pytest.raises(KeyError):
        del c["a"]
    stats = c.stats()
    assert stats["evictions"] == 5
    assert (stats["hits"], stats["misses"]) == (0, 3)  # setdefault, c["a"], get
    assert c.currsize == 0


def test_maxsize_one_keeps_the_last_write(policy: str) -> None:
    """maxsize 1: every new key evicts the previous one; the entry just written survives."""
    c = LocalCache(1, policy=policy)
    for i in range(20):
        c[i] = str(i)
        assert list(c) == [i] and c[i] == str(i)
    assert c.stats()["evictions"] == 19
    c[19] = "again"  # re-setting the only key evicts nothing
    assert list(c.items()) == [(19, "again")] and c.stats()["evictions"] == 19
    assert c.popitem() == (19, "again")
    assert len(c) == 0


# -- re-setting, mapping methods --------------------------------------------------------------


def test_reset_existing_key_replaces_value_without_eviction(policy: str) -> None:
    """Re-setting a live key replaces its value in place: same size, no eviction, same order."""
    c = LocalCache(3, policy=policy, maxbytes=100, getsizeof=len)
    c.update([("a", "1"), ("b", "22"), ("c", "333")])
    c["b"] = "bbbbbb"
    assert len(c) == 3 and c.stats()["evictions"] == 0
    assert c["b"] == "bbbbbb"
    assert list(c) == ["a", "b", "c"]  # a replaced value keeps its place, like dict
    assert c.currbytes == 1 + 6 + 3


def test_getitem_get_in_and_missing_keys(policy: str) -> None:
    """c[k] raises KeyError(k) on a miss, get returns the default, `in` does not count."""
    c = LocalCache(4, policy=policy)
    c["x"] = 0  # a falsy value is still a hit
    with pytest.raises(KeyError) as info:
        c["nope"]
    assert info.value.args == ("nope",)
    assert c.get("nope") is None and c.get("nope", 7) == 7
    assert c["x"] == 0 and c.get("x", 9) == 0
    assert "x" in c and "nope" not in c
    stats = c.stats()
    assert (stats["hits"], stats["misses"]) == (2, 3)


def test_missing_hook_called_by_getitem_only(policy: str) -> None:
    """A subclass's __missing__ answers c[k] misses (after counting the miss), not get()."""
    calls: list[Any] = []

    class Defaulting(LocalCache):
        def __missing__(self, key: Any) -> Any:
            calls.append(key)
            self[key] = f"made-{key}"
            return f"made-{key}"

    c = Defaulting(4, policy=policy)
    assert c["k"] == "made-k"
    assert calls == ["k"]
    assert c["k"] == "made-k"  # now a hit: no second call
    assert c.get("q", "dflt") == "dflt"
    assert calls == ["k"]
    stats = c.stats()
    assert (stats["hits"], stats["misses"]) == (1, 2)


def test_setdefault_pop_popitem_update(policy: str) -> None:
    """setdefault, pop with and without default, popitem on empty, update from every source."""
    c = LocalCache(10, policy=policy)
    assert c.setdefault("a", 1) == 1
    assert c.setdefault("a", 2) == 1
    assert c.setdefault("n") is None and c["n"] is None
    assert c.pop("a") == 1
    with pytest.raises(KeyError):
        c.pop("a")
    assert c.pop("a", "dflt") == "dflt"
    assert c.pop("a", None) is None
    c.clear()
    with pytest.raises(KeyError):
        c.popitem()
    c.update({"d": 1})
    c.update([("p", 2), ("q", 3)])
    c.update(kw=4)
    c.update({"d": 10}, e=5)
    items = {"d": 10, "p": 2, "q": 3, "kw": 4, "e": 5}
    assert dict(c.items()) == items
    assert dict(c.popitem() for _ in range(5)) == items
    assert len(c) == 0


def test_views_do_not_count(policy: str) -> None:
    """keys(), values(), items(), iteration, peek and entry count no hit and no use."""
    c = LocalCache(4, policy=policy)
    c.update(a=1, b=2)
    before = c.stats()
    assert list(c.keys()) == ["a", "b"] and list(c) == ["a", "b"]
    assert list(c.values()) == [1, 2] and list(c.items()) == [("a", 1), ("b", 2)]
    assert 2 in c.values() and ("a", 1) in c.items() and ("a", 2) not in c.items()
    assert c.peek("a") == 1 and c.peek("zz", "d") == "d"
    entry = c.entry("a")
    assert entry is not None and c.entry("zz") is None
    assert c.stats() == before


def test_views_do_not_refresh_lru_order() -> None:
    """Reading through views, `in`, peek or entry leaves the LRU victim unchanged."""
    c = LocalCache(3, policy="lru")
    c.update(a=1, b=2, c=3)
    list(c.items())
    list(c.values())
    assert "a" in c and c.peek("a") == 1 and c.entry("a") is not None
    c["d"] = 4
    assert "a" not in c and list(c) == ["b", "c", "d"]


def test_equality_and_repr(policy: str) -> None:
    """== compares the live items with any mapping; repr names class, maxsize, policy, size."""
    timer = FakeTimer()
    c = LocalCache(5, policy=policy, timer=timer)
    c.update(a=1, b=2)
    c.set("t", 3, ttl=1.0)
    assert c == {"a": 1, "b": 2, "t": 3}
    assert c != {"a": 1, "b": 2}
    assert c != [("a", 1)]
    timer.advance(1.0)
    assert c == {"a": 1, "b": 2}
    other = LocalCache(9, policy="lru")
    other.update(b=2, a=1)
    assert c == other
    text = repr(c)
    assert "LocalCache" in text and "5" in text and policy in text and "2" in text
    assert "LFUCache" in repr(LFUCache(3))


def test_entry_metadata(policy: str) -> None:
    """entry(k) exposes version, fresh_until and expires as given to set(); re-set resets them."""
    timer = FakeTimer(50.0)
    c = LocalCache(5, policy=policy, timer=timer)
    c.set("k", "v", ttl=10.0, version=7, fresh_until=55.0)
    e = c.entry("k")
    assert e is not None
    assert (e.version, e.fresh_until, e.expires) == (7, 55.0, 60.0)
    c.set("k", "w", version=8)
    e = c.entry("k")
    assert e is not None
    assert (e.version, e.fresh_until, e.expires) == (8, math.inf, math.inf)
    c["plain"] = 1
    e = c.entry("plain")
    assert e is not None and (e.version, e.fresh_until, e.expires) == (0, math.inf, math.inf)
    c.set("inf", 1, ttl=math.inf)
    e = c.entry("inf")
    assert e is not None and e.expires == math.inf


def test_version_must_fit_in_64_bits(policy: str) -> None:
    """version is an unsigned 64-bit number: out of range is OverflowError and changes nothing."""
    c = LocalCache(4, policy=policy)
    c.set("k", "old", version=3)
    before = c.stats()
    for bad in (-1, 2**64):
        with pytest.raises(OverflowError):
            c.set("k", "new", version=bad)
        with pytest.raises(OverflowError):
            c.set("other", "new", version=bad)
    assert dict(c.items()) == {"k": "old"} and c.stats() == before
    e = c.entry("k")
    assert e is not None and e.version == 3
    c.set("k", "max", version=2**64 - 1)
    e = c.entry("k")
    assert e is not None and e.version == 2**64 - 1
    assert "version" in repr(e)


def test_update_from_object_with_keys() -> None:
    """update() treats any object with keys() and [] as a mapping, like dict.update."""

    class KeysOnly:
        def keys(self) -> list[str]:
            return ["a", "b"]

        def __getitem__(self, key: str) -> str:
            return key.upper()

    c = LocalCache(4)
    c.update(KeysOnly())
    assert dict(c.items()) == {"a": "A", "b": "B"}


# -- iteration --------------------------------------------------------------------------------


def test_delete_during_iteration_raises(policy: str) -> None:
    """Deleting while iterating raises RuntimeError, as a dict does."""
    c = LocalCache(8, policy=policy)
    c.update({i: i for i in range(5)})
    with pytest.raises(RuntimeError):
        for k in c:
            del c[k]
    c2 = LocalCache(8, policy=policy)
    c2.update({i: i for i in range(5)})
    with pytest.raises(RuntimeError):
        for k in c2:
            c2[k + 100] = 0  # inserting too
    c3 = LocalCache(8, policy=policy)
    c3.update({i: i for i in range(5)})
    with pytest.raises(RuntimeError):
        for _ in c3:
            c3.clear()  # and clearing
    c4 = LocalCache(5, policy=policy)
    c4.update({i: i for i in range(5)})
    with pytest.raises(RuntimeError):
        for k in c4:
            c4[k + 100] = 0  # a full cache keeps its size, but never yields more than it had


def test_iteration_skips_expired_entries(policy: str) -> None:
    """Iteration, items, values and == only see live entries."""
    timer = FakeTimer()
    c = LocalCache(8, policy=policy, timer=timer)
    c.set("short", 1, ttl=1.0)
    c.set("long", 2, ttl=5.0)
    c["forever"] = 3
    timer.advance(1.0)
    assert list(c) == ["long", "forever"] and len(c) == 2
    assert list(c.values()) == [2, 3]


# -- unhashable keys --------------------------------------------------------------------------


@pytest.mark.parametrize("key", UNHASHABLE, ids=["list", "dict", "set"])
def test_unhashable_key_raises_type_error(policy: str, key: Any) -> None:
    """Every keyed operation rejects an unhashable key with TypeError, and changes nothing."""
    c = LocalCache(4, policy=policy)
    c["ok"] = 1
    operations: list[Callable[[], Any]] = [
        lambda: c[key],
        lambda: c.get(key),
        lambda: c.__setitem__(key, 1),
        lambda: c.set(key, 1, ttl=5),
        lambda: key in c,
        lambda: c.__delitem__(key),
        lambda: c.pop(key),
        lambda: c.pop(key, None),
        lambda: c.setdefault(key, 1),
        lambda: c.peek(key),
        lambda: c.entry(key),
    ]
    for op in operations:
        with pytest.raises(TypeError):
            op()
    assert dict(c.items()) == {"ok": 1}
    stats = c.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (0, 0, 0)


# -- weights ----------------------------------------------------------------------------------


def test_value_heavier_than_maxbytes_changes_nothing(policy: str) -> None:
    """A too-heavy value raises ValueError: nothing evicted, counted or replaced."""
    c = LocalCache(10, policy=policy, maxbytes=10, getsizeof=len)
    c.update(a="aaaa", b="bbbb")
    before = (list(c.items()), c.stats(), c.currbytes)
    with pytest.raises(ValueError):
        c["new"] = "x" * 11
    with pytest.raises(ValueError):
        c["a"] = "x" * 11  # replacing: the old value stays
    with pytest.raises(ValueError):
        c.set("b", "x" * 50, ttl=3)
    assert (list(c.items()), c.stats(), c.currbytes) == before
    c["c"] = "x" * 10  # exactly maxbytes fits, evicting the others
    assert list(c.items()) == [("c", "x" * 10)] and c.currbytes == 10


def test_maxbytes_evicts_until_under_bound() -> None:
    """A heavy write evicts LRU victims until the weight fits, never the entry just written."""
    c = LocalCache(10, policy="lru", maxbytes=10, getsizeof=len)
    c.update(a="111", b="222", c="333")
    c["a"] = "1"  # refresh a; weights 1 + 3 + 3
    c["d"] = "44444"  # 12 > 10: evict b (LRU), then 9 fits
    assert list(c) == ["a", "c", "d"] and c.currbytes == 9
    c["a"] = "1111111111"  # growing an existing entry evicts the others, not itself
    assert list(c.items()) == [("a", "1111111111")] and c.currbytes == 10
    assert c.stats()["evictions"] == 3


def test_default_getsizeof_used_with_maxbytes() -> None:
    """maxbytes without getsizeof weighs values with sys.getsizeof."""
    c = LocalCache(10, maxbytes=10_000)
    c["k"] = "x" * 100
    assert c.currbytes == sys.getsizeof("x" * 100)
    with pytest.raises(ValueError):
        c["big"] = "x" * 20_000


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None])
def test_getsizeof_returning_bad_value(policy: str, bad: Any) -> None:
    """getsizeof must return an int >= 0: anything else is a ValueError that changes nothing."""
    c = LocalCache(4, policy=policy, maxbytes=100, getsizeof=lambda v: bad if v == "bad" else 1)
    c["a"] = "fine"
    with pytest.raises(ValueError):
        c["b"] = "bad"
    with pytest.raises(ValueError):
        c["a"] = "bad"
    assert dict(c.items()) == {"a": "fine"} and c.currbytes == 1


def test_getsizeof_exception_propagates(policy: str) -> None:
    """An exception from getsizeof propagates and leaves the cache as it was."""

    def weigh(v: Any) -> int:
        if v == "boom":
            raise ZeroDivisionError
        return 1

    c = LocalCache(4, policy=policy, maxbytes=100, getsizeof=weigh)
    c["a"] = "x"
    with pytest.raises(ZeroDivisionError):
        c["a"] = "boom"
    assert dict(c.items()) == {"a": "x"} and c.currbytes == 1


@pytest.mark.parametrize("maxsize", [1, 2, 3, 5])
def test_written_key_survives_its_own_eviction(policy: str, maxsize: int) -> None:
    """Random writes of light and heavy values (new keys and re-writes of every segment's
    entries): the key just written is never evicted, and both bounds hold after every write."""
    rnd = random.Random(f"{policy}{maxsize}")
    for round_ in range(30):
        c = LocalCache(maxsize, policy=policy, maxbytes=12, getsizeof=len, seed=round_)
        for _ in range(60):
            key = rnd.randrange(maxsize + 3)
            if rnd.random() < 0.3:
                c.get(key)
                continue
            c[key] = "w" * rnd.randint(1, 12)
            assert key in c, f"{key} evicted by its own write"
            assert len(c) <= maxsize and c.currbytes <= 12
            assert c.currbytes == sum(map(len, c.values()))


# -- TTL --------------------------------------------------------------------------------------


def test_ttl_expiry_boundary(policy: str) -> None:
    """An entry expires exactly when timer() >= expires; then every read misses."""
    timer = FakeTimer(100.0)
    c = LocalCache(4, policy=policy, ttl=10.0, timer=timer)
    c["k"] = "v"
    c.set("own", "o", ttl=3.0)
    timer.advance(2.999)
    assert c["own"] == "o"
    timer.now = 103.0
    assert "own" not in c and c.get("own") is None and c.peek("own") is None
    assert c.entry("own") is None
    with pytest.raises(KeyError):
        c["own"]
    timer.now = 109.5
    assert c["k"] == "v" and len(c) == 1
    timer.now = 110.0
    assert len(c) == 0 and "k" not in c and list(c) == []
    with pytest.raises(KeyError):
        c.pop("k")
    stats = c.stats()
    assert stats["expirations"] == 2  # "own" removed by get(), "k" by pop()


@pytest.mark.parametrize(
    "read",
    ["getitem", "get", "contains", "peek", "entry", "setdefault", "pop", "delitem", "iter", "len"],
)
def test_each_read_misses_exactly_at_expiry(policy: str, read: str) -> None:
    """Every read sees an entry live just before ``expires`` and gone at exactly ``expires``."""

    def observe(c: LocalCache) -> Any:
        ops: dict[str, Callable[[], Any]] = {
            "getitem": lambda: c["k"],
            "get": lambda: c.get("k", "gone"),
            "contains": lambda: "k" in c,
            "peek": lambda: c.peek("k", "gone"),
            "entry": lambda: c.entry("k") is not None,
            "setdefault": lambda: c.setdefault("k", "new"),
            "pop": lambda: c.pop("k", "gone"),
            "delitem": lambda: c.__delitem__("k"),
            "iter": lambda: list(c),
            "len": lambda: len(c),
        }
        try:
            return ops[read]()
        except KeyError:
            return KeyError

    results = []
    for offset in (-0.25, 0.0):
        timer = FakeTimer(10.0)
        c = LocalCache(4, policy=policy, timer=timer)
        c.set("k", "v", ttl=2.0)
        timer.now = 12.0 + offset
        results.append(observe(c))
    live = {"getitem": "v", "get": "v", "contains": True, "peek": "v", "entry": True}
    live |= {"setdefault": "v", "pop": "v", "delitem": None, "iter": ["k"], "len": 1}
    gone = {"getitem": KeyError, "get": "gone", "contains": False, "peek": "gone"}
    gone |= {"entry": False, "setdefault": "new", "pop": "gone", "delitem": KeyError}
    gone |= {"iter": [], "len": 0}
    assert results == [live[read], gone[read]]


def test_expired_entry_purged_before_live_eviction(policy: str) -> None:
    """A full cache holding an expired entry drops that one (an expiration), not a live one."""
    timer = FakeTimer()
    c = LocalCache(3, policy=policy, timer=timer)
    c["a"] = 1
    c.set("short", 2, ttl=1.0)
    c["b"] = 3
    for _ in range(3):
        assert c["short"] == 2  # the most used and most recent entry
    timer.advance(1.0)
    c["new"] = 4
    assert set(c) == {"a", "b", "new"}
    stats = c.stats()
    assert (stats["evictions"], stats["expirations"]) == (0, 1)


def test_reset_of_expired_key_is_a_fresh_entry() -> None:
    """Re-setting an expired key counts an expiration and starts over (LFU count 1, new order)."""
    timer = FakeTimer()
    c = LocalCache(3, policy="lfu", timer=timer)
    c.set("x", 1, ttl=1.0)
    for _ in range(5):
        c["x"]
    c["y"] = 2
    c["z"] = 3
    timer.advance(1.0)
    c["x"] = 10  # expired: replaced by a fresh entry with count 1, after y and z
    assert list(c) == ["y", "z", "x"] and c.stats()["expirations"] == 1
    c["y"]
    c["z"]
    c["w"] = 4  # x has the least count now
    assert "x" not in c and set(c) == {"y", "z", "w"}


def test_expire_and_len_count_live_only(policy: str) -> None:
    """len counts live entries only; expire() removes the expired ones and returns their count."""
    timer = FakeTimer()
    c = LocalCache(10, policy=policy, timer=timer, maxbytes=100, getsizeof=len)
    for i in range(6):
        c.set(i, "ab", ttl=1.0 + (i % 3))
    timer.advance(2.0)
    assert len(c) == 2 and c.currsize == 2
    assert c.currbytes == 12  # expired entries still weigh until purged
    assert c.expire() == 4
    assert c.currbytes == 4 and c.stats()["expirations"] == 4
    assert c.expire() == 0


def test_popitem_skips_expired_entries() -> None:
    """popitem purges expired entries first and returns the LRU live one."""
    timer = FakeTimer()
    c = LocalCache(5, policy="lru", timer=timer)
    c.set("old", 1, ttl=1.0)
    c["a"] = 2
    c["b"] = 3
    timer.advance(5)
    assert c.popitem() == ("a", 2)
    assert c.stats()["expirations"] == 1


# -- LRU / LFU victims in a nutshell ----------------------------------------------------------


def test_lru_victim_order() -> None:
    """lru: reads and re-writes refresh; the least recent goes first."""
    c = LRUCache(3)
    c.update(a=1, b=2, c=3)
    c["a"]
    c["b"] = 20
    c["d"] = 4
    assert list(c) == ["a", "b", "d"]
    assert [c.popitem()[0] for _ in range(3)] == ["a", "b", "d"]


def test_lfu_victim_least_count_then_least_recent() -> None:
    """lfu: least used first; among equals the least recently used."""
    c = LFUCache(3)
    c.update(a=1, b=2, c=3)
    c["a"]
    c["a"]
    c.get("b")
    c.setdefault("c", None)  # b and c have count 2, c used last
    c["d"] = 4  # count 1, the newest: protected as the entry just written
    assert set(c) == {"a", "c", "d"}  # b: count 2 but less recent than c
    assert [c.popitem()[0] for _ in range(3)] == ["d", "c", "a"]


# -- re-entry ---------------------------------------------------------------------------------


class _ReentrantKey:
    """A key that collides with ``victim`` and writes to ``cache`` while being compared."""

    armed = False

    def __init__(self, cache: LocalCache) -> None:
        self.cache = cache

    def __hash__(self) -> int:
        return 42

    def __eq__(self, other: object) -> bool:
        if type(self).armed:
            type(self).armed = False
            self.cache["inner"] = 1  # re-enters a mutation of the same cache
        return self is other


class _Colliding:
    def __hash__(self) -> int:
        return 42

    def __eq__(self, other: object) -> bool:
        return self is other


class _FailingEq(_Colliding):
    __hash__ = _Colliding.__hash__

    def __eq__(self, other: object) -> bool:
        raise ZeroDivisionError("from __eq__")


def test_key_eq_errors_propagate(policy: str) -> None:
    """An exception from a colliding key's __eq__ reaches the caller of every lookup, as with a
    dict, and leaves the cache as it was."""
    c = LocalCache(4, policy=policy)
    stored = _Colliding()
    c[stored] = "stored"
    probe = _FailingEq()
    for op in (
        lambda: c[probe],
        lambda: c.get(probe),
        lambda: probe in c,
        lambda: c.entry(probe),
        lambda: c.pop(probe, None),
        lambda: c.__setitem__(probe, 1),
        lambda: c.setdefault(probe, 1),
    ):
        with pytest.raises(ZeroDivisionError):
            op()
    assert list(c.items()) == [(stored, "stored")] and c[stored] == "stored"
    assert_consistent(c)


def test_many_colliding_keys(policy: str) -> None:
    """Keys that all share one hash are told apart by ``==``, through growth and removals."""
    c = LocalCache(50, policy=policy)
    keys = [_Colliding() for _ in range(80)]
    for i, k in enumerate(keys):
        c[k] = i
    live = [k for k in keys if k in c]
    assert len(live) == len(c) == 50
    for k in live[::2]:
        del c[k]
    for k in live[1::2]:
        assert c[k] == keys.index(k)
    assert all(k not in c for k in live[::2])
    assert_consistent(c)


@pytest.mark.timeout(60)
def test_reentrant_mutation_from_key_eq_raises(policy: str) -> None:
    """A key's __eq__ that writes to the cache mid-write gets RuntimeError, not a deadlock."""
    c = LocalCache(4, policy=policy)
    stored = _ReentrantKey(c)
    c[stored] = "first"
    _ReentrantKey.armed = True
    with pytest.raises(RuntimeError):
        run_with_timeout(lambda: c.__setitem__(_Colliding(), "second"))
    assert "inner" not in c
    # The mutex was released: the cache still works from this and other threads.
    run_with_timeout(lambda: c.__setitem__("after", 2))
    assert c["after"] == 2
    assert_consistent(c)


@pytest.mark.timeout(60)
def test_write_from_key_eq_during_read(policy: str) -> None:
    """A key's __eq__ that writes to the cache inside c[k]'s lookup never deadlocks: the read
    either refuses the re-entry (RuntimeError) or, if its lookup runs before any mutation (as
    the lock-free hit path of the C twin does), lets the write land and then misses."""
    c = LocalCache(4, policy=policy)
    c[_ReentrantKey(c)] = "first"
    _ReentrantKey.armed = True
    with pytest.raises((RuntimeError, KeyError)) as info:
        run_with_timeout(lambda: c[_Colliding()])
    if info.type is KeyError:
        assert c.peek("inner") == 1
    else:
        assert "inner" not in c
    run_with_timeout(lambda: c.__setitem__("after", 2))
    assert c["after"] == 2
    assert_consistent(c)


class _FlakyStoredKey:
    """A key whose __eq__ raises on its ``fail_at``-th call only."""

    def __init__(self, fail_at: int) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def __hash__(self) -> int:
        return 42

    def __eq__(self, other: object) -> bool:
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError("flaky __eq__")
        return self is other


def test_exception_from_key_eq_leaves_cache_consistent(policy: str) -> None:
    """An exception from a key's __eq__ at any point of a write (the lookup's comparison, the
    insertion's, an eviction's) propagates and leaves the cache consistent."""
    for fail_at in range(1, 6):
        c = LocalCache(2, policy=policy)
        stored = _FlakyStoredKey(fail_at)
        c[stored] = 1
        for key in [_Colliding(), "x", "y", "z"]:
            try:
                c[key] = 2
            except ValueError:
                pass
        stored.fail_at = 0  # disarmed: now the cache must simply work
        for key in "abc":
            c[key] = 0
        assert len(c) == len(list(c)) == 2
        assert_consistent(c)


class _WritesOnDel:
    """A value whose finalizer writes to the cache it was stored in."""

    outcomes: list[str] = []
    enabled = True

    def __init__(self, cache: LocalCache, tag: int) -> None:
        self.cache = cache
        self.tag = tag

    def __del__(self) -> None:
        if not type(self).enabled:
            return
        try:
            self.cache[("from-del", self.tag)] = self.tag
            type(self).outcomes.append("ok")
        except RuntimeError:
            type(self).outcomes.append("RuntimeError")
        except Exception as exc:
            type(self).outcomes.append(repr(exc))


@pytest.mark.timeout(60)
def test_finalizer_of_evicted_value_writing_to_cache(policy: str) -> None:
    """A value whose __del__ writes to the cache, evicted or replaced by a write: no deadlock,
    the write either lands or gets RuntimeError, and the cache stays consistent."""
    _WritesOnDel.outcomes = []
    _WritesOnDel.enabled = True
    c = LocalCache(3, policy=policy)

    def churn() -> None:
        for i in range(30):
            c[i % 5] = _WritesOnDel(c, i)  # replacements and evictions drop values

    run_with_timeout(churn)
    assert _WritesOnDel.outcomes, "no finalizer ran"
    assert set(_WritesOnDel.outcomes) <= {"ok", "RuntimeError"}, _WritesOnDel.outcomes
    _WritesOnDel.enabled = False  # (else a finalizer's write may evict "after" at once)
    run_with_timeout(lambda: c.__setitem__("after", 1))
    assert "after" in c
    assert_consistent(c)


@pytest.mark.timeout(60)
def test_weakref_callback_writing_to_cache(policy: str) -> None:
    """A weakref callback fired when an evicted value dies may write to the cache safely."""
    c = LocalCache(2, policy=policy)
    outcomes: list[str] = []
    refs: list[weakref.ref[Any]] = []

    class Box:
        pass

    def callback(_ref: weakref.ref[Any]) -> None:
        try:
            c[("cb", len(outcomes))] = 0
            outcomes.append("ok")
        except RuntimeError:
            outcomes.append("RuntimeError")

    def churn() -> None:
        for i in range(10):
            box = Box()
            refs.append(weakref.ref(box, callback))
            c[i] = box
            del box

    run_with_timeout(churn)
    assert outcomes and set(outcomes) <= {"ok", "RuntimeError"}
    assert len(c) == len(list(c)) <= 2


class _CyclicFinalizer:
    """Cyclic garbage whose finalizer, run by the collector, writes to a cache."""

    outcomes: list[str] = []
    enabled = True

    def __init__(self, cache: LocalCache) -> None:
        self.cache = cache
        self.me = self

    def __del__(self) -> None:
        if not type(self).enabled:
            return
        try:
            self.cache[("gc", id(self))] = 0
            type(self).outcomes.append("ok")
        except RuntimeError:
            type(self).outcomes.append("RuntimeError")
        except Exception as exc:
            type(self).outcomes.append(repr(exc))


class _GarbageKey:
    """A key whose __hash__ leaves cyclic garbage behind, so that the collector is likely to run
    (and fire finalizers) at the next allocation: inside the cache's write."""

    def __init__(self, cache: LocalCache, n: int) -> None:
        self.cache = cache
        self.n = n

    def __hash__(self) -> int:
        _CyclicFinalizer(self.cache)
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _GarbageKey) and other.n == self.n


@pytest.mark.timeout(120)
def test_gc_finalizer_mid_write_does_not_deadlock(policy: str) -> None:
    """With the collector running on almost every allocation and garbage made inside the write,
    finalizers that write to the cache never deadlock and never corrupt it."""
    _CyclicFinalizer.outcomes = []
    _CyclicFinalizer.enabled = True
    c = LocalCache(16, policy=policy, maxbytes=400, getsizeof=lambda v: 10)
    threshold = gc.get_threshold()

    def churn() -> None:
        gc.set_threshold(1, 100, 100)  # young collections on nearly every allocation
        try:
            for i in range(400):
                c[_GarbageKey(c, i % 40)] = [i]
                c.get(_GarbageKey(c, (i * 7) % 40))
        finally:
            gc.set_threshold(*threshold)

    run_with_timeout(churn, 60)
    gc.collect()
    _CyclicFinalizer.enabled = False
    assert _CyclicFinalizer.outcomes
    assert set(_CyclicFinalizer.outcomes) <= {"ok", "RuntimeError"}, _CyclicFinalizer.outcomes
    assert c.currbytes == 10 * len(c) <= 400
    assert_consistent(c)


# -- cycles through the cache -------------------------------------------------------------------


class _Node:
    """A value or key that can point back at the cache."""

    def __init__(self, n: int, sink: object) -> None:
        self.n = n
        self.cache: Any = None
        self.payload = [n, "payload"]
        self.sink = sink

    def __hash__(self) -> int:
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Node) and other.n == self.n


def _filled_with_cycles(policy: str, sink: object) -> LocalCache:
    """A cache whose values and keys refer to it, each also holding ``sink``: a default-TTL
    entry, a per-key TTL (heap) entry, a plain entry, a node key, and a tuple value (which the
    collector cannot clear: the cache itself must let go of it)."""
    c = LocalCache(8, policy=policy, ttl=100.0)
    nodes = [_Node(i, sink) for i in range(4)]
    for node in nodes:
        node.cache = c
    c["ring"] = nodes[0]
    c.set("heap", nodes[1], ttl=50.0)
    c.set("plain", nodes[2], ttl=math.inf)
    c[nodes[3]] = "value of a node key"
    c["tuple"] = (c, sink)
    return c


def test_cycle_through_values_and_keys_is_collected(policy: str) -> None:
    """value -> cache -> entry -> value (and the same through a key) is garbage the cyclic
    collector frees, whichever expiry structure the entry is in."""
    sink = object()
    base = sys.getrefcount(sink)
    c = _filled_with_cycles(policy, sink)
    assert sys.getrefcount(sink) == base + 5
    del c
    gc.collect()
    assert sys.getrefcount(sink) == base  # everything that held it was freed


def test_collector_keeps_what_is_reachable(policy: str) -> None:
    """Values and keys in cycles with a live cache, or with an entry someone holds, survive
    collections intact; the cycle is freed once the last outside reference goes."""
    sink = object()
    base = sys.getrefcount(sink)
    c = _filled_with_cycles(policy, sink)
    held = c.entry("heap")  # an outside reference to one entry only
    gc.collect()
    assert c["ring"].payload == [0, "payload"] and c["heap"].cache is c
    assert sorted(k.n for k in c if isinstance(k, _Node)) == [3] and c["tuple"][0] is c
    it = iter(c)  # an iteration in progress
    next(it)
    del c
    gc.collect()
    assert held is not None and held.value.payload == [1, "payload"]
    cache = held.value.cache
    assert cache["plain"].payload == [2, "payload"] and cache.entry("heap") is held
    assert len(cache) == 5 and sys.getrefcount(sink) == base + 5
    del cache, it
    gc.collect()
    assert held.value.cache["ring"].payload == [0, "payload"]
    del held
    gc.collect()
    assert sys.getrefcount(sink) == base


# -- on_evict -----------------------------------------------------------------------------------


class Recorder:
    """An on_evict hook that records what it is told."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, Any, str]] = []

    def __call__(self, key: Any, value: Any, cause: str) -> None:
        self.log.append((key, value, cause))


def test_on_evict_reports_size_evictions_only(policy: str) -> None:
    """Victims of the size bound are reported with their own key and value, in eviction order;
    del, pop, popitem, clear and replaced values are not."""
    hook = Recorder()
    c = LocalCache(2, policy=policy, on_evict=hook)
    assert c.on_evict is hook
    c["a"] = "A"
    c["b"] = "B"
    c["a"] = "A2"  # a replaced value: not an eviction
    assert hook.log == []
    c["c"] = "C"  # evicts one of a, b
    [(key, value, cause)] = hook.log
    assert cause == "size" and key not in c and value == {"a": "A2", "b": "B"}[key]
    del c["c"]
    c.pop(next(iter(c)))
    c["d"] = "D"
    c.popitem()
    c["e"] = "E"
    c.clear()
    assert len(hook.log) == 1 == c.stats()["evictions"]


def test_on_evict_lru_order_and_reused_entries() -> None:
    """LRU: a full cache reports each victim's own key and value (the C build reuses the
    victim's entry object for the new key), least recent first."""
    hook = Recorder()
    c = LocalCache(3, on_evict=hook)
    for i in range(6):
        c[f"k{i}"] = i
        if i == 3:
            assert c["k1"] == 1  # k1 becomes the most recent
    assert hook.log == [("k0", 0, "size"), ("k2", 2, "size"), ("k3", 3, "size")]
    assert list(c) == ["k1", "k4", "k5"]


def test_on_evict_reports_every_victim_of_one_write(policy: str) -> None:
    """A heavy value evicts several entries at once: each is reported, none twice."""
    hook = Recorder()
    c = LocalCache(10, policy=policy, maxbytes=10, getsizeof=len, on_evict=hook)
    for key in "abcde":
        c[key] = key * 2
    c["big"] = "x" * 9  # leaves room for nothing else
    assert sorted(hook.log) == [(k, k * 2, "size") for k in "abcde"]
    assert list(c.items()) == [("big", "x" * 9)]
    assert c.stats()["evictions"] == 5


def test_on_evict_maxsize_zero(policy: str) -> None:
    """With maxsize 0 the value written is evicted at once, and reported so."""
    hook = Recorder()
    c = LocalCache(0, policy=policy, on_evict=hook)
    c["k"] = "v"
    assert c.setdefault("s", "d") == "d"
    assert hook.log == [("k", "v", "size"), ("s", "d", "size")] and len(c) == 0


def test_on_evict_reports_expired_entries(policy: str) -> None:
    """An expired entry is reported as "expired" when a read, a write, pop or expire() removes
    it; one just invisible (len, in, iteration) is not reported until it is removed."""
    timer, hook = FakeTimer(), Recorder()
    c = LocalCache(8, policy=policy, ttl=1.0, timer=timer, on_evict=hook)
    for key in "abcdef":
        c[key] = key.upper()
    c.set("z", "Z", ttl=math.inf)
    timer.advance(1.0)
    assert len(c) == 1 and "a" not in c and list(c) == ["z"]
    assert hook.log == []
    with pytest.raises(KeyError):
        c["a"]
    assert c.get("b", "dflt") == "dflt"
    assert c.pop("c", None) is None
    c["d"] = "D2"  # a write over an expired entry: the old one is reported, the new one stored
    assert c.expire() == 2  # e and f
    assert hook.log == [
        ("a", "A", "expired"),
        ("b", "B", "expired"),
        ("c", "C", "expired"),
        ("d", "D", "expired"),
        ("e", "E", "expired"),
        ("f", "F", "expired"),
    ]
    assert c.stats()["expirations"] == 6 and dict(c.items()) == {"z": "Z", "d": "D2"}


def test_on_evict_expired_before_live_victims(policy: str) -> None:
    """A write that makes room purges expired entries first: they are reported as "expired",
    and no live entry is evicted."""
    timer, hook = FakeTimer(), Recorder()
    c = LocalCache(2, policy=policy, timer=timer, on_evict=hook)
    c.set("short", 1, ttl=1.0)
    c["long"] = 2
    timer.advance(2.0)
    c["new"] = 3
    assert hook.log == [("short", 1, "expired")]
    assert dict(c.items()) == {"long": 2, "new": 3}
    c.set("x", 4, ttl=1.0)  # full: a live victim now
    assert hook.log[1][2] == "size" and len(c) == 2


def test_on_evict_popitem_reports_purged_entries(policy: str) -> None:
    """popitem purges expired entries first: those are reported, its own victim is not."""
    timer, hook = FakeTimer(), Recorder()
    c = LocalCache(4, policy=policy, timer=timer, on_evict=hook)
    c.set("old", 1, ttl=1.0)
    c["keep"] = 2
    timer.advance(1.0)
    assert c.popitem() == ("keep", 2)
    assert hook.log == [("old", 1, "expired")]


def test_on_evict_hook_may_use_the_cache(policy: str) -> None:
    """The hook runs after the cache is released: it may read and write the same cache (its
    own writes may evict again, and are reported too)."""
    log: list[tuple[Any, str]] = []
    c: Any = None

    def hook(key: Any, value: Any, cause: str) -> None:
        log.append((key, cause))
        c.get(key)  # a miss
        if key != "last":
            c["last"] = key  # may evict once more

    c = LocalCache(2, policy=policy, on_evict=hook)
    for i in range(5):
        c[i] = i

    def run() -> None:
        for i in range(5, 20):
            c[i] = i

    run_with_timeout(run)
    assert len(c) == 2 and c.stats()["evictions"] == len(log)
    assert_consistent(c)


def test_on_evict_exceptions_are_logged(policy: str, caplog: pytest.LogCaptureFixture) -> None:
    """A hook that raises does not undo the write or skip the next reports: it is logged."""
    seen: list[Any] = []

    def hook(key: Any, value: Any, cause: str) -> None:
        seen.append(key)
        raise ZeroDivisionError("hook failed")

    c = LocalCache(1, policy=policy, maxbytes=4, getsizeof=len, on_evict=hook)
    c["a"] = "a"
    with caplog.at_level("ERROR", logger="tiercache.local"):
        c["b"] = "bbbb"
    assert seen == ["a"] and dict(c.items()) == {"b": "bbbb"}
    [record] = caplog.records
    assert record.name == "tiercache.local" and "on_evict" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


def test_on_evict_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_evict"):
        LocalCache(4, on_evict="print")  # type: ignore[arg-type]
    assert LocalCache(4).on_evict is None


def test_on_evict_cycle_is_collected(policy: str) -> None:
    """A hook that refers to its cache makes a cycle the collector frees."""
    hook = Recorder()
    c = LocalCache(2, policy=policy, on_evict=hook)
    hook.cache = c  # type: ignore[attr-defined]
    c["k"] = hook
    ref = weakref.ref(hook)
    del c, hook
    gc.collect()
    assert ref() is None

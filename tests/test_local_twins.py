"""The Cython LocalCache and its pure-Python twin, driven by the same operations, act the same.

Both classes are imported directly (not through ``tiercache.local``), so this file checks the pair
whichever implementation the rest of the run selected. Every operation's outcome must match, and
after each one the visible state: items in iteration order, entry metadata, ``len`` and
``stats()``; at the end both caches are drained with ``popitem`` and must give up the same
victims in the same order. The Cython build may be missing only in the pure-Python run: when
``TIERCACHE_REQUIRE_EXTENSIONS`` is set, a missing build fails this file instead of skipping it.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.local_models import FakeTimer, outcome
from tiercache import _local_py as py_impl

if os.environ.get("TIERCACHE_REQUIRE_EXTENSIONS"):
    from tiercache import _local as c_impl
else:
    c_impl = pytest.importorskip("tiercache._local", reason="the Cython build is not importable")

POLICIES = ["lru", "lfu", "tinylfu"]
EXTRA_KEYS: list[Hashable] = ["a", "bb", (1, "x"), -1, -2, -(2**63), 2**64 + 3, 2**70, 0.5]
ALL_KEYS: list[Hashable] = [*range(12), *EXTRA_KEYS]
KEYS = st.one_of(st.integers(0, 11), st.sampled_from(EXTRA_KEYS))
VALUES = st.text("pq", max_size=8)

OPS = st.one_of(
    st.tuples(
        st.just("set"),
        KEYS,
        VALUES,
        st.sampled_from([None, 0.5, 1.0, 2.5, math.inf, 0, -1.0]),
        st.sampled_from([0, 1, 5, 2**64 - 1, -1, 2**64]),
        st.sampled_from([math.inf, 3.0, 1001.0]),
    ),
    st.tuples(st.sampled_from(["setitem", "setdefault"]), KEYS, VALUES),
    st.tuples(
        st.sampled_from(["getitem", "get", "contains", "peek", "delitem", "pop", "pop_default"]),
        KEYS,
    ),
    st.tuples(st.sampled_from(["popitem", "clear", "expire", "len"])),
    st.tuples(st.just("update"), st.lists(st.tuples(KEYS, VALUES), max_size=4)),
    st.tuples(st.just("advance"), st.sampled_from([0.25, 0.5, 1.0, 2.0])),
)


def apply(c: Any, timer: FakeTimer, op: tuple[Any, ...]) -> tuple[str, Any]:
    """Run one operation on ``c``; its outcome as a comparable value."""
    name, *args = op
    if name == "set":
        key, value, ttl, version, fresh_until = args
        return outcome(c.set, key, value, ttl, version=version, fresh_until=fresh_until)
    if name == "advance":
        timer.advance(args[0])
        return "ok", None
    if name == "len":
        return "ok", (len(c), c.currsize, c.currbytes)
    method = {
        "setitem": c.__setitem__,
        "setdefault": c.setdefault,
        "getitem": c.__getitem__,
        "get": c.get,
        "contains": c.__contains__,
        "peek": c.peek,
        "delitem": c.__delitem__,
        "pop": c.pop,
        "pop_default": lambda key: c.pop(key, "dflt"),
        "popitem": c.popitem,
        "clear": c.clear,
        "expire": c.expire,
        "update": c.update,
    }[name]
    return outcome(method, *args)


class Recorder:
    """An on_evict hook that records what it is told."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, Any, str]] = []

    def __call__(self, key: Any, value: Any, cause: str) -> None:
        self.log.append((key, value, cause))


def snapshot(c: Any, keys: list[Hashable]) -> dict[str, Any]:
    """Everything observable without counting a use, and what on_evict was told so far."""
    entries = {}
    for key in keys:
        e = c.entry(key)
        entries[key] = None if e is None else (e.expires, e.version, e.fresh_until)
    return {
        "items": list(c.items()),
        "len": len(c),
        "currbytes": c.currbytes,
        "stats": c.stats(),
        "entries": entries,
        "repr": repr(c),
        # the same reports (expired entries purged by one operation may come in another order)
        "evicted": sorted(map(repr, c.on_evict.log)),
    }


def make_pair(**kwargs: Any) -> tuple[Any, FakeTimer, Any, FakeTimer]:
    """The C cache and the pure-Python cache, each on its own fake clock at the same time, each
    recording what its on_evict hook is told."""
    t1, t2 = FakeTimer(), FakeTimer()
    return (
        c_impl.LocalCache(timer=t1, on_evict=Recorder(), **kwargs),
        t1,
        py_impl.LocalCache(timer=t2, on_evict=Recorder(), **kwargs),
        t2,
    )


def assert_same_drain(c: Any, p: Any) -> None:
    """popitem empties both caches through the same victims, in the same order."""
    victims_c, victims_p = [], []
    while True:
        got_c, got_p = outcome(c.popitem), outcome(p.popitem)
        assert got_c == got_p
        if got_c[0] == "raise":
            break
        victims_c.append(got_c[1])
        victims_p.append(got_p[1])
    assert victims_c == victims_p
    assert c.stats() == p.stats()


def test_twin_classes_and_names() -> None:
    """The C module offers the same public names and policy subclasses as the twin."""
    for name in ["LocalCache", "LRUCache", "LFUCache", "TinyLFUCache", "Entry"]:
        assert hasattr(c_impl, name) and hasattr(py_impl, name)
    for cls, policy in [("LRUCache", "lru"), ("LFUCache", "lfu"), ("TinyLFUCache", "tinylfu")]:
        c = getattr(c_impl, cls)(4)
        assert isinstance(c, c_impl.LocalCache) and c.policy == policy
        assert repr(c) == repr(getattr(py_impl, cls)(4))


@settings(
    max_examples=600,
    deadline=None,
    report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    policy=st.sampled_from(POLICIES),
    maxsize=st.integers(0, 8),
    maxbytes=st.none() | st.integers(1, 20),
    weigh=st.booleans(),
    ttl=st.sampled_from([None, 1.0, 4.0]),
    seed=st.integers(0, 2**64 - 1),
    ops=st.lists(OPS, max_size=60),
)
def test_twins_agree_on_random_operations(
    policy: str,
    maxsize: int,
    maxbytes: int | None,
    weigh: bool,
    ttl: float | None,
    seed: int,
    ops: list[tuple[Any, ...]],
) -> None:
    """Same operations, same outcomes, same state after each step, same victims at the end."""
    getsizeof = len if maxbytes is not None or weigh else None
    c, tc, p, tp = make_pair(
        maxsize=maxsize, policy=policy, maxbytes=maxbytes, getsizeof=getsizeof, ttl=ttl, seed=seed
    )
    for op in ops:
        got_c, got_p = apply(c, tc, op), apply(p, tp, op)
        assert got_c == got_p, f"{op}: C gave {got_c}, Python {got_p}"
        assert snapshot(c, ALL_KEYS) == snapshot(p, ALL_KEYS), f"after {op}"
    assert_same_drain(c, p)


def zipf_keys(rnd: random.Random, n: int, count: int) -> list[int]:
    """``count`` keys from 0..n-1, skewed like Zipf(1.0), with a few scans mixed in."""
    weights = [1.0 / (rank + 1) for rank in range(n)]
    keys = rnd.choices(range(n), weights=weights, k=count)
    for start in range(0, count, count // 5):  # scans: the pattern W-TinyLFU must resist
        keys[start : start + n // 4] = range(n - n // 4, n)[: len(keys[start : start + n // 4])]
    return keys


@pytest.mark.timeout(300)
@pytest.mark.parametrize("maxsize", [3, 50, 300])
@pytest.mark.parametrize("policy", POLICIES)
def test_twins_agree_on_long_skewed_traces(policy: str, maxsize: int) -> None:
    """Long Zipf-plus-scan traces: the sketch ages, segments fill, admission decides, and the two
    twins still agree on every outcome and evict the same keys (checked every 500 steps)."""
    rnd = random.Random(f"{policy}-{maxsize}")
    n = maxsize * 4
    c, tc, p, tp = make_pair(
        maxsize=maxsize, policy=policy, maxbytes=maxsize * 6, getsizeof=len, seed=maxsize
    )
    keys: list[Any] = zipf_keys(rnd, n, 12_000)
    for i, k in enumerate(keys):
        key: Hashable = k if k % 3 else f"s{k}"  # ints and strings: two hash families
        r = rnd.random()
        if r < 0.55:
            op: tuple[Any, ...] = ("get", key)
        elif r < 0.85:
            op = ("set", key, "v" * rnd.randint(1, 9), rnd.choice([None, 5.0, 40.0]), i, math.inf)
        elif r < 0.9:
            op = ("getitem", key)
        elif r < 0.94:
            op = ("pop", key)
        elif r < 0.97:
            op = ("advance", 0.5)
        elif r < 0.99:
            op = ("setdefault", key, "d")
        else:
            op = ("popitem",)
        reported = len(c.on_evict.log), len(p.on_evict.log)
        got_c, got_p = apply(c, tc, op), apply(p, tp, op)
        assert got_c == got_p, f"step {i} {op}: C gave {got_c}, Python {got_p}"
        assert sorted(map(repr, c.on_evict.log[reported[0] :])) == sorted(
            map(repr, p.on_evict.log[reported[1] :])
        ), f"step {i} {op}: on_evict told different things"
        if i % 500 == 0:
            assert list(c.items()) == list(p.items()), f"step {i}"
            assert c.stats() == p.stats(), f"step {i}"
    assert list(c.items()) == list(p.items())
    assert c.stats() == p.stats()
    stats = c.stats()
    causes = [cause for _, _, cause in c.on_evict.log]
    assert (causes.count("size"), causes.count("expired")) == (
        stats["evictions"],
        stats["expirations"],
    )
    assert_same_drain(c, p)


@pytest.mark.parametrize("policy", POLICIES)
def test_twins_agree_on_tinylfu_seed_sensitivity(policy: str) -> None:
    """Different seeds are honoured identically: for each seed both twins pick the same victims."""
    for seed in [0, 1, 2**63, 2**64 - 1]:
        c, tc, p, tp = make_pair(maxsize=5, policy=policy, seed=seed)
        rnd = random.Random(seed)
        for _ in range(400):
            key = rnd.randrange(15)
            op = ("get", key) if rnd.random() < 0.5 else ("setitem", key, "v")
            assert apply(c, tc, op) == apply(p, tp, op)
        assert list(c.items()) == list(p.items())
        assert_same_drain(c, p)

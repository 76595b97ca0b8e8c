"""Insert with eviction: a 1,000-entry cache, 10,000 str keys cycling, so every insert evicts.

SPEC 6: LocalCache insert with eviction is faster than cachebox LRUCache. The dict row overwrites
existing keys (no eviction): it is the floor of a mapping store, not a cache.
"""

from __future__ import annotations

import collections
import functools

import harness
import pytest
import report
from harness import Variant

BENCH_ORDER = 20
GROUP = "local-insert"
N_KEYS = 10_000
SIZE = 1_000
KEYS = [f"key:{i:05d}" for i in range(N_KEYS)]

LOOP = "loop overhead (for k in keys: pass)"
DICT = "dict d[k]=v (overwrite, no eviction)"
CACHEBOX_LRU = "cachebox.LRUCache c[k]=v"
OURS = {p: f"tiercache LocalCache({p}) c[k]=v" for p in ("lru", "lfu", "tinylfu")}
OURS_TTL = "tiercache LocalCache(lru, ttl=3600) c[k]=v"

HAND_LRU = f"""
c[k] = k
if len(c) > {SIZE}:
    c.popitem(last=False)
"""


def _dict(_):
    return {k: k for k in KEYS}


def _lru_cache(_):
    return functools.lru_cache(maxsize=SIZE)(lambda k: k)


def _lru_dict(_):
    from lru import LRU

    return LRU(SIZE)


def _cachebox(kind):
    def make(_):
        import cachebox

        return getattr(cachebox, kind)(SIZE)

    return make


def _cachetools(kind):
    def make(_):
        import cachetools

        return getattr(cachetools, kind)(SIZE)

    return make


def _theine(nolock):
    return lambda _: harness.theine_cache(SIZE, nolock=nolock)


def _ours(policy, **kw):
    return lambda tc: harness.make_local(tc, SIZE, policy, **kw)


def _variants() -> list[Variant]:
    close = harness.close_theine
    v = [
        Variant(LOOP, "pass", lambda _: None),
        Variant(DICT, "c[k] = k", _dict),
        Variant(
            "OrderedDict set+popitem(last=False) (hand LRU)",
            HAND_LRU,
            lambda _: collections.OrderedDict(),
        ),
        Variant(f"functools.lru_cache({SIZE}) f(k) miss+insert+evict", "c(k)", _lru_cache),
        Variant("lru-dict LRU c[k]=v", "c[k] = k", _lru_dict),
        Variant(CACHEBOX_LRU, "c[k] = k", _cachebox("LRUCache")),
        Variant("cachebox.LFUCache c[k]=v", "c[k] = k", _cachebox("LFUCache")),
        Variant("cachetools.LRUCache c[k]=v", "c[k] = k", _cachetools("LRUCache")),
        Variant("cachetools.LFUCache c[k]=v", "c[k] = k", _cachetools("LFUCache")),
        Variant(
            "theine.Cache set(k,v) (default, locked)", "c.set(k, k)", _theine(False), close=close
        ),
        Variant("theine.Cache set(k,v) (nolock=True)", "c.set(k, k)", _theine(True), close=close),
    ]
    for policy in ("lru", "lfu", "tinylfu"):
        v.append(Variant(OURS[policy], "c[k] = k", _ours(policy), ours=True))
    v.append(Variant(OURS_TTL, "c[k] = k", _ours("lru", ttl=3600), ours=True))
    return v


VARIANTS = _variants()


def _targets(rows, group):
    out = {}
    for name in OURS.values():
        r = report.ratio(rows, name, CACHEBOX_LRU)
        if r is not None:
            out[name] = f"{report.mark(r < 1.0)} <cb.LRU ({r:.2f}x)"
    return out


report.register_group(
    report.Group(
        key=GROUP,
        title=f"Insert with eviction (size {SIZE:,}, {N_KEYS:,} keys cycling), ns/op",
        order=20,
        overhead=LOOP,
        baselines=[("dict", DICT), ("cachebox LRU", CACHEBOX_LRU)],
        targets=_targets,
        target_note="SPEC 6 column: LocalCache insert with eviction faster than cachebox LRUCache.",
    )
)


@pytest.mark.parametrize("v", VARIANTS, ids=repr)
def test_insert(benchmark, v: Variant) -> None:
    harness.run_variant(benchmark, GROUP, v, KEYS)

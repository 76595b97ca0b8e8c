"""Hit path: 10,000 str keys, every cache holds them all; ``c[k]`` and ``c.get(k)``.

SPEC 6: a LocalCache hit ``c[k]`` is <= 1.2 x dict ``d[k]`` (net of the loop) and faster than
lru-dict and cachebox. The ``ttl=3600`` rows read the clock on every hit: their difference from
the plain ``lru`` rows is the cost of the TTL check.
"""

from __future__ import annotations

import collections
import functools

import harness
import pytest
import report
from harness import Variant

BENCH_ORDER = 10
GROUP = "local-hit"
N_KEYS = 10_000
MAXSIZE = 20_000  # holds every key
KEYS = [f"key:{i:05d}" for i in range(N_KEYS)]

LOOP = "loop overhead (for k in keys: pass)"
DICT = "dict d[k]"
LRU_CACHE = "functools.lru_cache(maxsize=None) f(k)"
LRU_DICT = "lru-dict LRU c[k]"
CACHEBOX = ("cachebox.LRUCache c[k]", "cachebox.LFUCache c[k]")
OURS_GETITEM = {p: f"tiercache LocalCache({p}) c[k]" for p in ("lru", "lfu", "tinylfu")}
OURS_TTL = "tiercache LocalCache(lru, ttl=3600) c[k]"
OURS_TTL_GET = "tiercache LocalCache(lru, ttl=3600) c.get(k)"


def _filled(c):
    for k in KEYS:
        c[k] = k
    return c


def _dict(_):
    return _filled({})


def _odict(_):
    return _filled(collections.OrderedDict())


def _lru_cache(maxsize):
    def make(_):
        f = functools.lru_cache(maxsize=maxsize)(lambda k: k)
        for k in KEYS:
            f(k)
        return f

    return make


def _lru_dict(_):
    from lru import LRU

    return _filled(LRU(MAXSIZE))


def _cachebox(kind):
    def make(_):
        import cachebox

        return _filled(getattr(cachebox, kind)(MAXSIZE))

    return make


def _cachetools(kind):
    def make(_):
        import cachetools

        return _filled(getattr(cachetools, kind)(MAXSIZE))

    return make


def _theine(nolock):
    def make(_):
        c = harness.theine_cache(MAXSIZE, nolock=nolock)
        for k in KEYS:
            c.set(k, k)
        return c

    return make


def _ours(policy, **kw):
    def make(tc):
        return _filled(harness.make_local(tc, MAXSIZE, policy, **kw))

    return make


def _variants() -> list[Variant]:
    v = [
        Variant(LOOP, "pass", lambda _: None),
        Variant(DICT, "c[k]", _dict),
        Variant("dict d.get(k)", "c.get(k)", _dict),
        Variant("OrderedDict od[k]+move_to_end (hand LRU)", "c[k]; c.move_to_end(k)", _odict),
        Variant(LRU_CACHE, "c(k)", _lru_cache(None)),
        Variant("functools.lru_cache(maxsize=20000) f(k)", "c(k)", _lru_cache(MAXSIZE)),
        Variant(LRU_DICT, "c[k]", _lru_dict),
        Variant("lru-dict LRU c.get(k)", "c.get(k)", _lru_dict),
    ]
    for kind in ("LRUCache", "LFUCache"):
        v.append(Variant(f"cachebox.{kind} c[k]", "c[k]", _cachebox(kind)))
        v.append(Variant(f"cachebox.{kind} c.get(k)", "c.get(k)", _cachebox(kind)))
    for kind in ("LRUCache", "LFUCache"):
        v.append(Variant(f"cachetools.{kind} c[k]", "c[k]", _cachetools(kind)))
        v.append(Variant(f"cachetools.{kind} c.get(k)", "c.get(k)", _cachetools(kind)))
    close = harness.close_theine
    v.append(
        Variant("theine.Cache get(k) (default, locked)", "c.get(k)", _theine(False), close=close)
    )
    v.append(Variant("theine.Cache get(k) (nolock=True)", "c.get(k)", _theine(True), close=close))
    for policy in ("lru", "lfu", "tinylfu"):
        v.append(Variant(OURS_GETITEM[policy], "c[k]", _ours(policy), ours=True))
        v.append(
            Variant(
                f"tiercache LocalCache({policy}) c.get(k)", "c.get(k)", _ours(policy), ours=True
            )
        )
    v.append(Variant(OURS_TTL, "c[k]", _ours("lru", ttl=3600), ours=True))
    v.append(Variant(OURS_TTL_GET, "c.get(k)", _ours("lru", ttl=3600), ours=True))
    return v


VARIANTS = _variants()


def _targets(rows, group):
    """SPEC 6: net ratio vs dict <= 1.2, and faster than lru-dict and every cachebox (paired)."""
    rivals = [n for n in (LRU_DICT, *CACHEBOX) if n in rows]
    out = {}
    for name in OURS_GETITEM.values():
        if name not in rows:
            continue
        parts = []
        r = report.ratio(rows, name, DICT, net=True)
        if r is not None:
            parts.append(f"{report.mark(r <= 1.2)} ≤1.2xdict ({r:.2f})")
        for rival in rivals:
            x = report.ratio(rows, name, rival)
            short = rival.split(" c[k]")[0].replace("cachebox.", "cb.")
            parts.append(f"{report.mark(x is not None and x < 1.0)} <{short} ({x:.2f}x)")
        out[name] = " ".join(parts)
    return out


def _footer(rows, group):
    lines = []
    for plain, ttl in (
        (OURS_GETITEM["lru"], OURS_TTL),
        ("tiercache LocalCache(lru) c.get(k)", OURS_TTL_GET),
    ):
        if plain in rows and ttl in rows:
            r = report.ratio(rows, ttl, plain)
            d = (r - 1.0) * rows[plain].min_ns
            op = ttl.split(") ")[-1]
            lines.append(
                f"TTL check cost on a hit ({op}): {d:+.1f} ns ({100 * (r - 1):+.0f}%) vs the "
                "same cache without ttl (paired ratio x its min ns)."
            )
    return lines


report.register_group(
    report.Group(
        key=GROUP,
        title=f"Local hit path ({N_KEYS:,} str keys, cache holds all), ns/op",
        order=10,
        overhead=LOOP,
        baselines=[("dict", DICT), ("lru_cache", LRU_CACHE)],
        targets=_targets,
        footer=_footer,
        target_note=(
            "SPEC 6 column: LocalCache `c[k]` net ≤ 1.2 x dict `d[k]` net, and faster than "
            "lru-dict `c[k]` and cachebox LRUCache/LFUCache `c[k]` (paired ratios, gross)."
        ),
    )
)


@pytest.mark.parametrize("v", VARIANTS, ids=repr)
def test_hit(benchmark, v: Variant) -> None:
    harness.run_variant(benchmark, GROUP, v, KEYS)

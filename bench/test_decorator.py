"""``@tiered_cache`` against the memoizing decorators, side by side in one run (SPEC 2.3, 6):

1. Hit ``f(x)``: 10,000 str arguments, every result cached (in the decorator's local tier for
   ours), vs ``functools.lru_cache(maxsize=None)`` and ``(maxsize=20000)``,
   ``cachetools.cached(LRUCache(20000))``, ``cachebox.cached(LRUCache(20000))`` (decorated
   ``f(x)`` calls, as research/peer-performance.md measured them), an undecorated call and dict
   ``d[k]``. SPEC 6: a local hit costs no more than an lru_cache hit (≤ 1.0 x, net of the loop).
2. The same with int arguments (10,000 ints; the peer table measured ``f(x: int)``).
3. A two-argument call ``f(k, 1)`` (information: ours takes the Python path by design; the C
   front answers only single str/int arguments).
4. The miss path, for information: per-call latency of the first call of an argument (Redis round
   trips + the function + the store) vs an lru_cache miss, and of a call whose result another
   process already computed (an L2 hit), with a raw redis-py GET for scale.

Timing: the harness loop (``bench/harness.py``), paired with dict loops before every round;
ratio columns are paired ratios of fastest rounds. Redis: a private ``redis-server`` on a free
loopback port (tiercache.server.RedisServer), stopped at the end of the module.
No timing assertions: only the report's SPEC 6 column judges.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import harness
import pytest
import report
from harness import Variant

BENCH_ORDER = 36
QUICK = harness.QUICK
GROUP_STR = "decorator-hit"
GROUP_INT = "decorator-hit-int"
GROUP_TWO = "decorator-hit-2arg"
SECTION = "decorator"
MAXSIZE = 20_000  # holds every key, as the peers' LRUCache(20000)

N_KEYS = 2_000 if QUICK else 10_000  # each of our rows first fills its keys through Redis
KEYS = [f"key:{i:05d}" for i in range(N_KEYS)]
INT_KEYS = [1_000_000 + i for i in range(N_KEYS)]  # not the interpreter's small ints
N_TWO = min(N_KEYS, 2_000)  # the two-argument group: ours takes tens of µs per call there
TWO_KEYS = KEYS[:N_TWO]
N_MISS = 300 if QUICK else 2_000  # timed calls per side (miss path)
BLOCK = 50  # calls per interleaved block (miss path)

LOOP = "loop overhead (for k in keys: pass)"
DICT = "dict d[k]"
PLAIN = "undecorated f(k) call (no cache)"
LRU = "functools.lru_cache(maxsize=None) f(k)"
LRU_20K = "functools.lru_cache(maxsize=20000) f(k)"
CACHETOOLS = "cachetools.cached(LRUCache(20000)) f(k)"
CACHEBOX = "cachebox.cached(LRUCache(20000)) f(k)"
OURS = "tiered_cache(cache, local_maxsize=20000) f(k)"


def f(x: Any, y: Any = None) -> Any:  # the decorated function (module level: a stable qualname)
    return x


# -- the objects under test -----------------------------------------------------------------------


class _Ours:
    """The TieredCache (one private Redis) the decorated functions of this module use; built on
    the first ``tiered_cache`` row, closed at the end of the module (see the fixture below)."""

    server: Any = None
    cache: Any = None
    functions: dict[str, Any] = {}
    error: str | None = None

    @classmethod
    def get(cls, tc: Any) -> Any:
        if cls.error is not None:
            raise ImportError(cls.error)  # run_variant notes the skip
        if cls.cache is None:
            from tiercache.server import RedisServer

            try:
                srv = RedisServer(bloom=False)
                srv.start()
            except Exception as exc:  # no redis-server here: the rows say so
                cls.error = f"no Redis server: {exc}"
                raise ImportError(cls.error) from exc
            cls.server = srv
            cls.cache = tc.TieredCache(srv.url, namespace="bench-dec", local_maxsize=1_000)
            if not cls.cache.wait_ready(10.0):
                cls.error = "TieredCache listener not ready"
                cls.close()
                raise ImportError(cls.error)
        return cls.cache

    @classmethod
    def close(cls) -> None:
        for fn in cls.functions.values():
            fn.close()
        cls.functions.clear()
        if cls.cache is not None:
            cls.cache.close()
            cls.cache = None
        if cls.server is not None:
            cls.server.stop()
            cls.server = None


@pytest.fixture(scope="module", autouse=True)
def _close_ours():
    yield
    _Ours.close()


def _ours(name: str, keys: list[Any], two: bool = False):
    """A ``@tiered_cache`` function whose results for ``keys`` are all in its local tier."""

    def make(tc: Any) -> Any:
        if name in _Ours.functions:
            return _Ours.functions[name]
        cache = _Ours.get(tc)
        fn = tc.tiered_cache(cache, local_maxsize=MAXSIZE, name=f"bench.{name}")(f)
        for k in keys:  # misses: Redis GET, lease, f, fill (about a ms each on this machine)
            fn(k, 1) if two else fn(k)
        for k in keys:  # now local hits
            fn(k, 1) if two else fn(k)
        _Ours.functions[name] = fn
        return fn

    return make


def _filled_call(deco: Any, keys: list[Any], two: bool = False) -> Any:
    fn = deco(f)
    for k in keys:
        fn(k, 1) if two else fn(k)
    return fn


def _lru(maxsize: int | None, keys: list[Any], two: bool = False):
    return lambda _: _filled_call(functools.lru_cache(maxsize=maxsize), keys, two)


def _cachetools(keys: list[Any], two: bool = False):
    def make(_: Any) -> Any:
        import cachetools

        return _filled_call(cachetools.cached(cachetools.LRUCache(MAXSIZE)), keys, two)

    return make


def _cachebox(keys: list[Any], two: bool = False):
    def make(_: Any) -> Any:
        import cachebox

        return _filled_call(cachebox.cached(cachebox.LRUCache(MAXSIZE)), keys, two)

    return make


def _fresh(keys: list[Any]) -> list[Any]:
    """Equal but distinct objects (hashes computed here, once, as for an argument used twice)."""
    out = [int(str(k)) for k in keys] if type(keys[0]) is int else [(k + ".")[:-1] for k in keys]
    assert all(a is not b and a == b for a, b in zip(out, keys, strict=True))
    for k in out:
        hash(k)
    return out


FRESH = " (fresh argument objects)"
# Rows timed with other keys than their group's: Variant name -> keys (see test_hit).
ROW_KEYS: dict[tuple[str, str], list[Any]] = {}


def _variants(group: str, keys: list[Any], tag: str, two: bool = False) -> list[Variant]:
    call = "c(k, 1)" if two else "c(k)"
    sfx = (lambda s: s.replace("f(k)", "f(k, 1)")) if two else (lambda s: s)
    ours = _ours(tag, keys, two)
    v = [
        Variant(LOOP, "pass", lambda _: None),
        Variant(DICT, "c[k]", lambda _: {k: k for k in keys}),
        Variant(sfx(PLAIN), call, lambda _: f),
        Variant(sfx(LRU), call, _lru(None, keys, two)),
        Variant(sfx(LRU_20K), call, _lru(MAXSIZE, keys, two)),
        Variant(sfx(CACHETOOLS), call, _cachetools(keys, two)),
        Variant(sfx(CACHEBOX), call, _cachebox(keys, two)),
        Variant(sfx(OURS), call, ours, ours=True),
    ]
    if not two:
        # Filled with ``keys``, called with equal copies: lru_cache then compares keys as ours
        # always does (its local tier holds keys decoded from their Redis encoding, never the
        # caller's objects), so these two rows compare the hit paths like for like.
        fresh = _fresh(keys)
        for name, make, is_ours in ((LRU, _lru(None, keys), False), (OURS, ours, True)):
            v.append(Variant(name + FRESH, call, make, ours=is_ours))
            ROW_KEYS[(group, name + FRESH)] = fresh
    return v


GROUPS = {
    GROUP_STR: (KEYS, _variants(GROUP_STR, KEYS, "str")),
    GROUP_INT: (INT_KEYS, _variants(GROUP_INT, INT_KEYS, "int")),
    GROUP_TWO: (TWO_KEYS, _variants(GROUP_TWO, TWO_KEYS, "two", two=True)),
}


# -- report groups --------------------------------------------------------------------------------


def _hit_path() -> str:
    """Which implementation answers our hits (printed in the report)."""
    try:
        import tiercache
        from tiercache import decorator
    except Exception as exc:
        return f"tiercache not importable ({type(exc).__name__})"
    front = decorator.CachedFunction.__mro__[1]
    path = getattr(sys.modules.get(front.__module__), "__file__", "?") or "?"
    kind = "Cython extension" if tiercache.EXTENSIONS else "pure-Python twin"
    return (
        f"our hit path: `{front.__module__}.{front.__name__}` ({kind}, `{os.path.relpath(path)}`), "
        f"EXTENSIONS={tiercache.EXTENSIONS}"
    )


def _targets(rows: dict[str, report.TimingRow], group: report.Group) -> dict[str, str]:
    """Ours vs lru_cache, net of the loop, in each condition (same objects; fresh objects)."""
    out = {}
    for ours, lru, what in ((OURS, LRU, "lru_cache"), (OURS + FRESH, LRU + FRESH, "its row")):
        if ours not in rows or lru not in rows:
            continue
        net = report.ratio(rows, ours, lru, net=True)
        gross = report.ratio(rows, ours, lru)
        if net is not None and gross is not None:
            out[ours] = f"{report.mark(net <= 1.0)} ≤1.0x {what} net ({net:.2f}; gross {gross:.2f})"
    return out


def _note() -> str:
    return (
        f"{_hit_path()}. Every row is a decorated `f(x)` returning its argument, all results "
        "cached before timing; ours: `@tiered_cache(cache, local_maxsize=20000)` on a "
        "TieredCache of a private redis-server, timed after its misses filled its local tier"
    )


_TARGET_NOTE = (
    "SPEC 6 column: a `@tiered_cache` local hit `f(x)` ≤ 1.0 x a `functools.lru_cache"
    "(maxsize=None)` hit, net of the loop (paired ratios; gross in brackets), as the peers were "
    "measured (each function called with the very objects it was filled with: lru_cache's dict "
    "then matches them by identity, ours compares them, since its local tier holds keys decoded "
    "from their Redis encoding), and like for like: both called with fresh equal objects."
)

report.register_group(
    report.Group(
        key=GROUP_STR,
        title=f"`@tiered_cache` hit `f(x)` ({N_KEYS:,} str arguments, all cached), ns/call",
        order=36,
        overhead=LOOP,
        baselines=[("lru_cache", LRU), ("dict", DICT)],
        targets=_targets,
        note=_note(),
        target_note=_TARGET_NOTE,
        footer=lambda rows, g: _check_lines(GROUP_STR),
    )
)
report.register_group(
    report.Group(
        key=GROUP_INT,
        title=f"`@tiered_cache` hit `f(x)`, int arguments ({N_KEYS:,} ints), ns/call",
        order=37,
        overhead=LOOP,
        baselines=[("lru_cache", LRU), ("dict", DICT)],
        targets=_targets,
        target_note=_TARGET_NOTE,
        note="As above, with int arguments (research/peer-performance.md measured f(x: int))",
        footer=lambda rows, g: _check_lines(GROUP_INT),
    )
)
report.register_group(
    report.Group(
        key=GROUP_TWO,
        title=f"Two-argument call `f(k, 1)` ({N_TWO:,} str first arguments), ns/call (information)",
        order=38,
        overhead=LOOP,
        baselines=[("lru_cache", LRU.replace("f(k)", "f(k, 1)")), ("dict", DICT)],
        note=(
            "Ours by design answers only a single str/int argument in C; this call goes through "
            "the Python path (argument binding, the Redis key encoding, the local-tier lookup), "
            "still without a Redis round trip. `dict d[k]` is the single-key dict loop"
        ),
        footer=lambda rows, g: _check_lines(GROUP_TWO),
    )
)


# -- hit benchmarks -------------------------------------------------------------------------------

_CHECKS: dict[str, list[str]] = {}


def _check_lines(group: str) -> list[str]:
    return _CHECKS.get(group, [])


@pytest.mark.parametrize(
    ("group", "v"),
    [(g, v) for g, (_, vs) in GROUPS.items() for v in vs],
    ids=lambda x: x if isinstance(x, str) else repr(x),
)
def test_hit(benchmark, group: str, v: Variant) -> None:
    keys = ROW_KEYS.get((group, v.name), GROUPS[group][0])
    if not v.ours:
        harness.run_variant(benchmark, group, v, keys)
        return
    tc = harness.tiercache_or_none()
    fn = None
    if tc is not None:
        try:
            fn = v.make(tc)  # built (and filled) once; run_variant gets the same function
        except ImportError:
            pass  # run_variant records the skip
    before = _probe(fn)
    harness.run_variant(benchmark, group, v, keys)
    after = _probe(fn)
    if before is None or after is None or v.name not in report.TIMINGS.get(group, {}):
        return
    d = {n: after[n] - before[n] for n in before}
    ok = d["local misses"] == 0 and d["loads"] == 0 and d["Redis reads"] == 0
    line = (
        f"{v.name}: {d['local hits']:,} local-tier hits (timed and calibration calls), "
        f"{d['local misses']} local misses, {d['loads']} loads, {d['Redis reads']} Redis "
        f"GET/EVALSHA calls"
    )
    if d["remote hits"]:  # cache_info's own split, when it disagrees with the server's count
        line += f"; cache_info().remote_hits counted {d['remote hits']:,}"
    _CHECKS.setdefault(group, []).append(("Check: " if ok else "Check FAILED: ") + line + ".")


def _probe(fn: Any) -> dict[str, int] | None:
    """Counters around a timed run of ours: its local tier, cache_info, and Redis' own count of
    the read commands it served (the truth about round trips)."""
    if fn is None:
        return None
    local, info = fn.local.stats(), fn.cache_info()
    st = _Ours.cache.redis.info("commandstats")
    reads = sum(st.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("get", "mget", "evalsha"))
    return {
        "local hits": local["hits"],
        "local misses": local["misses"],
        "loads": info.loads,
        "remote hits": info.remote_hits,
        "Redis reads": reads,
    }


# -- miss path ------------------------------------------------------------------------------------


def _pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def _interleaved(sides: list[Any], n: int) -> list[list[int]]:
    """ns per call of each ``side(i)``, i = 0..n-1, the sides taking turns in blocks of BLOCK
    (order 0 1 2 3, then 2 3 0 1: side 0 always runs a block before side 1)."""
    clock = time.perf_counter_ns
    out: list[list[int]] = [[] for _ in sides]
    half = len(sides) // 2
    for b, start in enumerate(range(0, n, BLOCK)):
        idx = range(start, min(n, start + BLOCK))
        order = list(range(len(sides)))
        if b % 2:
            order = order[half:] + order[:half]
        for s in order:
            fn, res = sides[s], out[s]
            for i in idx:
                t0 = clock()
                fn(i)
                res.append(clock() - t0)
    return out


def _round_trips(client: Any, fn: Any, n: int) -> str:
    """Commands the client sent per ``fn(i)`` call, i = 0..n-1 (counted in the client: what a
    script runs inside Redis is not a round trip)."""
    counts: dict[str, int] = {}
    send = client.execute_command

    def counting(*args: Any, **kw: Any) -> Any:
        name = str(args[0]).split()[0].upper()
        counts[name] = counts.get(name, 0) + 1
        return send(*args, **kw)

    client.execute_command = counting  # an instance attribute: redis-py's methods go through it
    try:
        for i in range(n):
            fn(i)
    finally:
        del client.execute_command
    return ", ".join(f"{c} {k / n:.2f}" for c, k in sorted(counts.items())) or "none"


def test_miss_path(tc) -> None:
    try:
        cache = _Ours.get(tc)
    except ImportError as exc:
        report.skipped(SECTION, f"miss path ({exc})")
        pytest.skip(str(exc))
    url = _Ours.server.url
    other = tc.TieredCache(url, namespace="bench-dec", local_maxsize=1_000)  # "another process"
    try:
        assert other.wait_ready(10.0), "second TieredCache not ready"
        tag = f"{os.getpid()}-{time.time_ns()}"
        ours = tc.tiered_cache(cache, local_maxsize=MAXSIZE, name="bench.miss")(f)
        # The same function in another TieredCache (its own local tier): its first call of a
        # key ours computed is an L2 hit.
        theirs = tc.tiered_cache(other, local_maxsize=MAXSIZE, name="bench.miss")(f)
        lru = functools.lru_cache(maxsize=None)(f)
        n = N_MISS
        warm = 100
        miss_keys = [f"miss:{tag}:{i:06d}" for i in range(n + warm)]
        for k in miss_keys[:warm]:  # warm-up: connections, scripts, code paths
            ours(k)
            theirs(k)
            lru(k)
        miss_keys = miss_keys[warm:]
        get, raw_name = cache.redis.get, b"bench-dec:raw"
        cache.redis.set(raw_name, b"x" * 40)  # about the size of an envelope of a short str
        before_o, before_t = ours.cache_info(), theirs.cache_info()
        o_miss, t_l2, l_miss, raw = _interleaved(
            [
                lambda i: ours(miss_keys[i]),
                lambda i: theirs(miss_keys[i]),  # after ours' block: computed, in Redis
                lambda i: lru(miss_keys[i]),
                lambda i: get(raw_name),
            ],
            n,
        )
        d_o = ours.cache_info().loads - before_o.loads
        d_t = theirs.cache_info().remote_hits - before_t.remote_hits
        ck = [f"cmd-{tag}-{i:06d}" for i in range(300)]
        cmds_miss = _round_trips(cache.redis, lambda i: ours(ck[i]), len(ck))
        cmds_l2 = _round_trips(other.redis, lambda i: theirs(ck[i]), len(ck))
        rows = [
            ("lru_cache(maxsize=None) miss (f runs, result stored)", l_miss, "", ""),
            (
                "`@tiered_cache` miss: first call anywhere (Redis miss, lease, f, fill, local "
                "store)",
                o_miss,
                cmds_miss,
                f"{d_o:,} loads in {n:,} calls",
            ),
            (
                "`@tiered_cache` L2 hit: first call here, computed by another cache (Redis GET, "
                "decode, local store)",
                t_l2,
                cmds_l2,
                f"{d_t:,} remote hits in {n:,} calls",
            ),
            ("raw redis-py GET (same client, for scale)", raw, "GET 1.00", ""),
        ]
        for name, xs, cmds, check in rows:
            report.record(
                SECTION,
                {
                    "name": name,
                    "n": len(xs),
                    "p50": _pct(xs, 50) / 1e3,
                    "p99": _pct(xs, 99) / 1e3,
                    "x_lru": _pct(xs, 50) / _pct(l_miss, 50),
                    "cmds": cmds,
                    "check": check,
                },
            )
        ours.close()
        theirs.close()
    finally:
        other.close()


def _render(rows: list[dict]) -> list[str]:
    out = [
        "### `@tiered_cache` miss path, µs per call (information)",
        "",
        f"The first call of an argument, each call timed with perf_counter_ns (so the lru_cache "
        f"figure includes ~0.1 µs of clock reads), the four sides taking turns in blocks of "
        f"{BLOCK} calls. Private redis-server on loopback, shared 2-core machine: the Redis rows "
        "move with the load. Round trips per call: the commands the cache's redis-py client "
        "sent (a Lua script is one), counted over 300 more calls.",
        "",
        "| call | calls | p50 µs | p99 µs | x lru_cache miss (p50) | Redis round trips per call | "
        "check |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['n']:,} | {r['p50']:,.2f} | {r['p99']:,.2f} | "
            f"{r['x_lru']:,.0f} | {r['cmds']} | {r['check']} |"
        )
    out.append("")
    return out


report.register_section(SECTION, order=39, title="decorator miss path", render=_render)

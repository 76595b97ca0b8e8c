"""AsyncTieredCache against the sync driver and cashews, side by side in one run (issue 9):

1. L1 hit: ``await cache.get(k)`` (10,000 str keys, all in the local tier) vs the sync
   ``TieredCache.get(k)``, cashews' in-memory backend ``await cache.get(k)``, and an empty
   ``await noop(k)`` (the floor of any awaited call).
2. L2 hit (L1 miss): ``await cache.get(k)`` with a local tier smaller than the key set read in
   cyclic order (every read misses and goes to Redis, as in bench/test_tiered.py) vs the sync
   TieredCache doing the same, a raw ``redis.asyncio`` GET, and cashews' Redis backend
   ``await cache.get(k)``.

Method: one round is a pass over the keys inside one coroutine (``for k in keys: await ...``),
run by ``loop.run_until_complete``; pytest-benchmark times ``ROUNDS`` rounds per row (the sync
rows run the same loop without awaits). ns/op = round time / keys. Rows of a group run back to
back in one process, one private ``redis-server`` on loopback. No timing assertions: the report
gives the figures and ratios (min and median per op).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import harness
import pytest
import report

BENCH_ORDER = 32
SECTION = "async"
QUICK = harness.QUICK
ROUNDS = 5 if QUICK else 20

N_KEYS = 10_000
KEYS = [f"key:{i:05d}" for i in range(N_KEYS)]
L2_KEYS = [f"l2:{i:05d}" for i in range(500 if QUICK else 1_000)]
L2_LOCAL = 125 if QUICK else 250  # a local tier this small: every cyclic read misses
L2_ROUNDS = 5 if QUICK else 10  # a round of round trips takes 0.1-1 s
VALUE = {"id": 1, "name": "ada", "tags": ["a", "b"]}

L1 = "L1 hit"
L2 = "L2 hit (L1 miss)"
OURS_ASYNC = "AsyncTieredCache await get(k)"
OURS_SYNC = "TieredCache get(k) (sync driver)"
NOOP = "await noop(k) (the floor of an awaited call)"
CASHEWS_MEM = "cashews mem:// await get(k)"
RAW_GET = "redis.asyncio await GET"
CASHEWS_REDIS = "cashews redis:// await get(k)"

ROWS: dict[str, dict[str, dict[str, float]]] = {}


@pytest.fixture(scope="module")
def server(tc: Any) -> Any:
    from tiercache.server import RedisServer

    try:
        srv = RedisServer(bloom=False)
        srv.start()
    except Exception as exc:  # no redis-server here: the section says so
        report.skipped(SECTION, f"all rows ({exc})")
        pytest.skip(f"no Redis server: {exc}")
    with srv:
        yield srv


@pytest.fixture(scope="module")
def loop() -> Any:
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.run_until_complete(lp.shutdown_default_executor())
        lp.close()


def _time(benchmark: Any, group: str, name: str, one_round: Callable[[], Any], n: int) -> None:
    """Time ``one_round()`` (``n`` ops) over the group's rounds; record min and median ns/op."""
    benchmark.group = f"async: {group}"
    benchmark.extra_info["ops_per_round"] = n
    gc.collect()
    rounds = L2_ROUNDS if group == L2 else ROUNDS
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1 if group == L2 else 2)
    st = getattr(benchmark, "stats", None)
    if st is None:  # --benchmark-disable
        return
    s = st.stats
    ROWS.setdefault(group, {})[name] = {"min": s.min / n * 1e9, "median": s.median / n * 1e9}
    if not any(r is ROWS for r in report.SECTIONS[SECTION].rows):
        report.record(SECTION, ROWS)


def _awaiting(loop: Any, call: Callable[[Any], Awaitable[Any]], keys: list[Any]) -> Callable:
    async def one_pass() -> None:
        for k in keys:
            await call(k)

    return lambda: loop.run_until_complete(one_pass())


def _calling(call: Callable[[Any], Any], keys: list[Any]) -> Callable:
    def one_pass() -> None:
        for k in keys:
            call(k)

    return one_pass


async def _async_cache(tc: Any, url: str, namespace: str, **kw: Any) -> Any:
    c = tc.AsyncTieredCache(url, namespace=namespace, **kw)
    if not await c.wait_ready(10.0):
        await c.aclose()
        raise RuntimeError(f"AsyncTieredCache {namespace!r}: listener not ready")
    return c


def _sync_cache(tc: Any, url: str, namespace: str, **kw: Any) -> Any:
    c = tc.TieredCache(url, namespace=namespace, **kw)
    if not c.wait_ready(10.0):
        c.close()
        raise RuntimeError(f"TieredCache {namespace!r}: listener not ready")
    return c


def _cashews(url: str) -> Any:
    try:
        from cashews import Cache
    except ImportError as exc:
        report.skipped(SECTION, f"cashews rows ({exc})")
        pytest.skip(str(exc))
    c = Cache()
    c.setup(url)
    return c


# -- 1. L1 hit ------------------------------------------------------------------------------------


def test_l1_hit_noop(benchmark: Any, loop: Any) -> None:
    async def noop(k: Any) -> Any:
        return k

    _time(benchmark, L1, NOOP, _awaiting(loop, noop, KEYS), N_KEYS)


def test_l1_hit_sync_driver(benchmark: Any, tc: Any, server: Any) -> None:
    c = _sync_cache(tc, server.url, "bench-async-l1s", local_maxsize=N_KEYS * 2)
    try:
        for k in KEYS:
            c[k] = VALUE
        assert all(c.get(k) == VALUE for k in KEYS[:100])
        _time(benchmark, L1, OURS_SYNC, _calling(c.get, KEYS), N_KEYS)
        assert c.stats()["remote_hits"] == 0, "an L1 round went to Redis"
    finally:
        c.clear()
        c.close()


def test_l1_hit_async(benchmark: Any, tc: Any, server: Any, loop: Any) -> None:
    c = loop.run_until_complete(
        _async_cache(tc, server.url, "bench-async-l1a", local_maxsize=N_KEYS * 2)
    )
    try:

        async def fill() -> None:
            for k in KEYS:
                await c.set(k, VALUE)

        loop.run_until_complete(fill())
        _time(benchmark, L1, OURS_ASYNC, _awaiting(loop, c.get, KEYS), N_KEYS)
        assert c.stats()["remote_hits"] == 0, "an L1 round went to Redis"
    finally:
        loop.run_until_complete(c.clear())
        loop.run_until_complete(c.aclose())


def test_l1_hit_cashews_mem(benchmark: Any, loop: Any) -> None:
    c = _cashews("mem://?size=20000")

    async def fill() -> None:
        for k in KEYS:
            await c.set(k, VALUE)

    loop.run_until_complete(fill())
    try:
        _time(benchmark, L1, CASHEWS_MEM, _awaiting(loop, c.get, KEYS), N_KEYS)
    finally:
        loop.run_until_complete(c.close())


# -- 2. L2 hit -----------------------------------------------------------------------------------


def test_l2_hit_raw_get(benchmark: Any, tc: Any, server: Any, loop: Any) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(server.url)

    async def fill() -> None:
        for k in L2_KEYS:
            await client.set(f"raw:{k}", b"x" * 60)

    loop.run_until_complete(fill())
    names = [f"raw:{k}" for k in L2_KEYS]
    try:
        _time(benchmark, L2, RAW_GET, _awaiting(loop, client.get, names), len(names))
    finally:
        loop.run_until_complete(client.aclose())


def test_l2_hit_sync_driver(benchmark: Any, tc: Any, server: Any) -> None:
    c = _sync_cache(tc, server.url, "bench-async-l2s", local_maxsize=L2_LOCAL)
    try:
        for k in L2_KEYS:
            c[k] = VALUE
        before = c.stats()["remote_hits"]
        _time(benchmark, L2, OURS_SYNC, _calling(c.get, L2_KEYS), len(L2_KEYS))
        assert c.stats()["remote_hits"] > before, "the L2 rounds did not reach Redis"
    finally:
        c.clear()
        c.close()


def test_l2_hit_async(benchmark: Any, tc: Any, server: Any, loop: Any) -> None:
    c = loop.run_until_complete(
        _async_cache(tc, server.url, "bench-async-l2a", local_maxsize=L2_LOCAL)
    )
    try:

        async def fill() -> None:
            for k in L2_KEYS:
                await c.set(k, VALUE)

        loop.run_until_complete(fill())
        before = c.stats()["remote_hits"]
        _time(benchmark, L2, OURS_ASYNC, _awaiting(loop, c.get, L2_KEYS), len(L2_KEYS))
        assert c.stats()["remote_hits"] > before, "the L2 rounds did not reach Redis"
    finally:
        loop.run_until_complete(c.clear())
        loop.run_until_complete(c.aclose())


def test_l2_hit_cashews_redis(benchmark: Any, server: Any, loop: Any) -> None:
    c = _cashews(server.url)

    async def fill() -> None:
        for k in L2_KEYS:
            await c.set(f"cw:{k}", VALUE)

    loop.run_until_complete(fill())
    names = [f"cw:{k}" for k in L2_KEYS]
    try:
        _time(benchmark, L2, CASHEWS_REDIS, _awaiting(loop, c.get, names), len(names))
    finally:
        loop.run_until_complete(c.close())


# -- the report ------------------------------------------------------------------------------


def _ratio(rows: dict[str, dict[str, float]], a: str, b: str, key: str) -> str:
    if a not in rows or b not in rows or not rows[b][key]:
        return "-"
    return f"{rows[a][key] / rows[b][key]:.2f}"


def _render(sections: list[dict[str, dict[str, dict[str, float]]]]) -> list[str]:
    if not sections:
        return []
    data = sections[0]
    impl, _ = report.implementation()
    out = [
        "### asyncio: AsyncTieredCache vs the sync driver and cashews",
        "",
        f"ns per operation (min and median of {ROUNDS} rounds, {L2_ROUNDS} for L2; a round is "
        "one pass over the keys in one coroutine, or a plain loop for the sync rows). "
        f"tiercache: {impl}. "
        "Ratios are of medians; ours / the row named.",
        "",
    ]
    compare = {
        L1: [(OURS_SYNC, "vs sync"), (CASHEWS_MEM, "vs cashews mem"), (NOOP, "vs await noop")],
        L2: [(OURS_SYNC, "vs sync"), (CASHEWS_REDIS, "vs cashews redis"), (RAW_GET, "vs GET")],
    }
    for group in (L1, L2):
        rows = data.get(group, {})
        if not rows:
            continue
        out += [f"#### {group}", "", "| row | min ns | median ns |", "| --- | ---: | ---: |"]
        for name, r in rows.items():
            out.append(f"| {name} | {r['min']:.0f} | {r['median']:.0f} |")
        out.append("")
        for other, label in compare[group]:
            out.append(
                f"- {OURS_ASYNC} {label}: {_ratio(rows, OURS_ASYNC, other, 'median')} "
                f"(min: {_ratio(rows, OURS_ASYNC, other, 'min')})"
            )
        out.append("")
    return out


report.register_section(SECTION, order=35, title="asyncio", render=_render)

"""AsyncTieredCache against the sync driver and cashews, side by side in one run (issue 9):

1. L1 hit: ``await cache.get(k)`` (10,000 str keys, all in the local tier) vs the sync
   ``TieredCache.get(k)``, cashews' in-memory backend ``await cache.get(k)``, and an empty
   ``await noop(k)`` (the floor of any awaited call).
2. L2 hit (L1 miss): ``await cache.get(k)`` with a local tier smaller than the key set read in
   cyclic order (every read misses and goes to Redis, as in bench/test_tiered.py) vs the sync
   TieredCache doing the same, a raw ``redis.asyncio`` GET, and cashews' Redis backend
   ``await cache.get(k)``.

Method: a row's round is a pass over the keys inside one coroutine (``for k in keys: await
...``), run by ``loop.run_until_complete`` (the sync rows: the same loop without awaits).
pytest-benchmark runs the group's rounds; each round times one round of every row in turn
(rotating the order), so all rows of a group see the same moments of a shared machine. ns/op =
a row's round time / keys; the report gives min and median per row and their ratios. One
private ``redis-server`` on loopback. No timing assertions.
"""

from __future__ import annotations

import asyncio
import gc
import time
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


class Rows:
    """The rows of one group: each a round function, timed in turn within every round."""

    def __init__(self, group: str, n: int) -> None:
        self.group = group
        self.n = n
        self.rounds: dict[str, Callable[[], Any]] = {}
        self.samples: dict[str, list[float]] = {}

    def add(self, name: str, one_round: Callable[[], Any]) -> None:
        self.rounds[name] = one_round
        self.samples[name] = []

    def run_all(self) -> None:
        """One round of every row, in an order rotated each time (no row always first)."""
        names = list(self.rounds)
        k = len(self.samples[names[0]]) % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            self.rounds[name]()
            self.samples[name].append(time.perf_counter() - t0)

    def record(self, warmup: int) -> None:
        out = ROWS.setdefault(self.group, {})
        for name, xs in self.samples.items():
            xs = sorted(xs[warmup:])
            out[name] = {"min": xs[0] / self.n * 1e9, "median": xs[len(xs) // 2] / self.n * 1e9}
        if not any(r is ROWS for r in report.SECTIONS[SECTION].rows):
            report.record(SECTION, ROWS)


def _time(benchmark: Any, rows: Rows) -> None:
    """Rounds of every row in turn (pytest-benchmark times the whole; the report each row), so
    the rows see the same moments of a shared machine."""
    benchmark.group = f"async: {rows.group}"
    benchmark.extra_info["ops_per_round"] = rows.n * len(rows.rounds)
    l2 = rows.group == L2
    warmup = 1 if l2 else 2
    gc.collect()
    benchmark.pedantic(rows.run_all, rounds=L2_ROUNDS if l2 else ROUNDS, warmup_rounds=warmup)
    if getattr(benchmark, "stats", None) is not None:  # (None: --benchmark-disable)
        rows.record(warmup)


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
    """A cashews Cache on ``url``, or None (noted in the report) when cashews is missing."""
    try:
        from cashews import Cache
    except ImportError as exc:
        report.skipped(SECTION, f"cashews rows ({exc})")
        return None
    c = Cache()
    c.setup(url)
    return c


async def _fill(set_: Callable[[Any, Any], Awaitable[Any]], keys: list[Any]) -> None:
    for k in keys:
        await set_(k, VALUE)


# -- 1. L1 hit ------------------------------------------------------------------------------------


def test_l1_hit(benchmark: Any, tc: Any, server: Any, loop: Any) -> None:
    rows = Rows(L1, N_KEYS)

    async def noop(k: Any) -> Any:
        return k

    rows.add(NOOP, _awaiting(loop, noop, KEYS))
    sync = _sync_cache(tc, server.url, "bench-async-l1s", local_maxsize=N_KEYS * 2)
    ours = loop.run_until_complete(
        _async_cache(tc, server.url, "bench-async-l1a", local_maxsize=N_KEYS * 2)
    )
    cw = _cashews("mem://?size=20000")
    try:
        for k in KEYS:
            sync[k] = VALUE
        loop.run_until_complete(_fill(ours.set, KEYS))
        rows.add(OURS_SYNC, _calling(sync.get, KEYS))
        rows.add(OURS_ASYNC, _awaiting(loop, ours.get, KEYS))
        if cw is not None:
            loop.run_until_complete(_fill(cw.set, KEYS))
            rows.add(CASHEWS_MEM, _awaiting(loop, cw.get, KEYS))
        _time(benchmark, rows)
        assert sync.stats()["remote_hits"] == 0 and ours.stats()["remote_hits"] == 0, (
            "an L1 round went to Redis"
        )
    finally:
        sync.clear()
        sync.close()
        loop.run_until_complete(ours.aclose())
        if cw is not None:
            loop.run_until_complete(cw.close())


# -- 2. L2 hit -----------------------------------------------------------------------------------


def test_l2_hit(benchmark: Any, tc: Any, server: Any, loop: Any) -> None:
    import redis.asyncio as aioredis

    rows = Rows(L2, len(L2_KEYS))
    client = aioredis.Redis.from_url(server.url)
    sync = _sync_cache(tc, server.url, "bench-async-l2s", local_maxsize=L2_LOCAL)
    ours = loop.run_until_complete(
        _async_cache(tc, server.url, "bench-async-l2a", local_maxsize=L2_LOCAL)
    )
    cw = _cashews(server.url)
    try:
        raw_names = [f"raw:{k}" for k in L2_KEYS]
        for name in raw_names:
            loop.run_until_complete(client.set(name, b"x" * 60))
        rows.add(RAW_GET, _awaiting(loop, client.get, raw_names))
        for k in L2_KEYS:
            sync[k] = VALUE
        rows.add(OURS_SYNC, _calling(sync.get, L2_KEYS))
        loop.run_until_complete(_fill(ours.set, L2_KEYS))
        rows.add(OURS_ASYNC, _awaiting(loop, ours.get, L2_KEYS))
        if cw is not None:
            cw_names = [f"cw:{k}" for k in L2_KEYS]
            loop.run_until_complete(_fill(cw.set, cw_names))
            rows.add(CASHEWS_REDIS, _awaiting(loop, cw.get, cw_names))
        before = (sync.stats()["remote_hits"], ours.stats()["remote_hits"])
        _time(benchmark, rows)
        after = (sync.stats()["remote_hits"], ours.stats()["remote_hits"])
        assert after[0] > before[0] and after[1] > before[1], "the L2 rounds did not reach Redis"
    finally:
        sync.clear()
        sync.close()
        loop.run_until_complete(ours.clear())
        loop.run_until_complete(ours.aclose())
        loop.run_until_complete(client.delete(*[f"raw:{k}" for k in L2_KEYS]))
        loop.run_until_complete(client.aclose())
        if cw is not None:
            loop.run_until_complete(cw.clear())
            loop.run_until_complete(cw.close())


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

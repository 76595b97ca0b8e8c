"""The cost of a tag invalidation (issue 10), for 1,000 and 10,000 keys with the tag.

On a private ``redis-server``, two caches of one namespace: ``a`` writes the keys with the tag and
calls ``invalidate_tag``; ``b`` has read every key, so its local tier holds them all and must
drop them when the invalidation message arrives. Per size, over a few repetitions (medians):

* ``invalidate_tag`` as the caller sees it (one Lua script per partition, whatever the size);
* ``b``'s handling of the message: dropping its local copies with the tag (O(local copies));
* the alternative design, a Redis set of keys per tag (``SADD`` on every write), invalidated by
  ``SMEMBERS`` + ``UNLINK`` in batches of 500: raw redis-py, the same keys;
* what tags cost elsewhere: a write with one tag vs without, an L2 hit of a tagged value (its tag
  version known) vs an untagged one, per call, µs (p50).

No timing assertions: the report shows the figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import harness
import pytest
import report

BENCH_ORDER = 45
SECTION = "tags"
QUICK = harness.QUICK
SIZES = (1_000, 10_000)
REPS = {1_000: 2 if QUICK else 7, 10_000: 1 if QUICK else 3}
N_CALLS = 300 if QUICK else 2_000
OPTIONS: dict[str, Any] = {
    "socket_timeout": 1.0,
    "connect_timeout": 1.0,
    "local_maxsize": 20_000,
    "health_timeout": 5.0,
}


@pytest.fixture(scope="module")
def server(tc: Any) -> Iterator[Any]:
    from tiercache.server import RedisServer

    try:
        srv = RedisServer().start()
    except Exception as exc:
        report.skipped(SECTION, f"all rows ({exc})")
        pytest.skip(f"no Redis server: {exc}")
    with srv:
        yield srv


def _cache(tc: Any, srv: Any, **kw: Any) -> Any:
    c = tc.TieredCache(srv.url, namespace="bench-tags", ttl=600.0, **{**OPTIONS, **kw})
    if not c.wait_ready(10.0):
        c.close()
        raise RuntimeError("TieredCache: listener not ready")
    return c


def _fill(cache: Any, keys: list[str], *tags: str) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: cache.set(k, k, tags=tags), keys))


@pytest.mark.parametrize("size", SIZES)
def test_invalidate_tag_cost(tc: Any, server: Any, size: int) -> None:
    from tiercache.keys import encode_key

    a = _cache(tc, server)
    b = _cache(tc, server)
    raw = server.client()
    handled: list[tuple[float, int]] = []
    original = b._tag_invalidated

    def timed(key: bytes, version: int | None) -> None:  # b's handling of the G message
        before = len(b.local)
        start = time.perf_counter()
        original(key, version)
        handled.append((time.perf_counter() - start, before - len(b.local)))

    b._tag_invalidated = timed
    calls, drops, dropped, sets, pings, colds = [], [], [], [], [], []
    try:
        for rep in range(REPS[size]):
            tag = f"group:{size}:{rep}"
            keys = [f"k:{size}:{rep}:{i}" for i in range(size)]
            _fill(a, keys, tag, tag + ":cold")
            start = time.perf_counter()
            a.invalidate_tag(tag + ":cold")  # N keys with the tag, no local copy anywhere
            colds.append(time.perf_counter() - start)
            _fill(a, keys, tag)
            b.get_many(keys)  # learns the tag, then every key enters b's local tier
            b.get_many(keys)
            assert sum(1 for k in keys if b.local.entry(k) is not None) == size
            handled.clear()
            start = time.perf_counter()
            raw.ping()  # a bare round trip, in the same conditions
            pings.append(time.perf_counter() - start)
            start = time.perf_counter()
            a.invalidate_tag(tag)
            calls.append(time.perf_counter() - start)
            deadline = time.monotonic() + 30
            while not handled and time.monotonic() < deadline:
                time.sleep(0.001)
            assert handled, "b never handled the invalidation"
            drops.append(handled[0][0])
            dropped.append(handled[0][1])
            assert all(b.get(k) is None for k in keys[:100])
            # The alternative: a set of keys per tag, unlinked in batches.
            names = [a._keys.value(encode_key(k)) for k in keys]
            set_key = f"bench-tags:set:{tag}"
            for i in range(0, size, 1000):
                raw.sadd(set_key, *names[i : i + 1000])
            raw.mset({n: b"x" for n in names})
            start = time.perf_counter()
            members = list(raw.smembers(set_key))
            for i in range(0, len(members), 500):
                raw.unlink(*members[i : i + 500])
            raw.unlink(set_key)
            sets.append(time.perf_counter() - start)
    finally:
        a.close()
        b.close()
        raw.close()
    report.record(
        SECTION,
        {
            "part": "invalidate",
            "size": size,
            "reps": REPS[size],
            "call_ms": statistics.median(calls) * 1000,
            "drop_ms": statistics.median(drops) * 1000,
            "dropped": statistics.median(dropped),
            "set_ms": statistics.median(sets) * 1000,
            "ping_ms": statistics.median(pings) * 1000,
            "cold_ms": statistics.median(colds) * 1000,
        },
    )


def test_tagged_write_and_read_cost(tc: Any, server: Any) -> None:
    a = _cache(tc, server)
    b = _cache(tc, server, local_maxsize=10)  # reads reach Redis
    rows: dict[str, list[int]] = {"set": [], "set+tag": [], "hit": [], "hit+tag": []}
    clock = time.perf_counter_ns
    try:
        for i in range(N_CALLS):  # alternate, so machine noise hits both rows alike
            for name, tags in (("set", None), ("set+tag", ("t",))):
                start = clock()
                a.set(f"{name}:{i}", i, tags=tags)
                rows[name].append(clock() - start)
        b.get("set+tag:0")  # learns the tag's version
        for i in range(N_CALLS):
            for name, key in (("hit", f"set:{i}"), ("hit+tag", f"set+tag:{i}")):
                start = clock()
                assert b.get(key) == i
                rows[name].append(clock() - start)
    finally:
        a.close()
        b.close()
    report.record(
        SECTION,
        {"part": "calls", **{k: statistics.median(v) / 1000 for k, v in rows.items()}},
    )


def _render(rows: list[dict[str, Any]]) -> list[str]:
    out = ["### Tags: invalidation cost (issue 10)", ""]
    inv = sorted((r for r in rows if r["part"] == "invalidate"), key=lambda r: r["size"])
    if inv:
        out += [
            "Median over the repetitions. `invalidate_tag` = the call (one Lua script: the tag's "
            "version raised, the message published). Local drop = another process' handling of "
            "the message, dropping its local copies with the tag. Set + UNLINK = the other "
            "design (a Redis set of keys per tag): SMEMBERS then UNLINK in batches of 500, raw "
            "redis-py, for the same keys.",
            "",
            "PING = a bare redis-py round trip just before each call. Both caches live in this "
            "process, so the call's time can include the other cache's drop (the GIL).",
            "",
            "Cold = `invalidate_tag` of a tag the same keys carry while no process holds a local "
            "copy (the Redis side alone); warm = while the other cache holds them all.",
            "",
            "| keys with the tag | reps | PING ms | `invalidate_tag` cold ms | warm ms "
            "| local drop ms (copies) | set + UNLINK ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in inv:
            out.append(
                f"| {r['size']:,} | {r['reps']} | {r['ping_ms']:.2f} | {r['cold_ms']:.2f} "
                f"| {r['call_ms']:.2f} "
                f"| {r['drop_ms']:.2f} "
                f"({r['dropped']:,.0f}) | {r['set_ms']:.2f} |"
            )
        out.append("")
    for r in rows:
        if r["part"] == "calls":
            out += [
                f"Per call, µs (p50 of {N_CALLS:,}): write without tag {r['set']:.1f}, with one "
                f"tag {r['set+tag']:.1f}; L2 hit untagged {r['hit']:.1f}, tagged (tag version "
                f"known) {r['hit+tag']:.1f}.",
                "",
            ]
    return out


report.register_section(SECTION, order=45, title="Tags", render=_render)

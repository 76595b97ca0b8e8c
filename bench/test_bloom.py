"""The negative filter (tiercache.bloom, SPEC 3.8): what a full miss costs with it, what it saves.

Both backends, each on its own private server: RedisBloom (``--loadmodule redisbloom.so``; its rows
are skipped when the module is not installed) and the pure-Redis bitmap fallback ("lua", a server
without the module).

1. A full miss, per-call latency (perf_counter_ns, the rows of one backend alternating in blocks):
   a raw redis-py ``GET`` of a missing key; the same GET pipelined with the filter's check (what
   the cache sends when the filter is on: the probe's extra cost); ``cache.get(k)`` of an absent
   key without a filter and without a loader (a plain GET miss through the cache);
   ``cache.get(k)`` with a loader and the filter answering "absent" (the loader is skipped);
   ``cache.get(k)`` with a loader and no filter (lease, loader, store of the absence: each key read
   once, so no cached absence helps). And an L2 hit (local tier too small to hold the keys) with
   and without the filter: the check goes with every Redis read, hits included.
2. Origin calls avoided on a workload of 50% absent keys: 5,000 keys exist (warmed into the
   filter), 5,000 do not, all read once in a shuffled order through ``cache.get`` with a loader,
   with and without the filter: loader calls, false positives, µs per read (the loader is a dict
   lookup; a derived column adds 1 ms per loader call, a modest database query).

No timing assertions: the report shows the figures.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import harness
import pytest
import report

BENCH_ORDER = 35
SECTION = "bloom"
QUICK = harness.QUICK

N_LAT = 1_000 if QUICK else 5_000  # timed calls per row
BLOCK = 100
N_WORK = 1_000 if QUICK else 5_000  # existing keys, and as many absent ones, in the workload
CAPACITY = 20_000
CLIENT_KW = {"socket_timeout": 0.5, "connect_timeout": 0.5, "retries": 1}

ROWS = [
    ("raw", "raw `GET` (missing key)"),
    ("raw+probe", "raw pipeline: `GET` + filter check"),
    ("plain", "`cache.get(k)`, no filter, no loader (GET miss)"),
    ("filtered", "`cache.get(k)`, loader, filter says absent"),
    ("loaded", "`cache.get(k)`, loader, no filter (lease + load + store absence)"),
    ("hit", "`cache.get(k)` L2 hit (L1 miss), no filter"),
    ("hit+probe", "`cache.get(k)` L2 hit (L1 miss), filter on (the check rides along)"),
]
ORIGIN_MS = 1.0  # the derived column: what each loader call would add at this origin latency
HIT_KEYS = 2_000


def pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


@pytest.fixture(scope="module", params=["redisbloom", "lua"])
def server(request: pytest.FixtureRequest, tc: Any) -> Iterator[Any]:
    from tiercache.server import RedisServer, find_redisbloom

    backend = request.param
    if backend == "redisbloom" and find_redisbloom() is None:
        report.skipped(SECTION, "RedisBloom rows (module not installed)")
        pytest.skip("RedisBloom module not installed")
    try:
        srv = RedisServer(bloom=backend == "redisbloom").start()
    except Exception as exc:
        report.skipped(SECTION, f"{backend} rows ({exc})")
        pytest.skip(f"no Redis server: {exc}")
    srv.backend = backend  # type: ignore[attr-defined]
    with srv:
        yield srv


def _cache(tc: Any, srv: Any, namespace: str, **kw: Any) -> Any:
    c = tc.TieredCache(srv.url, namespace=namespace, **CLIENT_KW, **kw)
    if not c.wait_ready(10.0):
        c.close()
        raise RuntimeError(f"TieredCache {namespace!r}: listener not ready")
    return c


def _never(key: Any) -> Any:
    raise KeyError(key)


def test_full_miss_latency(tc: Any, server: Any) -> None:
    from tiercache.bloom import BloomConfig
    from tiercache.keys import KeySpace, encode_key

    backend = server.backend
    bloom = BloomConfig(CAPACITY)
    filtered = _cache(tc, server, "bench-bf", bloom=bloom, loader=_never)
    plain = _cache(tc, server, "bench-plain")
    loaded = _cache(tc, server, "bench-load", loader=_never)
    hits = [f"hit:{i}" for i in range(HIT_KEYS)]
    hit_plain = _cache(tc, server, "bench-hit", local_maxsize=10, loader=_never)
    hit_bloom = _cache(tc, server, "bench-hit", local_maxsize=10, loader=_never, bloom=bloom)
    made = (filtered, plain, loaded, hit_plain, hit_bloom)
    try:
        for k in hits:
            hit_plain[k] = 1
        f = filtered.bloom
        f.warm(f"present:{i}" for i in range(CAPACITY // 2))
        assert f.backend == backend and f.complete
        absent = [f"absent:{i}" for i in range(N_LAT + 400)]
        once = iter([f"once:{i}" for i in range(N_LAT + 400)])
        names = [KeySpace("bench-bf").value(encode_key(k)) for k in absent]
        client = filtered.redis
        get = client.get
        probe = f.probe(encode_key(absent[0]))
        assert probe is not None

        def raw_probe(i: int) -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.get(names[i])
            pipe.execute_command(*probe)
            return pipe.execute(raise_on_error=False)

        calls: dict[str, Callable[[int], Any]] = {
            "raw": lambda i: get(names[i]),
            "raw+probe": raw_probe,
            "plain": lambda i: plain.get(absent[i]),
            "filtered": lambda i: filtered.get(absent[i]),
            "loaded": lambda i: loaded.get(next(once)),
            "hit": lambda i: hit_plain.get(hits[i % HIT_KEYS]),
            "hit+probe": lambda i: hit_bloom.get(hits[(i + HIT_KEYS // 2) % HIT_KEYS]),
        }
        times: dict[str, list[int]] = {name: [] for name in calls}
        clock = time.perf_counter_ns
        for i in range(200):  # warm-up (not on the keys timed by "loaded")
            for fn in calls.values():
                fn(N_LAT + i)
        avoided0 = f.stats()["loads_avoided"]
        order = list(calls)
        for b, start in enumerate(range(0, N_LAT, BLOCK)):
            for name in order if b % 2 == 0 else reversed(order):
                fn, out = calls[name], times[name]
                for i in range(start, min(N_LAT, start + BLOCK)):
                    t0 = clock()
                    fn(i)
                    out.append(clock() - t0)
        avoided = f.stats()["loads_avoided"] - avoided0
        remote = [c.stats()["remote_hits"] for c in (hit_plain, hit_bloom)]
        client.config_resetstat()
        for i in range(2_000):
            raw_probe(i % N_LAT)
        stat = client.info("commandstats").get("cmdstat_evalsha_ro")
        report.record(
            SECTION,
            {
                "part": "latency",
                "backend": backend,
                "times": times,
                "server_us": None if stat is None else float(stat["usec_per_call"]),
                "check": (
                    f"{avoided:,} of {N_LAT:,} filtered reads skipped the loader; L2 hits "
                    f"counted: {remote[0]:,} / {remote[1]:,} (no filter / filter)"
                ),
            },
        )
    finally:
        for c in made:
            c.close()


def test_origin_calls_avoided(tc: Any, server: Any) -> None:
    from tiercache.bloom import BloomConfig

    backend = server.backend
    present = [f"present:{i}" for i in range(N_WORK)]
    absent = [f"absent:{i}" for i in range(N_WORK)]
    truth = dict.fromkeys(present, 1)
    workload = present + absent
    random.Random(5).shuffle(workload)
    for with_filter in (False, True):
        calls = {"present": 0, "absent": 0}

        def loader(key: str, calls: dict[str, int] = calls) -> Any:
            calls["present" if key in truth else "absent"] += 1
            return truth[key]

        kw: dict[str, Any] = {"loader": loader}
        if with_filter:
            kw["bloom"] = BloomConfig(N_WORK * 2)
        ns = f"bench-work-{int(with_filter)}"
        cache = _cache(tc, server, ns, **kw)
        try:
            if with_filter:
                cache.bloom.warm(present)
            t0 = time.perf_counter()
            for key in workload:
                cache.get(key)
            elapsed = time.perf_counter() - t0
            stats = cache.bloom.stats() if with_filter else {}
        finally:
            cache.close()
        report.record(
            SECTION,
            {
                "part": "workload",
                "backend": backend,
                "filter": with_filter,
                "reads": len(workload),
                "present_loads": calls["present"],
                "absent_loads": calls["absent"],
                "us_per_read": elapsed / len(workload) * 1e6,
                "false_positives": stats.get("false_positives"),
                "avoided": stats.get("loads_avoided"),
            },
        )


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _render(rows: list[dict[str, Any]]) -> list[str]:
    out = ["### Negative filter (SPEC 3.8)", ""]
    lat = [r for r in rows if r["part"] == "latency"]
    if lat:
        out += [
            "#### A full miss, per-call latency, µs",
            "",
            f"{N_LAT:,} calls per row, the rows of one backend alternating in blocks of {BLOCK} "
            "calls; x GET = the row / raw GET at the same percentile. Extra = the row's p50 minus "
            "the raw GET's: the pipelined check costs the difference between the first two rows. "
            "Server µs: Redis `INFO commandstats` for the check script (EVALSHA_RO) alone.",
            "",
            "| backend | row | p50 | p99 | x GET p50 | x GET p99 | extra p50 µs |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in lat:
            t = r["times"]
            raw50, raw99 = pct(t["raw"], 50), pct(t["raw"], 99)
            for key, label in ROWS:
                p50, p99 = pct(t[key], 50), pct(t[key], 99)
                out.append(
                    f"| {r['backend']} | {label} | {_f(p50 / 1e3)} | {_f(p99 / 1e3)} | "
                    f"{p50 / raw50:.2f} | {p99 / raw99:.2f} | {_f((p50 - raw50) / 1e3)} |"
                )
        out.append("")
        out += [
            f"- {r['backend']}: server time of the check {_f(r['server_us'], 2)} µs/call; "
            f"{r['check']}"
            for r in lat
        ]
        out.append("")
    work = [r for r in rows if r["part"] == "workload"]
    if work:
        out += [
            f"#### Origin calls on a workload of 50% absent keys ({N_WORK:,} + {N_WORK:,} keys, "
            "each read once, shuffled)",
            "",
            "| backend | filter | loader calls (existing) | loader calls (absent) | absent "
            "calls avoided | false positives | µs per read | "
            f"µs per read, {ORIGIN_MS:g} ms origin |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in work:
            saved = 1 - r["absent_loads"] / N_WORK
            loads = r["present_loads"] + r["absent_loads"]
            with_origin = r["us_per_read"] + loads * ORIGIN_MS * 1e3 / r["reads"]
            out.append(
                f"| {r['backend']} | {'on' if r['filter'] else 'off'} | {r['present_loads']:,} "
                f"| {r['absent_loads']:,} | {saved:.1%} | "
                f"{'' if r['false_positives'] is None else format(r['false_positives'], ',')} | "
                f"{_f(r['us_per_read'])} | {_f(with_origin)} |"
            )
        out += [
            "",
            "Without the filter every absent key costs a loader call (and a lease and a stored "
            "absence); with it, only its false positives do (configured rate 1%, the filter "
            f"sized for {2 * N_WORK:,} keys). With the filter, each load that finds a key also "
            "registers it (one more round trip), which is why the reads cost more when the "
            "origin is free; the last column adds the origin's latency per loader call.",
            "",
        ]
    return out


report.register_section(SECTION, order=35, title="Negative filter", render=_render)

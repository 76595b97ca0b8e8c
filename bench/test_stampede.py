"""Origin calls under a stampede, with and without each protection (SPEC 3.7, issue 4).

P worker processes x T caller threads (spawned, ``bench/stampede_procs.py``) on one private
``redis-server``; the origin (loader) sleeps ``LOADER_S`` and counts each call in a Redis hash,
so calls are counted across processes, background refreshes included.

1. Cold keys: every caller asks for the same ``K`` cold keys, in the same order, all starting
   at the same moment (every key is a stampede). Rows: plain cache-aside on a redis-py client
   (GET, else load + SET PX: no protection); the same with in-process single-flight
   (``tiercache.stampede.SingleFlight`` around the load) in one process with P x T threads, and in
   P processes; ``TieredCache.get_or_load`` (single-flight + the distributed fill lease).
2. Hot keys expiring all at once: ``K`` keys loaded together with ``ttl=TTL`` (no jitter); the
   callers read them round-robin, paced, from just after the load until past their expiry.
   Rows: plain cache-aside; ``get_or_load`` with the lease only (``stale_ttl=0,
   xfetch_beta=0``); with stale-while-revalidate (``stale_ttl``); with XFetch
   (``xfetch_beta=1``, δ = the measured load time); with both.

Per row: origin calls per key per stampede (mean and max over keys and repetitions) and the
callers' latency (each call timed, p50/p99/max). No assertions: the report shows the figures.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import harness
import pytest
import report
import stampede_procs

BENCH_ORDER = 40
SECTION = "stampede"
QUICK = harness.QUICK

PROCS = 4
THREADS = 4 if QUICK else 8
K_COLD = 5 if QUICK else 10
K_HOT = 5 if QUICK else 10
REPS = 1 if QUICK else 3
LOADER_S = 0.05  # the origin's latency
TTL = 2.0  # hot keys: seconds fresh (an early refresh's next horizon starts after the window)
STALE_TTL = 10.0  # the SWR rows: served stale this long after expiry, while one refresh runs
TAIL = 0.5  # hot keys: the callers read this long past the expiry
PACE_S = 0.002  # hot keys: a caller's pause between two reads
SLOW_NS = 10_000_000  # a call that waited for the origin (or a lease holder)

COLD_ROWS = [
    # (id, label, mode, processes, threads per process, TieredCache options)
    ("aside", "no protection: plain cache-aside (redis-py GET, else load + SET PX)", "aside",
     PROCS, THREADS, {}),
    ("sf-1", "in-process single-flight only (`SingleFlight` around the load), one process",
     "sf_aside", 1, PROCS * THREADS, {}),
    ("sf-n", f"in-process single-flight only, {PROCS} processes", "sf_aside", PROCS, THREADS, {}),
    ("lease", "`get_or_load`: single-flight + distributed lease", "tiered", PROCS, THREADS, {}),
]  # fmt: skip
HOT_ROWS = [
    ("aside", "no protection: plain cache-aside (GET, else load + SET PX)", "aside",
     PROCS, THREADS, {}),
    ("lease", "`get_or_load`, lease only (`stale_ttl=0, xfetch_beta=0`)", "tiered",
     PROCS, THREADS, {"stale_ttl": 0.0, "xfetch_beta": 0.0}),
    ("swr", f"+ SWR (`stale_ttl={STALE_TTL:g}, xfetch_beta=0`)", "tiered",
     PROCS, THREADS, {"stale_ttl": STALE_TTL, "xfetch_beta": 0.0}),
    ("xfetch", "+ XFetch (`stale_ttl=0, xfetch_beta=1`)", "tiered",
     PROCS, THREADS, {"stale_ttl": 0.0, "xfetch_beta": 1.0}),
    ("both", f"+ SWR + XFetch (`stale_ttl={STALE_TTL:g}, xfetch_beta=1`)", "tiered",
     PROCS, THREADS, {"stale_ttl": STALE_TTL, "xfetch_beta": 1.0}),
]  # fmt: skip

mono = time.monotonic


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tc):
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
def workers(server):
    ws = [stampede_procs.Worker(server.url, i) for i in range(PROCS)]
    try:
        yield ws
    finally:
        for w in ws:
            w.close()


@pytest.fixture(scope="module")
def counter(server):
    import redis

    client = redis.Redis.from_url(server.url, **stampede_procs.CLIENT_KW)
    try:
        yield client
    finally:
        client.close()


# -- one row --------------------------------------------------------------------------------------


def _preload(url: str, spec: dict[str, Any], counter: Any) -> float:
    """Load the hot keys together (one thread per key); the monotonic time they were loaded."""
    keys, ttl = spec["keys"], spec["ttl"]
    loader = stampede_procs.make_loader(counter, spec["count_key"] + ":preload", spec["loader_s"])
    if spec["mode"] == "aside":
        pipe = counter.pipeline(transaction=False)
        for k in keys:
            pipe.set(spec["namespace"] + ":" + k, f"value of {k}", px=int(ttl * 1000))
        t = mono()
        pipe.execute()
        return t
    cache = stampede_procs.make_cache(url, spec["namespace"], spec["cache_kw"])
    try:
        t0 = mono()
        threads = [threading.Thread(target=cache.get_or_load, args=(k, loader, ttl)) for k in keys]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30.0)
        return t0 + spec["loader_s"]  # about when the fills landed
    finally:
        cache.close()


def _run_row(
    url: str, workers: list[Any], counter: Any, workload: str, row: tuple, rep: int
) -> dict[str, Any]:
    rid, _, mode, procs, threads, cache_kw = row
    ns = f"bench-st-{workload}-{rid}-{rep}-{secrets.token_hex(3)}"
    k = K_COLD if workload == "cold" else K_HOT
    spec = {
        "mode": mode,
        "workload": workload,
        "namespace": ns,
        "count_key": f"bench-stampede:origin:{ns}",
        "keys": [f"{workload}:{i:03d}" for i in range(k)],
        "threads": threads,
        "loader_s": LOADER_S,
        "ttl": TTL if workload == "hot" else 60.0,
        "pace_s": PACE_S,
        "cache_kw": cache_kw,
    }
    used = workers[:procs]
    for w in used:
        w.send("prepare", spec)
    for w in used:
        assert w.reply(60.0) == "ready"
    if workload == "hot":
        loaded = _preload(url, spec, counter)
        start_at = mono() + 0.05
        end_at = loaded + TTL + TAIL
    else:
        start_at = end_at = mono() + 0.1
    for w in used:
        w.send("go", start_at, end_at)
    results = [w.reply() for w in used]
    counts = {kk.decode(): int(v) for kk, v in counter.hgetall(spec["count_key"]).items()}
    stats: dict[str, int] = {}
    for r in results:
        for name, v in r["stats"].items():
            stats[name] = stats.get(name, 0) + v
    return {
        "per_key": [counts.get(key, 0) for key in spec["keys"]],
        "lat": [x for r in results for x in r["lat"]],
        "errors": sum(r["n_errors"] for r in results),
        "error_sample": next((e for r in results for e in r["errors"]), ""),
        "stuck": sum(r["stuck"] for r in results),
        "stats": stats,
    }


def _record(workload: str, row: tuple, runs: list[dict[str, Any]], wall: float) -> None:
    rid, label, _, procs, threads, _ = row
    per_key = [c for r in runs for c in r["per_key"]]
    lat = [x for r in runs for x in r["lat"]]
    stats: dict[str, int] = {}
    for r in runs:
        for name, v in r["stats"].items():
            stats[name] = stats.get(name, 0) + v
    report.record(
        SECTION,
        {
            "workload": workload,
            "id": rid,
            "label": label,
            "callers": f"{procs} x {threads}",
            "origin_total": sum(per_key),
            "events": len(per_key),
            "per_key_mean": sum(per_key) / len(per_key) if per_key else 0.0,
            "per_key_max": max(per_key, default=0),
            "per_key_min": min(per_key, default=0),
            "calls": len(lat),
            "p50": _pct(lat, 50) / 1e6 if lat else None,
            "p99": _pct(lat, 99) / 1e6 if lat else None,
            "max": max(lat) / 1e6 if lat else None,
            "slow": sum(x >= SLOW_NS for x in lat),
            "errors": sum(r["errors"] for r in runs),
            "error_sample": next((r["error_sample"] for r in runs if r["error_sample"]), ""),
            "stuck": sum(r["stuck"] for r in runs),
            "stats": stats,
            "wall": wall,
        },
    )


def _pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


@pytest.mark.parametrize(
    ("workload", "row"),
    [("cold", r) for r in COLD_ROWS] + [("hot", r) for r in HOT_ROWS],
    ids=lambda x: x if isinstance(x, str) else x[0],
)
def test_stampede(server, workers, counter, workload: str, row: tuple) -> None:
    t0 = mono()
    runs = [_run_row(server.url, workers, counter, workload, row, rep) for rep in range(REPS)]
    _record(workload, row, runs, mono() - t0)


# -- the report section ---------------------------------------------------------------------------


def _f(x: float | None, d: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{d}f}"


def _table(rows: list[dict[str, Any]], event: str) -> list[str]:
    out = [
        f"| row | callers (procs x threads) | origin calls | per key per {event}: mean "
        "(min-max) | caller p50 ms | p99 ms | max ms | calls ≥ 10 ms | tiercache stats (all "
        "processes) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        st = r["stats"]
        info = ", ".join(
            f"{name} {st[name]:,}"
            for name in (
                "loads",
                "refreshes",
                "stale_fills_rejected",
                "stale_served",
                "lease_timeouts",
            )
            if name in st
        )
        if r["errors"] or r["stuck"]:
            info += f"; **{r['errors']} errors, {r['stuck']} stuck callers** {r['error_sample']}"
        out.append(
            f"| {r['label']} | {r['callers']} | {r['origin_total']:,} | "
            f"{r['per_key_mean']:.2f} ({r['per_key_min']}-{r['per_key_max']}) | "
            f"{_f(r['p50'], 3)} | {_f(r['p99'], 3)} | {_f(r['max'], 1)} | "
            f"{r['slow']:,} / {r['calls']:,} | {info or '—'} |"
        )
    return out


def _render(rows: list[dict[str, Any]]) -> list[str]:
    impl, _ = report.implementation()
    cold = [r for r in rows if r["workload"] == "cold"]
    hot = [r for r in rows if r["workload"] == "hot"]
    out = [
        "### Stampede: origin calls with and without each protection",
        "",
        f"Callers: {PROCS} spawned worker processes x threads, one private `redis-server` on "
        f"loopback; the origin sleeps {LOADER_S * 1e3:.0f} ms and counts each call in a Redis "
        f"hash (HINCRBY before it sleeps), so calls are counted across processes, background "
        f"refreshes included. {REPS} repetition(s) per row, fresh keys each time; latency = "
        "each call, timed in its caller (all calls of all repetitions). tiercache: "
        f"{impl}. Shared 2-core machine: {PROCS} processes and the server share the cores, so "
        "latencies include scheduling delays (a loaded origin call is ~"
        f"{LOADER_S * 1e3:.0f} ms); the origin-call counts are the figures to read.",
        "",
    ]
    if cold:
        out += [
            f"#### Cold keys: every caller asks for the same {K_COLD} cold keys at once",
            "",
            "Each caller thread asks for the keys in the same order, all starting at one moment "
            "(CLOCK_MONOTONIC across processes), so each key is a stampede of every caller.",
            "",
            *_table(cold, "stampede"),
            "",
        ]
    if hot:
        out += [
            f"#### Hot keys expiring all at once ({K_HOT} keys, ttl {TTL:g} s, no jitter)",
            "",
            f"The keys are loaded together (one thread per key), then every caller reads them "
            f"round-robin with a {PACE_S * 1e3:g} ms pause between reads, from just after the "
            f"load to {TAIL:g} s past their expiry: one expiry of every key. TieredCache rows "
            "serve most reads from each process' local tier (local copies stop at the expiry, "
            "or ln(1000)·β·δ before it with XFetch, so reads near the expiry reach Redis).",
            "",
            *_table(hot, "expiry"),
            "",
        ]
    out += [
        "Reading the table: *origin calls* = loader calls during the stampede (the hot rows' "
        "initial load is not counted); *calls ≥ 10 ms* = calls that waited for an origin call "
        "(their own or a lease holder's), or for the machine. tiercache stats: `loads` = loader "
        "calls this cache made (incl. background refreshes), `lease_timeouts` = waits for "
        "another process' fill that ran out, `stale_served` = reads answered with the expired "
        "value while a refresh ran, `refreshes` = background refreshes stored, "
        "`stale_fills_rejected` = loaded values not stored because the key had changed meanwhile "
        "(e.g. a refresh of a version another process had already refreshed).",
        "",
        f"Wall time: {sum(r['wall'] for r in rows):.0f} s for {len(rows)} rows.",
        "",
    ]
    return out


report.register_section(SECTION, order=40, title="stampede", render=_render)

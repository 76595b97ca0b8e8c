"""Write-behind throughput vs write-through (issue 10), side by side in one run.

One process, one private ``redis-server``; an origin that is a SQLite file (WAL, one
transaction per write for the write-through rows, one per batch for the flusher). Rows, each a
run of ``N`` writes of distinct keys (so nothing coalesces), alternated ``REPS`` times:

1. raw redis-py ``SET`` (the floor of any acknowledged write);
2. ``cache.set(k, v)``: write-through to the cache only (the origin written elsewhere);
3. ``cache.set(k, v, write_behind=True)``: the same write, also queued for the origin in the same
   Lua script (what the caller waits for in write-behind);
4. write-through to the origin: a SQLite UPSERT (committed) then ``cache.set`` — what a caller
   waits for without write-behind;
5. the flusher: queued writes applied to the SQLite origin by ``WriteBehind.flush`` in batches
   of ``BATCH`` (one transaction per batch), writes/s drained.

Figures: acknowledged writes per second (median over repetitions) and per-write latency
(p50/p99 of each call, perf_counter_ns). No assertions: the report shows the figures.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from typing import Any

import harness
import pytest
import report

BENCH_ORDER = 45
SECTION = "write-behind"
QUICK = harness.QUICK
N = 300 if QUICK else 3_000
BLOCK = 100  # writes per timed block; the variants' blocks alternate
REPS = 1 if QUICK else 3
BATCH = 100
VALUE = {"name": "user", "n": 1, "tags": ["a", "b"]}

ROWS = [
    ("raw", "raw redis-py `SET` (reference)"),
    ("through", "`cache.set(k, v)` (write-through, cache only)"),
    ("behind", "`cache.set(k, v, write_behind=True)` (acknowledged, queued)"),
    ("origin", "SQLite UPSERT + commit, then `cache.set` (write-through to the origin)"),
    ("flush", f"flusher: queued writes into SQLite, batches of {BATCH} (drained)"),
]


def _origin(path: Any) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT, version INTEGER)")
    return db


def _upsert(db: sqlite3.Connection, rows: list[tuple[str, str, int]]) -> None:
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO t (k, v, version) VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE SET "
        "v = excluded.v, version = excluded.version WHERE excluded.version > t.version",
        rows,
    )
    db.execute("COMMIT")


@pytest.fixture(scope="module")
def server(tc: Any) -> Any:
    from tiercache.server import RedisServer

    srv = RedisServer(die_with_parent=True).start()
    yield srv
    srv.stop()


def _timed(fn: Any, keys: list[str]) -> tuple[float, list[float]]:
    """(writes/s, per-call µs) of ``fn(k)`` over ``keys``."""
    lat = []
    clock = time.perf_counter_ns
    start = clock()
    for k in keys:
        t0 = clock()
        fn(k)
        lat.append((clock() - t0) / 1000.0)
    return len(keys) / ((clock() - start) / 1e9), lat


def test_write_behind_throughput(tc: Any, server: Any, tmp_path: Any) -> None:
    from tiercache import TieredCache, WriteBehind

    db = _origin(tmp_path / "origin.db")
    client = server.client()
    cache = TieredCache(server.url, namespace="wbbench", heartbeat_interval=0)

    def writer(batch: list[Any]) -> None:
        _upsert(db, [(str(i.key), "v", i.version) for i in batch])

    wb = WriteBehind(cache, writer, batch_size=BATCH, start=False)
    payload = cache._codec.dumps(VALUE)
    results: dict[str, list[tuple[float, list[float]]]] = {r: [] for r, _ in ROWS}
    try:
        for rep in range(REPS):
            keys = [f"k{rep}:{i}" for i in range(N)]

            def origin_then_cache(k: str) -> None:
                _upsert(db, [("o:" + k, "v", 1)])
                cache.set("o:" + k, VALUE)

            variants = [
                ("raw", lambda k: client.set("raw:" + k, payload)),
                ("through", lambda k: cache.set("t:" + k, VALUE)),
                ("behind", lambda k: cache.set("b:" + k, VALUE, write_behind=True)),
                ("origin", origin_then_cache),
            ]
            for start in range(0, N, BLOCK):  # interleaved blocks, rotated order
                block = keys[start : start + BLOCK]
                turn = (start // BLOCK) % len(variants)
                for row, fn in variants[turn:] + variants[:turn]:
                    results[row].append(_timed(fn, block))
            queued = wb.pending()
            t0 = time.perf_counter()
            assert wb.flush(120.0)
            results["flush"].append((queued / (time.perf_counter() - t0), []))
    finally:
        wb.close()
        cache.close()
        client.close()
        db.close()
    for row, label in ROWS:
        rates = [r for r, _ in results[row]]
        best = max(rates)
        lat = sorted(x for _, xs in results[row] for x in xs)
        report.record(
            SECTION,
            {
                "row": row,
                "label": label,
                "rate": statistics.median(rates),
                "best": best,
                "p50": lat[len(lat) // 2] if lat else None,
                "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            },
        )


def _render(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["row"]: r for r in rows}
    out = [
        f"{REPS} runs of {N} writes of distinct keys per row, timed in blocks of {BLOCK} that "
        "alternate between the rows; writes/s: median block and best block (the best is the "
        "clean sample on a busy machine); one process, loopback Redis, SQLite origin (WAL, "
        "synchronous=NORMAL). The flusher row: whole drains, median.",
        "",
        "| write | writes/s (median) | writes/s (best) | p50 µs | p99 µs "
        "| best vs write-through to the origin |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = by.get("origin", {}).get("best")
    for row, _ in ROWS:
        r = by.get(row)
        if r is None:
            continue
        p50 = "-" if r["p50"] is None else f"{r['p50']:.0f}"
        p99 = "-" if r["p99"] is None else f"{r['p99']:.0f}"
        ratio = f"{r['best'] / base:.2f}x" if base else "-"
        out.append(
            f"| {r['label']} | {r['rate']:,.0f} | {r['best']:,.0f} | {p50} | {p99} | {ratio} |"
        )
    if "behind" in by and "through" in by:
        cost = by["through"]["best"] / by["behind"]["best"]
        out += [
            "",
            f"A write-behind write takes {cost:.2f}x the time of a cache-only write-through "
            "(best blocks).",
        ]
    return out


report.register_section(SECTION, order=45, title="Write-behind", render=_render)

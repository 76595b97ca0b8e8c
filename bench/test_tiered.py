"""TieredCache against its baselines, side by side in one run (SPEC 6):

1. L1 hit ``cache[k]`` (10,000 str keys, all in the local tier) vs dict ``d[k]`` (harness loop);
   also ``cache.get(k)``, an int-key hit and the bare local tier ``cache.local[k]``.
2. L2 hit (L1 miss) vs a raw redis-py ``GET`` of the same stored bytes on the cache's own client.
   The miss is honest: ``local_maxsize`` is smaller than the key set, read in cyclic order, so
   every read misses and its fill evicts. Per-call latency (perf_counter_ns, both sides in
   interleaved blocks) and a throughput loop (pytest-benchmark rounds, the raw loop timed before
   each round).
3. Write ``cache[k] = v`` vs a raw ``SET`` of an envelope-sized value, same client: the writer
   alone (its own listener hears its echo) and with a TieredCache of the namespace listening in
   another process (the deployment).
4. Invalidation: write in this process (A) returns -> process B's listener has dropped B's local
   copy, vs raw redis-py PUBLISH -> receive between the same two processes, paced writes,
   alternated; with B idle and with a thread of B busy running Python.
5. Memory: bytes per entry of a LocalCache of 100k str keys -> int values (net of keys and
   values) vs an OrderedDict, tracemalloc and RSS, each in a fresh process.

Redis: a private ``redis-server`` (tiercache.server.RedisServer) on a free loopback port, stopped
at the end of the module; process B is joined (killed after a timeout) at the end too.
No timing assertions: only the report's SPEC 6 column judges.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import harness
import procs
import pytest
import report

BENCH_ORDER = 30
SECTION = "tiered"
L1_GROUP = "tiered-l1"
QUICK = harness.QUICK

N_KEYS = 10_000
KEYS = [f"key:{i:05d}" for i in range(N_KEYS)]
INT_KEYS = list(range(2_000))
L2_KEYS = 1_000 if QUICK else 4_000  # cycled in order through...
L2_LOCAL = 250 if QUICK else 1_000  # ...a local tier this small: every read misses
N_LAT = 2_000 if QUICK else 10_000  # timed calls per side (latency)
BLOCK = 100  # calls per interleaved block
TP_OPS = 500  # ops per throughput round
TP_ROUNDS = 5 if QUICK else 20
N_INV = 200 if QUICK else 1_000  # paced writes per invalidation phase
INV_REPS = 1 if QUICK else 2  # raw/ours phases alternate this many times
N_INV_BUSY = 100 if QUICK else 300
GAP_S = 0.0015  # pacing of the invalidation writes
MEM_N = 100_000
PAD = b"x" * 40  # raw pub/sub payloads about as long as an invalidation message
CLIENT_KW = {"socket_timeout": 0.5, "connect_timeout": 0.5, "retries": 1}  # TieredCache's

LOOP = "loop overhead (for k in keys: pass)"
DICT = "dict d[k]"
OURS_L1 = "TieredCache cache[k]"
OURS_L1_GET = "TieredCache cache.get(k)"
OURS_L1_LOCAL = "its local tier cache.local[k] (LocalCache, ttl)"
OURS_L1_INT = "TieredCache cache[k], int keys (2,000)"

mono_ns = time.monotonic_ns  # CLOCK_MONOTONIC: the same clock in every process of the host


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tc):
    from tiercache.server import RedisServer

    try:
        srv = RedisServer(bloom=False)
        srv.start()
    except Exception as exc:  # no redis-server here: the section says so
        report.skipped(SECTION, f"all Redis rows ({exc})")
        pytest.skip(f"no Redis server: {exc}")
    with srv:
        yield srv


@pytest.fixture(scope="module")
def peer(server):
    p = procs.Peer(server.url)
    try:
        yield p
    finally:
        p.close()


def _cache(tc, server, namespace: str, **kw: Any) -> Any:
    c = tc.TieredCache(server.url, namespace=namespace, **kw)
    if not c.wait_ready(10.0):
        c.close()
        raise RuntimeError(f"TieredCache {namespace!r}: listener not ready")
    return c


def _stats_delta(after: dict[str, Any], before: dict[str, Any], *names: str) -> dict[str, int]:
    return {n: after[n] - before[n] for n in names}


# -- measurement helpers --------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``xs``."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def paired_latency(
    ours: Callable[[int], Any],
    raw: Callable[[int], Any],
    n: int,
    after_warmup: Callable[[], Any] | None = None,
) -> tuple[list[int], list[int]]:
    """ns per call of ``ours(i)`` and ``raw(i)``, i = 0..n-1, in interleaved blocks of BLOCK
    calls (ABBA order), so both sides see the same moments of a shared machine."""
    clock = time.perf_counter_ns
    o: list[int] = []
    r: list[int] = []
    for i in range(-min(n, 200), 0):  # warm-up on the keys before 0 in the cycle: not recorded,
        ours(i)  # and not the first keys timed (a warmed key would be in the local tier)
        raw(i)
    if after_warmup is not None:
        after_warmup()
    for b, start in enumerate(range(0, n, BLOCK)):
        idx = range(start, min(n, start + BLOCK))
        order = ((raw, r), (ours, o)) if b % 2 == 0 else ((ours, o), (raw, r))
        for fn, out in order:
            for i in idx:
                t0 = clock()
                fn(i)
                out.append(clock() - t0)
    return o, r


def paired_throughput(
    benchmark: Any, ours_round: Callable[[], Any], raw_round: Callable[[], Any], ops: int
) -> tuple[list[float], list[float]] | None:
    """Seconds per op of ``ours_round`` (pytest-benchmark rounds) and of ``raw_round`` (timed in
    each round's setup, right before it); None when benchmarks are disabled."""
    raw_s: list[float] = []
    warm = 1

    def setup() -> None:
        t0 = time.perf_counter()
        raw_round()
        raw_s.append(time.perf_counter() - t0)

    benchmark.extra_info["ops_per_round"] = ops
    gc.collect()
    benchmark.pedantic(ours_round, setup=setup, rounds=TP_ROUNDS, warmup_rounds=warm)
    st = getattr(benchmark, "stats", None)
    if st is None:
        return None
    ours_s = list(st.stats.data)
    return [x / ops for x in ours_s], [x / ops for x in raw_s[warm:]]


HELD_GET = "GET on a held redis-py `Connection` (no `execute_command`)"
HELD_SET = "SET on a held redis-py `Connection`"


@contextlib.contextmanager
def held_connection(client: Any) -> Iterator[Callable[..., Any]]:
    """``call(*args)``: one round trip on a connection checked out of ``client``'s pool."""
    pool = client.connection_pool
    conn = pool.get_connection()

    def call(*args: Any) -> Any:
        conn.send_command(*args)
        return conn.read_response()

    try:
        yield call
    finally:
        pool.release(conn)


def server_usec(client: Any, fn: Callable[[int], Any], n: int, command: str) -> float | None:
    """Redis-side µs per call of ``command`` (INFO commandstats, reset first) over ``fn(0..n-1)``:
    the server's share of the round trip (for EVALSHA: the whole script)."""
    client.config_resetstat()
    for i in range(n):
        fn(i)
    stat = client.info("commandstats").get(f"cmdstat_{command}")
    return None if stat is None else float(stat["usec_per_call"])


def lat_row(part: str, name: str, ours_ns: list[int], raw_ns: list[int], **extra: Any) -> dict:
    row = {
        "part": part,
        "name": name,
        "n": len(ours_ns),
        "ours_p50": pct(ours_ns, 50) / 1e3,
        "ours_p99": pct(ours_ns, 99) / 1e3,
        "raw_p50": pct(raw_ns, 50) / 1e3,
        "raw_p99": pct(raw_ns, 99) / 1e3,
    }
    row.update(extra)
    return row


def tp_row(part: str, name: str, ours_s: list[float], raw_s: list[float], **extra: Any) -> dict:
    med = report.median
    row = {
        "part": part,
        "name": name,
        "rounds": len(ours_s),
        "ours_med": med(ours_s) * 1e6,
        "ours_min": min(ours_s) * 1e6,
        "raw_med": med(raw_s) * 1e6,
        "raw_min": min(raw_s) * 1e6,
    }
    row.update(extra)
    return row


# -- 1. L1 hit ------------------------------------------------------------------------------------


def _l1_targets(rows: dict[str, report.TimingRow], group: report.Group) -> dict[str, str]:
    out = {}
    if OURS_L1 in rows and DICT in rows:
        net = report.ratio(rows, OURS_L1, DICT, net=True)
        gross = report.ratio(rows, OURS_L1, DICT)
        if net is not None:
            out[OURS_L1] = f"{report.mark(net <= 1.6)} ≤1.6xdict net ({net:.2f}; gross {gross:.2f})"
    return out


L1_GROUP_DEF = report.Group(  # rendered inside the section (not registered as its own block)
    key=L1_GROUP,
    title=f"L1 hit ({N_KEYS:,} str keys, all in the local tier), ns/op",
    overhead=LOOP,
    baselines=[("dict", DICT)],
    targets=_l1_targets,
    target_note=(
        "SPEC 6 column: TieredCache `cache[k]` ≤ 1.6 x dict `d[k]`, net of the loop (paired "
        "ratios, as the local-hit group). The int-key row takes the Python path (encoding, "
        "checks) by design: information only."
    ),
)


@pytest.fixture(scope="class")
def l1(tc, server):
    """A TieredCache holding KEYS and INT_KEYS locally (closed after TestL1)."""
    c = _cache(tc, server, "bench-l1", local_maxsize=2 * N_KEYS)
    for k in KEYS:
        c[k] = 1
    for k in INT_KEYS:
        c[k] = 1
    try:
        yield c
    finally:
        c.close()


class TestL1:
    @pytest.mark.parametrize(
        "name", [LOOP, DICT, OURS_L1, OURS_L1_GET, OURS_L1_LOCAL, OURS_L1_INT], ids=str
    )
    def test_l1_hit(self, benchmark, l1, name: str) -> None:
        keys = INT_KEYS if name == OURS_L1_INT else KEYS
        obj, stmt = {
            LOOP: (None, "pass"),
            DICT: ({k: 1 for k in KEYS}, "c[k]"),
            OURS_L1: (l1, "c[k]"),
            OURS_L1_GET: (l1, "c.get(k)"),
            OURS_L1_LOCAL: (l1.local, "c[k]"),
            OURS_L1_INT: (l1, "c[k]"),
        }[name]
        before = l1.stats()
        harness.run_loop(benchmark, L1_GROUP, name, stmt, obj, keys)
        d = _stats_delta(l1.stats(), before, "remote_hits", "misses", "local_misses")
        report.record(SECTION, {"part": "l1-check", "name": name, **d})


# -- 2. L2 hit ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def l2(tc, server):
    from tiercache.keys import KeySpace, encode_key

    c = _cache(tc, server, "bench-l2", local_maxsize=L2_LOCAL)
    keys = [f"key:{i:05d}" for i in range(L2_KEYS)]
    for i, k in enumerate(keys):
        c[k] = i
    space = KeySpace("bench-l2")
    names = [space.value(encode_key(k)) for k in keys]  # the Redis keys the cache reads
    try:
        yield c, keys, names
    finally:
        c.close()


def test_l2_hit_latency(l2) -> None:
    cache, keys, names = l2
    nk = len(keys)
    get = cache.redis.get  # the cache's own client: same pool, hiredis parser, timeouts
    getitem = cache.__getitem__
    before: dict[str, Any] = {}
    ours, raw = paired_latency(
        lambda i: getitem(keys[i % nk]),
        lambda i: get(names[i % nk]),
        N_LAT,
        after_warmup=lambda: before.update(cache.stats()),
    )
    d = _stats_delta(cache.stats(), before, "remote_hits", "local_hits", "misses")
    srv = server_usec(cache.redis, lambda i: get(names[i % nk]), 2_000, "get")
    report.record(
        SECTION,
        lat_row(
            "redis",
            "L2 hit `cache[k]` (L1 miss) vs GET",
            ours,
            raw,
            target=1.15,
            server=f"GET {srv:.1f}" if srv is not None else "n/a",
            check=(
                f"{d['remote_hits']:,} L2 hits, {d['local_hits']} L1 hits, {d['misses']} misses "
                f"in {len(ours):,} timed reads"
            ),
        ),
    )
    # For scale: the same GET on a held connection, without redis-py's execute_command (the
    # way the cache's own calls go, tiercache.lane): what is left is the cache's own work.
    with held_connection(cache.redis) as held:
        ours, raw = paired_latency(
            lambda i: getitem(keys[i % nk]), lambda i: held("GET", names[i % nk]), N_LAT
        )
    report.record(SECTION, lat_row("redis", f"L2 hit vs {HELD_GET}", ours, raw, target=None))


def test_l2_hit_throughput(benchmark, l2) -> None:
    cache, keys, names = l2
    get = cache.redis.get
    ours_it, raw_it = itertools.cycle(keys), itertools.cycle(names)

    def ours_round() -> None:
        for _ in range(TP_OPS):
            cache[next(ours_it)]

    def raw_round() -> None:
        for _ in range(TP_OPS):
            get(next(raw_it))

    before = cache.stats()
    res = paired_throughput(benchmark, ours_round, raw_round, TP_OPS)
    d = _stats_delta(cache.stats(), before, "local_hits")
    if res is not None:
        report.record(
            SECTION,
            tp_row(
                "redis-tp", "L2 hit `cache[k]` vs GET", *res, target=1.15, l1_hits=d["local_hits"]
            ),
        )


# -- 3. write -------------------------------------------------------------------------------------


def _write_setup(tc, server, peer, scenario: str) -> tuple[Any, list[str], list[bytes], bytes]:
    from tiercache.keys import KeySpace, encode_key

    ns = f"bench-w{scenario}"
    if scenario == "peer":
        assert peer.call("open", ns, ns, {}), "process B's cache did not become ready"
    c = _cache(tc, server, ns)
    keys = [f"key:{i:05d}" for i in range(N_KEYS)]
    c[keys[0]] = 12345
    stored = c.redis.get(KeySpace(ns).value(encode_key(keys[0])))  # as the cache stores it
    raw_names = [b"bench-raw:" + KeySpace(ns).value(encode_key(k)) for k in keys]
    return c, keys, raw_names, stored


@pytest.mark.parametrize("scenario", ["alone", "peer"])
def test_write_latency(tc, server, request, scenario: str) -> None:
    peer = request.getfixturevalue("peer") if scenario == "peer" else None
    cache, keys, raw_names, stored = _write_setup(tc, server, peer, scenario)
    try:
        setitem, rset, nk = cache.__setitem__, cache.redis.set, len(keys)
        before: dict[str, Any] = {}
        remote0: dict[str, Any] = {}

        def mark() -> None:
            before.update(cache.stats())
            if peer is not None:
                time.sleep(0.1)  # the warm-up's messages reach B
                remote0.update(peer.call("stats", f"bench-w{scenario}"))

        ours, raw = paired_latency(
            lambda i: setitem(keys[i % nk], i),
            lambda i: rset(raw_names[i % nk], stored),
            N_LAT,
            after_warmup=mark,
        )
        time.sleep(0.1)
        d = _stats_delta(cache.stats(), before, "writes", "write_errors", "invalidations_received")
        remote = peer.call("stats", f"bench-w{scenario}") if peer else None
        s_ours = server_usec(cache.redis, lambda i: setitem(keys[i % nk], i), 2_000, "evalsha")
        s_raw = server_usec(cache.redis, lambda i: rset(raw_names[i % nk], stored), 2_000, "set")
        who = (
            "writer alone (its listener hears its own echo)"
            if scenario == "alone"
            else "a TieredCache listening in process B"
        )
        check = (
            f"{d['writes']:,} writes, {d['write_errors']} errors; own echoes received here: "
            f"{d['invalidations_received']:,}"
        )
        if remote is not None:
            n_b = remote["invalidations_received"] - remote0["invalidations_received"]
            check += f"; in B: {n_b:,}"
        report.record(
            SECTION,
            lat_row(
                "redis",
                f"write `cache[k] = v` vs SET, {who}",
                ours,
                raw,
                target=1.5,
                server=(
                    f"EVALSHA {s_ours:.1f} / SET {s_raw:.1f}"
                    if s_ours is not None and s_raw is not None
                    else "n/a"
                ),
                check=check,
                value_bytes=len(stored),
            ),
        )
        if scenario == "alone":  # for scale, as for the L2 hit
            with held_connection(cache.redis) as held:
                ours, raw = paired_latency(
                    lambda i: setitem(keys[i % nk], i),
                    lambda i: held("SET", raw_names[i % nk], stored),
                    N_LAT,
                )
            report.record(
                SECTION, lat_row("redis", f"write vs {HELD_SET}, {who}", ours, raw, target=None)
            )
    finally:
        cache.close()


@pytest.mark.parametrize("scenario", ["alone", "peer"])
def test_write_throughput(benchmark, tc, server, request, scenario: str) -> None:
    peer = request.getfixturevalue("peer") if scenario == "peer" else None
    cache, keys, raw_names, stored = _write_setup(tc, server, peer, scenario)
    try:
        rset = cache.redis.set
        ours_it, raw_it, val = itertools.cycle(keys), itertools.cycle(raw_names), itertools.count()

        def ours_round() -> None:
            for _ in range(TP_OPS):
                cache[next(ours_it)] = next(val)

        def raw_round() -> None:
            for _ in range(TP_OPS):
                rset(next(raw_it), stored)

        res = paired_throughput(benchmark, ours_round, raw_round, TP_OPS)
        if res is not None:
            who = "writer alone" if scenario == "alone" else "+ listener in process B"
            report.record(SECTION, tp_row("redis-tp", f"write vs SET, {who}", *res, target=1.5))
    finally:
        cache.close()


# -- 4. invalidation latency ----------------------------------------------------------------------


def _pace(deadline: float) -> float:
    """Sleep until ``deadline`` (monotonic s); the next deadline (never in the past)."""
    now = time.monotonic()
    if deadline > now:
        time.sleep(deadline - now)
    return max(deadline, now) + GAP_S


def _raw_phase(client: Any, peer: procs.Peer, n: int) -> tuple[list[int], list[int], int]:
    """Paced PUBLISH here -> receive in B: (ns from call start, ns from return, received)."""
    channel, end = b"bench-raw-inv", b"end"
    peer.send("raw_sub", channel, n, end, CLIENT_KW)
    assert peer.reply(30) == "ready"
    sent: list[tuple[int, int]] = []
    deadline = time.monotonic()
    for i in range(n):
        payload = b"%d " % i + PAD
        t0 = mono_ns()
        client.publish(channel, payload)
        sent.append((t0, mono_ns()))
        deadline = _pace(deadline)
    client.publish(channel, end)
    got = peer.reply()
    start, ret = [], []
    for t, data in got:
        i = int(data.split(b" ", 1)[0])
        start.append(t - sent[i][0])
        ret.append(t - sent[i][1])
    return start, ret, len(got)


def _ours_phase(
    cache: Any, peer: procs.Peer, n: int, tag: str
) -> tuple[list[int], list[int], dict]:
    """Paced ``cache[k] = v`` here -> B's copy dropped: (ns from call, ns from return, info)."""
    from tiercache.keys import decode_key

    keys = [f"inv:{tag}:{i:05d}" for i in range(n)]
    for k in keys:
        cache[k] = 0
    time.sleep(0.1)  # the set-up writes' invalidations reach B before it reads the keys
    loaded = peer.call("preload", "inv", keys)
    peer.call("arm", "inv")
    sent: dict[str, tuple[int, int]] = {}
    deadline = time.monotonic()
    for k in keys:
        t0 = mono_ns()
        cache[k] = 1
        sent[k] = (t0, mono_ns())
        deadline = _pace(deadline)
    time.sleep(0.3)
    records = peer.call("collect", "inv")
    start, ret, seen = [], [], set()
    for t, encoded, had, gone in records:
        k = decode_key(encoded)
        if had and gone and k in sent and k not in seen:
            seen.add(k)
            start.append(t - sent[k][0])
            ret.append(t - sent[k][1])
    return start, ret, {"loaded": loaded, "messages": len(records)}


def test_invalidation_latency(tc, server, peer) -> None:
    assert peer.call("open", "inv", "bench-inv", {}), "process B's cache did not become ready"
    cache = _cache(tc, server, "bench-inv")
    try:
        client = cache.redis  # raw PUBLISH on the same client (settings, pool) as the cache
        raw_s: list[int] = []
        raw_r: list[int] = []
        ours_s: list[int] = []
        ours_r: list[int] = []
        raw_n = loaded = 0
        for rep in range(INV_REPS):  # alternate, so both see the same conditions
            s, r, got = _raw_phase(client, peer, N_INV)
            raw_s += s
            raw_r += r
            raw_n += got
            s, r, info = _ours_phase(cache, peer, N_INV, f"r{rep}")
            ours_s += s
            ours_r += r
            loaded += info["loaded"]
        sent = N_INV * INV_REPS
        report.record(
            SECTION,
            {
                "part": "inv",
                "name": "B idle",
                "raw": (raw_s, raw_r, raw_n, sent),
                "ours": (ours_s, ours_r, len(ours_s), loaded),
                "judged": True,
            },
        )
        peer.call("busy", True)
        try:
            s, r, got = _raw_phase(client, peer, N_INV_BUSY)
            s2, r2, info = _ours_phase(cache, peer, N_INV_BUSY, "busy")
        finally:
            peer.call("busy", False)
        report.record(
            SECTION,
            {
                "part": "inv",
                "name": "B busy (a thread of B runs Python)",
                "raw": (s, r, got, N_INV_BUSY),
                "ours": (s2, r2, len(s2), info["loaded"]),
                "judged": False,
            },
        )
    finally:
        cache.close()


# -- 5. memory ------------------------------------------------------------------------------------

MEM_KINDS = [
    ("OrderedDict", "OrderedDict"),
    ("dict", "dict"),
    ("cython:plain", "LocalCache(lru) c[k] = v, Cython"),
    (
        "cython:l1",
        "LocalCache(lru, ttl) set(k, v, version, fresh_until), Cython (TieredCache's L1)",
    ),
    ("python:plain", "LocalCache(lru) c[k] = v, pure-Python twin"),
    ("python:l1", "LocalCache(lru, ttl) set(..., version, fresh_until), pure-Python twin"),
]


def test_memory(tc) -> None:
    for kind, label in MEM_KINDS:
        for method in ("tracemalloc", "rss"):
            try:
                per = procs.run_child(procs.memory_probe, kind, MEM_N, method, timeout=120)
            except Exception as exc:  # e.g. no Cython build
                report.skipped(SECTION, f"memory {label} {method} ({exc})")
                continue
            report.record(
                SECTION, {"part": "mem", "kind": kind, "name": label, "method": method, "per": per}
            )


# -- the report section ---------------------------------------------------------------------------


def _f(x: float | None, d: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{d}f}"


def _render(rows: list[dict]) -> list[str]:
    by = lambda part: [r for r in rows if r["part"] == part]  # noqa: E731
    out = [
        "### TieredCache (SPEC 6)",
        "",
        "One private `redis-server` on loopback; the raw baselines run on the cache's own redis-py "
        "client (hiredis parser, same pool and timeouts) against the same server, interleaved with "
        "our calls in the same run. On this shared 2-core machine the absolute µs move with the "
        "load (redis-server, process B and this process share the cores); the ratios are what to "
        "read.",
        "",
    ]
    if any(r["part"] == "l1-check" for r in rows):
        lines = report.render_group(L1_GROUP_DEF)
        if lines:
            lines[0] = "#" + lines[0]
            out += lines
        ours_rows = (OURS_L1, OURS_L1_GET, OURS_L1_LOCAL, OURS_L1_INT)
        checks = [r for r in by("l1-check") if r["name"] in ours_rows]
        if checks:
            bad = [
                r["name"] for r in checks if r["remote_hits"] or r["misses"] or r["local_misses"]
            ]
            out += [
                "Check: every timed TieredCache read was an L1 hit (stats: no remote hits, misses "
                "or local misses)."
                if not bad
                else f"Check FAILED, reads left L1 in: {bad}",
                "",
            ]
    lat = by("redis")
    if lat:
        out += [
            "#### Redis tier: per-call latency, µs",
            "",
            f"Each call timed with perf_counter_ns, ours and raw alternating in blocks of {BLOCK} "
            "calls. x raw = ours / raw at the same percentile. Server µs/call: Redis "
            "`INFO commandstats` over 2,000 more calls (EVALSHA = the whole write script).",
            "",
            "| figure | calls | ours p50 | ours p99 | raw p50 | raw p99 | x raw p50 | x raw p99 "
            "| server µs/call | SPEC 6 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in lat:
            x50, x99 = r["ours_p50"] / r["raw_p50"], r["ours_p99"] / r["raw_p99"]
            judged = (
                "information (not a SPEC baseline)"
                if r["target"] is None
                else f"{report.mark(x50 <= r['target'])} p50 ≤{r['target']}x ({x50:.2f})"
            )
            out.append(
                f"| {r['name']} | {r['n']:,} | {_f(r['ours_p50'])} | {_f(r['ours_p99'])} | "
                f"{_f(r['raw_p50'])} | {_f(r['raw_p99'])} | {x50:.2f} | {x99:.2f} | "
                f"{r.get('server', '')} | {judged} |"
            )
        out.append("")
        out += [f"- {r['name']}: {r['check']}" for r in lat if r.get("check")]
        out.append("")
    tp = by("redis-tp")
    if tp:
        out += [
            "#### Redis tier: throughput loop (sequential, one connection), µs/op",
            "",
            f"pytest-benchmark rounds of {TP_OPS} calls; the raw loop is timed right before each "
            "round. x raw (median) = ratio of the median rounds; x raw (best) = of the fastest.",
            "",
            "| loop | rounds | ours median | ours best | raw median | raw best | ops/s ours | "
            "x raw (median) | x raw (best) | SPEC 6 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in tp:
            xm, xb = r["ours_med"] / r["raw_med"], r["ours_min"] / r["raw_min"]
            out.append(
                f"| {r['name']} | {r['rounds']} | {_f(r['ours_med'])} | {_f(r['ours_min'])} | "
                f"{_f(r['raw_med'])} | {_f(r['raw_min'])} | {1e6 / r['ours_med']:,.0f} | "
                f"{xm:.2f} | {xb:.2f} | {report.mark(xm <= r['target'])} ≤{r['target']}x |"
            )
        out.append("")
        out += [
            f"- {r['name']}: {r['l1_hits']} L1 hits during the loop (0 = every read went to Redis)"
            for r in tp
            if "l1_hits" in r
        ]
        out.append("")
    inv = by("inv")
    if inv:
        out += [
            "#### Invalidation latency across processes, µs",
            "",
            f"Process A (this one) writes, paced every {GAP_S * 1e3:.1f} ms; process B (spawned) "
            "holds the keys in its local tier, and its listener thread timestamps the moment it "
            "has popped B's copy (time.monotonic_ns: CLOCK_MONOTONIC, one clock for both "
            "processes). Raw: redis-py PUBLISH in A -> `get_message` returns in B (hiredis, the "
            "listener's 0.1 s poll), same pacing, phases alternated. 'from return' starts when "
            "the write (PUBLISH) call returned in A, 'from call' when it was made; negative = B "
            "had it before A's call returned. Busy: a thread of B loops in Python, so B's "
            "listener must win the GIL (switch interval 5 ms).",
            "",
            "| B | figure | delivered | p50 from return | p99 from return | max | p50 from call | "
            "p99 from call | x raw p50 | SPEC 6 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in inv:
            rs, rr, rn, rsent = r["raw"]
            os_, or_, on, oloaded = r["ours"]
            if not rr or not or_:
                out.append(f"| {r['name']} | (no samples: raw {rn}, ours {on}) | | | | | | | | |")
                continue
            raw50 = pct(rr, 50)
            ours50, ours99 = pct(or_, 50), pct(or_, 99)
            x = ours50 / raw50 if raw50 > 0 else None
            xs = pct(os_, 50) / pct(rs, 50)
            mark = ""
            if r["judged"]:
                ok50 = x is not None and x <= 1.5
                mark = (
                    f"{report.mark(ok50)} p50 ≤1.5x raw ({_f(x, 2)} from return, {xs:.2f} from "
                    f"call); {report.mark(ours99 <= 2e6)} p99 ≤2 ms"
                )
            out.append(
                f"| {r['name']} | raw PUBLISH→receive | {rn:,}/{rsent:,} | {_f(raw50 / 1e3)} | "
                f"{_f(pct(rr, 99) / 1e3)} | {_f(max(rr) / 1e3)} | {_f(pct(rs, 50) / 1e3)} | "
                f"{_f(pct(rs, 99) / 1e3)} | 1.00 | |"
            )
            out.append(
                f"| {r['name']} | write→B's L1 drop | {on:,}/{oloaded:,} | {_f(ours50 / 1e3)} | "
                f"{_f(ours99 / 1e3)} | {_f(max(or_) / 1e3)} | {_f(pct(os_, 50) / 1e3)} | "
                f"{_f(pct(os_, 99) / 1e3)} | {_f(x, 2)} | {mark} |"
            )
        out += [
            "",
            "delivered: raw = messages received / published; ours = copies dropped in B / keys B "
            "held when the writes began.",
            "",
        ]
    mem = by("mem")
    if mem:
        per = {(r["kind"], r["method"]): r["per"] for r in mem}
        out += [
            f"#### Memory: local-tier overhead per entry ({MEM_N:,} str keys -> int values), bytes",
            "",
            "Each container built in a fresh process after its keys and values exist, so the "
            "delta is the container's own memory (tables, nodes, entries). tracemalloc counts the "
            "Python allocators (objects, dict tables, PyMem blocks); RSS adds allocator slack.",
            "",
            "| container | tracemalloc B/entry | x OrderedDict | RSS B/entry | x OrderedDict "
            "| SPEC 6 |",
            "|---|---:|---:|---:|---:|---|",
        ]
        od_t, od_r = per.get(("OrderedDict", "tracemalloc")), per.get(("OrderedDict", "rss"))
        for kind, label in MEM_KINDS:
            t, s = per.get((kind, "tracemalloc")), per.get((kind, "rss"))
            if t is None and s is None:
                continue
            xt = t / od_t if t is not None and od_t else None
            xr = s / od_r if s is not None and od_r else None
            mark = ""
            if kind.startswith("cython") and xt is not None:
                mark = f"{report.mark(xt <= 1.5)} ≤1.5x OrderedDict ({xt:.2f})"
            elif kind.startswith("python") and xt is not None:
                mark = f"(twin: {report.mark(xt <= 1.5)} {xt:.2f})"
            out.append(f"| {label} | {_f(t)} | {_f(xt, 2)} | {_f(s)} | {_f(xr, 2)} | {mark} |")
        out.append("")
    return out


report.register_section(SECTION, order=30, title="TieredCache (SPEC 6)", render=_render)

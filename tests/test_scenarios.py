"""The failure scenarios S1-S10 and S18 of research/correctness.md section 5, one test each.

Each test names its scenario, injects the fault for real (a slow loader held on an Event, the TCP
proxy on one path only, CLIENT KILL, SIGSTOP of Redis or of a cache process, restart with no data,
FLUSHALL, eviction under maxmemory, a subscriber dropped by its output-buffer limit, fork) and
asserts the scenario's "Must hold" points. Staging is done on conditions, never on sleeps: the
MONITOR tap (``tests.history.MonitorTap``) tells when a command has executed in Redis, the
listener connections are found in CLIENT LIST by name. Bounds are generous (``DELTA`` for
propagation, ``DETECT`` for noticing a lost channel); the measured figures are printed.

The local participants are TieredCache instances of this process (own connections and
listeners); the ones that must be frozen or forked, or that run concurrently, are other OS
processes (``tests.history.CacheProcess``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest
import redis

import tiercache
from tests.history import (
    CacheProcess,
    MonitorTap,
    check_history,
    hold,
    listener_clients,
    load_logs,
    routed_client,
)
from tests.proxy import TcpProxy
from tests.servers import RedisServer, wait_until
from tiercache.codec import resolve_codec
from tiercache.envelope import unpack
from tiercache.errors import CacheUnavailable
from tiercache.keys import KeySpace, encode_key, local_key
from tiercache.protocol import parse_message
from tiercache.tiered import TieredCache

DELTA = 1.0  # propagation bound of fault-free operation (generous: shared 2-core machines)
HEALTH_INTERVAL = 0.2
HEALTH_TIMEOUT = 0.5
DETECT = HEALTH_INTERVAL + HEALTH_TIMEOUT + 1.5  # bound for noticing a lost channel, with margin
RECOVERY = 15.0  # bound for reconnecting after Redis comes back
FAST: dict[str, Any] = {
    "health_interval": HEALTH_INTERVAL,
    "health_timeout": HEALTH_TIMEOUT,
    "socket_timeout": 2.0,
    "startup_timeout": 5.0,
}
CODEC = resolve_codec(None)
MISSING = getattr(tiercache, "MISSING", object())  # a cached absence, where cached


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def caches(redis_server: RedisServer) -> Iterator[Callable[..., TieredCache]]:
    """Open TieredCache instances in this process (default: on ``redis_server``, namespace "s")."""
    opened: list[TieredCache] = []
    clients: list[redis.Redis] = []

    def open_cache(target: Any = None, **options: Any) -> TieredCache:
        options = {"namespace": "s", **FAST, **options}
        if isinstance(target, redis.Redis):
            clients.append(target)
        cache = TieredCache(redis_server.url if target is None else target, **options)
        opened.append(cache)
        return cache

    try:
        yield open_cache
    finally:
        for cache in opened:
            cache.close()
        for client in clients:
            client.close()


@pytest.fixture
def procs() -> Iterator[Callable[[str], CacheProcess]]:
    """Start cache worker processes; each is resumed, asked to exit and killed at teardown."""
    started: list[CacheProcess] = []

    def start(name: str) -> CacheProcess:
        worker = CacheProcess(name)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.terminate()


@pytest.fixture
def proxies(redis_server: RedisServer) -> Iterator[Callable[[], TcpProxy]]:
    """TCP proxies in front of ``redis_server``, closed at teardown."""
    made: list[TcpProxy] = []

    def make() -> TcpProxy:
        p = TcpProxy(redis_server.host, redis_server.port)
        made.append(p)
        return p

    try:
        yield make
    finally:
        for p in made:
            p.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client of ``redis_server`` (str replies)."""
    client = redis_server.client(decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> Iterator[Any]:
    """Collect measured figures; printed with the test's name whatever the outcome."""
    lines: list[str] = []
    yield lines.append
    if lines:
        with capsys.disabled():
            print(f"\n[{request.node.name}] " + "; ".join(lines))


def l2_entry(server: RedisServer, namespace: str, key: Hashable) -> tuple[Any, int] | None:
    """``key``'s Redis entry read raw: (value or None for a tombstone/lease, version), or None."""
    client = server.client()
    try:
        data = client.get(KeySpace(namespace).value(encode_key(key)))
    finally:
        client.close()
    if data is None:
        return None
    env = unpack(data)
    if not getattr(env, "is_value", True) or env.absent:
        return None, env.version
    return CODEC.loads(env.payload), env.version


def l2_value(server: RedisServer, namespace: str, key: Hashable) -> Any:
    entry = l2_entry(server, namespace, key)
    return None if entry is None else entry[0]


def local_value(cache: TieredCache, key: Hashable) -> Any:
    """The value ``cache`` holds for ``key`` in its local tier (None if none, or an absence)."""
    e = cache.local.entry(local_key(key, encode_key(key)))
    return None if e is None or e.value is MISSING else e.value


def count(cache: TieredCache) -> int:
    return int(cache.stats()["invalidations_received"])


def timed(predicate: Callable[[], Any], timeout: float, message: str) -> float:
    """Seconds until ``predicate`` holds (TimeoutError with ``message`` past ``timeout``)."""
    start = time.monotonic()
    wait_until(predicate, timeout, message=message)
    return time.monotonic() - start


class SlowLoader:
    """A loader that reads the truth, then blocks until released (the stale-set interleaving)."""

    def __init__(self, truth: dict[Hashable, Any]) -> None:
        self.truth = truth
        self.gated: set[Hashable] = set()
        self.loading = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, key: Hashable) -> Any:
        self.calls += 1
        value = self.truth.get(key)
        if key in self.gated:
            self.loading.set()
            if not self.release.wait(15.0):
                raise TimeoutError("the slow loader was never released")
        if value is None:
            raise KeyError(key)
        return value


class Background:
    """Run one call in a thread; ``result()`` joins it (with a deadline) and returns or raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._out: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._out["value"] = fn()
        except BaseException as exc:
            self._out["error"] = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 15.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background call did not return"
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


def new_listener_name(raw: redis.Redis, before: set[str]) -> str:
    names = {c["name"] for c in listener_clients(raw)} - before
    assert len(names) == 1, f"cannot tell the new listener among {names}"
    return names.pop()


def listener_names(raw: redis.Redis) -> set[str]:
    return {c["name"] for c in listener_clients(raw)}


# -- S1 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["set", "invalidate", "delete"])
def test_s1_stale_set_in_l2_is_rejected(
    redis_server: RedisServer, caches: Any, procs: Any, how: str, report: Any
) -> None:
    """S1. Stale set in L2: A misses and its loader reads v1, then blocks; B (another process)
    writes v2 (``set``), or changes the origin and invalidates (``invalidate``), or deletes;
    A's loader is released and tries to fill with v1.

    Must hold (P1, P3): after A returns, L2 and every L1 hold nothing or >= v2 (the fill is
    rejected and counted in ``stale_fills_rejected``); A's own return may be v1; later reads
    everywhere return the truth. Not varied: *where* in A's fill path the release lands (before
    the L2 fill, between L2 and L1, during a publish) — no hook reaches inside the library, and
    the lease makes every such point equivalent (the fill is rejected in L2 before any L1 step).
    """
    truth: dict[Hashable, Any] = {"k": "v1"}
    loader = SlowLoader(truth)
    loader.gated.add("k")
    a = caches(loader=loader)
    c = caches()
    b = procs("B")
    b.open(redis_server.url, namespace="s", **FAST)
    read = Background(lambda: a.get("k"))
    wait_until(loader.loading.is_set, 5.0, message="A calling its loader")
    v2 = None if how == "delete" else "v2"
    truth["k"] = v2
    if how == "set":
        b.call("set", "k", "v2")
    else:
        b.call("invalidate", "k")
    loader.release.set()
    assert read.result() == "v1", "A's own read returns what its loader read"
    assert a.stats()["stale_fills_rejected"] == 1, "A's fill of v1 was not rejected"
    assert l2_value(redis_server, "s", "k") == (v2 if how == "set" else None)
    assert local_value(a, "k") in (None, v2), "A caches the overtaken v1"
    for name, cache in (("A", a), ("C", c)):
        assert local_value(cache, "k") != "v1", f"{name} caches the overtaken v1"
    # Later reads everywhere return the truth (A loads it; B and C then read it from Redis).
    assert a.get("k") == v2
    took = timed(lambda: c.get("k") == v2, DELTA, "C reading the truth")
    wait_until(lambda: b.call("get", "k") == v2, DELTA, message="B reading the truth")
    entry = b.call("entry", "k")
    assert entry is None or entry[0] == v2, f"B caches {entry!r}"
    report(f"C converged in {took * 1000:.1f} ms")


# -- S2 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["get", "read-through"])
def test_s2_local_fill_crossing_an_invalidation(
    redis_server: RedisServer, caches: Any, proxies: Any, path: str, report: Any
) -> None:
    """S2. L1 fill crosses an incoming invalidation: A's data connection goes through a proxy
    that delays replies (server to client) by 1 s, its pub/sub connection is direct. A reads k:
    the read executes in Redis and sees v1, its reply is held; meanwhile B writes v2 and A
    applies the invalidation (k, v2) before the reply arrives.

    ``get``: k is in Redis (A's GET sees v1). ``read-through``: A has a loader and k is absent
    when A's GET runs; B writes v1 before A's lease script runs, so the script answers with the
    value v1 (held by the proxy), then B writes v2.

    Must hold (P2): after A applied (k, v2), A's L1 never stores v1 (A's read itself may return
    v1: it ran before the write), and A's next read returns v2.
    """
    proxy = proxies()
    loader = SlowLoader({"k": "origin"}) if path == "read-through" else None
    a = caches(
        routed_client(proxy.host, proxy.port, listener_port=redis_server.port, socket_timeout=5.0),
        loader=loader,
    )
    b = caches()
    tap = MonitorTap(redis_server.host, redis_server.port)
    try:
        value_key = KeySpace("s").value(encode_key("k"))
        if path == "get":
            b["k"] = "v1"
            wait_until(lambda: count(a) >= 1, DELTA, message="A applying v1")
        a.get("warm-up")  # A's data connection exists (and its scripts are loaded) before delays
        proxy.set_latency(1.0, direction="downstream")
        mark = tap.last_index
        read = Background(lambda: a.get("k"))
        first = tap.wait_for(
            lambda e: value_key in e.args[1:] and e.client != "lua", 5.0, after=mark
        )
        a_client = first.client
        if path == "read-through":
            assert first.command == "GET", f"A's read started with {first.command}, not a GET"
            b["k"] = "v1"
            mark = tap.last_index
            lease = tap.wait_for(lambda e: e.client == a_client, 5.0, after=mark)
            assert lease.command.startswith("EVAL"), f"A went on with {lease.command}"
            assert l2_value(redis_server, "s", "k") == "v1"
        before = count(a)
        b["k"] = "v2"
        wait_until(lambda: count(a) > before, DELTA, message="A applying the invalidation of v2")
        assert read.running, "staging: A's read finished before the invalidation arrived"
        got = read.result()
        assert got == "v1", f"A's read returned {got!r}"
        assert local_value(a, "k") in (None, "v2"), (
            "A cached v1, read before the invalidation of v2 that it had already applied"
        )
        proxy.set_latency(0.0)
        assert a.get("k") == "v2"
        if loader is not None:
            assert loader.calls == 1, "the loader ran although the value had arrived"
        report(f"local_fills_rejected={a.stats()['local_fills_rejected']}")
    finally:
        tap.close()


# -- S3 -----------------------------------------------------------------------------------------


def test_s3_publish_follows_the_write(
    redis_server: RedisServer, procs: Any, tmp_path: Any, report: Any
) -> None:
    """S3. Invalidation published before the L2 write is visible: B (a process) writes k 1,000+
    times while A and C (processes) read it as fast as they can; a raw subscriber re-reads L2 the
    moment each invalidation arrives.

    Must hold (P1, P2): every invalidation (k, v) is published after v is in L2 (the raw re-read
    finds version >= v: the write and its publish are one Lua script); the history of A and C is
    monotonic and never older than a write acknowledged ``DELTA`` before the read; B's write call
    returns only after L2 has the value (a read that starts after the ack is never older).
    The proxy-delayed grey-box variant is not needed: the publish is inside the write's script.
    """
    namespace = "s3"
    keyspace = KeySpace(namespace)
    value_key = keyspace.value(encode_key("k"))
    sub_client = redis_server.client(socket_timeout=0.2)
    check_client = redis_server.client()
    pubsub = sub_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keyspace.channel(0))
    problems: list[str] = []
    seen = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                msg = pubsub.get_message(timeout=0.1)
            except redis.TimeoutError:
                continue
            if msg is None or msg["type"] != "message":
                continue
            inv = parse_message(msg["data"])
            raw_entry = check_client.get(value_key)
            stored = unpack(raw_entry).version if raw_entry is not None else 0
            seen[0] += 1
            if stored < inv.version:
                problems.append(f"message of version {inv.version}, L2 holds {stored}")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    workers = [procs(name) for name in ("B", "A", "C")]
    try:
        for w in workers:
            w.send("open", redis_server.url, {"namespace": namespace, **FAST})
        for w in workers:
            w.receive(60)
        start_at, end_at = time.time() + 0.3, time.time() + 2.8
        logs = [str(tmp_path / f"s3-{i}.pickle") for i in range(3)]
        for i, w in enumerate(workers):
            w.send(
                "history",
                {
                    "proc": i,
                    "keys": ["k"],
                    "owners": [0],
                    "start_at": start_at,
                    "end_at": end_at,
                    "rate": 500.0 if i == 0 else 2000.0,
                    "write_ratio": 1.0 if i == 0 else 0.0,
                    "delete_ratio": 0.0,
                    "contended_ratio": 0.0,
                    "seed": i,
                    "log_path": logs[i],
                },
            )
        summaries = [w.receive(60) for w in workers]
        wait_until(lambda: seen[0] >= summaries[0]["count"], 5.0, message="all messages seen")
    finally:
        stop.set()
        watcher.join(5.0)
        pubsub.close()
        sub_client.close()
        check_client.close()
    ops, _ = load_logs(logs)
    result = check_history(ops, ["k"], [0], delta=DELTA, detect=DETECT)
    report(f"{seen[0]} messages checked; {result.summary()}")
    assert not problems, f"published before the write was visible: {problems[:5]}"
    # (about 1,000 at the intended rate; fewer when the shared machine is loaded)
    assert result.writes >= 300, f"only {result.writes} writes"
    assert result.violation_count == 0, "\n".join(result.violations)


# -- S4 -----------------------------------------------------------------------------------------


def test_s4_duplicate_reordered_and_echoed_invalidations(
    redis_server: RedisServer, caches: Any, raw: redis.Redis, report: Any
) -> None:
    """S4. Duplicate, reordered and self-echo invalidations: B writes v2 and C writes v3 right
    after; the genuine messages (captured by a raw subscriber) are then re-published in reverse
    order and twice, and also handed to A's handler directly in the order (v3, v2, v3).

    Must hold: applying (k, v) removes only entries older than v and is idempotent; C's own v3
    entry survives its echo and every late (k, v2); B applies C's message right after its own
    write (no "ignore the next message after my write"); P1, P4.
    """
    a, b, c = caches(), caches(), caches()
    sub = redis_server.client()
    pubsub = sub.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(KeySpace("s").channel(0))
    captured: list[bytes] = []
    try:
        wait_until(lambda: pubsub.get_message(timeout=0.1) is None and pubsub.subscribed, 5.0)
        b["k"] = "v2"
        c["k"] = "v3"
        deadline = time.monotonic() + 5.0
        while len(captured) < 2:
            assert time.monotonic() < deadline, "the raw subscriber got no message"
            msg = pubsub.get_message(timeout=0.5)
            if msg is not None and msg["type"] == "message":
                captured.append(msg["data"])
    finally:
        pubsub.close()
        sub.close()
    for cache in (a, b, c):
        wait_until(lambda cache=cache: count(cache) >= 2, DELTA, message="both applied")
    assert local_value(c, "k") == "v3", "C's own v3 entry did not survive its echo"
    assert local_value(b, "k") in (None, "v3"), "B kept v2 after C's v3"
    assert a.get("k") == b.get("k") == c.get("k") == "v3"
    assert local_value(a, "k") == "v3"
    health = [(x.stats()["gaps"], x.stats()["flushes"]) for x in (a, b, c)]
    for data in [*reversed(captured), *captured]:
        raw.publish(KeySpace("s").channel(0), data)
    b["marker"] = 1  # a genuine message after the replays: once applied, the replays were seen
    for cache in (a, b, c):
        wait_until(lambda cache=cache: count(cache) >= 3, DELTA, message="the marker applied")
    for name, cache in (("A", a), ("C", c)):
        assert local_value(cache, "k") == "v3", f"{name}'s v3 entry was dropped by a replay"
    assert [(x.stats()["gaps"], x.stats()["flushes"]) for x in (a, b, c)] == health
    # Reordered delivery, straight to the handler: (k, v3), then the late (k, v2), then v3 again.
    v2_msg, v3_msg = (parse_message(d) for d in captured)
    assert v2_msg.version < v3_msg.version
    for msg in (v3_msg, v2_msg, v3_msg):
        a.apply(msg)
    assert local_value(a, "k") == "v3", "a late or repeated (k, v) dropped a newer entry"
    assert a.get("k") == "v3" and c.get("k") == "v3"
    report(f"versions v2={v2_msg.version} v3={v3_msg.version}")


# -- S5 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("log", ["replay", "log-lost"])
def test_s5_subscriber_connection_killed(
    redis_server: RedisServer, caches: Any, procs: Any, raw: redis.Redis, log: str, report: Any
) -> None:
    """S5. Subscriber connection killed (clean disconnect): warm L1 for keys K on A (a process),
    B and C; freeze A, ``CLIENT KILL TYPE pubsub``, B updates K while A cannot resubscribe
    (``log-lost``: the invalidation log is deleted too, as eviction would), then let A run.

    Must hold: P6 — after resubscribing, A has replayed (or, without the log, flushed)
    everything stored before the kill, and A's reads return the new values within the detection
    bound; A reports the resync; liveness — a write after resubscription reaches everyone within
    ``DELTA``. (The 200-cycle resource check is ``test_s5_kill_cycles_leak_nothing``.)
    """
    keys = ["k0", "k1", ("k", 2)]
    b, c = caches(), caches()
    a = procs("A")
    a.open(redis_server.url, namespace="s", **FAST)
    for k in keys:
        b[k] = "v1"
    for k in keys:
        wait_until(lambda k=k: a.call("get", k) == "v1" and a.call("entry", k) is not None, DELTA)
        assert c.get(k) == "v1"
    before = a.call("stats")
    a.stop_signal()
    try:
        killed = raw.client_kill_filter(_type="pubsub")
        assert killed >= 3
        for k in keys:
            b[k] = "v2"
        if log == "log-lost":
            assert raw.delete(KeySpace("s").log(0).decode()) == 1
    finally:
        a.cont_signal()
    took = max(a.call("read_until", k, "v2", DETECT) or float("inf") for k in keys)
    assert took < float("inf"), (
        f"A still serves v1 {DETECT}s after its subscription was killed (stats {a.call('stats')})"
    )
    wait_until(
        lambda: a.call("stats")["resyncs"] > before["resyncs"],
        RECOVERY,
        message="A reporting a resync",
    )
    after = a.call("stats")
    if log == "log-lost":
        assert after["flushes"] > before["flushes"], f"A did not flush without the log: {after}"
    for k in keys:
        assert c.get(k) == "v2" and b.get(k) == "v2"
    b["k0"] = "v3"
    live = a.call("read_until", "k0", "v3", DELTA)
    assert live is not None, "a write after the resubscription did not reach A"
    wait_until(lambda: c.get("k0") == "v3", DELTA)
    report(f"A fresh {took * 1000:.1f} ms after resuming; next write seen in {live * 1000:.1f} ms")


def test_s5_kill_cycles_leak_nothing(
    redis_server: RedisServer, caches: Any, raw: redis.Redis, report: Any
) -> None:
    """S5 (P14 part): 20 cycles of ``CLIENT KILL TYPE pubsub`` (200 in the soak variant): the
    listeners come back each time, and thread and connection counts stay flat; a write after the
    last cycle reaches the other instance within ``DELTA``."""
    _kill_cycles(caches, raw, report, 20)


@pytest.mark.slow
def test_s5_kill_cycles_leak_nothing_long(
    request: pytest.FixtureRequest, caches: Any, raw: redis.Redis, report: Any
) -> None:
    """S5 (P14): 200 kill cycles."""
    from tests.history import soak_only

    soak_only(request)
    _kill_cycles(caches, raw, report, 200)


def _kill_cycles(caches: Any, raw: redis.Redis, report: Any, cycles: int) -> None:
    b = caches()
    c = caches()
    b["k"] = 0
    assert c.get("k") == 0
    threads = threading.active_count()
    connections = len(raw.client_list())
    started = time.monotonic()
    per_cycle = []

    def subscribed() -> set[str]:
        return {x["id"] for x in listener_clients(raw) if x["sub"] == "1"}

    for i in range(cycles):
        ids = wait_until(lambda: len(subscribed()) == 2 and subscribed(), RECOVERY)
        t0 = time.monotonic()
        assert raw.client_kill_filter(_type="pubsub") == 2
        wait_until(
            lambda ids=ids: len(subscribed()) == 2 and not ids & subscribed(),
            RECOVERY,
            message=f"both listeners back after kill {i}",
        )
        per_cycle.append(time.monotonic() - t0)
    elapsed = time.monotonic() - started
    wait_until(lambda: b.stats()["local_usable"] and c.stats()["local_usable"], RECOVERY)
    assert threading.active_count() == threads, "threads leaked over the kill cycles"
    assert len(raw.client_list()) == connections, "connections leaked over the kill cycles"
    b["k"] = cycles
    took = timed(lambda: c.get("k") == cycles, DELTA, "the write after the cycles reaching C")
    per_cycle.sort()
    report(
        f"{cycles} cycles in {elapsed:.1f}s (both listeners back within max "
        f"{per_cycle[-1] * 1000:.0f} ms, median {per_cycle[len(per_cycle) // 2] * 1000:.0f} ms); "
        f"last write seen in {took * 1000:.1f} ms"
    )


# -- S6 -----------------------------------------------------------------------------------------


def test_s6_half_open_invalidation_channel(
    redis_server: RedisServer, caches: Any, proxies: Any, report: Any
) -> None:
    """S6. Half-open invalidation channel: A's pub/sub connection goes through a proxy that then
    blackholes it (both sockets stay open, nothing flows); the data path stays healthy; B writes.

    Must hold: within health_interval + health_timeout (+ margin) A notices the *missing PONG*
    (a PING that was sent is no proof of health), stops serving its local copies and reads the
    new value from L2; after the link heals, A resubscribes and a later write reaches it within
    ``DELTA`` (P3 with the fault's bound).
    """
    proxy = proxies()
    a = caches(routed_client(redis_server.host, redis_server.port, listener_port=proxy.port))
    b = caches()
    b["k"] = "v1"
    wait_until(lambda: a.get("k") == "v1" and local_value(a, "k") == "v1", DELTA)
    proxy.blackhole()
    started = time.monotonic()
    b["k"] = "v2"
    detected = timed(
        lambda: not a.stats()["local_usable"],
        HEALTH_INTERVAL + HEALTH_TIMEOUT + 2.0,
        "A noticing the silent channel",
    )
    assert a.get("k") == "v2", "A served its local copy after the channel went silent"
    proxy.restore()
    healed = timed(lambda: a.stats()["local_usable"], RECOVERY, "A resubscribing")
    b["k"] = "v3"
    took = timed(lambda: a.get("k") == "v3", DELTA, "a write after the heal reaching A")
    assert a.stats()["resyncs"] >= 1
    report(
        f"detected after {detected * 1000:.0f} ms (bound "
        f"{(HEALTH_INTERVAL + HEALTH_TIMEOUT) * 1000:.0f} ms + margin), healed "
        f"{healed * 1000:.0f} ms after restore, next write seen in {took * 1000:.1f} ms; "
        f"blackhole lasted {time.monotonic() - started:.2f}s"
    )


def test_s6_recovery_keeps_reads_monotonic(
    redis_server: RedisServer, caches: Any, proxies: Any, report: Any
) -> None:
    """S6, recovery: while A's channel is down A reads from L2 (its local tier is off); a write
    that lands after A's catch-up read the counter but before A turned its local tier back on
    reaches A's listener only later (its pub/sub path is slow). A read from L2 during recovery
    returned the new value v2; the next read, once the local tier is on again, must not return
    the pre-fault local copy v1 (monotonic reads, P5; "after the heal, no stale read").

    Staging: listener path through a proxy (blackholed, then 3 s latency), data path through a
    second proxy (0.8 s latency on replies); the MONITOR tap shows when A's catch-up has read the
    counter, and B writes right then; A's read during recovery completes before A's recovery
    does, and A's next read comes before the invalidation of v2 reaches it (0.8 s margins).
    """
    listener_proxy, data_proxy = proxies(), proxies()
    a = caches(
        routed_client(
            data_proxy.host, data_proxy.port, listener_port=listener_proxy.port, socket_timeout=6.0
        ),
        health_timeout=4.0,
        startup_timeout=8.0,
    )
    b = caches()
    tap = MonitorTap(redis_server.host, redis_server.port)
    try:
        b["k"] = "v1"
        wait_until(lambda: a.get("k") == "v1" and local_value(a, "k") == "v1", DELTA)
        value_key = KeySpace("s").value(encode_key("k"))
        tap.wait_for(lambda e: e.command == "GET" and value_key in e.args, 5.0)
        # A second ready connection in A's pool: A's read below must not wait for a handshake.
        pool = a.redis.connection_pool
        spare = [pool.get_connection(), pool.get_connection()]
        for conn in spare:
            pool.release(conn)
        listener_proxy.blackhole()
        wait_until(lambda: not a.stats()["local_usable"], 10.0, message="A noticing the silence")
        data_proxy.set_latency(0.8, direction="downstream")
        listener_proxy.set_latency(3.0, direction="downstream")
        mark = tap.last_index
        listener_proxy.restore()
        subscribe = tap.wait_for(lambda e: e.command == "SUBSCRIBE", 15.0, after=mark)
        catch_up = tap.wait_for(  # the first data command after it: the catch-up's read
            lambda e: (
                e.client not in ("lua", subscribe.client)
                and e.command not in ("PING", "HELLO", "CLIENT")
            ),
            15.0,
            after=subscribe.index,
        )
        b["k"] = "v2"  # after A's catch-up read the counter, before A turns its local tier on
        assert not a.stats()["local_usable"], "staging: A's local tier came back too early"
        assert a.get("k") == "v2", "A's read during recovery goes to L2"
        assert not a.stats()["local_usable"], "staging: A's local tier came back during the read"
        wait_until(lambda: a.stats()["local_usable"], 10.0, message="A's recovery")
        got = a.get("k")
        assert got == "v2", (
            f"A read {got!r} after having read v2 (monotonic reads): the pre-fault local copy "
            f"came back when the local tier was turned on again (catch-up read "
            f"{catch_up.command} {catch_up.args[1:2]!r} before v2 was written)"
        )
    finally:
        tap.close()
    listener_proxy.set_latency(0.0)
    data_proxy.set_latency(0.0)
    wait_until(lambda: a.get("k") == "v2" and local_value(a, "k") in (None, "v2"), DELTA * 3)
    report("monotonic across the recovery")


# -- S7 -----------------------------------------------------------------------------------------


def test_s7_slow_subscriber_evicted(
    redis_factory: Callable[..., RedisServer], caches: Any, procs: Any, report: Any
) -> None:
    """S7. Slow subscriber evicted by Redis (``client-output-buffer-limit pubsub 1kb 1kb 0``):
    A (a process) is frozen with SIGSTOP while B publishes a burst until Redis drops A's
    subscription (Redis then sends A nothing); B also updates k, which A has cached; A resumes.

    Must hold: A notices the closed socket (or the gap), treats it as loss (replays the log or
    flushes), resubscribes, and reads the new value of k within the detection bound (P3 with
    Δ_fault after SIGCONT).
    """
    server = redis_factory(extra_args=["--client-output-buffer-limit", "pubsub 1kb 1kb 0"])
    raw = server.client(decode_responses=True)
    try:
        b = TieredCache(server.url, namespace="s", **FAST)
        try:
            before_names = listener_names(raw)
            a = procs("A")
            a.open(server.url, namespace="s", **FAST)
            a_name = new_listener_name(raw, before_names)
            b["k"] = "v1"
            wait_until(lambda: a.call("get", "k") == "v1" and a.call("entry", "k"), DELTA)
            before = a.call("stats")
            a.stop_signal()
            try:
                filler = [f"f{i}:" + "x" * 2000 for i in range(40)]
                deadline = time.monotonic() + 10.0
                bursts = 0
                while a_name in listener_names(raw):
                    for k in filler:
                        b[k] = bursts
                    bursts += 1
                    assert time.monotonic() < deadline, "Redis never dropped the frozen A"
                b["k"] = "v2"
            finally:
                a.cont_signal()
            took = a.call("read_until", "k", "v2", DETECT)
            assert took is not None, f"A still serves v1 {DETECT}s after resuming"
            wait_until(
                lambda: a.call("stats")["resyncs"] > before["resyncs"],
                RECOVERY,
                message="A resynchronising after it was dropped",
            )
            assert a.call("get", "k") == "v2"
            report(f"{bursts * len(filler)} writes to evict A; A fresh after {took * 1000:.1f} ms")
        finally:
            b.close()
    finally:
        raw.close()


# -- S8 -----------------------------------------------------------------------------------------


def test_s8_redis_crash_restart_empty(redis_server: RedisServer, caches: Any, report: Any) -> None:
    """S8. Redis crash, restarted with an empty dataset: warm L1 and L2; SIGKILL redis-server;
    during the outage the origin changes k and B's invalidate fails; restart on the same port.

    Must hold: (a) every process flushes L1 after reconnecting (P6); (b) versions stay totally
    ordered (P7): a write after the restart is newer than every version held before; (d) B's
    failed invalidation is surfaced (CacheUnavailable, bounded in time) and B's own L1 entry is
    dropped at once (P4, P12); reads everywhere return the truth (or a miss), never the old
    value. Deferred: (c) the Bloom filter ("missing filter means unknown") — no Bloom filter yet
    (issue of SPEC 3.8).
    """
    truth: dict[Hashable, Any] = {"k": "v1", "j": "w1"}
    a = caches(loader=SlowLoader(truth))
    b, c = caches(socket_timeout=0.5, connect_timeout=0.5), caches()
    b["k"], b["j"] = "v1", "w1"
    for cache in (a, c):
        wait_until(lambda cache=cache: cache.get("k") == "v1" and cache.get("j") == "w1", DELTA)
        assert local_value(cache, "k") == "v1"
    old_versions = {k: l2_entry(redis_server, "s", k)[1] for k in ("k", "j")}
    resyncs = [x.stats()["resyncs"] for x in (a, b, c)]
    redis_server.kill()
    truth["k"] = "v2"
    started = time.monotonic()
    with pytest.raises(CacheUnavailable):
        b.invalidate("k")
    failed_after = time.monotonic() - started
    assert local_value(b, "k") is None, "B kept its copy after its invalidate failed"
    with pytest.raises(CacheUnavailable):
        b.get("k")  # no local copy, no Redis: an error, not the old value
    redis_server.restart()
    for name, cache, before in zip("ABC", (a, b, c), resyncs, strict=True):
        wait_until(
            lambda cache=cache, before=before: (
                cache.stats()["resyncs"] > before and cache.stats()["local_usable"]
            ),
            RECOVERY,
            message=f"{name} recovering",
        )
        assert len(cache.local) == 0, f"{name} kept local copies across the data loss"
    assert a.get("k") == "v2"  # loaded from the origin
    for cache in (b, c):
        assert cache.get("k") in ("v2", None)
    b["j"] = "w2"
    new_version = l2_entry(redis_server, "s", "j")[1]
    assert new_version > max(old_versions.values()), "a version after the restart is not newer"
    took = timed(lambda: a.get("j") == "w2" and c.get("j") == "w2", DELTA, "everyone reads w2")
    for cache in (a, b, c):
        assert cache.get("k") != "v1"
    report(f"invalidate failed after {failed_after:.2f}s; w2 everywhere in {took * 1000:.1f} ms")


# -- S9 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["flushall", "eviction"])
def test_s9_version_regression_without_restart(
    redis_factory: Callable[..., RedisServer], report: Any, loss: str
) -> None:
    """S9. Version regression without a restart: FLUSHALL, or eviction under ``maxmemory 2mb``
    with ``allkeys-lru`` until k's entry is gone (and with it any counter kept next to it).

    Must hold (P7, P1): the next write of k is newer than every cached copy; no L1 rejects the
    genuinely newer write as older (the new value is served and cached by A, no stale-forever
    high-water mark); everyone converges within ``DELTA``.
    """
    args = ["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"] if loss == "eviction" else []
    server = redis_factory(extra_args=args)
    raw = server.client()
    a = TieredCache(server.url, namespace="s", **FAST)
    b = TieredCache(server.url, namespace="s", **FAST)
    try:
        b["k"] = "v1"
        wait_until(lambda: a.get("k") == "v1" and local_value(a, "k") == "v1", DELTA)
        v1 = l2_entry(server, "s", "k")[1]
        if loss == "flushall":
            raw.flushall()
        else:
            value_key = KeySpace("s").value(encode_key("k"))
            junk = b"x" * 10_000
            n = 0
            while raw.exists(value_key):
                pipe = raw.pipeline(transaction=False)
                for _ in range(50):
                    pipe.set(f"junk:{n}", junk)
                    n += 1
                pipe.execute()
                assert n < 100_000, "k was never evicted"
            assert int(raw.info("stats")["evicted_keys"]) > 0
        b["k"] = "v2"
        v2 = l2_entry(server, "s", "k")[1]
        assert v2 > v1, f"the write after the loss got version {v2} <= {v1}"
        took = timed(lambda: a.get("k") == "v2", DELTA, "A reading v2")
        wait_until(lambda: a.get("k") == "v2" and local_value(a, "k") == "v2", DELTA)
        b["k"] = "v3"
        wait_until(lambda: a.get("k") == "v3" and local_value(a, "k") == "v3", DELTA)
        assert b.get("k") == "v3"
        report(f"A read v2 {took * 1000:.1f} ms after the write; versions {v1} < {v2}")
    finally:
        a.close()
        b.close()
        raw.close()


# -- S10 ----------------------------------------------------------------------------------------


def test_s10_redis_paused_indeterminate_write_and_lease_expiry(
    redis_server: RedisServer, caches: Any, raw: redis.Redis, report: Any
) -> None:
    """S10. Redis paused: B (socket_timeout 0.5 s) writes k1 while Redis is SIGSTOPped for 2.5 s;
    A holds the fill lease of k2 (lease TTL 1 s) with its loader blocked.

    Must hold: B's write reports an error within its timeouts, and B's L1 does not keep serving
    the old value (P12); everyone converges to the post-resume value within the detection bound
    (the queued write is applied after SIGCONT); A's lease expired during the pause, so its fill
    cannot commit (P11): counted in ``stale_fills_rejected``, k2 holds no value afterwards.
    """
    truth: dict[Hashable, Any] = {"k2": "x1"}
    loader = SlowLoader(truth)
    loader.gated.add("k2")
    a = caches(loader=loader, lease_ttl=1.0)
    b = caches(socket_timeout=0.5, connect_timeout=0.5)
    c = caches()
    b["k1"] = "v1"
    for cache in (a, c):
        wait_until(lambda cache=cache: cache.get("k1") == "v1" and local_value(cache, "k1"), DELTA)
    fill = Background(lambda: a.get("k2"))
    wait_until(loader.loading.is_set, 5.0, message="A loading k2 under its lease")
    rejected = a.stats()["stale_fills_rejected"]
    redis_server.pause()
    paused_at = time.monotonic()
    try:
        with pytest.raises(CacheUnavailable):
            b["k1"] = "v2"
        failed_after = time.monotonic() - paused_at
        assert local_value(b, "k1") is None, "B kept its old copy after the failed write"
        with pytest.raises(CacheUnavailable):
            b.get("k1")
        hold(max(0.0, 2.5 - (time.monotonic() - paused_at)))  # the pause outlives the lease
    finally:
        redis_server.resume()
    loader.release.set()
    assert fill.result() == "x1"
    assert a.stats()["stale_fills_rejected"] == rejected + 1, "a fill with an expired lease landed"
    assert l2_value(redis_server, "s", "k2") is None
    wait_until(lambda: l2_entry(redis_server, "s", "k1") is not None, 5.0)
    post = l2_value(redis_server, "s", "k1")
    took = timed(
        lambda: a.get("k1") == post and b.get("k1") == post and c.get("k1") == post,
        DETECT + RECOVERY,
        f"everyone converging to {post!r}",
    )
    report(
        f"B's write failed after {failed_after:.2f}s; post-resume value {post!r}; "
        f"converged in {took * 1000:.0f} ms"
    )


# -- S18 ----------------------------------------------------------------------------------------


def test_s18a_used_before_the_subscription_is_acknowledged(
    redis_server: RedisServer, caches: Any, proxies: Any, report: Any
) -> None:
    """S18 (a). Startup gap: A's pub/sub connection is slow (0.6 s per reply), so A is used
    before its SUBSCRIBE is acknowledged (``startup_timeout`` 0.2 s); B writes meanwhile.

    Must hold (P2, P3): until A reports ready, its local tier is not used (every read goes to L2
    and returns the newest value; nothing is cached locally); once ready, a write reaches A within
    ``DELTA``.
    """
    proxy = proxies()
    proxy.set_latency(0.6, direction="downstream")  # replies stay below the 1 s subscribe timeout
    b = caches()
    b["k"] = "v1"
    a = caches(
        routed_client(
            redis_server.host, redis_server.port, listener_port=proxy.port, socket_timeout=5.0
        ),
        startup_timeout=0.2,
        health_timeout=5.0,
    )
    assert not a.stats()["local_usable"], "staging: A's channel was ready at once"
    assert a.get("k") == "v1"
    b["k"] = "v2"
    assert a.get("k") == "v2", "A served a value cached before its subscription"
    assert not a.stats()["local_usable"], "staging: A became ready too early"
    assert len(a.local) == 0, "A cached values before its channel was ready"
    assert a.wait_ready(10.0)
    proxy.set_latency(0.0)
    assert a.get("k") == "v2"
    b["k"] = "v3"
    took = timed(lambda: a.get("k") == "v3", DELTA, "a write after A's start reaching A")
    report(f"after ready, v3 seen in {took * 1000:.1f} ms")


def _forked_child(cache: TieredCache, conn: Any) -> None:
    """In the forked child: report what the inherited cache holds and reads, then wait for v2."""
    try:
        conn.send(("local", len(cache.local)))
        conn.send(("read", cache.get("k")))
        expected, timeout = conn.recv()
        start = time.monotonic()
        while cache.get("k") != expected:
            if time.monotonic() - start > timeout:
                conn.send(("fresh", None))
                break
            time.sleep(0.001)
        else:
            conn.send(("fresh", time.monotonic() - start))
        conn.send(("stats", cache.stats()))
    finally:
        cache.close()
        conn.close()


def test_s18b_forked_child_does_not_trust_the_parents_copies(
    redis_server: RedisServer, caches: Any, report: Any
) -> None:
    """S18 (b). Fork gap (the ``gunicorn --preload`` pattern): the parent warms its L1, then
    forks (``multiprocessing`` "fork" context); after the fork B writes k.

    Must hold: the child does not serve the parent's copies (its local tier starts empty), reads
    the current value, re-creates its own listener, and sees B's later write within ``DELTA``
    (P3 in the child).
    """
    a, b = caches(), caches()
    b["k"] = "v1"
    wait_until(lambda: a.get("k") == "v1" and local_value(a, "k") == "v1", DELTA)
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    with warnings_suppressed():
        child = ctx.Process(target=_forked_child, args=(a, child_end), daemon=True)
        child.start()
    child_end.close()
    try:
        assert parent_end.poll(10.0)
        assert parent_end.recv() == ("local", 0), "the child inherited usable local copies"
        assert parent_end.poll(10.0)
        assert parent_end.recv() == ("read", "v1")
        b["k"] = "v2"
        parent_end.send(("v2", DELTA))
        assert parent_end.poll(DELTA + 10.0)
        kind, took = parent_end.recv()
        assert kind == "fresh" and took is not None, "the child never saw the write after the fork"
        assert parent_end.poll(10.0)
        _, stats = parent_end.recv()
        report(f"child saw v2 in {took * 1000:.1f} ms; child stats resyncs={stats['resyncs']}")
    finally:
        child.join(10.0)
        if child.is_alive():
            child.kill()
            child.join(5.0)
        parent_end.close()
    assert child.exitcode == 0
    assert a.get("k") == "v2"


@contextlib.contextmanager
def warnings_suppressed() -> Iterator[None]:
    """Silence Python's warning about forking a process that has threads (wanted here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield

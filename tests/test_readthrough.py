"""Read-through (SPEC 2.2, 3.7, issue 4): ``get_or_load`` and ``loader=``, negative caching,
fail-safe serving, stale-while-revalidate, XFetch early refresh, TTL jitter, and the batch calls
``get_many`` / ``get_or_load_many``.

Everything runs on a real Redis (the session's shared server, flushed before each test); the
"other process" checks use a real worker process (``tests.test_stampede.Worker``). XFetch's
statistics are checked on ``tiercache.protocol.xfetch_due`` with a seeded RNG and a fixed clock,
and its wiring in the cache with a fake RNG (the cache's ``_random``). Round trips to Redis are
counted on the client side (a ``redis.Connection`` that counts what it sends). Nothing sleeps to
wait: waits are conditions with deadlines.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.servers import RedisServer, wait_until
from tests.test_stampede import (
    Background,
    Factory,
    Truth,
    TruthLoader,
    Worker,
    cache_factory,
    forkserver_running,
    is_lease,
    local_entry,
    marker_key,
    raw_key,
    refresh_pending,
    worker_pool,
)
from tiercache import MISSING, TieredCache
from tiercache.envelope import unpack
from tiercache.keys import encode_key
from tiercache.protocol import jittered, xfetch_due


@pytest.fixture
def make(redis_client: redis.Redis, shared_redis: RedisServer, impl: str) -> Iterator[Factory]:
    """Ready caches on the shared server: TieredCache, or AsyncTieredCache (tests.aio_facade)."""
    with cache_factory(shared_redis.url, impl) as factory:
        yield factory


@pytest.fixture
def truth(redis_client: redis.Redis) -> Truth:
    return Truth(redis_client)


@pytest.fixture(scope="module")
def forkserver() -> Iterator[None]:
    with forkserver_running():
        yield


@pytest.fixture
def worker(forkserver: None, shared_redis: RedisServer) -> Iterator[Worker]:
    """One worker process with a ready TieredCache on the shared server."""
    with worker_pool() as (start, _go):
        w = start("W")
        w.open(shared_redis.url, health_timeout=5.0)
        yield w


def envelope(client: redis.Redis, key: Any) -> Any:
    raw = client.get(raw_key(key))
    return None if raw is None else unpack(raw)


class Counter:
    """A loader that counts its calls (thread by thread) and returns a fixed or numbered value."""

    def __init__(self, result: Any = None, *, gate: threading.Event | None = None) -> None:
        self.calls: list[str] = []
        self.result = result
        self.gate = gate
        self.loading = threading.Event()

    def __call__(self, key: Any) -> Any:
        self.calls.append(threading.current_thread().name)
        self.loading.set()
        if self.gate is not None and not self.gate.wait(20):
            raise TimeoutError("the gated loader was never released")
        if isinstance(self.result, BaseException):
            raise self.result
        if self.result is None:
            return f"{key}#{len(self.calls)}"
        return self.result


# -- get_or_load and loader= ---------------------------------------------------------------------


def test_get_or_load_stores_with_the_given_ttl_and_loader_option_reads_through(
    make: Factory, redis_client: redis.Redis
) -> None:
    default_loader = Counter("from the cache's loader")
    c = make(loader=default_loader, ttl=60.0)
    own = Counter("from get_or_load's loader")
    assert c.get_or_load("a", own, ttl=5.0) == "from get_or_load's loader"
    assert 0 < redis_client.pttl(raw_key("a")) <= 5000
    assert c["b"] == "from the cache's loader"  # loader= reads through on [] and get
    assert c.get("c") == "from the cache's loader"
    assert 5000 < redis_client.pttl(raw_key("b")) <= 60_000
    assert (len(own.calls), len(default_loader.calls)) == (1, 2)
    # Stored values are served without any loader, locally and from Redis elsewhere.
    assert c.get_or_load("a", Counter("unused")) == "from get_or_load's loader"
    assert make().get_or_load("b", Counter("unused")) == "from the cache's loader"
    env = envelope(redis_client, "a")
    assert env.is_value and env.fresh_until > time.time()


# -- negative caching ----------------------------------------------------------------------------


@pytest.mark.parametrize("absence", ["MISSING", "KeyError"])
def test_an_absence_is_cached_in_both_tiers_and_a_later_write_replaces_it_everywhere(
    make: Factory,
    worker: Worker,
    redis_client: redis.Redis,
    shared_redis: RedisServer,
    truth: Truth,
    absence: str,
) -> None:
    loader = Counter(MISSING if absence == "MISSING" else KeyError("no such user"))
    c = make(negative_ttl=20.0)
    with pytest.raises(KeyError):
        c.get_or_load("k", loader)
    with pytest.raises(KeyError):
        c.get_or_load("k", loader)
    assert c.get("k", "dflt") == "dflt"
    assert len(loader.calls) == 1, "the cached absence did not spare the loader"
    # Both tiers hold the absence: L1 a MISSING entry, Redis an "absent" envelope, for
    # negative_ttl.
    e = local_entry(c, "k")
    assert e is not None and e.value is MISSING
    env = envelope(redis_client, "k")
    assert env is not None and env.absent and env.is_value
    assert 0 < redis_client.pttl(raw_key("k")) <= 20_000
    assert "k" not in c
    # Another process: its own loader is not called, it answers "absent" from Redis.
    outcome = worker.call("get_or_load", "k", TruthLoader(shared_redis.url, "w"))
    assert outcome[0] == "KeyError"
    assert truth.calls("w") == 0
    assert worker.call("entry", "k")[0] == "MISSING"
    # A write replaces the absence in Redis, in the worker's local tier and in c's.
    make()["k"] = "now there"
    wait_until(lambda: worker.call("get", "k") == "now there", 5, message="the worker sees it")
    wait_until(lambda: c.get("k") == "now there", 5, message="c sees the write")
    assert c.get_or_load("k", loader) == "now there"
    assert len(loader.calls) == 1
    assert unpack(redis_client.get(raw_key("k"))).absent is False


def test_a_cached_absence_expires_after_negative_ttl(
    make: Factory, redis_client: redis.Redis
) -> None:
    loader = Counter(MISSING)
    c = make(negative_ttl=0.6)
    t0 = time.monotonic()
    with pytest.raises(KeyError):
        c.get_or_load("k", loader)

    def asked_again() -> bool:
        with pytest.raises(KeyError):
            c.get_or_load("k", loader)
        return len(loader.calls) >= 2  # (an early refresh may ask once more)

    wait_until(asked_again, 10, message="the origin asked again after negative_ttl")
    assert time.monotonic() - t0 >= 0.6 - 0.05, "the absence expired before negative_ttl"


def test_loader_errors_other_than_key_error_are_not_cached(
    make: Factory, redis_client: redis.Redis
) -> None:
    c, other = make(), make()
    with pytest.raises(ZeroDivisionError):
        c.get_or_load("k", Counter(ZeroDivisionError("bug in the origin")))
    assert redis_client.get(raw_key("k")) is None, "an error or its lease was left in Redis"
    assert local_entry(c, "k") is None
    retry = Counter("fine")
    assert other.get_or_load("k", retry) == "fine"
    assert c.get_or_load("k", retry) == "fine"
    assert len(retry.calls) == 1


# -- fail-safe -----------------------------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves (the local tier's ``timer=``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stale_if_error_serves_a_recent_local_copy_when_the_loader_fails(
    make: Factory, redis_client: redis.Redis
) -> None:
    clock = Clock()
    c = make(stale_if_error=30.0, ttl=0.3, timer=clock)
    strict = make(ttl=0.3)
    assert c.get_or_load("k", Counter("v1")) == "v1"
    assert strict.get_or_load("k", Counter("unused")) == "v1"
    wait_until(lambda: redis_client.get(raw_key("k")) is None, 5, message="k expiring in Redis")
    # (Redis' clock and the local tier's may disagree by a few ms: wait for both.)
    wait_until(lambda: not _fresh_here(strict, "k"), 5, message="strict's copy going stale")
    clock.now += 1.0  # the local copy is no longer fresh, 1 s old: within stale_if_error
    failing = Counter(ConnectionError("origin down"))
    assert c.get_or_load("k", failing) == "v1"
    assert c.stats()["stale_served"] == 1
    assert len(failing.calls) == 1
    assert redis_client.get(raw_key("k")) is None, "the fail-safe answer was stored"
    # Without stale_if_error the loader's error propagates; beyond the bound too.
    with pytest.raises(ConnectionError):
        strict.get_or_load("k", failing)
    clock.now += 40.0
    with pytest.raises(ConnectionError):
        c.get_or_load("k", failing)
    assert c.stats()["stale_served"] == 1
    # The loader recovers: a fresh value, stored again.
    assert c.get_or_load("k", Counter("v2")) == "v2"
    assert unpack(redis_client.get(raw_key("k"))).is_value


def _fresh_here(cache: Any, key: str) -> bool:
    e = cache.local.entry(key)
    return e is not None and e.fresh_until > cache.local.timer()


# -- stale-while-revalidate ------------------------------------------------------------------------


def wait_stale(client: redis.Redis, key: Any) -> Any:
    """Wait until ``key``'s Redis entry is past its fresh period (still stored); its envelope."""
    env = envelope(client, key)
    assert env is not None and env.fresh_until
    wait_until(lambda: time.time() > env.fresh_until + 0.02, 10, message="the value going stale")
    return env


def test_swr_serves_the_stale_value_at_once_while_one_background_refresh_runs(
    make: Factory, redis_client: redis.Redis
) -> None:
    options = {"ttl": 0.3, "stale_ttl": 30.0}
    a = make(**options)
    readers = [make(**options) for _ in range(3)]
    assert a.get_or_load("k", Counter("v1")) == "v1"
    old = wait_stale(redis_client, "k")
    gate = threading.Event()
    refresh = Counter("v2", gate=gate)
    try:
        # Every reader gets v1 at once, though the refresh's loader is blocked.
        for _ in range(3):
            for r in readers:
                assert r.get_or_load("k", refresh) == "v1"
        assert refresh.loading.wait(10)
        assert sum(r.stats()["stale_served"] for r in readers) == 9
        assert refresh.calls and all(n.startswith("tiercache") for n in refresh.calls)
        # The other readers' refresh attempts found the marker taken and gave up.
        wait_until(lambda: sum(refresh_pending(r, "k") for r in readers) == 1, 10)
        assert len(refresh.calls) == 1, "more than one refresh of one stale key"
        assert 0 < redis_client.pttl(marker_key("k")) <= 10_000, "no refresh marker, or no TTL"
    finally:
        gate.set()
    wait_until(lambda: sum(r.stats()["refreshes"] for r in readers) == 1, 10)
    new = envelope(redis_client, "k")
    assert new.version > old.version and new.fresh_until > old.fresh_until
    for r in readers:
        wait_until(lambda r=r: r.get("k") == "v2", 5)
    assert sum(r.stats()["stale_fills_rejected"] for r in readers) == 0
    assert len(refresh.calls) == 1
    assert not redis_client.exists(marker_key("k")), "the refresh marker was left behind"


def test_a_refresh_of_a_version_already_replaced_is_not_claimed(
    make: Factory, redis_client: redis.Redis
) -> None:
    """A process that read the stale v1 after another one refreshed it does not call the origin
    again: the refresh claim holds only while the entry still has the version it read."""
    a = make(ttl=0.3, stale_ttl=30.0)
    assert a.get_or_load("k", Counter("v1")) == "v1"
    old = wait_stale(redis_client, "k")
    encoded = encode_key("k")
    driver = a._driver
    assert driver.mark_refresh(encoded, b"t1", 5_000, old.version)
    assert not driver.mark_refresh(encoded, b"t2", 5_000, old.version), "claimed twice"
    redis_client.delete(marker_key("k"))  # the first refresh finished and released its claim
    a["k"] = "v2"  # (as a refresh or any write would) the entry moves on
    assert not driver.mark_refresh(encoded, b"t3", 5_000, old.version), "refresh of a dead version"
    assert not redis_client.exists(marker_key("k"))
    assert driver.mark_refresh(encoded, b"t4", 5_000, envelope(redis_client, "k").version)


def test_swr_never_serves_past_ttl_plus_stale_ttl(make: Factory, redis_client: redis.Redis) -> None:
    c = make(ttl=0.2, stale_ttl=0.4, local_ttl=60.0)
    reader = make()
    assert c.get_or_load("k", Counter("v1")) == "v1"
    env = envelope(redis_client, "k")
    assert env.expires_at == pytest.approx(env.fresh_until + 0.4)
    wait_until(lambda: time.time() > env.expires_at + 0.02, 10, message="past the stale period")
    assert reader.get("k") is None
    assert c.get("k") is None, "a local copy outlived the value"
    later = Counter("v2")
    assert c.get_or_load("k", later) == "v2"
    assert later.calls and not later.calls[0].startswith("tiercache"), "not a foreground load"
    assert c.stats()["stale_served"] == 0


# -- XFetch ----------------------------------------------------------------------------------------

# (t, delta, beta): chances exp(-t/(beta*delta)) from 0.08 to 0.61.
XFETCH_CASES = [
    (0.1, 0.1, 1.0),
    (0.5, 0.2, 1.0),
    (0.3, 0.1, 2.0),
    (1.0, 2.0, 0.5),
    (0.05, 0.2, 0.5),
    (2.0, 1.0, 1.0),
]


@pytest.mark.parametrize(("t", "delta", "beta"), XFETCH_CASES)
def test_xfetch_early_refresh_frequency_matches_exp_within_5_sigma(
    t: float, delta: float, beta: float
) -> None:
    rng = random.Random(f"{t}-{delta}-{beta}")  # the fake RNG: seeded
    now = 1_700_000_000.0  # the fake clock: a fixed unix time, as the cache uses
    fresh_until = now + t
    n = 100_000
    hits = sum(xfetch_due(now, fresh_until, delta, beta, rng.random()) for _ in range(n))
    p = math.exp(-t / (beta * delta))
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) <= 5 * sigma, f"frequency {hits / n:.4f}, expected {p:.4f}"


def test_xfetch_edges() -> None:
    now = 1_700_000_000.0
    # u = 0 is a legal draw of random(): no log(0), and never early.
    assert xfetch_due(now, now + 1.0, 0.2, 1.0, 0.0) is False
    # The largest draw below 1: early as long as beta*delta*ln(2**53) reaches t.
    top = 1.0 - 2.0**-53
    assert xfetch_due(now, now + 7.0, 0.2, 1.0, top) is True
    assert xfetch_due(now, now + 8.0, 0.2, 1.0, top) is False
    # At or past the fresh period: always, whatever u, delta and beta.
    for u in (0.0, 0.5, top):
        for delta, beta in ((0.0, 1.0), (0.2, 0.0), (0.2, 1.0)):
            assert xfetch_due(now, now, delta, beta, u) is True
            assert xfetch_due(now + 5.0, now, delta, beta, u) is True
    # delta = 0 (unknown load time) or beta = 0: no early refresh.
    assert xfetch_due(now, now + 0.001, 0.0, 1.0, top) is False
    assert xfetch_due(now, now + 0.001, 0.2, 0.0, top) is False


@settings(max_examples=100, deadline=None)
@given(
    t=st.floats(-10, 10),
    delta=st.floats(0, 5),
    beta=st.floats(0, 5),
    u1=st.floats(0, 1, exclude_max=True),
    u2=st.floats(0, 1, exclude_max=True),
)
def test_xfetch_is_the_exponential_rule_and_monotone(
    t: float, delta: float, beta: float, u1: float, u2: float
) -> None:
    now = 1_700_000_000.0
    due = xfetch_due(now, now + t, delta, beta, u1)
    assert isinstance(due, bool)
    if t <= 0:
        assert due
    elif delta > 0 and beta > 0 and abs(-math.log1p(-u1) * beta * delta - t) > 1e-6 * (1 + t):
        # Away from the boundary: exactly the rule -beta*delta*ln(1-u) >= t.
        assert due == (-beta * delta * math.log1p(-u1) >= t)
    # A larger draw, or a later moment, is never less due.
    lo, hi = sorted((u1, u2))
    if xfetch_due(now, now + t, delta, beta, lo):
        assert xfetch_due(now, now + t, delta, beta, hi)
    if due:
        assert xfetch_due(now + 0.5, now + t, delta, beta, u1)


def test_xfetch_in_the_cache_uses_the_measured_load_time_in_seconds(
    make: Factory, redis_client: redis.Redis
) -> None:
    """The loader's duration is stored with the value (ms) and read back as delta in seconds.

    With a fake RNG the decision is deterministic: a draw whose -beta*delta*ln(1-u) reaches
    1 s beyond the time left refreshes early, one that falls 1 s short does not. Had delta been
    taken in ms (or the clock in another unit), both or neither would refresh.
    """
    beta = 10.0
    writer = make(ttl=30.0, xfetch_beta=beta)

    def slow(key: Any) -> str:
        time.sleep(0.15)  # the origin's latency: what delta measures
        return "v1"

    assert writer.get_or_load("k", slow) == "v1"
    env = envelope(redis_client, "k")
    assert 150 <= env.load_ms < 150 + 5000, f"load_ms {env.load_ms}"
    delta = env.load_ms / 1000.0

    def draw_for(margin: float) -> float:
        """The u whose -beta*delta*ln(1-u) is the time left plus ``margin`` seconds."""
        left = env.fresh_until - time.time()
        return -math.expm1(-(left + margin) / (beta * delta))

    late, early = make(xfetch_beta=beta), make(xfetch_beta=beta)
    refresh = Counter("v2")
    late._random = lambda: draw_for(-1.0)  # type: ignore[method-assign]
    assert late.get_or_load("k", refresh) == "v1"
    assert not refresh_pending(late, "k"), "an early refresh drawn 1 s short of the time left"
    early._random = lambda: draw_for(+1.0)  # type: ignore[method-assign]
    assert early.get_or_load("k", refresh) == "v1"
    wait_until(lambda: early.stats()["refreshes"] == 1, 10, message="the early refresh landing")
    assert len(refresh.calls) == 1 and refresh.calls[0].startswith("tiercache")
    assert late.stats()["loads"] == 0
    new = envelope(redis_client, "k")
    assert new.version > env.version
    assert early.get("k") == "v2" and make().get("k") == "v2"


@pytest.mark.parametrize("got_it_by", ["loading", "waiting"])
def test_xfetch_draws_near_expiry_after_this_process_loaded_or_waited_for_the_value(
    make: Factory, got_it_by: str
) -> None:
    """XFetch only draws on reads that reach Redis, so a local copy must stop short of the
    early-refresh window however this process got the value: by its own load, or while waiting
    on another process' fill lease, as well as by a plain read of Redis.

    beta 10 and a 150 ms loader make the window (beta * delta * ln 1000, about 10 s) cover the
    whole 5 s TTL; the fake RNG's largest draw makes any read inside it refresh early.
    """
    top = 1.0 - 2.0**-53

    def slow(key: Any) -> str:
        time.sleep(0.15)  # the origin's latency: what delta measures
        return "v1"

    c = make(ttl=5.0, xfetch_beta=10.0)
    c._random = lambda: top  # type: ignore[method-assign]
    if got_it_by == "loading":
        assert c.get_or_load("k", slow) == "v1"
    else:
        other = make(ttl=5.0, xfetch_beta=10.0)
        gate = threading.Event()
        gated = Counter("unused", gate=gate)
        fill = Background(lambda: other.get_or_load("k", lambda k: gated(k) and slow(k)))
        assert gated.loading.wait(10)
        waiter = Background(lambda: c.get_or_load("k", slow))
        wait_until(lambda: c.stats()["misses"] == 1, 5, message="c waiting on the lease")
        gate.set()
        assert fill.result() == "v1" and waiter.result() == "v1"
        assert c.stats()["loads"] == 0, "staging: c loaded instead of waiting"
    refresh = Counter("v2")
    assert c.get_or_load("k", refresh) == "v1"
    wait_until(
        lambda: c.stats()["refreshes"] == 1,
        3,
        message="an early refresh (the read near expiry was answered locally, with no draw)",
    )
    assert c.get("k") == "v2"


# -- TTL jitter --------------------------------------------------------------------------------


def test_jittered_stays_within_bounds() -> None:
    assert jittered(10.0, 0.0, 0.99) == 10.0
    assert jittered(10.0, 0.2, 0.0) == pytest.approx(8.0)
    assert jittered(10.0, 0.2, 0.5) == pytest.approx(10.0)
    assert 11.99 < jittered(10.0, 0.2, 1.0 - 2.0**-53) <= 12.0
    rng = random.Random(7)
    for _ in range(1000):
        assert 8.0 <= jittered(10.0, 0.2, rng.random()) <= 12.0


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_ttl_jitter_spreads_expiries_within_plus_minus_jitter(
    make: Factory, redis_client: redis.Redis, jitter: float
) -> None:
    c = make(ttl=10.0, ttl_jitter=jitter)
    keys = [f"k{i}" for i in range(60)]
    for k in keys[:30]:
        c[k] = "written"
    c.get_or_load_many(keys[30:], lambda ks: dict.fromkeys(ks, "loaded"))
    pipe = redis_client.pipeline()
    for k in keys:
        pipe.pttl(raw_key(k))
    ttls = [ms / 1000.0 for ms in pipe.execute()]
    assert all(10.0 * (1 - jitter) - 0.5 <= t <= 10.0 * (1 + jitter) for t in ttls), ttls
    spread = max(ttls) - min(ttls)
    if jitter:
        # 60 uniform draws over +-2 s: their range is below 2 s with probability ~1e-13.
        assert spread > 2.0, f"expiries spread over {spread:.2f}s only"
        mean = sum(ttls) / len(ttls)
        assert abs(mean - 10.0) < 0.8, f"mean TTL {mean:.2f}s"
    else:
        assert spread < 1.0


# -- batches ---------------------------------------------------------------------------------------


class CountingConnection(redis.Connection):
    """A real connection that records what the test's own thread sends through it (one send
    per round trip); the cache's background threads (listener, heartbeats) are not counted."""

    def __init__(
        self, *, sends: list[bytes] | None = None, thread: Any = None, **kwargs: Any
    ) -> None:
        self._sends = sends
        self._thread = thread
        super().__init__(**kwargs)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._sends is not None and threading.current_thread() is self._thread:
            self._sends.append(b"".join(command) if isinstance(command, list) else command)
        super().send_packed_command(command, check_health)


@pytest.fixture
def counted(shared_redis: RedisServer, redis_client: redis.Redis) -> Iterator[Any]:
    """``(cache, sends)``: a TieredCache whose data connections count their round trips."""
    sends: list[bytes] = []
    pool = redis.ConnectionPool(
        connection_class=CountingConnection,
        sends=sends,
        thread=threading.current_thread(),
        host=shared_redis.host,
        port=shared_redis.port,
        socket_timeout=2.0,
    )
    client = redis.Redis(connection_pool=pool)
    # (no heartbeat: its worker thread would start after the ``make`` fixture's thread baseline)
    cache = TieredCache(client, health_timeout=5.0, negative_ttl=20.0, heartbeat_interval=0)
    try:
        assert cache.wait_ready(10)
        yield cache, sends
    finally:
        cache.close()
        client.close()


def test_get_many_reads_every_local_miss_in_one_round_trip(
    counted: Any, make: Factory, redis_client: redis.Redis
) -> None:
    c, sends = counted
    other = make()
    c["local"] = 1
    other["remote"] = 2
    other["gone"] = 3
    other.invalidate("gone")  # a tombstone: a miss
    c.get_many(["warm-up"])
    del sends[:]
    assert c.get_many(["local", "remote", "absent", "gone", ("t", 1)]) == {"local": 1, "remote": 2}
    assert len(sends) == 1 and b"MGET" in sends[0], sends
    del sends[:]
    assert c.get_many(["local", "remote"]) == {"local": 1, "remote": 2}
    assert sends == [], "values read by get_many were not kept locally"
    assert c.stats()["local_hits"] >= 3


def test_get_or_load_many_one_read_one_loader_call_values_shared_absences_cached(
    counted: Any,
    make: Factory,
    worker: Worker,
    redis_client: redis.Redis,
    shared_redis: RedisServer,
    truth: Truth,
) -> None:
    c, sends = counted
    other = make()
    c["local"] = "L"
    other["remote"] = "R"
    batches: list[list[Any]] = []

    def loader_many(keys: list[Any]) -> dict[Any, Any]:
        batches.append(list(keys))
        return {k: f"loaded:{k}" for k in keys if k != "nowhere"}

    c.get_or_load_many(["warm-a", "warm-b"], loader_many)  # scripts loaded, connection made
    del sends[:], batches[:]
    got = c.get_or_load_many(["local", "remote", "x", ("t", 2), "nowhere"], loader_many)
    assert got == {"local": "L", "remote": "R", "x": "loaded:x", ("t", 2): "loaded:('t', 2)"}
    assert batches == [["x", ("t", 2), "nowhere"]], "not one loader call for the keys missing"
    # One read of the local misses, one batch of leases, one batch of fills.
    assert len(sends) == 3, [s[:40] for s in sends]
    assert b"MGET" in sends[0]
    assert sends[1].count(b"EVALSHA") == 3 and sends[2].count(b"EVALSHA") == 3
    assert c.stats()["loads"] == 2  # (with the warm-up)
    # Stored: another process reads them from Redis; the absence is cached there too.
    assert worker.call("get", "x") == "loaded:x"
    assert worker.call("get", ("t", 2)) == "loaded:('t', 2)"
    outcome = worker.call("get_or_load", "nowhere", TruthLoader(shared_redis.url, "w"))
    assert outcome[0] == "KeyError"
    assert truth.calls("w") == 0
    assert envelope(redis_client, "nowhere").absent
    # A second batch loads nothing: values and the absence are cached.
    del sends[:], batches[:]
    got = c.get_or_load_many(["x", ("t", 2), "nowhere", "remote"], loader_many)
    assert got == {"x": "loaded:x", ("t", 2): "loaded:('t', 2)", "remote": "R"}
    assert batches == [] and sends == []


def test_get_or_load_many_does_not_store_over_a_write_that_lands_during_the_load(
    make: Factory, redis_client: redis.Redis
) -> None:
    c, writer = make(), make()
    started, release = threading.Event(), threading.Event()

    def loader_many(keys: list[Any]) -> dict[Any, Any]:
        started.set()
        assert release.wait(10)
        return {k: "stale" for k in keys}

    batch = Background(lambda: c.get_or_load_many(["a", "b"], loader_many))
    assert started.wait(10)
    assert is_lease(redis_client.get(raw_key("a")))
    writer["a"] = "fresh"
    release.set()
    assert batch.result() == {"a": "stale", "b": "stale"}  # its own answer predates the write
    assert c.stats()["stale_fills_rejected"] == 1
    wait_until(lambda: c.get("a") == "fresh", 5)
    assert c.get("b") == "stale" and writer.get("a") == "fresh"

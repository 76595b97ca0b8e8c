"""TieredCache under real faults (SPEC 3.2, 3.5, 3.6, 3.10; research scenarios S5, S6, S8, S10).

Every fault is injected for real on a real redis-server process owned by the test: SIGKILL and
restart with an empty dataset, SIGSTOP/SIGCONT, ``CLIENT KILL TYPE pubsub``, an ACL change that
keeps one instance's listener out while its data connection works, and a TCP proxy that
blackholes one instance's link (a half-open connection only a missed PONG reveals). Waits are
``wait_until`` with deadlines; the only timing assertions are generous upper bounds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.aio_facade import make_cache
from tests.proxy import TcpProxy
from tests.servers import RedisServer, wait_until
from tiercache.envelope import unpack
from tiercache.errors import CacheUnavailable
from tiercache.keys import KeySpace, encode_key, local_key
from tiercache.tiered import TieredCache

# Short health checks and timeouts, so faults are detected quickly.
FAST: dict[str, Any] = {
    "health_interval": 0.2,
    "health_timeout": 1.0,
    "socket_timeout": 0.5,
    "connect_timeout": 0.5,
    "retries": 1,
    "startup_timeout": 5.0,
}
BOUND = 5.0  # generous bound on any call while Redis is down or frozen (timeouts are 0.5 s)

Factory = Callable[..., TieredCache]
KeyOf = Callable[[Any], Any]


_BASELINE: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _thread_baseline() -> None:
    """Threads alive before the test (another file's leak must not fail this one)."""
    _BASELINE.clear()
    _BASELINE.update(threading.enumerate())


def tiercache_threads() -> list[threading.Thread]:
    """tiercache's threads started during this test and still alive."""
    return [
        t for t in threading.enumerate() if t.name.startswith("tiercache") and t not in _BASELINE
    ]


@pytest.fixture
def make(redis_server: RedisServer, impl: str) -> Iterator[Factory]:
    """``make(url=None, ready=True, **options)``: a TieredCache on the test's own server.

    Parametrized: a TieredCache, or an AsyncTieredCache behind tests.aio_facade.SyncFacade.
    """
    made: list[TieredCache] = []

    def factory(url: str | None = None, *, ready: bool = True, **kwargs: Any) -> TieredCache:
        options = {**FAST, **kwargs}
        cache = make_cache(impl, url or redis_server.url, **options)
        made.append(cache)
        if ready:
            assert cache.wait_ready(10), "the invalidation channel never became ready"
        return cache

    try:
        yield factory
    finally:
        if redis_server.paused:
            redis_server.resume()
        for cache in made:
            cache.close()
        wait_until(lambda: tiercache_threads() == [], message="listener threads stopped")


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(params=["str", "tuple"])
def K(request: pytest.FixtureRequest) -> KeyOf:
    """Key maker: str keys (fast path) or tuple keys (slow path)."""
    if request.param == "str":
        return lambda n: f"user:{n}"
    return lambda n: ("user", n, 1.5)


def str_key(n: Any) -> str:
    return f"user:{n}"


def lk(key: Any) -> Any:
    return local_key(key, encode_key(key))


def raw_key(key: Any) -> bytes:
    return KeySpace("tc").value(encode_key(key))


def usable(cache: TieredCache) -> bool:
    return bool(cache.stats()["local_usable"])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, the exception raised or None)."""
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


def assert_unavailable(
    fn: Callable[[], Any], cause: type[BaseException] = redis.RedisError
) -> None:
    """``fn`` raises CacheUnavailable, with a redis error chained, within BOUND seconds."""
    seconds, exc = timed(fn)
    assert isinstance(exc, CacheUnavailable), f"expected CacheUnavailable, got {exc!r}"
    assert isinstance(exc.__cause__, cause), f"cause not chained: {exc.__cause__!r}"
    assert seconds < BOUND, f"took {seconds:.1f}s"


def _subscribers(admin: redis.Redis) -> int:
    """How many connections are subscribed to a channel now."""
    return sum(1 for c in admin.client_list() if int(c.get("sub", 0)) > 0)


def down(redis_server: RedisServer, *caches: TieredCache) -> None:
    """SIGKILL the server and wait until every cache has stopped using its local tier."""
    redis_server.kill()
    for cache in caches:
        wait_until(lambda cache=cache: not usable(cache), message="local tier off after the kill")


# -- Redis killed: reads ------------------------------------------------------------------------


def test_reads_raise_cache_unavailable_when_redis_is_down(
    make: Factory, redis_server: RedisServer, K: KeyOf
) -> None:
    a = make()
    a[K(1)] = "v1"
    assert a[K(1)] == "v1"
    down(redis_server, a)
    assert a.local.peek(lk(K(1))) == "v1"  # still held, but not served without Redis
    assert_unavailable(lambda: a[K(1)])
    assert_unavailable(lambda: a.get(K(1)))
    assert_unavailable(lambda: a[K(2)])
    assert_unavailable(lambda: K(1) in a)
    assert_unavailable(lambda: len(a))
    assert_unavailable(lambda: list(a))
    assert a.stats()["read_errors"] >= 3
    assert a.stats()["stale_served"] == 0


class Clock:
    """A monotonic clock the test moves (for the local tier's ages)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stale_if_error_serves_a_recent_local_copy(
    make: Factory, redis_server: RedisServer, K: KeyOf
) -> None:
    clock = Clock()
    a = make(stale_if_error=30.0, timer=clock)
    a[K(1)] = "v1"
    b = make()
    b[K(2)] = "v2"
    assert a[K(2)] == "v2"  # read from Redis into a's local tier
    down(redis_server, a, b)
    clock.now += 10  # 10 s old: within the 30 s bound
    assert a[K(1)] == "v1"
    assert a.get(K(2)) == "v2"
    assert a.stats()["stale_served"] == 2
    assert_unavailable(lambda: a[K(3)])  # nothing local to fall back on
    clock.now += 25  # 35 s old: beyond the bound
    assert_unavailable(lambda: a[K(1)])
    assert a.stats()["stale_served"] == 2
    # b has no stale_if_error: it never serves a local copy without Redis.
    assert b.local.peek(lk(K(2))) == "v2"
    assert_unavailable(lambda: b[K(2)])


def test_the_loader_answers_when_redis_is_down(make: Factory, redis_server: RedisServer) -> None:
    K = str_key  # one key style is enough here
    calls: list[Any] = []
    c = make(loader=lambda k: calls.append(k) or f"origin:{k!r}")
    c[K(1)] = "cached"
    down(redis_server, c)
    seconds, _ = timed(lambda: c[K(1)])
    assert seconds < BOUND
    assert c[K(1)] == f"origin:{K(1)!r}"
    assert c.get(K(2)) == f"origin:{K(2)!r}"
    assert len(calls) == 3
    assert c.stats()["loads"] >= 3


# -- Redis killed: writes -----------------------------------------------------------------------


def test_writes_raise_cache_unavailable_and_drop_the_writers_copy(
    make: Factory, redis_server: RedisServer
) -> None:
    K = str_key  # one key style is enough here
    a = make(stale_if_error=60.0)
    a[K(1)] = "old"
    a[K(2)] = "old2"
    a[K(3)] = "old3"
    down(redis_server, a)
    assert_unavailable(lambda: a.__setitem__(K(1), "new"))
    # The writer's own copy is gone, so even stale_if_error cannot serve the old value.
    assert a.local.peek(lk(K(1))) is None
    assert_unavailable(lambda: a[K(1)])
    assert_unavailable(lambda: a.set(K(2), "new2", ttl=5))
    assert a.local.peek(lk(K(2))) is None
    assert_unavailable(lambda: a.__delitem__(K(3)))
    assert a.local.peek(lk(K(3))) is None
    assert_unavailable(lambda: a.invalidate(K(3)))
    assert_unavailable(a.clear)
    assert a.stats()["write_errors"] >= 4


def test_on_write_error_invalidate_local_swallows_and_drops(
    make: Factory, redis_server: RedisServer
) -> None:
    K = str_key  # one key style is enough here
    a = make(on_write_error="invalidate_local", stale_if_error=60.0)
    a[K(1)] = "old"
    a[K(2)] = "old2"
    down(redis_server, a)
    seconds, exc = timed(lambda: a.__setitem__(K(1), "new"))
    assert exc is None and seconds < BOUND
    assert a.local.peek(lk(K(1))) is None
    seconds, exc = timed(lambda: a.invalidate(K(2)))
    assert exc is None and seconds < BOUND
    assert a.local.peek(lk(K(2))) is None
    assert a.stats()["write_errors"] == 2
    assert_unavailable(lambda: a[K(1)])  # reads still say Redis is gone


def test_unknown_write_outcome_never_leaves_the_old_value_local(
    make: Factory, redis_server: RedisServer, admin: redis.Redis, K: KeyOf
) -> None:
    """S10: Redis frozen (SIGSTOP), the write times out, then Redis applies it on SIGCONT."""
    a = make(stale_if_error=60.0)
    b = make()
    a[K(1)] = "old"
    assert b[K(1)] == "old"
    redis_server.pause()
    assert_unavailable(lambda: a.__setitem__(K(1), "new"), redis.TimeoutError)
    assert a.local.peek(lk(K(1))) is None
    # Still frozen: the writer cannot confirm anything, and does not fall back on "old".
    assert_unavailable(lambda: a[K(1)], redis.TimeoutError)
    redis_server.resume()
    wait_until(lambda: usable(a) and usable(b), 15, message="both recovered after SIGCONT")
    stored = unpack(admin.get(raw_key(K(1))))
    in_redis = "new" if stored.payload.endswith(b"new") else "old"
    assert in_redis == "new"  # the queued write was applied when Redis resumed
    assert a[K(1)] == "new"
    wait_until(lambda: b[K(1)] == "new", 10, message="b converges to the resumed write")
    for _ in range(3):
        assert a[K(1)] == "new" and b[K(1)] == "new"


# -- recovery after a restart -------------------------------------------------------------------


def test_recovery_is_automatic_after_a_restart(make: Factory, redis_server: RedisServer) -> None:
    K = str_key  # one key style is enough here
    a, b = make(), make()
    a[K(1)] = "v1"
    assert b[K(1)] == "v1"
    down(redis_server, a, b)
    redis_server.restart()  # same port, empty
    for cache in (a, b):
        wait_until(
            lambda cache=cache: usable(cache) and cache.stats()["resyncs"] >= 1,
            15,
            message="local tier usable again after the restart",
        )
    # Nothing comes back from any tier: Redis lost it, so the local copies were flushed.
    assert b.local.peek(lk(K(1))) is None and a.local.peek(lk(K(1))) is None
    assert b.get(K(1)) is None and a.get(K(1)) is None
    assert b.stats()["flushes"] >= 1
    # Writes work again, reach the other instance, and are served locally again.
    a[K(1)] = "v2"
    assert b[K(1)] == "v2"
    hits = b.stats()["local_hits"]
    assert b[K(1)] == "v2"
    assert b.stats()["local_hits"] == hits + 1
    a[K(1)] = "v3"
    wait_until(lambda: b[K(1)] == "v3", message="invalidations flow after the restart")


def test_a_cache_started_while_redis_is_down_recovers(
    make: Factory, redis_server: RedisServer
) -> None:
    redis_server.stop()
    start = time.monotonic()
    c = make(ready=False, startup_timeout=0.5)
    assert time.monotonic() - start < BOUND  # the constructor does not wait for Redis forever
    assert not usable(c)
    assert_unavailable(lambda: c["k"])
    assert_unavailable(lambda: c.__setitem__("k", 1))
    redis_server.restart()  # the same port
    wait_until(lambda: usable(c), 15, message="recovered once Redis is up")
    c["k"] = 1
    assert c["k"] == 1
    assert c.stats()["local_hits"] == 1


def test_restart_empty_brings_no_old_value_back_and_versions_keep_increasing(
    make: Factory, redis_server: RedisServer, admin: redis.Redis, K: KeyOf
) -> None:
    """S8: restart with an empty dataset; versions must stay ahead of every one seen."""
    a, b = make(), make(stale_if_error=60.0)
    seen: list[int] = []
    for n in range(5):
        a[K(n)] = f"before-{n}"
        seen.append(unpack(admin.get(raw_key(K(n)))).version)
        assert b[K(n)] == f"before-{n}"
    redis_server.restart()  # SIGTERM, then a new empty server on the same port at once
    admin.connection_pool.disconnect()
    # As soon as the listeners are back, nothing of the old dataset may be served from any tier.
    wait_until(lambda: _subscribers(admin) == 2, 15, message="both listeners subscribed again")
    for n in range(5):
        assert b.get(K(n)) is None, "b served a value Redis lost"
        assert a.get(K(n)) is None, "a served a value Redis lost"
        assert K(n) not in a
    for cache in (a, b):
        wait_until(lambda cache=cache: usable(cache), 15, message="recovered after restart")
    assert len(b) == 0 and len(b.local) == 0 and len(a.local) == 0
    # A brand-new instance has seen no version at all: its clock alone must be ahead.
    c = make()
    c[K(0)] = "after"
    a[K(1)] = "after"
    for n in (0, 1):
        version = unpack(admin.get(raw_key(K(n)))).version
        assert version > max(seen), (version, max(seen))
    assert b[K(0)] == "after" and b[K(1)] == "after"


def test_a_restart_behind_a_quick_reconnect_still_flushes(
    make: Factory, redis_server: RedisServer, admin: redis.Redis, proxy: TcpProxy
) -> None:
    """S8 (a): b only learns of the restart when its connection ends, once Redis is back."""
    K = str_key
    a = make()
    b = make(f"redis://{proxy.host}:{proxy.port}/0", health_interval=1.0, health_timeout=1.0)
    for n in range(3):
        a[K(n)] = f"before-{n}"
        assert b[K(n)] == f"before-{n}"
    proxy.blackhole()  # b's connections end only when the proxy forwards again
    redis_server.restart()  # empty
    admin.connection_pool.disconnect()
    proxy.restore()
    wait_until(lambda: _subscribers(admin) == 2, 15, message="both listeners subscribed again")
    for n in range(3):
        assert b.get(K(n)) is None, "b served a value from before the restart"
    wait_until(lambda: usable(b) and b.stats()["flushes"] >= 1, 15, message="b flushed")
    assert len(b.local) == 0
    a[K(0)] = "after"
    wait_until(lambda: b.get(K(0)) == "after", message="b follows writes after the restart")


# -- the invalidation channel ---------------------------------------------------------------------


def test_client_kill_pubsub_then_a_write_is_never_read_stale(
    make: Factory, admin: redis.Redis, K: KeyOf
) -> None:
    """S5: the subscribers are killed; a write lands before they are back."""
    a, b = make(), make()
    for n in range(5):
        a[K(n)] = "v1"
        assert b[K(n)] == "v1"
    before = b.stats()["resyncs"]
    assert admin.client_kill_filter(_type="pubsub") == 2
    a[K(0)] = "v2"  # microseconds after the kill: neither listener is subscribed yet
    wait_until(lambda: _subscribers(admin) == 2, 10, message="both listeners subscribed again")
    # Subscribed again is not caught up: the write above was never delivered to b.
    assert b[K(0)] == "v2", "b served its copy from before the kill"
    assert all(b[K(n)] == "v1" for n in range(1, 5))
    wait_until(lambda: b.stats()["resyncs"] > before and usable(b), 10, message="b resynced")
    assert b.local.peek(lk(K(0))) in (None, "v2")
    assert b[K(0)] == "v2"
    a[K(1)] = "v3"
    wait_until(lambda: b[K(1)] == "v3", message="live invalidations after the resync")


def test_a_write_made_while_the_subscriber_was_cut_is_never_read_stale(
    make: Factory, admin: redis.Redis, proxy: TcpProxy, K: KeyOf
) -> None:
    """S5, deterministic: b's subscription is gone on the server before the write is made."""
    a = make()
    # Default health checks (1 s): the whole fault below lasts milliseconds, no PING is missed.
    b = make(f"redis://{proxy.host}:{proxy.port}/0", health_interval=1.0, health_timeout=1.0)
    a[K(1)] = "v1"
    assert b[K(1)] == "v1"
    proxy.blackhole()  # hold the close below in the proxy for a moment
    assert admin.client_kill_filter(_type="pubsub") == 2  # b's subscription ends on the server
    a[K(1)] = "v2"  # published to nobody of b's
    proxy.restore()  # b's listener now sees its connection end
    wait_until(lambda: _subscribers(admin) == 2, 10, message="both listeners subscribed again")
    assert b[K(1)] == "v2", "b served its copy from before the cut"
    wait_until(lambda: b.stats()["resyncs"] >= 1 and usable(b), 10, message="b resynced")
    assert b[K(1)] == "v2"


@pytest.fixture
def acl_user(admin: redis.Redis, redis_server: RedisServer) -> str:
    """A URL for ACL user ``b`` (all commands, all keys, all channels)."""
    admin.execute_command("ACL", "SETUSER", "b", "on", ">pw-b", "~*", "&*", "+@all")
    return f"redis://b:pw-b@{redis_server.host}:{redis_server.port}/0"


def _shut_out(admin: redis.Redis, cache: TieredCache) -> None:
    """Kill the pub/sub connections and keep user b from subscribing again."""
    admin.execute_command("ACL", "SETUSER", "b", "resetchannels")
    admin.client_kill_filter(_type="pubsub")
    wait_until(lambda: not usable(cache), message="local tier off while shut out")


def _let_in(admin: redis.Redis, cache: TieredCache, resyncs: int) -> None:
    admin.execute_command("ACL", "SETUSER", "b", "&*")
    wait_until(
        lambda: usable(cache) and cache.stats()["resyncs"] > resyncs,
        15,
        message="resynced after being let in",
    )


def test_no_local_copy_is_served_until_the_channel_resyncs_from_the_log(
    make: Factory, admin: redis.Redis, acl_user: str, K: KeyOf
) -> None:
    a, b = make(), make(acl_user)
    for n in range(5):
        a[K(n)] = "v1"
        assert b[K(n)] == "v1"
    resyncs = b.stats()["resyncs"]
    _shut_out(admin, b)
    for n in range(5):
        a[K(n)] = "v2"  # announced while b cannot hear
    # b still holds v1 locally but does not serve it: its reads go to Redis.
    for n in range(5):
        assert b.local.peek(lk(K(n))) == "v1"
        assert b[K(n)] == "v2"
        assert b.get(K(n)) == "v2"
    assert not usable(b)
    _let_in(admin, b, resyncs)
    # The missed invalidations were replayed from the log (no flush needed).
    for n in range(5):
        assert b.local.peek(lk(K(n))) in (None, "v2")
        assert b[K(n)] == "v2"
    assert b.stats()["flushes"] == 0
    a[K(0)] = "v3"
    wait_until(lambda: b[K(0)] == "v3", message="live invalidations again")


def test_a_gap_beyond_the_log_flushes_the_local_tier(
    make: Factory, admin: redis.Redis, acl_user: str
) -> None:
    K = str_key  # one key style is enough here
    a = make(log_maxlen=5)  # the log keeps few messages (MAXLEN ~: a few hundred at most)
    b = make(acl_user)
    for n in range(5):
        a[K(n)] = "v1"
        assert b[K(n)] == "v1"
    b["b's own"] = "flushed too"
    resyncs = b.stats()["resyncs"]
    _shut_out(admin, b)
    a[K(0)] = "v2"
    for n in range(1500):  # enough to trim the first missed message out of the log
        a[("filler", n)] = n
    _let_in(admin, b, resyncs)
    assert b.stats()["flushes"] >= 1
    assert len(b.local) == 0
    assert b[K(0)] == "v2" and b[K(1)] == "v1"


def test_half_open_link_is_detected_by_the_missing_pong(
    make: Factory, proxy: TcpProxy, K: KeyOf
) -> None:
    """S6: the link is blackholed in both directions, sockets stay open."""
    a = make()
    b = make(f"redis://{proxy.host}:{proxy.port}/0")
    a[K(1)] = "v1"
    assert b[K(1)] == "v1"
    resyncs = b.stats()["resyncs"]
    proxy.blackhole()
    start = time.monotonic()
    wait_until(lambda: not usable(b), 10, message="half-open link detected")
    assert time.monotonic() - start < BOUND  # health_interval 0.2 s + health_timeout 1 s
    assert b.stats()["disconnects"] >= 1
    a[K(1)] = "v2"  # b cannot hear this
    assert b.local.peek(lk(K(1))) == "v1"
    assert_unavailable(lambda: b[K(1)])  # neither the stale copy nor a hang
    proxy.restore()
    wait_until(lambda: usable(b) and b.stats()["resyncs"] > resyncs, 15, message="b recovered")
    assert b.local.peek(lk(K(1))) in (None, "v2")
    assert b[K(1)] == "v2"
    a[K(1)] = "v3"
    wait_until(lambda: b[K(1)] == "v3", message="live invalidations after restore")


def test_close_stops_a_listener_stuck_on_a_half_open_link(make: Factory, proxy: TcpProxy) -> None:
    b = make(f"redis://{proxy.host}:{proxy.port}/0", startup_timeout=5.0)
    accepted = proxy.connections_accepted
    proxy.blackhole()
    wait_until(lambda: not usable(b), 10)
    # The listener reconnects through the proxy and waits for a subscription that never comes.
    wait_until(lambda: proxy.connections_accepted > accepted, 10)
    seconds, exc = timed(b.close)
    assert exc is None and seconds < BOUND
    assert tiercache_threads() == [], "close() returned with the listener thread still running"


def test_close_stops_the_listener_before_returning_even_when_redis_is_slow(
    redis_server: RedisServer, proxy: TcpProxy, admin: redis.Redis, impl: str
) -> None:
    # Every round trip through the proxy takes ~0.5 s: the listener is still connecting,
    # subscribing and catching up when close() is called.
    proxy.set_latency(0.25)
    cache = make_cache(
        impl, f"redis://{proxy.host}:{proxy.port}/0", socket_timeout=3.0, startup_timeout=0.2
    )
    seconds, exc = timed(cache.close)
    still_running = [t.name for t in tiercache_threads()]
    wait_until(lambda: tiercache_threads() == [], 15, message="the listener stopped at last")

    def others() -> list[str]:
        me = str(admin.client_id())
        return [f"{c['name']!r} last ran {c['cmd']}" for c in admin.client_list() if c["id"] != me]

    try:
        assert exc is None and seconds < BOUND
        assert still_running == [], "close() returned with the listener still running"
        # Nothing the cache opened stays connected (closes reach the server with the latency).
        wait_until(lambda: others() == [], 5, message="connections left open after close()")
    finally:
        left = others()
        if impl == "sync":  # (the asyncio cache's aclose() has closed its own client)
            cache.redis.connection_pool.disconnect()  # release whatever was left
    assert left == []


# -- bounded resources over many reconnects -------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _clients(admin: redis.Redis) -> int:
    return len(admin.client_list())


def _reconnect_cycles(cycles: int, make: Factory, admin: redis.Redis) -> None:
    a, b = make(), make()

    current = {f"k{n}": -1 for n in range(5)}
    for key, value in current.items():
        a[key] = value

    def cycle(i: int) -> None:
        key = f"k{i % 5}"
        before = (a.stats()["resyncs"], b.stats()["resyncs"])
        assert b[key] == current[key]  # b holds the key's current value locally
        assert admin.client_kill_filter(_type="pubsub") == 2
        a[key] = current[key] = i
        wait_until(lambda: _subscribers(admin) == 2, 10, message=f"cycle {i}: resubscribed")
        assert b[key] == i, f"cycle {i}: stale read after the kill"
        wait_until(
            lambda: all(
                usable(c) and c.stats()["resyncs"] > r for c, r in zip((a, b), before, strict=True)
            ),
            15,
            message=f"cycle {i}: both resynced",
        )

    for i in range(3):  # warm up: every connection either cache will use exists now
        cycle(i)
    threads, fds, clients = len(threading.enumerate()), _open_fds(), _clients(admin)
    for i in range(3, cycles):
        cycle(i)
    assert len(threading.enumerate()) == threads
    assert len(tiercache_threads()) == 2
    assert _open_fds() <= fds + 2
    assert _clients(admin) <= clients + 2
    for cache in (a, b):
        assert len(cache._guard) <= 10  # the per-key high-water marks stay bounded
        assert len(cache.local) <= 5
        assert cache.stats()["resyncs"] >= cycles


def test_reconnect_cycles_keep_resources_bounded(make: Factory, admin: redis.Redis) -> None:
    _reconnect_cycles(30, make, admin)


@pytest.mark.slow
def test_200_reconnect_cycles_keep_resources_bounded(make: Factory, admin: redis.Redis) -> None:
    _reconnect_cycles(200, make, admin)


def test_reconnect_backoff_starts_over_after_a_healthy_session(
    make: Factory, admin: redis.Redis, acl_user: str
) -> None:
    # Each time b is shut out, its listener fails to resubscribe once or twice, and is let in
    # right away. Each outage follows a session that was whole, so the listener's backoff should
    # start over every time (20 ms), not keep growing over the life of the process.
    b = make(acl_user)
    start = time.monotonic()
    for _ in range(20):
        resyncs = b.stats()["resyncs"]
        _shut_out(admin, b)
        _let_in(admin, b, resyncs)
    elapsed = time.monotonic() - start
    # About 20 x (a failed attempt + reconnect + resync): a second or two when the backoff starts
    # over; a backoff that only ever grows (to its 1 s cap) needs over 15 s.
    assert elapsed < 10.0, f"20 short outages took {elapsed:.1f}s to recover from"

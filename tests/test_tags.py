"""Tags, namespace generations, sliding and adaptive TTL (issue 10, part B) on a real Redis.

Two or more TieredCache instances per test, each with its own connections and listener thread,
as separate processes would have (tests/test_tags_procs.py runs real OS processes). Waits are
``wait_until`` with a deadline; no timing assertions.

With ``impl="async"`` the first, third... cache a test makes is an AsyncTieredCache (behind
tests.aio_facade's SyncFacade) and the others TieredCache: every scenario then runs between a
sync and an async cache on one namespace (a cache on a given client object stays sync).
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.aio_facade import make_cache
from tests.history import routed_client
from tests.proxy import TcpProxy
from tests.servers import RedisServer, wait_until
from tiercache.errors import CacheUnavailable
from tiercache.keys import KeySpace, encode_key
from tiercache.tags import Ext, check_tags, pack_ext, split_ext
from tiercache.tiered import TieredCache

Factory = Callable[..., TieredCache]


@pytest.fixture
def make(redis_client: redis.Redis, shared_redis: RedisServer, impl: str) -> Iterator[Factory]:
    """``make(**options)``: a ready cache on the shared server, closed after the test
    (alternately async and sync when ``impl`` is "async")."""
    made: list[Any] = []

    def factory(url: str | redis.Redis | None = None, **kwargs: Any) -> TieredCache:
        kwargs.setdefault("health_timeout", 5.0)
        kwargs.setdefault("namespace", "tg")
        kind = "async" if impl == "async" and len(made) % 2 == 0 else "sync"
        if url is not None and not isinstance(url, str):
            kind = "sync"  # (a sync client object)
        cache = make_cache(kind, url or shared_redis.url, **kwargs)
        made.append(cache)
        assert cache.wait_ready(10.0)
        return cache

    try:
        yield factory
    finally:
        for cache in made:
            cache.close()


class Clock:
    """A settable monotonic clock for the local tier and the sliding interval."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def value_name(cache: TieredCache, key: Any) -> bytes:
    """The Redis key name of ``key``'s entry in the cache's current generation."""
    return cache._keys.value(encode_key(key))


# -- the data -----------------------------------------------------------------------------------


def test_ext_block_round_trips() -> None:
    ext = Ext(("a", "ü:b", "x" * 1024), 12_345, 3)
    raw = pack_ext(ext) + b"payload"
    assert split_ext(raw, 3) == (ext, b"payload")
    assert split_ext(pack_ext(Ext()) + b"p") == (Ext(), b"p")
    for bad in (b"", pack_ext(ext)[:-1], b"\x00\x00\x00\x09" + pack_ext(ext)[4:]):
        with pytest.raises(ValueError):
            split_ext(bad)


def test_tags_are_checked() -> None:
    assert check_tags(["b", "a", "b"]) == ("a", "b")
    with pytest.raises(TypeError):
        check_tags("user:1")
    with pytest.raises(TypeError):
        check_tags([1])
    with pytest.raises(TypeError):
        check_tags([""])
    with pytest.raises(ValueError):
        check_tags(["x" * 1025])
    with pytest.raises(ValueError):
        check_tags([f"t{i}" for i in range(65)])


def test_generation_is_part_of_the_value_key_names() -> None:
    keys = KeySpace("ns", 2)
    bumped = keys.with_generation(42)
    enc = encode_key("k")
    assert keys.value(enc).endswith(b":v:sk")
    assert bumped.value(enc).endswith(b":v42:sk")
    assert keys.encoded_of_value_key(keys.value(enc)) == enc
    assert bumped.encoded_of_value_key(bumped.value(enc)) == enc
    assert bumped.script_keys(enc)[2] == bumped.value(enc)
    assert bumped.value_pattern(1) == b"ns:{ns:1}:v42:*"
    assert keys.generation_key() == bumped.generation_key() == b"ns:{ns:0}:gen"


# -- tags -------------------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [1, 3])
def test_invalidate_tag_drops_tagged_keys_in_redis_and_every_local_tier(
    make: Factory, partitions: int
) -> None:
    a = make(ttl=60, partitions=partitions)
    b = make(ttl=60, partitions=partitions)
    for i in range(30):
        a.set(f"k{i}", i, tags=("even" if i % 2 == 0 else "odd", "all"))
    a.set("plain", "p")
    assert [b[f"k{i}"] for i in range(30)] == list(range(30))
    assert b.local.entry("k0") is not None  # in b's local tier
    a.invalidate_tag("even")
    # a: at once (read-your-writes); b: once its listener applied the message.
    assert all(a.get(f"k{i}") is None for i in range(0, 30, 2))
    wait_until(lambda: b.local.entry("k0") is None, 10, message="b dropped k0 locally")
    assert all(b.get(f"k{i}") is None for i in range(0, 30, 2))
    assert [b.get(f"k{i}") for i in range(1, 30, 2)] == list(range(1, 30, 2))
    assert b["plain"] == "p"
    b.invalidate_tag("all")
    assert all(b.get(f"k{i}") is None for i in range(30))
    wait_until(lambda: a.local.entry("k1") is None, 10)
    assert all(a.get(f"k{i}") is None for i in range(30))


def test_a_write_after_the_invalidation_survives_it(make: Factory) -> None:
    a = make(ttl=60)
    b = make(ttl=60)
    a.set("k", "old", tags=("t",))
    a.invalidate_tag("t")
    b.set("k", "new", tags=("t",))
    assert a.get("k") == "new"
    wait_until(lambda: b.get("k") == "new", 10)


def test_a_write_whose_clock_is_behind_the_tag_is_renumbered_above_it(
    make: Factory, redis_client: redis.Redis
) -> None:
    a = make(ttl=60)
    a.set("k", "old", tags=("t",))
    tag_key = a._keys.tag(0, b"t")
    ahead = a._clock.now_us() + 30_000_000  # an invalidation numbered 30 s ahead of a's clock
    redis_client.hset(tag_key, "i", ahead)
    assert a.get("k") is None or a.local.entry("k") is not None  # (a's local copy may serve)
    a.set("k", "new", tags=("t",))
    assert a.local.entry("k").version > ahead
    fresh = make(ttl=60)
    assert fresh.get("k") == "new"


def test_a_fill_that_loaded_before_the_invalidation_is_not_stored(make: Factory) -> None:
    a = make(ttl=60)
    b = make(ttl=60)
    origin = {"k": "old"}

    def loader(key: str) -> str:
        value = origin[key]
        origin[key] = "new"  # the origin changes while this load is in flight...
        b.invalidate_tag("t")  # ...and its writer invalidates the tag
        return value

    assert a.get_or_load("k", loader, tags=("t",)) == "old"  # returned, not stored
    assert a.stats()["stale_fills_rejected"] == 1
    assert b.get("k") is None
    assert a.get_or_load("k", lambda k: origin[k], tags=("t",)) == "new"
    # (a load that begins within the clock margin after the invalidation is not stored either)
    wait_until(
        lambda: a.get_or_load("k", lambda k: origin[k], tags=("t",)) and b.get("k") == "new", 10
    )


def test_tags_from_a_callable_and_on_loaded_values(make: Factory) -> None:
    a = make(ttl=60, tags=lambda key, value: (f"user:{value['user']}",))
    b = make(ttl=60)
    a.set("order:1", {"user": 7, "total": 3})
    a.set("order:2", {"user": 8, "total": 4})
    assert b.get_or_load("order:3", lambda k: {"user": 7}, tags=lambda k, v: ("user:7",))
    b.invalidate_tag("user:7")
    assert a.get("order:1") is None and a.get("order:3") is None
    assert a.get("order:2") == {"user": 8, "total": 4}


def test_a_cached_absence_with_tags_is_invalidated_too(make: Factory) -> None:
    a = make(ttl=60)
    origin: dict[str, str] = {}
    with pytest.raises(KeyError):
        a.get_or_load("k", lambda k: origin[k], tags=("t",))
    origin["k"] = "now here"
    with pytest.raises(KeyError):  # the absence is cached
        a.get_or_load("k", lambda k: origin[k], tags=("t",))
    a.invalidate_tag("t")
    assert a.get_or_load("k", lambda k: origin[k], tags=("t",)) == "now here"


def test_a_lost_tag_key_makes_its_values_untrusted(
    make: Factory, redis_client: redis.Redis
) -> None:
    a = make(ttl=60)
    a.set("k", 1, tags=("t",))
    redis_client.delete(a._keys.tag(0, b"t"))  # evicted, say
    b = make(ttl=60)
    assert b.get("k") is None


def test_tagged_values_in_batches_and_signed_messages(make: Factory) -> None:
    secret = b"s" * 32
    a = make(ttl=60, secret=secret)
    b = make(ttl=60, secret=secret)
    found = a.get_or_load_many(["x", "y"], lambda keys: {k: k.upper() for k in keys})
    assert found == {"x": "X", "y": "Y"}
    a.set("z", "Z", tags=("t",))
    assert b.get_many(["x", "y", "z"]) == {"x": "X", "y": "Y", "z": "Z"}
    a.invalidate_tag("t")
    wait_until(lambda: b.local.entry("z") is None, 10)
    assert b.get_many(["x", "y", "z"]) == {"x": "X", "y": "Y"}
    assert b.stats()["unsigned_messages"] == 0


def test_invalidate_tag_with_redis_down_raises_and_forgets_locally(
    make: Factory, redis_server: RedisServer
) -> None:
    a = make(redis_server.url, ttl=60, socket_timeout=0.3, connect_timeout=0.3)
    a.set("k", 1, tags=("t",))
    assert a.get("k") == 1
    redis_server.pause()
    try:
        with pytest.raises(CacheUnavailable):
            a.invalidate_tag("t")
        assert a.local.entry("k") is None
    finally:
        redis_server.resume()


def test_concurrent_writes_and_invalidations_of_a_tag(make: Factory) -> None:
    """Each key's final value is its last write if that write began after the last invalidation."""
    a = make(ttl=60)
    b = make(ttl=60)
    stop = threading.Event()
    errors: list[BaseException] = []

    def invalidator() -> None:
        try:
            while not stop.is_set():
                b.invalidate_tag("t")
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=invalidator)
    thread.start()
    try:
        for i in range(200):
            a.set(f"k{i % 10}", i, tags=("t",))
    finally:
        stop.set()
        thread.join(10)
    assert not errors
    for i in range(190, 200):
        a.set(f"k{i % 10}", i, tags=("t",))  # after the last invalidation returned
    fresh = make(ttl=60)
    assert [fresh.get(f"k{i}") for i in range(10)] == list(range(190, 200))


# -- namespace generations --------------------------------------------------------------------


def test_bump_namespace_reaches_every_process_and_old_keys_keep_their_ttl(
    make: Factory, redis_client: redis.Redis
) -> None:
    a = make(ttl=60)
    b = make(ttl=60)
    a["k"] = "old"
    assert b["k"] == "old"
    old_name = value_name(a, "k")
    generation = a.bump_namespace()
    assert a.generation == generation and a.get("k") is None
    wait_until(lambda: b.generation == generation, 10, message="b learned the generation")
    assert b.get("k") is None
    assert 0 < redis_client.pttl(old_name) <= 60_000  # the old entry expires by its TTL
    b["k"] = "new"
    assert value_name(b, "k") != old_name
    wait_until(lambda: a.get("k") == "new", 10)
    late = make(ttl=60)  # a process started after the bump reads the generation
    assert late.generation == generation and late["k"] == "new"
    assert a.stats()["generation"] == generation
    assert "k" in a and len(a) == 1 and list(a) == ["k"]
    a.clear()  # a clear keeps the generation
    assert redis_client.get(a._keys.generation_key()) == b"%d" % generation


def test_a_process_that_missed_the_bump_does_not_serve_the_old_generation(
    make: Factory, redis_server: RedisServer, proxy: TcpProxy
) -> None:
    """b's listener goes through a proxy that stops forwarding: it misses the N message."""
    a = make(redis_server.url, ttl=60)
    client = routed_client(redis_server.host, redis_server.port, listener_port=proxy.port)
    b = make(client, ttl=60, health_interval=0.2, health_timeout=0.3)
    try:
        a["k"] = "old"
        assert b["k"] == "old" and b.local.entry("k") is not None
        proxy.blackhole()
        wait_until(lambda: not b.stats()["local_usable"], 10, message="b saw its channel fail")
        generation = a.bump_namespace()
        # Not healthy: b reads the generation itself, so no old-generation entry is served.
        assert b.get("k") is None
        assert b.generation == generation
        proxy.restore()
        wait_until(lambda: b.stats()["local_usable"], 10, message="b resynced")
        assert b.get("k") is None
        a["k"] = "new"
        wait_until(lambda: b.get("k") == "new", 10)
    finally:
        b.close()
        client.close()


def test_a_process_whose_listener_missed_the_message_learns_it_on_resync(
    make: Factory, redis_server: RedisServer, proxy: TcpProxy
) -> None:
    """The same, but b does not read in between: the replay (or the resync read) teaches it."""
    a = make(redis_server.url, ttl=60)
    client = routed_client(redis_server.host, redis_server.port, listener_port=proxy.port)
    b = make(client, ttl=60, health_interval=0.2, health_timeout=0.3, log_maxlen=1)
    try:
        b["k"] = "old"
        proxy.blackhole()
        wait_until(lambda: not b.stats()["local_usable"], 10)
        generation = a.bump_namespace()
        for i in range(5):  # more than the log holds: b flushes instead of replaying
            a[f"x{i}"] = i
        proxy.restore()
        wait_until(lambda: b.stats()["local_usable"], 10)
        assert b.generation == generation
        assert b.get("k") is None
    finally:
        b.close()
        client.close()


def test_generation_lost_with_the_data_is_relearned(
    make: Factory, redis_client: redis.Redis
) -> None:
    a = make(ttl=60, health_interval=0.2, health_timeout=0.5)
    a.bump_namespace()
    a["k"] = 1
    redis_client.flushall()
    b = make(ttl=60)
    assert b.generation == 0
    b["k"] = 2  # the restarted counter shows a the loss: it resyncs and reads the generation
    wait_until(lambda: a.generation == 0, 10)
    wait_until(lambda: a.get("k") == 2, 10)


# -- sliding TTL ------------------------------------------------------------------------------


def test_sliding_ttl_extends_at_most_once_per_interval(
    make: Factory, redis_client: redis.Redis
) -> None:
    clock = Clock()
    a = make(ttl=100, sliding=True, sliding_interval=10, timer=clock)
    a["k"] = "v"
    name = value_name(a, "k")
    assert 99_000 < redis_client.pttl(name) <= 100_000

    def read_from_redis() -> None:
        a.local.clear()  # every read below reaches Redis
        assert a["k"] == "v"

    redis_client.pexpire(name, 50_000)
    read_from_redis()
    clock.now += 5
    read_from_redis()
    assert redis_client.pttl(name) <= 50_000  # within the interval of the write: no extension
    clock.now += 6  # 11 s after the write
    read_from_redis()
    assert redis_client.pttl(name) > 90_000  # extended by the read
    assert a.stats()["slides"] == 1
    redis_client.pexpire(name, 50_000)
    for _ in range(20):
        read_from_redis()
        clock.now += 0.4  # 8 s of reads
    assert redis_client.pttl(name) <= 50_000
    assert a.stats()["slides"] == 1
    clock.now += 3
    read_from_redis()
    assert redis_client.pttl(name) > 90_000 and a.stats()["slides"] == 2


def test_hot_sliding_key_served_locally_reaches_redis_once_per_interval(
    make: Factory, redis_client: redis.Redis
) -> None:
    clock = Clock()
    a = make(ttl=100, sliding=True, sliding_interval=10, timer=clock)
    b = make(ttl=100, sliding=True, sliding_interval=10, timer=clock)
    a["k"] = "v"
    name = value_name(a, "k")
    for _ in range(100):
        assert b["k"] == "v"
        clock.now += 0.25  # 25 s of hot reads
    assert b.stats()["remote_hits"] <= 4  # local copies live one interval
    assert 1 <= b.stats()["slides"] <= 3
    assert redis_client.pttl(name) > 80_000


def test_sliding_per_call_and_tag_keys_kept_alive(make: Factory, redis_client: redis.Redis) -> None:
    clock = Clock()
    a = make(ttl=5, timer=clock)
    a.set("s", 1, ttl=100, sliding=True, tags=("t",))
    a.set("f", 1, ttl=100)
    assert redis_client.pttl(value_name(a, "f")) <= 100_000
    tag_key = a._keys.tag(0, b"t")
    redis_client.pexpire(tag_key, 1_000)
    redis_client.pexpire(value_name(a, "s"), 1_000)
    clock.now += 30
    a.local.clear()
    assert a["s"] == 1
    assert redis_client.pttl(value_name(a, "s")) > 90_000
    assert redis_client.pttl(tag_key) > 90_000  # the tag outlives its values
    assert a.get_or_load("l", lambda k: 2, ttl=50, sliding=True) == 2
    assert 49_000 < redis_client.pttl(value_name(a, "l")) <= 50_000


# -- adaptive TTL -----------------------------------------------------------------------------


def test_adaptive_ttl_from_a_callable(make: Factory, redis_client: redis.Redis) -> None:
    seen: list[tuple[Any, Any]] = []

    def ttl(key: Any, value: Any) -> float | None:
        seen.append((key, value))
        return None if value == "forever" else value * 10.0

    a = make(ttl=ttl)
    a["k"] = 3
    assert 29_000 < redis_client.pttl(value_name(a, "k")) <= 30_000
    a["p"] = "forever"
    assert redis_client.pttl(value_name(a, "p")) == -1
    assert a.get_or_load(("t", 1), lambda k: 7) == 7
    assert 69_000 < redis_client.pttl(value_name(a, ("t", 1))) <= 70_000
    a.set("c", 1, ttl=lambda k, v: 2.0)
    assert 1_000 < redis_client.pttl(value_name(a, "c")) <= 2_000
    assert a.get_or_load("g", lambda k: 1, ttl=lambda k, v: 4.0) == 1
    assert 3_000 < redis_client.pttl(value_name(a, "g")) <= 4_000
    found = a.get_or_load_many(["m"], lambda keys: {k: 5 for k in keys})
    assert found == {"m": 5} and 49_000 < redis_client.pttl(value_name(a, "m")) <= 50_000
    assert ("k", 3) in seen and (("t", 1), 7) in seen
    with pytest.raises(ValueError):
        a.set("bad", 1, ttl=lambda k, v: 0)
    with pytest.raises(ValueError):
        a.set("bad", 1, ttl=-1)


def _forked_child(cache: TieredCache, out: Any) -> None:
    ready = cache.wait_ready(10.0)
    before = cache.get("k")
    cache.invalidate_tag("t")
    out.put((ready, before, cache.get("k")))


@pytest.mark.sync_only("os.fork: TieredCache only (an event loop does not survive a fork)")
def test_tags_in_a_forked_child(make: Factory) -> None:
    a = make(ttl=60)
    a.set("k", 1, tags=("t",))
    assert a.get("k") == 1
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(a, out))
    child.start()
    try:
        assert out.get(timeout=30) == (True, 1, None)
    finally:
        child.join(10)
    wait_until(lambda: a.local.entry("k") is None, 10)
    assert a.get("k") is None

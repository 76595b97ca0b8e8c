"""TieredCache's public behaviour (SPEC 2.2) on a real Redis server, no faults.

Every test uses two or more TieredCache instances on the session's shared server (flushed before
each test): each has its own connections and its own listener thread, as separate processes
would. Most tests run with both key styles: str keys (answered by the local tier's fast path,
Cython or its twin) and non-str keys (the Python slow path). The fork test runs a real forked
child process. Nothing sleeps: every wait is a ``wait_until`` with a deadline.
"""

from __future__ import annotations

import datetime as dt
import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, MutableMapping
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
import redis

from tests.aio_facade import make_cache
from tests.servers import RedisServer, pid_alive, wait_until
from tiercache.envelope import unpack
from tiercache.keys import KeySpace, encode_key, local_key
from tiercache.tiered import TieredCache

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
def make(redis_client: redis.Redis, shared_redis: RedisServer, impl: str) -> Iterator[Factory]:
    """``make(**options)``: a ready TieredCache on the shared server, closed after the test.

    Parametrized: a TieredCache, or an AsyncTieredCache behind tests.aio_facade.SyncFacade.
    """
    made: list[TieredCache] = []

    def factory(**kwargs: Any) -> TieredCache:
        # A generous PONG deadline: a starved listener thread must not turn the local tier off
        # in the middle of a test that counts local hits.
        kwargs.setdefault("health_timeout", 5.0)
        cache = make_cache(impl, shared_redis.url, **kwargs)
        made.append(cache)
        assert cache.wait_ready(10), "the invalidation channel never became ready"
        return cache

    try:
        yield factory
    finally:
        for cache in made:
            cache.close()
    assert tiercache_threads() == []


@pytest.fixture(params=["str", "tuple"])
def K(request: pytest.FixtureRequest) -> KeyOf:
    """Key maker: str keys (fast path) or tuple keys (slow path)."""
    if request.param == "str":
        return lambda n: f"user:{n}"
    return lambda n: ("user", n, b"\x00:", 2.5, None, True)


def raw_key(key: Any, namespace: str = "tc") -> bytes:
    return KeySpace(namespace).value(encode_key(key))


def holds_value(client: redis.Redis, key: Any) -> bool:
    """Whether Redis holds a value for ``key`` (not nothing, a tombstone or a fill lease)."""
    raw = client.get(raw_key(key))
    return raw is not None and unpack(raw).is_value


def lk(key: Any) -> Any:
    """The local-tier key of ``key``."""
    return local_key(key, encode_key(key))


# -- write-through and reads --------------------------------------------------------------------


def test_write_through_is_read_by_another_instance(
    make: Factory, K: KeyOf, redis_client: redis.Redis
) -> None:
    a, b = make(), make()
    value = {"name": "ada", "tags": ["x", "y"], "n": 3}
    a[K(1)] = value
    # Redis has it, in a versioned envelope.
    env = unpack(redis_client.get(raw_key(K(1))))
    assert env.version > 0
    # The other instance, with nothing local, reads it from Redis, then from its local tier.
    assert b[K(1)] == value
    assert b.stats()["remote_hits"] == 1 and b.stats()["local_hits"] == 0
    assert b[K(1)] == value
    assert b.stats()["remote_hits"] == 1 and b.stats()["local_hits"] == 1
    assert b.local.entry(lk(K(1))).version == env.version
    # The writer itself serves it locally.
    assert a[K(1)] == value
    assert a.stats()["local_hits"] == 1 and a.stats()["remote_hits"] == 0


def test_a_new_write_reaches_the_other_instances_local_copy(make: Factory, K: KeyOf) -> None:
    a, b = make(), make()
    a[K(1)] = "v1"
    assert b[K(1)] == "v1"
    assert b.local.peek(lk(K(1))) == "v1"
    a[K(1)] = "v2"
    wait_until(lambda: b[K(1)] == "v2", message="b sees the new write")
    assert b.local.peek(lk(K(1)), "v2") == "v2"


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        -(2**70),
        1.5,
        math.inf,
        "",
        "naïve\ud800",
        b"\x00\xff",
        [1, [2, (3, 4)]],
        (1, "a", None),
        {"a": 1, "b": {"c": [1, 2]}},
        {1: "int keys", (1, 2): "tuple keys"},
        {1, 2, 3},
        frozenset({"x"}),
        dt.datetime(2024, 2, 29, 12, 30, tzinfo=dt.timezone.utc),
        dt.date(2024, 1, 1),
        Decimal("1.10"),
        UUID(int=12345),
    ],
)
def test_values_round_trip_through_redis_exactly(make: Factory, value: Any) -> None:
    a, b = make(), make()
    a["v"] = value
    got = b["v"]
    assert got == value or (got != got and value != value)
    assert type(got) is type(value)


def test_get_default_and_key_error(make: Factory, K: KeyOf) -> None:
    a = make()
    assert a.get(K("missing")) is None
    assert a.get(K("missing"), "dflt") == "dflt"
    with pytest.raises(KeyError) as err:
        a[K("missing")]
    assert err.value.args == (K("missing"),)
    a[K(1)] = None  # a stored None is a value, not a miss
    assert a.get(K(1), "dflt") is None
    assert a[K(1)] is None
    assert a.stats()["misses"] == 3


def test_set_with_ttl_expires_in_redis_and_everywhere(
    make: Factory, K: KeyOf, redis_client: redis.Redis
) -> None:
    a, b = make(), make()
    a.set(K(1), "short", ttl=1.5)
    a.set(K(2), "long")
    pttl = redis_client.pttl(raw_key(K(1)))
    assert 0 < pttl <= 1500
    assert redis_client.pttl(raw_key(K(2))) == -1  # no ttl: no expiry
    assert b[K(1)] == "short"  # now in b's local tier too
    wait_until(lambda: not redis_client.exists(raw_key(K(1))), message="redis expired it")
    # Neither local tier serves it past its Redis TTL.
    wait_until(lambda: b.get(K(1)) is None and a.get(K(1)) is None, message="expired locally")
    assert K(1) not in a
    assert a[K(2)] == "long" and b[K(2)] == "long"


def test_cache_wide_ttl(make: Factory, redis_client: redis.Redis) -> None:
    a = make(ttl=30)
    a["k"] = 1
    assert 25_000 < redis_client.pttl(raw_key("k")) <= 30_000
    a.set("k2", 2, ttl=5)
    assert 0 < redis_client.pttl(raw_key("k2")) <= 5000


@pytest.mark.parametrize("ttl", [0, -1])
def test_bad_ttls_are_refused(make: Factory, ttl: float) -> None:
    a = make()
    with pytest.raises(ValueError):
        a.set("k", 1, ttl=ttl)
    assert "k" not in a


@pytest.mark.parametrize(
    "options",
    [
        {"ttl": 0},
        {"local_ttl": 0},
        {"local_ttl": math.inf},
        {"stale_if_error": -1},
        {"on_write_error": "ignore"},
        {"namespace": ""},
        {"namespace": "a{b}"},
    ],
)
def test_bad_options_are_refused(
    shared_redis: RedisServer, options: dict[str, Any], impl: str
) -> None:
    with pytest.raises(ValueError):
        make_cache(impl, shared_redis.url, **options)
    assert tiercache_threads() == []


# -- delete, invalidate --------------------------------------------------------------------------


def test_del_removes_everywhere_and_raises_when_absent(
    make: Factory, K: KeyOf, redis_client: redis.Redis
) -> None:
    a, b = make(), make()
    a[K(1)] = "v"
    assert b[K(1)] == "v"
    del a[K(1)]
    assert not holds_value(redis_client, K(1))  # a tombstone at most
    assert a.get(K(1)) is None
    wait_until(lambda: b.local.peek(lk(K(1))) is None, message="b dropped its copy")
    assert b.get(K(1)) is None
    with pytest.raises(KeyError):
        del a[K(1)]
    with pytest.raises(KeyError):
        del b[K("never")]


def test_del_of_a_key_only_in_redis(make: Factory, K: KeyOf) -> None:
    a, b = make(), make()
    a[K(1)] = "v"
    del b[K(1)]  # b never read it: nothing local, but Redis had it
    assert b.get(K(1)) is None
    wait_until(lambda: a.get(K(1)) is None, message="a dropped its copy")


def test_invalidate_never_raises(make: Factory, K: KeyOf, redis_client: redis.Redis) -> None:
    a, b = make(), make()
    assert a.invalidate(K("never")) is False
    a[K(1)] = "v"
    assert b[K(1)] == "v"
    assert b.invalidate(K(1)) is True
    assert not holds_value(redis_client, K(1))  # a tombstone at most
    assert b.get(K(1)) is None
    wait_until(lambda: a.local.peek(lk(K(1))) is None, message="a dropped its copy")
    assert a.invalidate(K(1)) is False


def test_a_deleted_key_can_be_written_again(make: Factory, K: KeyOf) -> None:
    a, b = make(), make()
    a[K(1)] = "v1"
    del a[K(1)]
    b[K(1)] = "v2"  # above the tombstone's version
    assert a[K(1)] == "v2"
    wait_until(lambda: a[K(1)] == "v2")


# -- the namespace as a mapping -----------------------------------------------------------------

ALL_KEY_TYPES: list[Any] = [
    "s",
    "",
    b"s",
    b"",
    1,
    -7,
    2**80,
    1.0,
    -0.0,
    0.0,
    math.inf,
    True,
    False,
    None,
    (),
    ("s", 1),
    (("nested", (b"x", None)), 1.5),
    "with * ? [ ] \\ glob",
    "}:v:tricky",
]


def _canon(key: Any) -> Any:
    if type(key) is tuple:
        return ("tuple", tuple(_canon(k) for k in key))
    if type(key) is float:
        return ("float", key.hex())
    return (type(key).__name__, key)


def test_in_len_iter_speak_of_redis_keys(make: Factory) -> None:
    a, b, other = make(), make(), make(namespace="other")
    for i, key in enumerate(ALL_KEY_TYPES):
        a[key] = i
    other["s"] = "not ours"
    other[1] = "not ours"
    for cache in (a, b):
        assert len(cache) == len(ALL_KEY_TYPES)
        listed = list(cache)
        # Exact keys back, with exact types: 1, 1.0 and True are three keys, 0.0 and -0.0 two.
        assert sorted(map(_canon, listed), key=repr) == sorted(map(_canon, ALL_KEY_TYPES), key=repr)
        for key in ALL_KEY_TYPES:
            assert key in cache
    assert len(other) == 2
    assert "absent" not in a and 2 not in a and 1.5 not in a
    # 1 is stored but 1.0 and True are also stored: drop 1 only.
    del a[1]
    assert 1 not in a and 1.0 in a and True in a
    index = {encode_key(k): i for i, k in enumerate(ALL_KEY_TYPES)}
    assert b[1.0] == index[encode_key(1.0)] and b[True] == index[encode_key(True)]
    assert b[-0.0] == index[encode_key(-0.0)] and b[0.0] == index[encode_key(0.0)]
    assert len(b) == len(ALL_KEY_TYPES) - 1


def test_values_are_keyed_by_exact_type(make: Factory) -> None:
    a, b = make(), make()
    for key in (1, 1.0, True, "1", b"1", (1,)):
        a[key] = repr(key)
    for key in (1, 1.0, True, "1", b"1", (1,)):
        assert b[key] == repr(key)
        assert a[key] == repr(key)


def test_clear_empties_the_namespace_and_every_local_tier(
    make: Factory, K: KeyOf, redis_client: redis.Redis
) -> None:
    a, b, other = make(), make(), make(namespace="keep")
    for n in range(20):
        a[K(n)] = n
    other[K(1)] = "kept"
    assert [b[K(n)] for n in range(20)] == list(range(20))
    assert len(b.local) == 20
    a.clear()
    assert len(a) == 0 and list(a) == []
    assert len(a.local) == 0
    # Another instance's local tier is emptied by the announcement.
    wait_until(lambda: len(b.local) == 0, message="b's local tier cleared")
    assert all(b.get(K(n)) is None for n in range(20))
    assert other[K(1)] == "kept" and len(other) == 1
    # Nothing of the namespace is left in Redis but its counter and log.
    left = set(redis_client.scan_iter(match=KeySpace("tc").all_pattern(0)))
    assert left <= {KeySpace("tc").counter(0), KeySpace("tc").log(0)}
    a[K(1)] = "again"
    assert b[K(1)] == "again"


# -- the loader ---------------------------------------------------------------------------------


def test_loader_reads_through_once_and_stores_in_redis(
    make: Factory, K: KeyOf, redis_client: redis.Redis
) -> None:
    calls: list[Any] = []

    def loader(key: Any) -> Any:
        calls.append(key)
        return {"loaded": repr(key)}

    c, other = make(loader=loader), make()
    assert c[K(1)] == {"loaded": repr(K(1))}
    assert calls == [K(1)]
    assert c[K(1)] == {"loaded": repr(K(1))}
    assert c.get(K(1)) == {"loaded": repr(K(1))}
    assert calls == [K(1)]
    assert redis_client.exists(raw_key(K(1)))
    assert other[K(1)] == {"loaded": repr(K(1))}  # no loader there: it came from Redis
    assert other.stats()["remote_hits"] == 1
    assert c.get(K(2)) == {"loaded": repr(K(2))}  # get reads through too
    assert calls == [K(1), K(2)]
    stats = c.stats()
    assert (stats["misses"], stats["loads"]) == (2, 2)
    # The entry holds the value, not the fill lease.
    assert unpack(redis_client.get(raw_key(K(1)))).is_value


def test_loader_key_error_is_a_miss_and_its_absence_is_cached_for_negative_ttl(
    make: Factory, K: KeyOf, redis_client: redis.Redis
) -> None:
    calls: list[Any] = []

    def loader(key: Any) -> Any:
        calls.append(key)
        raise KeyError(key)

    c, other = make(loader=loader, negative_ttl=1.0), make()
    with pytest.raises(KeyError):
        c[K(1)]
    assert c.get(K(1), "dflt") == "dflt"
    assert c.get(K(1)) is None
    assert calls == [K(1)]  # SPEC 2.2 negative_ttl: the origin's "no such key" is cached
    # A cached absence is not a value: not in the namespace, a miss for everyone.
    assert K(1) not in c and K(1) not in other
    assert len(c) == 0 and list(c) == []
    with pytest.raises(KeyError):
        other[K(1)]
    assert other.get(K(1), "dflt") == "dflt"
    # After negative_ttl the origin is asked again.
    wait_until(lambda: c.get(K(1), "dflt") == "dflt" and len(calls) >= 2, 10)
    # A write replaces the cached absence, everywhere.
    other[K(1)] = "now there"
    wait_until(lambda: c.get(K(1)) == "now there", message="the write replaced the absence")
    assert K(1) in c and len(c) == 1


def test_iteration_skips_a_foreign_name_that_does_not_decode(
    make: Factory, redis_client: redis.Redis
) -> None:
    # A value planted under a name whose key part is no valid encoding (here a float beyond
    # the double range): iterating the namespace must skip it, not fail.
    a = make()
    a["mine"] = 1
    planted = KeySpace("tc").prefix(0) + b"v:f0x1p99999"
    redis_client.set(planted, redis_client.get(raw_key("mine")))
    assert list(a) == ["mine"]


def test_loader_errors_propagate_and_are_not_cached(make: Factory, K: KeyOf) -> None:
    attempts = []

    def loader(key: Any) -> Any:
        attempts.append(key)
        if len(attempts) == 1:
            raise RuntimeError("origin down")
        return "fine"

    c = make(loader=loader)
    with pytest.raises(RuntimeError, match="origin down"):
        c[K(1)]
    assert c[K(1)] == "fine"  # the lease of the failed load was released
    assert len(attempts) == 2


@pytest.mark.parametrize("op", ["write", "delete"])
def test_a_fill_that_started_before_a_write_is_discarded(
    make: Factory, K: KeyOf, redis_client: redis.Redis, op: str
) -> None:
    """S1: the loader read the origin before a write/delete completed; its fill must not land."""
    started, release = threading.Event(), threading.Event()

    def loader(key: Any) -> Any:
        started.set()
        assert release.wait(10)
        return "stale-from-origin"

    c, a = make(loader=loader), make()
    result: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: result.setdefault("value", c[K(1)]))
    reader.start()
    try:
        assert started.wait(10)
        if op == "write":
            a[K(1)] = "fresh"
        else:
            a.invalidate(K(1))
    finally:
        release.set()
        reader.join(10)
    assert not reader.is_alive()
    assert result["value"] == "stale-from-origin"  # the reader's own answer predates the write
    assert c.stats()["stale_fills_rejected"] == 1
    stored = redis_client.get(raw_key(K(1)))
    if op == "write":
        assert stored is not None and stored.endswith(b"fresh")
        assert c.local.peek(lk(K(1))) in (None, "fresh")
        wait_until(lambda: c[K(1)] == "fresh", message="c reads the write")
    else:
        assert stored is not None and not unpack(stored).is_value  # the tombstone
        assert c.local.peek(lk(K(1))) is None
    assert a.get(K(1)) == ("fresh" if op == "write" else None)


def test_a_local_copy_is_served_at_most_local_ttl(make: Factory, K: KeyOf) -> None:
    clock = {"now": 100.0}
    a = make(local_ttl=5.0, timer=lambda: clock["now"])
    a[K(1)] = "v"
    assert a[K(1)] == "v"
    assert (a.stats()["local_hits"], a.stats()["remote_hits"]) == (1, 0)
    clock["now"] += 4.9
    assert a[K(1)] == "v"
    assert (a.stats()["local_hits"], a.stats()["remote_hits"]) == (2, 0)
    clock["now"] += 0.2  # past local_ttl: back to Redis, then local again
    assert a[K(1)] == "v"
    assert (a.stats()["local_hits"], a.stats()["remote_hits"]) == (2, 1)
    assert a[K(1)] == "v"
    assert (a.stats()["local_hits"], a.stats()["remote_hits"]) == (3, 1)


# -- refused keys and values --------------------------------------------------------------------


def _snapshot(client: redis.Redis) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for name in client.scan_iter(count=1000):
        kind = client.type(name)
        if kind == b"string":
            out[name] = client.get(name)
        elif kind == b"hash":
            out[name] = client.hgetall(name)
        else:
            out[name] = client.xlen(name)
    return out


@pytest.mark.parametrize(
    ("key", "name"),
    [([1], "list"), ({"a": 1}, "dict"), ({1}, "set"), (("ok", [1]), "list"), (object(), "object")],
)
def test_unsupported_keys_raise_type_error_and_write_nothing(
    make: Factory, redis_client: redis.Redis, key: Any, name: str
) -> None:
    a = make()
    a["existing"] = 1
    before = _snapshot(redis_client)
    for op in (
        lambda: a.__setitem__(key, 1),
        lambda: a.set(key, 1, ttl=5),
        lambda: a[key],
        lambda: a.get(key),
        lambda: a.__delitem__(key),
        lambda: a.invalidate(key),
        lambda: key in a,
    ):
        with pytest.raises(TypeError, match=rf"\b{name}\b"):
            op()
    assert _snapshot(redis_client) == before
    assert a["existing"] == 1


def test_unserializable_value_raises_type_error_and_changes_nothing(
    make: Factory, K: KeyOf, redis_client: redis.Redis
) -> None:
    a, b = make(), make()
    a[K(1)] = "old"
    assert b[K(1)] == "old"
    before = _snapshot(redis_client)
    for bad in (object(), {"nested": [1, object()]}, threading.Lock()):
        with pytest.raises(TypeError):
            a[K(1)] = bad
        with pytest.raises(TypeError):
            a.set(K(2), bad, ttl=10)
    assert _snapshot(redis_client) == before  # no value, no tombstone, no announcement
    assert a[K(1)] == "old" and b[K(1)] == "old"
    assert a.get(K(2)) is None and K(2) not in b


def test_a_value_larger_than_local_maxbytes_skips_the_local_tier(
    make: Factory, K: KeyOf, redis_client: redis.Redis
) -> None:
    # SPEC 2.2 local_maxbytes bounds the local tier; a value that does not fit it must still be
    # written to and read from Redis (research S22: oversized values skip L1).
    a, b = make(local_maxbytes=4096), make(local_maxbytes=4096)
    big = b"x" * 20_000
    a[K(1)] = big
    assert unpack(redis_client.get(raw_key(K(1)))).payload.endswith(big)
    assert b[K(1)] == big
    assert a[K(1)] == big
    a[K(2)] = b"small"
    assert b[K(2)] == b"small" and b.local.peek(lk(K(2))) == b"small"


# -- stats --------------------------------------------------------------------------------------


def test_stats_count_a_scripted_workload_exactly(make: Factory, K: KeyOf) -> None:
    loaded: list[Any] = []
    a, b = make(), make()
    c = make(loader=lambda k: loaded.append(k) or "loaded")

    def applied_everywhere(sentinel_value: str) -> None:
        # Messages are applied in order: once every cache dropped its old copy of the sentinel,
        # each has applied everything published before it.
        b["sentinel"] = sentinel_value
        for cache in (a, c):
            wait_until(
                lambda cache=cache: cache.local.peek("sentinel") in (None, sentinel_value),
                message="sentinel invalidation applied",
            )

    a[K(1)] = 1  # invalidation 1
    assert a[K(1)] == 1  # a: local hit 1
    assert b[K(1)] == 1  # b: remote hit 1
    assert b[K(1)] == 1  # b: local hit 1
    assert b.get(K(1)) == 1  # b: local hit 2
    assert b.get(K("none")) is None  # b: miss 1
    with pytest.raises(KeyError):
        b[K("none")]  # b: miss 2
    assert c[K(3)] == "loaded"  # c: miss 1, load 1 (a fill announces nothing)
    assert c[K(3)] == "loaded"  # c: local hit 1
    a["sentinel"] = "s0"  # invalidation 2
    assert a["sentinel"] == "s0" and c["sentinel"] == "s0"  # a: local hit 2; c: remote hit 1
    a[K(1)] = 2  # invalidation 3
    applied_everywhere("s1")  # invalidation 4 (by b)
    wait_until(lambda: b.local.peek(lk(K(1))) is None, message="b applied invalidation 3")
    assert b[K(1)] == 2  # b: remote hit 2 (its copy was invalidated)
    assert a[K(1)] == 2  # a: local hit 3 (its own write's echo did not drop it)
    sa, sb, sc = a.stats(), b.stats(), c.stats()
    assert (sa["local_hits"], sa["remote_hits"], sa["misses"], sa["loads"]) == (3, 0, 0, 0)
    assert (sb["local_hits"], sb["remote_hits"], sb["misses"], sb["loads"]) == (2, 2, 2, 0)
    assert (sc["local_hits"], sc["remote_hits"], sc["misses"], sc["loads"]) == (1, 1, 1, 1)
    assert loaded == [K(3)]
    # b and c wrote nothing but the sentinel; each received a's three and b's one.
    wait_until(lambda: c.stats()["invalidations_received"] == 4)
    assert c.stats()["invalidations_received"] == 4
    for s in (sa, sb, sc):
        assert s["stale_fills_rejected"] == 0 and s["resyncs"] == 0
        assert s["local_usable"] is True


# -- lifecycle ----------------------------------------------------------------------------------


def _listener_names(client: redis.Redis, namespace: str) -> list[str]:
    prefix = f"tiercache:listener:{namespace}:"
    return [c["name"] for c in client.client_list() if c["name"].startswith(prefix)]


def test_context_manager_and_idempotent_close(
    shared_redis: RedisServer, redis_client: redis.Redis
) -> None:
    with TieredCache(shared_redis.url, namespace="ctx") as c:
        assert c.wait_ready(10)
        c["k"] = 1
        assert len(tiercache_threads()) == 1
        wait_until(lambda: len(_listener_names(redis_client, "ctx")) == 1)
    assert tiercache_threads() == []
    wait_until(
        lambda: _listener_names(redis_client, "ctx") == [], message="listener connection closed"
    )
    c.close()
    c.close()
    assert tiercache_threads() == []


def test_close_leaves_a_users_client_open(
    shared_redis: RedisServer, redis_client: redis.Redis
) -> None:
    client = shared_redis.client()
    try:
        cache = TieredCache(client)
        assert cache.wait_ready(10)
        cache["k"] = "v"
        assert cache.redis is client
        cache.close()
        assert tiercache_threads() == []
        assert client.ping()
        assert client.exists(raw_key("k"))
    finally:
        client.close()


def test_a_decoding_client_is_refused(shared_redis: RedisServer) -> None:
    client = shared_redis.client(decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            TieredCache(client)
        assert tiercache_threads() == []
    finally:
        client.close()


def test_is_a_mutable_mapping(make: Factory, K: KeyOf) -> None:
    # SPEC 1: a dict-like cache (collections.abc.MutableMapping): the mixin methods must work.
    a, b = make(), make()
    assert isinstance(a, MutableMapping)
    a.update({K(1): 1, K(2): 2})
    assert b[K(1)] == 1 and b[K(2)] == 2
    assert a.pop(K(1)) == 1
    assert a.pop(K(1), "gone") == "gone"
    assert a.setdefault(K(3), 3) == 3 and b[K(3)] == 3
    assert sorted(map(repr, a.keys())) == sorted(map(repr, [K(2), K(3)]))
    assert dict(b.items()) == {K(2): 2, K(3): 3}


def test_embedded_default_server_is_started_and_stopped() -> None:
    cache = TieredCache()
    try:
        pid = int(cache.redis.info("server")["process_id"])
        assert pid != os.getpid() and pid_alive(pid)
        assert cache.wait_ready(10)
        cache["k"] = {"v": 1}
        assert cache["k"] == {"v": 1}
        with TieredCache(cache.redis) as other:
            assert other["k"] == {"v": 1}
    finally:
        cache.close()
    wait_until(lambda: not pid_alive(pid), message="embedded server stopped at close")
    assert tiercache_threads() == []
    cache.close()


# -- fork ---------------------------------------------------------------------------------------


def _forked_child(cache: TieredCache, key: Any, conn: Any) -> None:
    """Runs in the forked child: report what the child's cache does, step by step."""
    try:
        out: dict[str, Any] = {
            "usable_at_fork": cache.stats()["local_usable"],
            "local_size_at_fork": len(cache.local),
            "threads_at_fork": [t.name for t in tiercache_threads()],
        }
        conn.send(("forked", out))
        assert conn.poll(20), "parent never wrote"
        assert conn.recv() == "written-after-fork"
        out["first_read"] = cache[key]
        stats = cache.stats()
        out["first_local_hits"], out["first_remote_hits"] = (
            stats["local_hits"],
            stats["remote_hits"],
        )
        out["ready"] = cache.wait_ready(10)
        out["second_read"] = cache[key]  # now in the child's own local tier
        out["child_listener"] = [t.name for t in tiercache_threads()]
        conn.send(("ready", out))
        assert conn.poll(20), "parent never wrote again"
        assert conn.recv() == "written-again"
        wait_until(lambda: cache[key] == "v3", 10, message="child sees the parent's write")
        out["third_read"] = cache[key]
        out["local_after"] = cache.local.peek(lk(key))
        cache.close()
        out["threads_after_close"] = [t.name for t in tiercache_threads()]
        conn.send(("done", out))
    except BaseException as exc:  # report, do not hang the parent
        conn.send(("error", repr(exc)))


@pytest.mark.sync_only("os.fork: an asyncio loop does not survive into a forked child")
def test_forked_child_does_not_serve_the_parents_copies(make: Factory, K: KeyOf) -> None:
    parent = make()
    parent[K(1)] = "v1"
    assert parent[K(1)] == "v1" and parent.local.peek(lk(K(1))) == "v1"
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_forked_child, args=(parent, K(1), theirs), daemon=True)
    child.start()
    try:

        def receive(step: str) -> dict[str, Any]:
            assert mine.poll(30), f"child silent before {step}"
            kind, payload = mine.recv()
            assert kind == step, payload
            return payload

        out = receive("forked")
        assert out["usable_at_fork"] is False
        assert out["local_size_at_fork"] == 0
        assert out["threads_at_fork"] == []
        # Written after the fork, before the child has any listener: a copy inherited from the
        # parent's local tier would now be stale.
        parent[K(1)] = "v2"
        mine.send("written-after-fork")
        out = receive("ready")
        assert out["first_read"] == "v2"
        assert (out["first_local_hits"], out["first_remote_hits"]) == (0, 1)
        assert out["ready"] is True and out["second_read"] == "v2"
        assert len(out["child_listener"]) == 1
        parent[K(1)] = "v3"
        mine.send("written-again")
        out = receive("done")
        assert out["third_read"] == "v3" and out["local_after"] in (None, "v3")
        assert out["threads_after_close"] == []
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
        mine.close()
        theirs.close()
    # The parent is unaffected (the child did not close its listener's socket): still coherent,
    # still serving locally, never disconnected.
    assert parent[K(1)] == "v3"
    stats = parent.stats()
    assert stats["local_usable"] is True
    assert (stats["disconnects"], stats["resyncs"]) == (0, 0)

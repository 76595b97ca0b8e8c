"""``@tiered_cache`` (SPEC 2.3, issue 4): key building, ``cache_info``, ``cache_clear`` and
``invalidate`` across processes, methods, ``async def`` functions, errors, metadata, and the C
hit path (a single str or int argument, ``tiercache.local.CallFront``) against the slow path.

Every test runs on a real Redis (the session's shared server, flushed before each test); "another
process" is a real worker process (``tests.test_stampede.Worker``) that decorates its own function
under the same ``name=``, or a second TieredCache of this process (own connections and listener).
The whole file runs once per implementation (Cython, pure-Python twin), so each C-path check also
checks its twin. Nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import tiercache
from tests.servers import RedisServer, wait_until
from tests.test_stampede import (
    Background,
    Factory,
    Worker,
    blocked_in,
    cache_factory,
    forkserver_running,
    raw_key,
    worker_pool,
)
from tiercache import CacheInfo, TieredCache, tiered_cache
from tiercache.envelope import unpack
from tiercache.tiered import CALL_MARK


@pytest.fixture
def make(redis_client: redis.Redis, shared_redis: RedisServer) -> Iterator[Factory]:
    with cache_factory(shared_redis.url) as factory:
        yield factory


@pytest.fixture(scope="module")
def forkserver() -> Iterator[None]:
    with forkserver_running():
        yield


@pytest.fixture
def worker(forkserver: None, shared_redis: RedisServer) -> Iterator[Worker]:
    with worker_pool() as (start, _go):
        w = start("W")
        w.open(shared_redis.url, health_timeout=5.0)
        yield w


class Counted:
    """A function body that counts its calls and says which call answered."""

    def __init__(self, tag: str = "f") -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.tag = tag

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append((args, tuple(sorted(kwargs.items()))))
        return f"{self.tag}#{len(self.calls)}"


def call_key(name: str, args: tuple[Any, ...], kw: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """The cache key of a call (SPEC 2.3: the qualified name and the arguments)."""
    return (CALL_MARK, name, args, kw)


def function_keys(cache: TieredCache, name: str) -> set[Any]:
    """The call keys of function ``name`` that hold a value in Redis."""
    return {k for k in cache if isinstance(k, tuple) and k[:2] == (CALL_MARK, name)}


# -- key building --------------------------------------------------------------------------------


def test_positional_and_keyword_forms_of_one_call_share_one_entry(make: Factory) -> None:
    c = make()
    body = Counted()

    @tiered_cache(c, name="bind")
    def f(x: Any, y: Any = 0) -> str:
        return body(x, y)

    first = f(1, 2)
    assert f(1, y=2) == f(x=1, y=2) == f(*[1], **{"y": 2}) == f(y=2, x=1) == first
    assert len(body.calls) == 1
    # Defaults are not filled in (as functools): f(1) and f(1, 0) are two calls.
    assert f(1) != f(1, 0)
    assert len(body.calls) == 3
    # The C path (one str/int argument) and the bound keyword form are one entry.
    a_value = f("a")
    assert f(x="a") == f(*("a",)) == a_value
    assert f(7) == f(x=7)
    assert len(body.calls) == 5
    assert f.invalidate(x="a") is True  # the keyword form drops the C path's entry
    assert f("a") not in (a_value, first) and len(body.calls) == 6


def test_keyword_arguments_in_any_order_are_one_call(make: Factory) -> None:
    c = make()
    body = Counted()

    @tiered_cache(c)
    def g(*, a: int, b: int, c: int = 0) -> str:
        return body(a=a, b=b, c=c)

    assert g(a=1, b=2) == g(b=2, a=1)
    assert g(a=1, b=2, c=3) == g(c=3, b=2, a=1) == g(b=2, c=3, a=1)
    assert len(body.calls) == 2


@pytest.mark.parametrize("typed", [False, True])
def test_typed_keeps_1_and_1_0_and_true_apart(make: Factory, typed: bool) -> None:
    a, b = make(), make()
    body_a, body_b = Counted("a"), Counted("b")
    fa = tiered_cache(a, typed=typed, name="typed")(lambda x: body_a(x))
    fb = tiered_cache(b, typed=typed, name="typed")(lambda x: body_b(x))
    answers = [fa(1), fa(1.0), fa(True)]
    if typed:
        assert len(set(answers)) == 3 and len(body_a.calls) == 3
    else:  # equal arguments are one call, as in functools.lru_cache
        assert len(set(answers)) == 1 and len(body_a.calls) == 1
    assert fa("1") not in answers  # a str is never an int
    # The other instance finds each of them in Redis under the same key.
    assert [fb(1), fb(1.0), fb(True)] == answers
    assert body_b.calls == []


def test_unsupported_arguments_raise_type_error_and_run_nothing(
    make: Factory, redis_client: redis.Redis
) -> None:
    c = make()
    body = Counted()

    @tiered_cache(c)
    def f(x: Any, y: Any = None) -> str:
        return body(x, y)

    for bad in ([1], {"a": 1}, {1, 2}, object(), bytearray(b"x")):
        with pytest.raises(TypeError):
            f(bad)
        with pytest.raises(TypeError):
            f(1, y=bad)
    # A call that does not bind is the caller's TypeError, and is not cached.
    with pytest.raises(TypeError):
        f(1, z=2)
    with pytest.raises(TypeError):
        f(1, 2, 3)
    assert body.calls == []
    assert list(c) == [], "a refused call wrote to Redis"


def test_methods_need_a_key_function_that_leaves_self_out(make: Factory) -> None:
    c = make()

    class Repo:
        def __init__(self, tenant: str) -> None:
            self.tenant = tenant
            self.calls = 0

        @tiered_cache(c, key=lambda self, uid: (self.tenant, uid))
        def user(self, uid: int) -> str:
            self.calls += 1
            return f"{self.tenant}:{uid}:{id(self)}"

        @tiered_cache(c)
        def unkeyed(self, uid: int) -> str:
            self.calls += 1
            return "never"

    a1, a2, b = Repo("a"), Repo("a"), Repo("b")
    first = a1.user(1)
    assert a2.user(1) == first and a2.calls == 0  # same tenant, same key
    assert b.user(1) != first and b.calls == 1
    assert Repo.user.cache_info().misses == 2
    assert Repo.user.invalidate(a2, 1) is True
    assert a2.user(1) != first and a2.calls == 1
    with pytest.raises(TypeError, match="Repo"):
        a1.unkeyed(1)
    assert a1.calls == 1
    # A key function's result must be a key type too.
    bad = tiered_cache(c, key=lambda x: [x], name="bad-key")(lambda x: x)
    with pytest.raises(TypeError):
        bad(1)


# -- cache_info ----------------------------------------------------------------------------------


def test_cache_info_counts_loads_local_and_remote_hits(make: Factory) -> None:
    a, b = make(), make()
    fa = tiered_cache(a, name="info", local_maxsize=2)(Counted("a"))
    fb = tiered_cache(b, name="info")(Counted("b"))
    assert fa.cache_info() == CacheInfo(0, 0, 2, 0, 0, 0, 0)
    fa(1)
    assert fa.cache_info() == CacheInfo(0, 1, 2, 1, 0, 0, 1)
    fa(1)
    fa(1)
    assert fa.cache_info() == CacheInfo(2, 1, 2, 1, 2, 0, 1)
    info = fa.cache_info()
    assert (info.hits, info.misses, info.maxsize, info.currsize) == (2, 1, 2, 1)
    fb(1)  # from Redis: a remote hit
    assert fb.cache_info() == CacheInfo(1, 0, 1024, 1, 0, 1, 0)
    fb(1)
    assert fb.cache_info() == CacheInfo(2, 0, 1024, 1, 1, 1, 0)
    fa(2)
    fa(3)
    assert fa.cache_info().currsize == 2, "the local tier grew beyond local_maxsize"
    assert fa.cache_info().misses == 3


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((1, 2), {}), ((), {"x": "a"}), ((("t", 1.5),), {})],
    ids=["two-args", "keyword", "tuple"],
)
def test_cache_info_counts_a_local_hit_of_a_slow_path_call_once(
    make: Factory, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """A call the C path does not take (not one str/int positional argument) and that the
    local tier answers is one local hit: not also a remote hit."""
    c = make()

    @tiered_cache(c, name="slow")
    def f(x: Any, y: Any = 0) -> str:
        return f"{x!r}{y!r}"

    f(*args, **kwargs)
    f(*args, **kwargs)
    assert f.cache_info() == CacheInfo(
        hits=1, misses=1, maxsize=1024, currsize=1, local_hits=1, remote_hits=0, loads=1
    )


# -- cache_clear and invalidate reach other processes ------------------------------------------


def test_invalidate_and_cache_clear_reach_another_process(
    make: Factory, worker: Worker, redis_client: redis.Redis
) -> None:
    c = make()
    body, other = Counted("T"), Counted("g")
    fn = tiered_cache(c, name="shared.fn")(lambda x, y=0: body(x, y))
    g = tiered_cache(c, name="shared.other")(lambda x: other(x))
    worker.call("decorate", "shared.fn", "sync", {})
    outcome, value, _, _ = worker.call("call", (1,), {})
    assert outcome == "ok"
    assert fn(1) == value and body.calls == []  # computed by the worker, read from Redis
    assert fn(1) == value and fn.cache_info().local_hits == 1
    assert worker.call("call", (1,), {})[1] == value and worker.call("fn_calls") == 1
    # invalidate: the worker's local copy goes, the next call there computes again.
    assert fn.invalidate(1) is True
    assert fn.invalidate(1) is False  # nothing cached anywhere now
    wait_until(lambda: worker.call("fn_local_len") == 0, 5, message="the worker dropping f(1)")
    again = worker.call("call", (1,), {})[1]
    assert again != value and worker.call("fn_calls") == 2
    assert fn(1) == again
    # cache_clear from the worker: every entry of this function, in Redis and in our local
    # tier; another function's entries stay.
    fn(2, y=3)
    g(5)
    assert len(fn.local) == 2 and len(g.local) == 1
    assert len(function_keys(c, "shared.fn")) == 2
    worker.call("cache_clear")
    wait_until(lambda: len(fn.local) == 0, 5, message="our local tier of fn emptied")
    assert function_keys(c, "shared.fn") == set()
    assert function_keys(c, "shared.other") == {call_key("shared.other", (5,))}
    assert len(g.local) == 1 and g(5) == "g#1" and g.cache_info().local_hits == 1
    before = len(body.calls)
    fn(2, y=3)
    assert len(body.calls) == before + 1


def test_cache_clear_and_invalidate_between_two_caches_of_one_process(make: Factory) -> None:
    a, b = make(), make()
    fa = tiered_cache(a, name="pair")(Counted("a"))
    fb = tiered_cache(b, name="pair")(Counted("b"))
    fa("x")
    assert fb("x") == "a#1"
    assert fb("x") == "a#1" and fb.cache_info().local_hits == 1
    fb.cache_clear()
    wait_until(lambda: len(fa.local) == 0, 5, message="a's local tier of the function emptied")
    assert fa("x") == "a#2"
    wait_until(lambda: fb("x") == "a#2", 5)
    assert fa.invalidate("x") is True
    wait_until(lambda: len(fb.local) == 0, 5)
    assert fb("x") == "b#1"


# -- errors, ttl, metadata, owning a cache -----------------------------------------------------


@pytest.mark.parametrize("error", [ValueError("bad input"), KeyError("no such row")])
def test_exceptions_propagate_and_are_not_cached(
    make: Factory, redis_client: redis.Redis, error: Exception
) -> None:
    a, b = make(), make()
    attempts: list[int] = []

    def body(x: Any) -> str:
        attempts.append(x)
        if len(attempts) == 1:
            raise error
        return "ok"

    f = tiered_cache(a, name="errors")(body)
    g = tiered_cache(b, name="errors")(body)
    with pytest.raises(type(error)) as info:
        f("k")
    assert info.value is error
    # A KeyError of the function is its error, not a cached "absent".
    assert redis_client.get(raw_key(call_key("errors", ("k",)))) is None
    assert len(f.local) == 0
    assert g("k") == "ok" and f("k") == "ok"
    assert attempts == ["k", "k"]


def test_ttl_bounds_an_entry_in_redis_and_on_the_c_path(
    make: Factory, redis_client: redis.Redis
) -> None:
    c = make()
    body = Counted()
    f = tiered_cache(c, ttl=0.3, name="short")(lambda x: body(x))
    first = f("a")
    pttl = redis_client.pttl(raw_key(call_key("short", ("a",))))
    assert 0 < pttl <= 300
    assert f("a") == first and f.cache_info().local_hits == 1
    wait_until(lambda: f("a") != first, 5, message="the expired entry computed again")
    assert len(body.calls) == 2


def test_a_write_elsewhere_stops_the_c_path_serving_the_old_value(make: Factory) -> None:
    a, b = make(), make()
    fa = tiered_cache(a, name="fresh")(Counted("a"))
    fb = tiered_cache(b, name="fresh")(Counted("b"))
    assert fa(42) == "a#1" and fb(42) == "a#1" and fb(42) == "a#1"
    assert fb.cache_info().local_hits == 1
    fa.invalidate(42)
    wait_until(lambda: fb(42) == "b#1", 5, message="b's C path stops serving a#1")


def test_wraps_metadata_and_signature(make: Factory) -> None:
    c = make()

    def lookup(user_id: int, *, fields: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Fetch a user."""
        return {"id": user_id}

    lookup.custom = "kept"  # type: ignore[attr-defined]
    f = tiered_cache(c)(lookup)
    assert f.__wrapped__ is lookup
    assert f.__name__ == "lookup"
    assert f.__qualname__ == lookup.__qualname__
    assert f.__doc__ == "Fetch a user."
    assert f.__module__ == __name__
    assert f.custom == "kept"
    assert inspect.signature(f) == inspect.signature(lookup)
    assert f(1) == {"id": 1} and f(1, fields=None) == {"id": 1}


def test_decorator_arguments_are_checked_and_names_are_unique(
    make: Factory, shared_redis: RedisServer
) -> None:
    c = make()
    with pytest.raises(TypeError):
        tiered_cache(shared_redis.url)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tiered_cache(c, namespace="other")
    first = tiered_cache(c, name="dup")(lambda x: x)
    with pytest.raises(ValueError, match="dup"):
        tiered_cache(c, name="dup")(lambda x: x)
    assert first(1) == 1


def test_a_decorator_that_owns_its_cache_closes_it(
    shared_redis: RedisServer, redis_client: redis.Redis
) -> None:
    baseline = set(threading.enumerate())
    body = Counted()
    f = tiered_cache(
        redis=shared_redis.url, namespace="own", ttl=5.0, health_timeout=5.0, name="owned"
    )(lambda x: body(x))
    try:
        assert f(1) == f(1) == "f#1"
        keys = redis_client.keys("own:*v:*")
        assert len(keys) == 1 and 0 < redis_client.pttl(keys[0]) <= 5000
    finally:
        f.close()
    wait_until(
        lambda: (
            not [
                t
                for t in threading.enumerate()
                if t.name.startswith("tiercache") and t not in baseline
            ]
        ),
        5,
        message="the owned cache's threads stopping",
    )


def test_the_c_path_is_the_implementation_asked_for() -> None:
    from tiercache.decorator import CachedFunction
    from tiercache.local import CallFront

    assert issubclass(CachedFunction, CallFront)
    if os.environ.get("TIERCACHE_REQUIRE_EXTENSIONS"):
        assert tiercache.EXTENSIONS and CallFront.__module__ == "tiercache._local"
    if os.environ.get("TIERCACHE_NO_EXTENSIONS"):
        assert not tiercache.EXTENSIONS and CallFront.__module__ == "tiercache._local_py"


def test_every_call_shape_answers_alike_through_each_call_slot(make: Factory) -> None:
    """vectorcall (how Python calls it), tp_call (``type(f).__call__``), a bound method and
    ``functools.partial`` hand the arguments over differently: the answers and counts agree."""
    c = make()
    body = Counted()

    @tiered_cache(c, name="shapes")
    def f(*args: Any, **kwargs: Any) -> str:
        return body(*args, **kwargs)

    shapes: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((), {}),
        (("a",), {}),
        ((7,), {}),
        (("a", 2), {}),
        (("a",), {"k": 1}),
        ((), {"k": 1, "j": "x"}),
    ]
    first = [f(*a, **kw) for a, kw in shapes]
    assert len(body.calls) == len(shapes) and len(set(first)) == len(shapes)
    slot = type(f).__call__
    assert [slot(f, *a, **kw) for a, kw in shapes] == first  # tp_call
    assert [functools.partial(f, *a)(**kw) for a, kw in shapes] == first
    assert f(*["a"]) == f(*("a",), **{}) == first[1]
    assert len(body.calls) == len(shapes)  # every one of those was a hit
    info = f.cache_info()
    assert info.misses == len(shapes) and info.hits == 2 * len(shapes) + 2

    class Holder:
        @tiered_cache(c, name="shapes-method", key=lambda self, x: x)
        def m(self, x: Any) -> str:
            return body(x)

    h = Holder()
    assert h.m("a") == h.m("a") == Holder.m(h, "a")  # the bound call passes self in front
    assert len(body.calls) == len(shapes) + 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_cache_info_counts_a_raising_call_as_a_miss_as_functools_does(
    make: Factory, kind: str
) -> None:
    c = make()

    def fails(x: int) -> int:
        raise ValueError(x)

    async def afails(x: int) -> int:
        raise ValueError(x)

    f = tiered_cache(c, name="raising")(fails if kind == "sync" else afails)
    with pytest.raises(ValueError):
        f(1) if kind == "sync" else asyncio.run(f(1))
    reference = functools.lru_cache(fails)
    with pytest.raises(ValueError):
        reference(1)
    info, ref = f.cache_info(), reference.cache_info()
    assert (info.hits, info.misses, info.currsize) == (ref.hits, ref.misses, ref.currsize)


# -- async def functions -----------------------------------------------------------------------


def test_async_concurrent_calls_share_one_run_and_cancelled_callers_do_not_cancel_it(
    make: Factory, redis_client: redis.Redis
) -> None:
    c = make()
    calls: list[Any] = []

    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        @tiered_cache(c, name="async.shared")
        async def fetch(x: int) -> dict[str, int]:
            calls.append(x)
            started.set()
            await release.wait()
            return {"x": x}

        leader = asyncio.create_task(fetch(1))
        await asyncio.wait_for(started.wait(), 10)
        followers = [asyncio.create_task(fetch(1)) for _ in range(49)]
        await asyncio.sleep(0)  # one loop turn: each follower joins the call in flight
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fetch(1), 0.05)  # a caller that times out
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*followers), 10)
        assert results == [{"x": 1}] * 49
        assert calls == [1]
        assert fetch._flights == {}, "the in-flight map keeps a finished call"
        assert await fetch(1) == {"x": 1} and fetch.cache_info().local_hits == 1
        # Every caller gone: the shared run still completes and is stored.
        started.clear()
        release.clear()
        lone = asyncio.create_task(fetch(2))
        await asyncio.wait_for(started.wait(), 10)
        lone.cancel()
        release.set()
        name = raw_key(call_key("async.shared", (2,)))
        for _ in range(1000):  # a condition with a deadline (10 s), on the running loop
            raw = redis_client.get(name)
            if raw is not None and unpack(raw).is_value:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the abandoned run was not stored")
        assert await fetch(2) == {"x": 2}
        assert calls == [1, 2]

    asyncio.run(scenario())


def test_async_exceptions_reach_every_caller_and_are_not_cached(
    make: Factory, redis_client: redis.Redis
) -> None:
    c = make()
    attempts: list[int] = []
    error = LookupError("origin down")

    async def scenario() -> None:
        release = asyncio.Event()

        @tiered_cache(c, name="async.errors")
        async def fetch(x: int) -> int:
            attempts.append(x)
            await release.wait()
            if len(attempts) == 1:
                raise error
            return x * 10

        tasks = [asyncio.create_task(fetch(3)) for _ in range(20)]
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert all(r is error for r in results), results
        assert attempts == [3]
        assert redis_client.get(raw_key(call_key("async.errors", (3,)))) is None
        assert await fetch(3) == 30 and attempts == [3, 3]
        assert await fetch(3) == 30 and attempts == [3, 3]
        info = fetch.cache_info()
        assert (info.hits, info.local_hits, info.currsize) == (1, 1, 1)

    asyncio.run(scenario())


def test_async_functions_share_entries_with_another_cache(make: Factory) -> None:
    a, b = make(), make()
    runs: list[str] = []

    async def fa_body(x: int) -> str:
        runs.append("a")
        return f"a:{x}"

    async def fb_body(x: int) -> str:
        runs.append("b")
        return f"b:{x}"

    fa = tiered_cache(a, name="async.pair")(fa_body)
    fb = tiered_cache(b, name="async.pair")(fb_body)

    async def scenario() -> None:
        assert await fa(1) == "a:1"
        assert await fb(1) == "a:1" and runs == ["a"]
        assert fb.cache_info().remote_hits == 1
        assert await fb(1) == "a:1" and fb.cache_info().local_hits == 1
        assert fa.invalidate(1) is True
        await asyncio.to_thread(wait_until, lambda: len(fb.local) == 0, 5)
        assert await fb(1) == "b:1"
        fb.cache_clear()
        await asyncio.to_thread(wait_until, lambda: len(fa.local) == 0, 5)
        assert await fa(1) == "a:1" and runs == ["a", "b", "a"]

    asyncio.run(scenario())


def test_async_wrapper_is_recognised_as_a_coroutine_function(make: Factory) -> None:
    """Frameworks decide whether to await a callable by asking the standard checks."""
    c = make()

    async def fetch(x: int) -> int:
        return x

    f = tiered_cache(c)(fetch)
    if sys.version_info >= (3, 12):
        assert inspect.iscoroutinefunction(f)
    else:
        assert asyncio.iscoroutinefunction(f)
    assert asyncio.run(f(5)) == 5


def test_sync_threads_share_one_call_of_a_decorated_function(make: Factory) -> None:
    c = make()
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    @tiered_cache(c, name="threads")
    def slow(x: int) -> str:
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        return f"slow:{x}"

    leader = Background(lambda: slow(9), name="leader")
    assert started.wait(10)
    followers = [Background(lambda: slow(9)) for _ in range(8)]
    wait_until(lambda: all(blocked_in(f.thread, "result") for f in followers), 10)
    release.set()
    assert [x.result() for x in [leader, *followers]] == ["slow:9"] * 9
    assert calls == ["leader"]
    assert slow.cache_info().misses == 1

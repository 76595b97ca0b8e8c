"""AsyncTieredCache in its own event loop: the API as coroutines, cancellation, shutdown, the
decorator, and one sync and one async cache sharing a namespace in one process.

The suites of the earlier issues run against the async driver through tests.aio_facade (the
``impl`` parameter); this file checks what only a native asyncio caller can: cancelling awaits,
tasks left behind, a loop's error reports. Every test runs in a fresh loop (``arun``) that fails
the test if asyncio reported anything (a task destroyed while pending, an exception never
retrieved) or if a task is still pending after the test's coroutine returned; warnings are
errors here (the ``aio`` mark), so an unclosed connection fails too.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis

from tests.proxy import TcpProxy
from tests.servers import RedisServer, wait_until
from tiercache import MISSING, AsyncTieredCache, CacheUnavailable, TieredCache, tiered_cache
from tiercache.aio import AsyncTieredCache as FromAio
from tiercache.aio.stampede import AsyncSingleFlight
from tiercache.envelope import FLAG_LEASE, unpack
from tiercache.keys import KeySpace, encode_key, local_key
from tiercache.writebehind import stream_key

pytestmark = pytest.mark.aio

T = TypeVar("T")
DEADLINE = 10.0  # no await of a test waits longer than this


def arun(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` in a new loop; fail on loop errors and on tasks left pending."""
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    left: list[asyncio.Task[Any]] = []

    async def run() -> T:
        result = await asyncio.wait_for(main(), 60)
        await asyncio.sleep(0)  # let callbacks of finished tasks run
        left.extend(t for t in asyncio.all_tasks() if t is not asyncio.current_task())
        return result

    try:
        return loop.run_until_complete(run())
    finally:
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=5))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        gc.collect()
        assert not left, f"tasks still pending after the test: {left}"
        assert not errors, f"the event loop reported: {errors}"


def raw_key(key: Any, namespace: str = "tc") -> bytes:
    return KeySpace(namespace).value(encode_key(key))


def lk(key: Any) -> Any:
    return local_key(key, encode_key(key))


def is_lease(raw: bytes | None) -> bool:
    return raw is not None and bool(unpack(raw).flags & FLAG_LEASE)


async def until(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "") -> Any:
    """Await ``predicate()`` (sync or async) becoming truthy; TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s: {what or predicate}")
        await asyncio.sleep(0.005)


def _listeners(client: redis.Redis, namespace: str) -> list[str]:
    prefix = f"tiercache:listener:{namespace}:"
    return [c["name"] for c in client.client_list() if c["name"].startswith(prefix)]


@pytest.fixture
def url(shared_redis: RedisServer, redis_client: redis.Redis) -> Iterator[str]:
    yield shared_redis.url


# -- the API --------------------------------------------------------------------------------------


def test_exported_from_tiercache_and_tiercache_aio() -> None:
    assert AsyncTieredCache is FromAio


def test_the_api_as_coroutines(url: str, redis_client: redis.Redis) -> None:
    async def main() -> None:
        async with AsyncTieredCache(url, health_timeout=5.0) as c, AsyncTieredCache(url) as d:
            assert c.stats()["local_usable"]
            await c.set("a", {"v": 1})
            await c.set(("t", 1), [1, 2], ttl=30)
            assert await c.get("a") == {"v": 1} and await d.get(("t", 1)) == [1, 2]
            assert await c.get("missing") is None and await c.get("missing", 7) == 7
            assert c.stats()["local_hits"] >= 1 and d.stats()["remote_hits"] >= 1
            assert await c.contains("a") and not await c.contains("missing")
            stored = [k async for k in c]
            assert sorted(map(repr, stored)) == ["'a'", "('t', 1)"]
            assert await c.count() == 2
            assert await d.get_many(["a", ("t", 1), "x"]) == {"a": {"v": 1}, ("t", 1): [1, 2]}
            got = await d.get_or_load_many(["a", "n1", "n2"], lambda ks: {"n1": ks})
            assert got == {"a": {"v": 1}, "n1": ["n1", "n2"]}
            assert await c.get("n2") is None  # left out by the loader: cached as absent
            assert await c.invalidate("a") is True and await c.invalidate("a") is False
            with pytest.raises(KeyError):
                await c.delete("a")
            await until(lambda: d.local.entry(lk("a")) is None, what="d dropped its copy of a")
            assert await d.get("a") is None
            with pytest.raises(TypeError, match=r"await cache\.get"):
                c["a"]
            with pytest.raises(TypeError):
                await c.set(["unhashable"], 1)
            with pytest.raises(ValueError):
                await c.set("a", 1, ttl=0)
            await c.clear()
            assert await d.count() == 0
            await until(lambda: len(d.local) == 0, what="d's local tier emptied by clear")
            stats = c.stats()
            assert isinstance(stats, dict) and stats["writes"] == 2 and stats["deletes"] == 3
            assert "AsyncTieredCache" in repr(c)

    arun(main)


def test_get_or_load_takes_async_sync_and_callable_loaders(url: str) -> None:
    loop_thread: list[int] = []

    async def coro_loader(key: Any) -> str:
        loop_thread.append(threading.get_ident())
        return f"async:{key}"

    def plain_loader(key: Any) -> str:
        return f"plain:{key}:{threading.get_ident() == loop_thread[0]}"

    class Callable_:
        async def __call__(self, key: Any) -> str:
            return f"callable:{key}"

    def absent(key: Any) -> Any:
        raise KeyError(key)

    async def main() -> None:
        async with AsyncTieredCache(url, namespace="loaders") as c:
            assert await c.get_or_load("a", coro_loader) == "async:a"
            # A plain loader runs in a worker thread: the loop is never blocked by it.
            assert await c.get_or_load("b", plain_loader) == "plain:b:False"
            assert await c.get_or_load("c", Callable_()) == "callable:c"
            with pytest.raises(KeyError):
                await c.get_or_load("d", lambda k: MISSING)
            with pytest.raises(KeyError):
                await c.get_or_load("e", absent)
            loads = c.stats()["loads"]
            with pytest.raises(KeyError):  # the absence is cached (negative_ttl)
                await c.get_or_load("e", absent)
            assert c.stats()["loads"] == loads
            await c.clear()

    arun(main)


def test_a_loader_on_the_cache_reads_through_on_get(url: str) -> None:
    async def loader(key: Any) -> str:
        return key.upper()

    async def main() -> None:
        async with AsyncTieredCache(url, namespace="rt", loader=loader) as c:
            assert await c.get("abc") == "ABC"
            assert c.stats()["loads"] == 1
            assert await c.get("abc") == "ABC" and c.stats()["loads"] == 1
            await c.clear()

    arun(main)


# -- shutdown ----------------------------------------------------------------------------------


def test_aclose_leaves_no_task_thread_or_connection(url: str, redis_client: redis.Redis) -> None:
    before = set(threading.enumerate())

    async def main() -> None:
        c = AsyncTieredCache(url, namespace="shut", ttl=0.2, stale_ttl=30.0)
        await c.start()
        assert _listeners(redis_client, "shut") != []
        gate = asyncio.Event()

        async def slow(key: Any) -> str:
            await gate.wait()
            return "v"

        # Work in flight at close: a load, a background refresh (SWR) of a sync loader.
        await c.get_or_load("sync", lambda k: "s")
        await until(lambda: time.time() > 0.3 + started, what="the value turned stale")
        assert await c.get_or_load("sync", lambda k: time.sleep(0.2) or "s2") == "s"
        load = asyncio.ensure_future(c.get_or_load("k", slow))
        await until(lambda: len(c._flights) == 1, what="the load in flight")
        # (holding its lease: a load cancelled inside the lease call leaves one to its TTL)
        await until(lambda: is_lease(redis_client.get(raw_key("k", "shut"))), what="the lease")
        await c.aclose()
        with pytest.raises(CacheUnavailable, match="closed"):
            await load  # the load was cancelled by aclose(); its caller is told why
        await c.aclose()  # idempotent
        assert c._listener is not None and not c._listener.alive

    started = time.time()
    arun(main)
    wait_until(lambda: _listeners(redis_client, "shut") == [], message="listener connection gone")
    assert not [t for t in threading.enumerate() if t not in before and t.name.startswith("tier")]
    assert not is_lease(redis_client.get(raw_key("k", "shut"))), "the cancelled load's lease stays"


def test_a_users_client_stays_open_and_a_decoding_one_is_refused(shared_redis: RedisServer) -> None:
    import redis.asyncio as aioredis

    async def main() -> None:
        client = aioredis.Redis(host=shared_redis.host, port=shared_redis.port)
        try:
            async with AsyncTieredCache(client, namespace="own") as c:
                await c.set("k", 1)
                assert c.redis is client
            assert await client.ping()
            await client.delete(raw_key("k", "own"))
        finally:
            await client.aclose()
        decoding = aioredis.Redis(
            host=shared_redis.host, port=shared_redis.port, decode_responses=True
        )
        try:
            with pytest.raises(ValueError, match="decode_responses"):
                AsyncTieredCache(decoding)
        finally:
            await decoding.aclose()
        with pytest.raises(TypeError):
            AsyncTieredCache(object())  # type: ignore[arg-type]

    arun(main)


def test_embedded_default_server_is_started_and_stopped() -> None:
    from tests.servers import pid_alive

    pids: list[int] = []

    async def main() -> None:
        async with AsyncTieredCache() as c:
            pids.append(int((await c.redis.info("server"))["process_id"]))
            await c.set("k", 1)
            assert await c.get("k") == 1

    arun(main)
    wait_until(lambda: not pid_alive(pids[0]), message="embedded server stopped at aclose")


# -- single-flight and cancellation ----------------------------------------------------------


def test_cancelling_waiters_and_the_first_caller_does_not_cancel_the_shared_load(
    url: str, redis_client: redis.Redis
) -> None:
    calls: list[str] = []

    async def main() -> None:
        async with AsyncTieredCache(url, namespace="cancel") as c:
            gate = asyncio.Event()

            async def loader(key: Any) -> str:
                calls.append(key)
                await gate.wait()
                return "loaded"

            callers = [asyncio.ensure_future(c.get_or_load("k", loader)) for _ in range(10)]
            await until(lambda: calls, what="the loader running")
            await until(lambda: len(c._flights) == 1, what="one load in flight")
            assert is_lease(redis_client.get(raw_key("k", "cancel")))
            for t in callers[:4]:  # the first caller (who started the load) and 3 others
                t.cancel()
            await asyncio.sleep(0.05)
            assert len(c._flights) == 1, "cancelling callers cancelled the shared load"
            gate.set()
            assert await asyncio.gather(*callers[4:]) == ["loaded"] * 6
            for t in callers[:4]:
                assert t.cancelled()
            assert calls == ["k"] and len(c._flights) == 0
            assert unpack(redis_client.get(raw_key("k", "cancel"))).is_value
            await c.clear()

    arun(main)


def test_a_load_whose_callers_were_all_cancelled_still_fills(
    url: str, redis_client: redis.Redis
) -> None:
    async def main() -> None:
        async with AsyncTieredCache(url, namespace="orphan") as c:
            gate = asyncio.Event()
            calls: list[int] = []

            async def loader(key: Any) -> str:
                calls.append(1)
                await gate.wait()
                return "v"

            caller = asyncio.ensure_future(c.get_or_load("k", loader))
            await until(lambda: calls, what="the loader running")
            caller.cancel()
            gate.set()
            await until(lambda: len(c._flights) == 0, what="the load finished")
            assert unpack(redis_client.get(raw_key("k", "orphan"))).is_value
            assert await c.get_or_load("k", loader) == "v" and calls == [1]
            await c.clear()

    arun(main)


def test_a_cancelled_shared_load_is_taken_over_by_a_waiting_caller(url: str) -> None:
    async def main() -> None:
        sf = AsyncSingleFlight()
        runs: list[int] = []
        gate = asyncio.Event()

        async def fn() -> str:
            runs.append(1)
            if len(runs) == 1:
                await asyncio.sleep(30)  # the first load hangs until it is cancelled
            await gate.wait()
            return f"run {len(runs)}"

        first = asyncio.ensure_future(sf.run("k", fn, wait=30))
        await until(lambda: runs, what="the first load running")
        waiter = asyncio.ensure_future(sf.run("k", fn, wait=30))
        await asyncio.sleep(0.01)
        sf._calls["k"].cancel()  # the load itself is cancelled, not its callers
        gate.set()
        # Both callers hand over to one new load: neither sees the cancellation.
        assert await asyncio.gather(first, waiter) == ["run 2", "run 2"]
        assert len(runs) == 2 and len(sf) == 0

    arun(main)


def test_the_leaders_exception_reaches_every_waiter_and_is_not_cached(url: str) -> None:
    async def main() -> None:
        async with AsyncTieredCache(url, namespace="err") as c:
            gate = asyncio.Event()
            calls: list[int] = []
            error = ConnectionError("origin down")

            async def loader(key: Any) -> str:
                calls.append(1)
                if len(calls) == 1:
                    await gate.wait()
                    raise error
                return "recovered"

            callers = [asyncio.ensure_future(c.get_or_load("k", loader)) for _ in range(5)]
            # A caller counts its miss and joins the load in one step (no await between).
            await until(lambda: c.stats()["misses"] == 5, what="every caller joined the load")
            gate.set()
            results = await asyncio.gather(*callers, return_exceptions=True)
            assert all(r is error for r in results) and calls == [1]
            assert len(c._flights) == 0
            assert await c.get_or_load("k", loader) == "recovered"
            await c.clear()

    arun(main)


def test_a_waiter_of_a_stuck_load_loads_itself_after_lease_wait(url: str) -> None:
    async def main() -> None:
        async with AsyncTieredCache(url, namespace="stuck", lease_wait=0.5) as c:
            gate = asyncio.Event()

            async def leader(key: Any) -> str:
                await gate.wait()
                return "leader's"

            first = asyncio.ensure_future(c.get_or_load("k", leader))
            await until(lambda: len(c._flights) == 1, what="the load in flight")
            t0 = time.monotonic()
            assert await c.get_or_load("k", lambda k: "waiter's") == "waiter's"
            assert 0.45 <= time.monotonic() - t0 < 5.0
            gate.set()
            assert await first == "leader's"
            assert await c.get("k") == "leader's"
            await c.clear()

    arun(main)


def test_a_cancelled_write_leaves_no_old_local_copy(
    redis_server: RedisServer, proxy: TcpProxy
) -> None:
    """A write cancelled in flight (its outcome unknown) drops the writer's local copy first and
    keeps any older fill out, as a write that timed out does (read-your-writes, SPEC 3.2)."""

    async def main() -> None:
        async with AsyncTieredCache(
            f"redis://{proxy.host}:{proxy.port}/0", socket_timeout=3.0, health_timeout=5.0
        ) as c:
            await c.set("k", "v1")
            assert c.local.entry(lk("k")) is not None
            proxy.set_latency(0.3)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.set("k", "v2"), 0.05)
            assert c.local.entry(lk("k")) is None, "the old value stayed local"
            newest = c._guard.newest(lk("k"))
            assert newest > 0, "the write's version is not kept as the key's high-water mark"
            proxy.set_latency(0.0)
            await until(lambda: c.get("k"), what="a read after the cancelled write")
            # Redis applied it after all: the reader sees v2, never v1 again.
            await until(lambda: _eq(c.get("k"), "v2"), what="the write applied")

    arun(main)


async def _eq(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


# -- one sync and one async cache in one process ----------------------------------------------


def test_a_sync_and_an_async_cache_in_one_process_stay_coherent(url: str) -> None:
    sync = TieredCache(url, namespace="mix", health_timeout=5.0)
    try:
        assert sync.wait_ready(10)

        async def main() -> None:
            async with AsyncTieredCache(url, namespace="mix", health_timeout=5.0) as a:
                for i in range(20):
                    # async writes, the sync cache's local copy follows
                    await a.set(("k", i % 3), i)
                    await until(
                        lambda i=i: sync.get(("k", i % 3)) == i, what=f"sync sees write {i}"
                    )
                    # sync writes, the async cache's local copy follows
                    sync[("k", i % 3)] = -i
                    await until(
                        lambda i=i: _eq(a.get(("k", i % 3)), -i), what=f"async sees write {i}"
                    )
                # Both have local copies, each drops its own on the other's invalidation.
                assert a.local.entry(lk(("k", 1))) is not None
                assert sync.local.entry(lk(("k", 1))) is not None
                await a.invalidate(("k", 1))
                await until(lambda: sync.local.entry(lk(("k", 1))) is None, what="sync dropped")
                assert sync.get(("k", 1)) is None
                sync.invalidate(("k", 2))
                await until(lambda: a.local.entry(lk(("k", 2))) is None, what="async dropped")
                assert await a.get(("k", 2)) is None
                sync.clear()
                await until(lambda: len(a.local) == 0, what="async emptied by the sync clear")
                assert await a.count() == 0

        arun(main)
    finally:
        sync.close()


def test_tags_namespace_bumps_sliding_and_write_behind_as_coroutines(url: str) -> None:
    """The new write and invalidation strategies from a native asyncio caller, coherent with a
    TieredCache on the same namespace (tests/test_tags.py runs them all mixed)."""
    sync = TieredCache(url, namespace="mixtags", health_timeout=5.0, ttl=60)
    try:
        assert sync.wait_ready(10)

        async def main() -> None:
            async with AsyncTieredCache(url, namespace="mixtags", health_timeout=5.0, ttl=60) as a:
                await a.set("u1", "one", tags=("users",))
                await a.set("u2", "two", tags=lambda k, v: ("users", f"user:{k}"))
                await a.set("s", "slides", sliding=True)
                await a.set("adaptive", 5, ttl=lambda k, v: 30.0)
                assert sync.get("u1") == "one" and sync.get("u2") == "two"
                assert sync.get("s") == "slides" and sync.get("adaptive") == 5
                assert await a.get_or_load("g", lambda k: "loaded", tags=("users",)) == "loaded"
                await until(lambda: sync.get("g") == "loaded", what="sync reads the tagged fill")
                await a.invalidate_tag("users")  # at once here, via the message in sync
                assert await a.get("u1") is None and await a.get("g") is None
                await until(lambda: sync.local.entry("u2") is None, what="sync dropped u2")
                assert sync.get("u1") is None and sync.get("u2") is None
                sync.set("u3", "three", tags=("users",))
                assert await a.get("u3") == "three"
                sync.invalidate_tag("users")
                await until(lambda: a.local.entry("u3") is None, what="async dropped u3")
                assert await a.get("u3") is None
                # Namespace generations, either way.
                await a.set("n", 1)
                assert sync.get("n") == 1
                generation = await a.bump_namespace()
                assert a.generation == generation and a.stats()["generation"] == generation
                assert await a.get("n") is None
                await until(lambda: sync.generation == generation, what="sync moved on")
                assert sync.get("n") is None
                sync["n"] = 2
                assert await a.get("n") == 2
                later = sync.bump_namespace()
                await until(lambda: a.generation == later, what="async moved on")
                assert await a.get("n") is None
                # Write-behind queues in the write's own script; write-around drops everywhere.
                await a.set("wb", "queued", write_behind=True)
                assert sync.redis.xlen(stream_key(KeySpace("mixtags"), 0)) == 1
                assert sync.get("wb") == "queued"
                assert await a.write_around("wb") is True
                await until(lambda: sync.local.entry("wb") is None, what="sync dropped wb")
                assert sync.get("wb") is None
                with pytest.raises(NotImplementedError):
                    await a.warm(["x"], lambda ks: {})

        arun(main)
    finally:
        sync.close()


def test_cluster_and_sentinel_urls_are_refused_clearly() -> None:
    for u in ("redis+cluster://127.0.0.1:1", "redis+sentinel://127.0.0.1:1/mymaster"):
        with pytest.raises(NotImplementedError, match="Cluster or Sentinel"):
            AsyncTieredCache(u)


# -- the decorator ----------------------------------------------------------------------------


def test_the_decorator_on_async_def_uses_the_async_cache(url: str) -> None:
    calls: list[int] = []

    async def main() -> None:
        async with AsyncTieredCache(url, namespace="deco", health_timeout=5.0) as c:
            gate = asyncio.Event()

            @tiered_cache(c, ttl=30)
            async def square(x: int) -> int:
                calls.append(x)
                await gate.wait()
                return x * x

            assert asyncio.iscoroutinefunction(square)
            callers = [asyncio.ensure_future(square(4)) for _ in range(5)]
            # Concurrent calls join one shared miss at their first step, before any I/O.
            await until(lambda: calls, what="the function running")
            assert len(square._flights) == 1
            callers[0].cancel()  # a cancelled caller does not cancel the shared call
            gate.set()
            assert await asyncio.gather(*callers[1:]) == [16] * 4
            assert calls == [4] and len(square._flights) == 0
            assert await square(4) == 16 and calls == [4]
            info = square.cache_info()
            assert info.misses == 1 and info.local_hits >= 1
            # Another process' cache (here a sync one) invalidating the call reaches this one.
            with TieredCache(url, namespace="deco") as other:
                assert other.wait_ready(10)
                key = ("tiercache.call", square._keys.name, (4,), ())
                assert await asyncio.to_thread(other.invalidate, key)
            await until(lambda: len(square.local) == 0, what="the call's local copy dropped")
            assert await square(4) == 16 and calls == [4, 4]
            assert await square.invalidate(4) is True
            await square.cache_clear()
            await square.aclose()

            with pytest.raises(TypeError, match="async def"):

                @tiered_cache(c)
                def plain(x: int) -> int:
                    return x

            @tiered_cache(c)
            async def raises(x: int) -> int:
                raise KeyError(x)  # the function's own KeyError, not a cache miss

            with pytest.raises(KeyError):
                await raises(1)
            await c.clear()

    arun(main)


def test_a_decorated_coroutine_with_long_arguments_is_cleared(
    url: str, redis_client: redis.Redis
) -> None:
    """Keys longer than max_key_bytes live under a digest; cache_clear() still finds them."""
    calls: list[str] = []

    async def main() -> None:
        async with AsyncTieredCache(url, namespace="long", max_key_bytes=64) as c:

            @tiered_cache(c, name="long-args")
            async def f(text: str) -> int:
                calls.append(text)
                return len(text)

            assert await f("z" * 1000) == 1000 and await f("z" * 1000) == 1000
            assert len(calls) == 1
            assert len([n for n in redis_client.scan_iter(match="long:*") if b":v:" in n]) == 1
            assert [k async for k in c] == [("tiercache.call", "long-args", ("z" * 1000,), ())]
            await f.cache_clear()
            assert [n for n in redis_client.scan_iter(match="long:*") if b":v:" in n] == []
            assert await f("z" * 1000) == 1000 and len(calls) == 2
            await c.clear()

    arun(main)


# -- the listener --------------------------------------------------------------------------------


def test_a_lost_channel_turns_the_local_tier_off_until_it_resyncs(
    url: str, redis_client: redis.Redis
) -> None:
    async def main() -> None:
        async with AsyncTieredCache(
            url, namespace="lost", health_interval=0.1, health_timeout=1.0
        ) as c:
            await c.set("k", 1)
            assert redis_client.client_kill_filter(_type="pubsub") >= 1
            await until(lambda: c.stats()["disconnects"] >= 1, what="the disconnect noticed")
            await until(lambda: c.stats()["local_usable"], what="resubscribed and resynced")
            assert c.stats()["resyncs"] >= 1
            assert await c.get("k") == 1
            await c.clear()

    arun(main)


def test_write_around_decorator_with_the_async_cache(url: str) -> None:
    from tiercache import write_around

    async def main() -> None:
        async with AsyncTieredCache(url, namespace="wa", health_timeout=5.0) as a:
            origin: dict[int, str] = {}

            @write_around(a, key=lambda uid, name: ("user", uid))
            async def rename(uid: int, name: str) -> None:
                origin[uid] = name

            await a.set(("user", 1), "old")
            await rename(1, "new")
            assert await a.get(("user", 1)) is None and origin == {1: "new"}

            @write_around(a)
            def blocking(uid: int) -> None:
                pass

            with pytest.raises(TypeError, match="async def writer"):
                blocking(1)

    arun(main)

"""Stampede protection (SPEC 3.7, issue 4): in-process single-flight, the fill lease across
processes, and their pieces (tiercache.stampede's SingleFlight and Refresher).

Cross-process tests run real OS processes (:class:`Worker`): each opens its own TieredCache and
calls ``get_or_load`` from several threads; the loader (:class:`TruthLoader`) records its calls
in Redis keys outside the cache's namespace, the "truth store", so the count survives the death
of the process that made it. Faults are real: the lease holder is SIGKILLed in the middle of its
load. Every wait is a condition with a deadline (``wait_until``, pipe polls, joins with a
timeout); every worker is resumed, asked to exit and killed at teardown.

Workers come from a ``forkserver`` (started, with redis and tiercache preloaded, by the
module-scoped ``forkserver`` fixture and stopped after the module): like ``spawn`` each child
starts from a clean single-threaded process (never a fork of the test process with its
listener threads), but it costs a fork instead of a fresh interpreter, which matters on a
loaded 2-core machine with 8 workers per test.

This module also holds the worker harness the other stampede files import
(``tests.test_scenarios_stampede``, ``tests.test_readthrough``, ``tests.test_decorator``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest
import redis

import tiercache
from tests.aio_facade import make_cache
from tests.servers import RedisServer, wait_until
from tiercache import MISSING, TieredCache
from tiercache.envelope import FLAG_LEASE, EnvelopeError, unpack
from tiercache.keys import KeySpace, encode_key, local_key
from tiercache.stampede import Refresher, SingleFlight

Factory = Callable[..., TieredCache]

# -- small helpers ------------------------------------------------------------------------------


def raw_key(key: Hashable, namespace: str = "tc") -> bytes:
    """The Redis key of ``key``'s entry."""
    return KeySpace(namespace).value(encode_key(key))


def marker_key(key: Hashable, namespace: str = "tc") -> bytes:
    """The Redis key of ``key``'s refresh marker."""
    return KeySpace(namespace).refresh_marker(encode_key(key))


def is_lease(raw: bytes | None) -> bool:
    """Whether raw bytes are a fill lease (False for anything that is not an envelope)."""
    try:
        return raw is not None and bool(unpack(raw).flags & FLAG_LEASE)
    except EnvelopeError:
        return False


def local_entry(cache: TieredCache, key: Hashable) -> Any:
    """``cache``'s local entry of ``key`` (None if none)."""
    return cache.local.entry(local_key(key, encode_key(key)))


def refresh_pending(cache: TieredCache, key: Hashable) -> bool:
    """Whether a background refresh of ``key`` is queued or running in ``cache``."""
    return encode_key(key) in cache._refresher._pending


def blocked_in(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is inside a call of a function named ``function`` right now.

    Used to know that a follower has joined a single-flight call (it is waiting on the
    leader's future) before the leader is released: a condition, not a sleep.
    The collector is off meanwhile: on CPython 3.11 a collection that starts inside
    ``sys._current_frames()`` (it holds the runtime's thread-list lock) can run a finalizer that
    needs that lock, and the thread hangs in C where no timeout reaches it (CPython gh-106883).
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        frame = sys._current_frames().get(thread.ident or -1)
    finally:
        if collecting:
            gc.enable()
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


class Background:
    """Run one call in a thread; ``result()`` joins it (with a deadline) and returns or raises."""

    def __init__(self, fn: Callable[[], Any], name: str = "test-call") -> None:
        self._out: dict[str, Any] = {}
        self.started = time.monotonic()
        self.finished: float | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._out["value"] = fn()
        except BaseException as exc:
            self._out["error"] = exc
        finally:
            self.finished = time.monotonic()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout: float = 20.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the background call did not return"
        if "error" in self._out:
            raise self._out["error"]
        return self._out["value"]


class TruthLoader:
    """A loader that records each call in the truth store (Redis keys ``truth:<counter>...``).

    ``delay``: the origin's own latency (the loader's work, not a wait for a condition).
    ``gate``: a list key; the loader blocks (BLPOP) until the test pushes ``ok`` (return) or
    ``fail`` (raise RuntimeError). It returns ``"<prefix>:<pid>:<call number>"``, so every
    load yields a distinct value.
    Picklable: its Redis client is made lazily in the process that calls it.
    """

    def __init__(
        self,
        url: str,
        counter: str,
        *,
        delay: float = 0.0,
        gate: str | None = None,
        prefix: str = "v",
    ) -> None:
        self.url = url
        self.counter = counter
        self.delay = delay
        self.gate = gate
        self.prefix = prefix
        self._client: redis.Redis | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.url, socket_timeout=None)
        return self._client

    def __call__(self, key: Any) -> Any:
        r = self.client()
        n = r.incr(f"truth:{self.counter}:calls")
        r.rpush(
            f"truth:{self.counter}:log",
            f"{os.getpid()} {time.time():.6f} {threading.current_thread().name}",
        )
        verdict = b"ok"
        if self.gate is not None:
            item = r.blpop([f"truth:{self.gate}"], timeout=30)
            verdict = b"fail" if item is None else item[1]
        if self.delay:
            time.sleep(self.delay)
        if verdict == b"fail":
            raise RuntimeError(f"origin failed for {key!r}")
        return f"{self.prefix}:{os.getpid()}:{n}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class Truth:
    """Reads the truth store that :class:`TruthLoader` writes."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def calls(self, counter: str) -> int:
        return int(self.client.get(f"truth:{counter}:calls") or 0)

    def log(self, counter: str) -> list[tuple[int, float, str]]:
        """(pid, wall time, thread name) of each call, in call order."""
        out = []
        for line in self.client.lrange(f"truth:{counter}:log", 0, -1):
            pid, at, thread = line.decode().split(" ", 2)
            out.append((int(pid), float(at), thread))
        return out

    def open_gate(self, gate: str, verdict: str = "ok") -> None:
        self.client.rpush(f"truth:{gate}", verdict)


# -- worker processes ---------------------------------------------------------------------------

CTX = multiprocessing.get_context("forkserver")
# (This module is imported as ``test_stampede`` by pytest and as ``tests.test_stampede`` by the
# other files: both names are preloaded, whichever the pickled worker function refers to.)
_PRELOAD = [
    "redis",
    "tiercache.tiered",
    "tiercache.decorator",
    "test_stampede",
    "tests.test_stampede",
]


@contextlib.contextmanager
def forkserver_running() -> Iterator[None]:
    """A forkserver with the libraries preloaded for the duration; stopped afterwards."""
    from multiprocessing import forkserver

    CTX.set_forkserver_preload(_PRELOAD)
    try:
        yield
    finally:
        stop = getattr(forkserver._forkserver, "_stop", None)
        if stop is not None:
            stop()


class RemoteError(RuntimeError):
    """A command raised in the worker (its type name and traceback are in the message)."""

    def __init__(self, type_name: str, text: str) -> None:
        super().__init__(f"{type_name}: {text}")
        self.type_name = type_name


class Worker:
    """One OS process with its own TieredCache, driven over a pipe (see ``_WorkerState``)."""

    def __init__(self, name: str, go: Any) -> None:
        self.name = name
        self._conn, child = CTX.Pipe()
        self.process = CTX.Process(target=_worker_main, args=(child, go), name=name, daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, *command: Any) -> None:
        self._conn.send(command)

    def receive(self, timeout: float = 30.0) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name} (pid {self.pid}) gave no answer in {timeout}s")
        status, payload = self._conn.recv()
        if status == "ok":
            return payload
        raise RemoteError(*payload)

    def call(self, *command: Any, timeout: float = 30.0) -> Any:
        self.send(*command)
        return self.receive(timeout)

    def open(self, url: str, **options: Any) -> int:
        """Open the worker's TieredCache (ready to serve); the worker's pid."""
        return int(self.call("open", url, options))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the worker and reap it."""
        self.signal(signal.SIGKILL)
        self.process.join(10)
        assert not self.process.is_alive(), f"{self.name} survived SIGKILL"

    def close(self, timeout: float = 5.0) -> None:
        """Resume, ask to exit, then kill if still there (teardown)."""
        if self.process.pid is None:
            return
        if self.process.is_alive():
            self.signal(signal.SIGCONT)
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(("exit",))
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self._conn.close()


@contextlib.contextmanager
def worker_pool() -> Iterator[tuple[Callable[[str], Worker], Any]]:
    """``(start, go)``: start workers by name; ``go`` is the event they start loads on."""
    started: list[Worker] = []
    go = CTX.Event()

    def start(name: str) -> Worker:
        w = Worker(name, go)
        started.append(w)
        return w

    try:
        yield start, go
    finally:
        for w in started:
            w.close()
        for w in started:
            assert not w.process.is_alive(), f"worker {w.name} outlived the test"


def _worker_main(conn: Any, go: Any) -> None:
    state = _WorkerState(go)
    try:
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            name, args = command[0], command[1:]
            if name == "exit":
                return
            try:
                result = state.run(name, args)
            except BaseException as exc:
                conn.send(("err", (type(exc).__name__, f"{exc}\n{traceback.format_exc()}")))
            else:
                conn.send(("ok", result))
    finally:
        state.close()


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any, float, float]:
    """(outcome, value, wall start, wall end) of one call: "ok" or the exception's type name."""
    t0 = time.time()
    try:
        value = fn()
    except Exception as exc:
        return type(exc).__name__, str(exc), t0, time.time()
    return "ok", value, t0, time.time()


class _WorkerState:
    """What a worker process holds: its cache, decorated functions, loaders."""

    def __init__(self, go: Any) -> None:
        self.go = go
        self.cache: TieredCache | None = None
        self.fn: Any = None
        self.fn_calls = 0
        self.loaders: list[TruthLoader] = []

    def close(self) -> None:
        for loader in self.loaders:
            with contextlib.suppress(Exception):
                loader.close()
        if self.cache is not None:
            with contextlib.suppress(Exception):
                self.cache.close()

    def _wait_go(self) -> None:
        if not self.go.wait(30):
            raise TimeoutError("the go signal never came")

    def run(self, name: str, args: tuple[Any, ...]) -> Any:
        if name == "open":
            url, options = args
            options = dict(options)
            self.cache = make_cache(options.pop("impl", "sync"), url, **options)
            if not self.cache.wait_ready(15):
                raise TimeoutError("the worker's cache did not become ready")
            return os.getpid()
        cache = self.cache
        assert cache is not None, "open first"
        if name == "load":
            # ("load", key, loader, threads, wait_go): `threads` threads call get_or_load at once
            key, loader, threads, wait_go = args
            self.loaders.append(loader)
            if wait_go:
                self._wait_go()
            return self._threads(threads, lambda: cache.get_or_load(key, loader))
        if name == "get":
            return cache.get(args[0])
        if name == "stats":
            return cache.stats()
        if name == "entry":
            e = local_entry(cache, args[0])
            if e is None:
                return None
            return ("MISSING" if e.value is MISSING else e.value), e.version
        if name == "get_or_load":
            key, loader = args
            self.loaders.append(loader)
            return _outcome(lambda: cache.get_or_load(key, loader))
        if name == "decorate":
            return self._decorate(*args)
        if name == "call":
            fn_args, fn_kwargs = args
            return _outcome(lambda: self.fn(*fn_args, **fn_kwargs))
        if name == "fn_calls":
            return self.fn_calls
        if name == "cache_clear":
            self.fn.cache_clear()
            return None
        if name == "fn_local_len":
            return len(self.fn.local)
        if name == "async_stampede":
            return self._async_stampede(*args)
        raise ValueError(f"unknown command {name!r}")

    def _threads(self, n: int, fn: Callable[[], Any]) -> list[tuple[str, Any, float, float]]:
        barrier = threading.Barrier(n)
        out: list[Any] = [None] * n

        def run(i: int) -> None:
            barrier.wait(10)
            out[i] = _outcome(fn)

        threads = [threading.Thread(target=run, args=(i,), name=f"caller-{i}") for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a caller thread hangs"
        return out

    def _decorate(self, name: str, kind: str, options: dict[str, Any]) -> None:
        """Decorate a function of this worker under ``name`` (the same name as the test's)."""
        cache = self.cache
        assert cache is not None
        state = self

        if kind == "sync":

            def fn(x: Any, y: Any = 0) -> str:
                state.fn_calls += 1
                return f"{os.getpid()}:{x!r}:{y!r}:{state.fn_calls}"

            self.fn = tiercache.tiered_cache(cache, name=name, **options)(fn)
            return
        loader: TruthLoader = options.pop("loader")
        self.loaders.append(loader)

        async def afn(x: Any) -> str:
            state.fn_calls += 1
            value = await asyncio.to_thread(loader, x)
            return str(value)

        target = getattr(cache, "impl", cache)  # an AsyncTieredCache behind a SyncFacade
        self.fn = tiercache.tiered_cache(target, name=name, **options)(afn)

    def _async_stampede(
        self, x: Any, tasks: int, rounds: list[dict[str, Any]]
    ) -> list[list[tuple[str, Any, float, float]]]:
        """Run ``tasks`` asyncio tasks calling the async function ``fn(x)`` in each round.

        A round is ``{"wait_go": True}`` (a cold start: everyone calls once, at once, on
        ``go``), or ``{"until_change": seconds, "notify": <list key>}`` (a hot key invalidated
        under load): every task calls ``fn(x)`` once, then ``notify`` is pushed to the truth
        store, then every task calls ``fn(x)`` in a paced loop until it returns another value
        than its first, within the deadline. Each task reports (outcome, value, start, end): its
        last call's outcome and value, with the start and end of its slowest call.
        """
        fn = self.fn

        async def one_call() -> tuple[str, Any, float, float]:
            t0 = time.time()
            try:
                value = await fn(x)
            except Exception as exc:
                return type(exc).__name__, str(exc), t0, time.time()
            return "ok", value, t0, time.time()

        async def until_change(
            first: tuple[str, Any, float, float], seconds: float
        ) -> tuple[str, Any, float, float]:
            deadline = time.monotonic() + seconds
            slowest = first
            while time.monotonic() < deadline:
                got = await one_call()
                if got[3] - got[2] > slowest[3] - slowest[2]:
                    slowest = got
                if got[0] != "ok" or got[1] != first[1]:
                    return got[0], got[1], slowest[2], slowest[3]
                await asyncio.sleep(0.02)  # pacing of the load generator
            return "unchanged", first[1], slowest[2], slowest[3]

        async def main() -> list[list[tuple[str, Any, float, float]]]:
            results = []
            for spec in rounds:
                if spec.get("wait_go"):
                    await asyncio.to_thread(self._wait_go)
                    results.append(list(await asyncio.gather(*(one_call() for _ in range(tasks)))))
                    continue
                firsts = await asyncio.gather(*(one_call() for _ in range(tasks)))
                await asyncio.to_thread(self.loaders[-1].client().rpush, spec["notify"], 1)
                seconds = spec["until_change"]
                results.append(
                    list(await asyncio.gather(*(until_change(f, seconds) for f in firsts)))
                )
            return results

        loop = getattr(self.cache, "_loop", None)  # an AsyncTieredCache runs in its own loop
        return loop.run(main(), 600) if loop is not None else asyncio.run(main())


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forkserver() -> Iterator[None]:
    with forkserver_running():
        yield


@pytest.fixture
def workers(forkserver: None) -> Iterator[tuple[Callable[[str], Worker], Any]]:
    with worker_pool() as pool:
        yield pool


def tiercache_threads(baseline: set[threading.Thread]) -> list[threading.Thread]:
    """tiercache's threads alive now that were not in ``baseline``."""
    alive = threading.enumerate()
    return [t for t in alive if t.name.startswith("tiercache") and t not in baseline]


@contextlib.contextmanager
def cache_factory(url: str, impl: str = "sync") -> Iterator[Factory]:
    """``make(**options)``: ready caches on ``url`` (``impl``: tests.aio_facade.make_cache),
    closed (threads checked)."""
    baseline = set(threading.enumerate())
    made: list[TieredCache] = []

    def factory(**kwargs: Any) -> TieredCache:
        kwargs.setdefault("health_timeout", 5.0)
        cache = make_cache(impl, url, **kwargs)
        made.append(cache)
        assert cache.wait_ready(10), "the invalidation channel never became ready"
        return cache

    try:
        yield factory
    finally:
        for cache in made:
            cache.close()
    # close() joins its workers with a bounded wait; a loaded machine may need a little longer
    wait_until(lambda: tiercache_threads(baseline) == [], 10.0, message="tiercache threads gone")


@pytest.fixture
def make(redis_client: redis.Redis, shared_redis: RedisServer, impl: str) -> Iterator[Factory]:
    with cache_factory(shared_redis.url, impl) as factory:
        yield factory


@pytest.fixture
def truth(redis_client: redis.Redis) -> Truth:
    return Truth(redis_client)


# -- SingleFlight and Refresher on their own ---------------------------------------------------


def _followers_joined(threads: list[threading.Thread]) -> bool:
    return all(blocked_in(t, "result") for t in threads)


def test_single_flight_shares_one_call_among_concurrent_callers() -> None:
    sf = SingleFlight()
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def leader_fn() -> str:
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        return "shared"

    leader = Background(lambda: sf.run("k", leader_fn, wait=30), name="leader")
    assert started.wait(10)
    followers = [
        Background(lambda: sf.run("k", lambda: calls.append("follower") or "own", wait=30))
        for _ in range(8)
    ]
    wait_until(lambda: _followers_joined([f.thread for f in followers]), 10)
    assert len(sf) == 1
    release.set()
    assert leader.result() == "shared"
    assert [f.result() for f in followers] == ["shared"] * 8
    assert calls == ["leader"]
    assert len(sf) == 0, "the in-flight map keeps a finished call"
    # Another key is another call; a later call of the same key runs again.
    assert sf.run("k2", lambda: "other", wait=1) == "other"
    assert sf.run("k", lambda: "again", wait=1) == "again"
    assert len(sf) == 0


@pytest.mark.parametrize("exc_type", [ValueError, KeyboardInterrupt])
def test_single_flight_leader_error_reaches_every_waiter_and_is_forgotten(
    exc_type: type[BaseException],
) -> None:
    sf = SingleFlight()
    started, release = threading.Event(), threading.Event()
    error = exc_type("origin down")

    def failing() -> Any:
        started.set()
        assert release.wait(10)
        raise error

    leader = Background(lambda: sf.run("k", failing, wait=30))
    assert started.wait(10)
    followers = [Background(lambda: sf.run("k", lambda: "own", wait=30)) for _ in range(5)]
    wait_until(lambda: _followers_joined([f.thread for f in followers]), 10)
    release.set()
    for call in [leader, *followers]:
        with pytest.raises(exc_type) as info:
            call.result()
        assert info.value is error, "a waiter got another error than the leader's"
    assert len(sf) == 0
    assert sf.run("k", lambda: "retried", wait=1) == "retried", "the error was remembered"


def test_single_flight_waiter_of_a_stuck_leader_runs_the_call_itself() -> None:
    sf = SingleFlight()
    started, release = threading.Event(), threading.Event()

    def stuck() -> str:
        started.set()
        assert release.wait(20)
        return "late"

    leader = Background(lambda: sf.run("k", stuck, wait=30))
    assert started.wait(10)
    waiter = Background(lambda: sf.run("k", lambda: "own", wait=0.3))
    assert waiter.result(10) == "own"
    assert waiter.finished is not None and waiter.finished - waiter.started >= 0.3
    assert leader.running, "staging: the leader finished early"
    release.set()
    assert leader.result() == "late"
    assert len(sf) == 0


def test_refresher_runs_one_refresh_per_key_at_a_time_and_survives_failures() -> None:
    refresher = Refresher(workers=2, backlog=4, name="tiercache-test")
    try:
        gate = threading.Event()
        ran: list[str] = []

        def blocked() -> None:
            ran.append("a")
            assert gate.wait(10)

        assert refresher.submit("a", blocked)
        wait_until(lambda: ran == ["a"], 5)
        assert not refresher.submit("a", lambda: ran.append("dup")), "a second refresh of a key"
        assert refresher.pending == 1

        def boom() -> None:
            ran.append("b")
            raise RuntimeError("refresh failed")

        assert refresher.submit("b", boom)
        wait_until(lambda: refresher.pending == 1 and "b" in ran, 5)  # b ran and failed
        assert refresher.submit("b", lambda: ran.append("b2"))  # the worker survived b
        wait_until(lambda: "b2" in ran, 5)
        gate.set()
        wait_until(lambda: refresher.pending == 0, 5)
        assert refresher.submit("a", lambda: ran.append("a2"))  # a is no longer pending
        wait_until(lambda: "a2" in ran, 5)
        assert "dup" not in ran
    finally:
        refresher.close()
    assert not any(t.name.startswith("tiercache-test") for t in threading.enumerate())
    assert not refresher.submit("c", lambda: None), "a closed refresher accepts work"


def test_refresher_backlog_is_bounded() -> None:
    refresher = Refresher(workers=1, backlog=3, name="tiercache-test")
    gate = threading.Event()
    try:
        ran: list[int] = []
        assert refresher.submit(0, lambda: gate.wait(10) and ran.append(0))
        wait_until(lambda: refresher._queue.qsize() == 0, 5)  # the worker took it
        accepted = [refresher.submit(i, lambda i=i: ran.append(i)) for i in range(1, 10)]
        assert accepted == [True] * 3 + [False] * 6, "the backlog grew beyond its bound"
        assert refresher.pending == 4
        gate.set()
        wait_until(lambda: refresher.pending == 0, 5)
        assert sorted(ran) == [0, 1, 2, 3]
        assert refresher.submit(5, lambda: ran.append(5)), "a dropped key stays blocked"
        wait_until(lambda: 5 in ran, 5)
    finally:
        gate.set()
        refresher.close()


# -- single-flight inside one process, through TieredCache ---------------------------------------


def test_threads_of_one_process_share_one_load(make: Factory, redis_client: redis.Redis) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def loader(key: Any) -> str:
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        return f"loaded:{key}"

    c = make()
    leader = Background(lambda: c.get_or_load("k", loader), name="leader")
    assert started.wait(10)
    followers = [Background(lambda: c.get_or_load("k", loader)) for _ in range(12)]
    # A caller counts its miss right before it joins the load (then waits in "result").
    wait_until(lambda: c.stats()["misses"] == 13, 10, message="every caller missed")
    wait_until(lambda: _followers_joined([f.thread for f in followers]), 10)
    # While the load runs, the key's entry is our fill lease, with a TTL.
    raw = redis_client.get(raw_key("k"))
    assert is_lease(raw)
    assert 0 < redis_client.pttl(raw_key("k")) <= 10_000
    release.set()
    assert [x.result() for x in [leader, *followers]] == ["loaded:k"] * 13
    assert calls == ["leader"]
    stats = c.stats()
    assert (stats["loads"], stats["misses"], stats["lease_timeouts"]) == (1, 13, 0)
    assert len(c._flights) == 0, "the in-flight map keeps a finished load"
    assert unpack(redis_client.get(raw_key("k"))).is_value
    assert c.get_or_load("k", loader) == "loaded:k" and calls == ["leader"]


def test_leader_exception_reaches_every_waiter_and_is_not_cached(
    make: Factory, redis_client: redis.Redis
) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []
    error = ConnectionError("origin down")

    def loader(key: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            started.set()
            assert release.wait(10)
            raise error
        return "recovered"

    c, other = make(), make()
    leader = Background(lambda: c.get_or_load("k", loader))
    assert started.wait(10)
    followers = [Background(lambda: c.get_or_load("k", loader)) for _ in range(6)]
    wait_until(lambda: c.stats()["misses"] == 7, 10, message="every caller missed")
    wait_until(lambda: _followers_joined([f.thread for f in followers]), 10)
    release.set()
    for call in [leader, *followers]:
        with pytest.raises(ConnectionError) as info:
            call.result()
        assert info.value is error
    assert calls == [1]
    # Nothing cached, the lease released at once (no waiting out its TTL): the next caller,
    # here in another instance, loads straight away.
    assert redis_client.get(raw_key("k")) is None
    assert local_entry(c, "k") is None
    t0 = time.monotonic()
    assert other.get_or_load("k", loader) == "recovered"
    assert time.monotonic() - t0 < 5.0
    assert other.stats()["lease_timeouts"] == 0
    assert len(calls) == 2
    assert c.get_or_load("k", loader) == "recovered" and len(calls) == 2


def test_a_waiter_whose_leader_is_stuck_loads_itself_after_lease_wait(
    make: Factory, redis_client: redis.Redis
) -> None:
    """A follower waits for a stuck leader at most ``lease_wait``, then calls the loader itself.

    The follower's own load is not stored (the leader still holds the fill lease); the leader's
    fill lands when it finishes. The bound: the follower's loader starts within ``lease_wait``
    (plus a generous margin), not after waiting a second ``lease_wait`` for the Redis lease
    that its own process holds.
    """
    lease_wait = 1.5
    started, release = threading.Event(), threading.Event()
    follower_started: list[float] = []

    def loader(key: Any) -> str:
        if threading.current_thread().name == "leader":
            started.set()
            assert release.wait(20)
            return "leader's"
        follower_started.append(time.monotonic())
        return "follower's"

    c = make(lease_ttl=30.0, lease_wait=lease_wait)
    try:
        leader = Background(lambda: c.get_or_load("k", loader), name="leader")
        assert started.wait(10)
        follower = Background(lambda: c.get_or_load("k", loader), name="follower")
        assert follower.result(20) == "follower's"
        waited = follower_started[0] - follower.started
        assert leader.running, "staging: the leader finished early"
        assert is_lease(redis_client.get(raw_key("k"))), "the follower's load replaced the lease"
        assert waited >= lease_wait - 0.05
        assert waited < lease_wait * 1.6, (
            f"the follower called the loader after {waited:.2f}s, lease_wait is {lease_wait}s"
        )
    finally:
        release.set()
    assert leader.result() == "leader's"
    assert c.get_or_load("k", loader) == "leader's"
    assert unpack(redis_client.get(raw_key("k"))).is_value


def test_single_flight_holds_when_redis_fails_the_read(
    redis_factory: Callable[..., RedisServer], impl: str
) -> None:
    """With Redis down, concurrent misses of one key in one process still share one load.

    The read falls back to the loader (SPEC 3.6); in-process single-flight needs no Redis, so a
    degraded Redis must not turn every concurrent caller into an origin call.
    """
    server = redis_factory()
    calls: list[str] = []

    def loader(key: Any) -> str:
        calls.append(threading.current_thread().name)
        time.sleep(0.3)  # the origin's latency
        return "from origin"

    with cache_factory(server.url, impl) as factory:
        c = factory(connect_timeout=0.2, socket_timeout=0.2)
        server.stop()
        callers = [Background(lambda: c.get_or_load("k", loader)) for _ in range(8)]
        assert [x.result() for x in callers] == ["from origin"] * 8
        assert c.stats()["read_errors"] >= 1
        assert len(calls) == 1, f"{len(calls)} origin calls for 8 concurrent misses"


def test_lease_waiters_poll_with_backoff_and_give_up_at_lease_wait(
    make: Factory, redis_client: redis.Redis
) -> None:
    """Another process' fill lease: the waiter polls with backoff (no busy loop), gives up after
    ``lease_wait`` and loads without storing; the holder's fill still lands."""
    started, release = threading.Event(), threading.Event()

    def holder_loader(key: Any) -> str:
        started.set()
        assert release.wait(20)
        return "holder's"

    waiter_calls: list[int] = []
    holder = make(lease_ttl=30.0)
    waiter = make(lease_ttl=30.0, lease_wait=1.0)
    try:
        fill = Background(lambda: holder.get_or_load("k", holder_loader))
        assert started.wait(10)
        before = redis_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        t0 = time.monotonic()
        got = waiter.get_or_load("k", lambda k: waiter_calls.append(1) or "waiter's")
        took = time.monotonic() - t0
        polls = redis_client.info("commandstats")["cmdstat_evalsha"]["calls"] - before
        assert got == "waiter's" and waiter_calls == [1]
        assert 1.0 <= took < 10.0
        assert waiter.stats()["lease_timeouts"] == 1
        # Backoff from 2 ms up to 50 ms: about 30 polls in a second, never a busy loop.
        assert 3 <= polls <= 80, f"{polls} lease polls in {took:.2f}s"
        assert is_lease(redis_client.get(raw_key("k"))), "the waiter's value replaced the lease"
        assert local_entry(waiter, "k") is None, "the waiter stored its unleased load locally"
    finally:
        release.set()
    assert fill.result() == "holder's"
    assert waiter.get_or_load("k", lambda k: "again") == "holder's"


def test_a_value_redis_still_holds_past_its_expiry_is_reloaded_once_under_the_lease(
    make: Factory, redis_client: redis.Redis
) -> None:
    """At a hot key's expiry Redis may hold the value a moment after the cache's clock passed
    its ``expires_at`` (the SET that set its TTL ran a little after the TTL was computed; the
    processes' clock calibrations differ). Readers in that window find it expired; they must
    still go through the fill lease (one load, stored), not each load without a lease and
    store nothing (one origin call per process at every expiry, and again on the next read).

    The window is staged by writing such an envelope: expired by its header, kept 5 s by Redis.
    """
    make()["k"] = "old"
    env = unpack(redis_client.get(raw_key("k")))
    past = time.time() - 0.5
    stale = env._replace(expires_at=past, fresh_until=past)
    redis_client.set(raw_key("k"), stale.pack(), px=5000)
    caches = [make(), make()]
    calls: list[str] = []

    def loader(key: Any) -> str:
        calls.append(threading.current_thread().name)
        # Every caller has read the expired entry (a loaded machine may start one late).
        wait_until(lambda: sum(x.stats()["misses"] for x in caches) >= 8, 10)
        time.sleep(0.2)  # the origin's latency
        return "new"

    callers = [Background(lambda x=x: x.get_or_load("k", loader)) for x in caches for _ in range(4)]
    assert [x.result() for x in callers] == ["new"] * 8
    assert len(calls) == 1, f"{len(calls)} loads (one per process, none under the lease)"
    stored = unpack(redis_client.get(raw_key("k")))
    assert stored.is_value and stored.version > env.version
    assert caches[1].get_or_load("k", loader) == "new" and len(calls) == 1


# -- across processes ------------------------------------------------------------------------


def _worker_results(ws: list[Worker], timeout: float) -> list[tuple[str, Any, float, float]]:
    out: list[tuple[str, Any, float, float]] = []
    deadline = time.monotonic() + timeout
    for w in ws:
        out.extend(w.receive(max(0.1, deadline - time.monotonic())))
    return out


def test_cold_key_stampede_across_8_processes_runs_the_loader_once(
    workers: Any, shared_redis: RedisServer, truth: Truth, redis_client: redis.Redis, impl: str
) -> None:
    """8 processes x 4 threads ask for one cold key at once; the loader takes 200 ms.

    Must hold: one loader call in all (the fill lease across processes, single-flight inside
    each); every caller gets that call's value; nobody times out on the lease; every call
    returns within the loader time plus a generous margin.
    """
    start, go = workers
    ws = [start(f"W{i}") for i in range(8)]
    for w in ws:
        w.send("open", shared_redis.url, {"health_timeout": 5.0, "impl": impl})
    for w in ws:
        w.receive(60)
    loader = TruthLoader(shared_redis.url, "k", delay=0.2)
    for w in ws:
        w.send("load", "k", loader, 4, True)
    go.set()
    results = _worker_results(ws, 60)
    assert len(results) == 32
    assert {r[0] for r in results} == {"ok"}, results
    values = {r[1] for r in results}
    assert truth.calls("k") == 1, f"{truth.calls('k')} loader calls"
    (value,) = values
    pid = truth.log("k")[0][0]
    assert value == f"v:{pid}:1"
    slowest = max(r[3] - r[2] for r in results)
    assert slowest < 0.2 + 5.0, f"a caller took {slowest:.2f}s"
    stats = [w.call("stats") for w in ws]
    assert sum(s["misses"] > 0 for s in stats) >= 4, "staging: the callers did not overlap"
    assert sum(s["loads"] for s in stats) == 1
    assert sum(s["lease_timeouts"] for s in stats) == 0
    assert unpack(redis_client.get(raw_key("k"))).is_value
    # Everyone now serves it without the loader.
    for w in ws[:2]:
        assert w.call("get", "k") == value


def _data_connections_running(client: redis.Redis, command: str) -> int:
    return sum(
        1
        for c in client.client_list()
        if c.get("cmd") == command and not str(c.get("name", "")).startswith("tiercache:listener")
    )


_KILL_OPTIONS = {"health_timeout": 5.0, "lease_ttl": 1.0, "lease_wait": 15.0}


def _holder_killed_round(
    start: Callable[[str], Worker],
    go: Any,
    url: str,
    truth: Truth,
    redis_client: redis.Redis,
    others: list[Worker],
    key: str,
) -> float:
    """One round: a new holder takes ``key``'s lease and is SIGKILLed mid-load while
    ``others`` (4 threads each) wait; checks the round and returns the recovery time."""
    lease_ttl = _KILL_OPTIONS["lease_ttl"]
    holder = start(f"holder-{key}")
    holder.open(url, **_KILL_OPTIONS)
    holder.send("load", key, TruthLoader(url, key, gate="never"), 1, False)
    wait_until(lambda: truth.calls(key) == 1, 10, message="the holder loading under its lease")
    assert is_lease(redis_client.get(raw_key(key)))
    pttl = redis_client.pttl(raw_key(key))
    assert 0 < pttl <= lease_ttl * 1000, "the lease has no TTL (a crash would strand everyone)"
    lease_expiry = time.time() + pttl / 1000.0
    go.clear()
    for w in others:
        w.send("load", key, TruthLoader(url, key, delay=0.2), 4, True)
    go.set()
    # The others are polling the holder's lease (their data connections run the lease script).
    wait_until(
        lambda: _data_connections_running(redis_client, "evalsha") >= len(others) + 1,
        10,
        message="the others waiting on the lease",
    )
    holder.kill()
    killed_at = time.time()
    results = _worker_results(others, lease_ttl + 30)
    assert len(results) == 4 * len(others)
    assert {r[0] for r in results} == {"ok"}, results
    log = truth.log(key)
    assert len(log) == 2, f"{len(log)} loader calls (1 by the dead holder, at most 1 more)"
    second_pid, second_at, _ = log[1]
    assert second_pid != holder.pid
    assert second_at >= lease_expiry - 0.05, "a waiter loaded while the dead holder's lease stood"
    assert {r[1] for r in results} == {f"v:{second_pid}:2"}
    recovered = max(r[3] for r in results) - killed_at
    assert recovered < lease_ttl + 0.2 + 5.0, "a caller hung past the lease TTL"
    assert unpack(redis_client.get(raw_key(key))).is_value
    return recovered


def test_lease_holder_killed_mid_load_the_others_recover_within_the_lease_ttl(
    workers: Any, shared_redis: RedisServer, truth: Truth, redis_client: redis.Redis, impl: str
) -> None:
    """The process holding the fill lease is SIGKILLed in the middle of its load while 7 other
    processes x 4 threads wait for the key.

    Must hold: the others take over once the lease expires (never before: no "everyone goes
    when the lease expires" within the lease), the loader runs exactly once more, every caller
    gets that value, nobody hangs (every caller returns within the lease TTL + the loader time
    + a generous margin after the kill), and no lease is left behind.
    """
    start, go = workers
    others = [start(f"W{i}") for i in range(7)]
    for w in others:  # (the holder is a TieredCache: the waiters' driver is parametrized)
        w.send("open", shared_redis.url, {**_KILL_OPTIONS, "impl": impl})
    for w in others:
        w.receive(60)
    _holder_killed_round(start, go, shared_redis.url, truth, redis_client, others, "k")
    assert sum(w.call("stats")["lease_timeouts"] for w in others) == 0


@pytest.mark.slow
def test_lease_holders_killed_round_after_round(
    workers: Any, shared_redis: RedisServer, truth: Truth, redis_client: redis.Redis
) -> None:
    """The kill round 8 times over with the same 7 waiting processes (a new holder each time):
    each round recovers the same way, and nothing piles up (no lease left, no lease
    timeouts)."""
    start, go = workers
    others = [start(f"W{i}") for i in range(7)]
    for w in others:
        w.send("open", shared_redis.url, _KILL_OPTIONS)
    for w in others:
        w.receive(60)
    times = []
    for r in range(8):
        times.append(
            _holder_killed_round(start, go, shared_redis.url, truth, redis_client, others, f"k{r}")
        )
    for name in redis_client.scan_iter(match="tc:*"):
        if redis_client.type(name) == b"string" and is_lease(redis_client.get(name)):
            raise AssertionError(f"a lease left behind: {name!r}")
    assert sum(w.call("stats")["lease_timeouts"] for w in others) == 0
    assert max(times) < _KILL_OPTIONS["lease_ttl"] + 5.2

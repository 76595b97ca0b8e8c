"""Worker processes of the stampede benchmark (``bench/test_stampede.py``), started with spawn.

A :class:`Worker` is one OS process driven over a pipe, in two steps per row so that every
caller of every process starts at the same moment:

- ``prepare(spec)``: build the row's clients (a plain redis-py client, or a TieredCache) and start
  ``spec["threads"]`` caller threads, which wait; reply when they all wait.
- ``go(start_at, end_at)``: the callers start at ``start_at`` (``time.monotonic``: CLOCK_MONOTONIC,
  one clock for every process of the host). Cold rows ask for each key once, in the same order
  (every key is a stampede); hot rows read the keys round-robin, paced, until ``end_at``. The
  reply holds every call's latency (ns), errors and, for TieredCache rows, its stats.

The loader (:func:`make_loader`) counts each call in a Redis hash (``HINCRBY count_key key 1``,
on its own client, before it sleeps), so the parent counts origin calls across processes,
including the background refreshes that finish after the callers are done.

Every process is joined with a timeout and killed if it does not exit.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

CTX = mp.get_context("spawn")
CALL_TIMEOUT = 120.0
JOIN_TIMEOUT = 10.0
CLIENT_KW = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}


def make_loader(counter: Any, count_key: str, sleep_s: float) -> Callable[[Any], Any]:
    """The origin: counts the call (shared, in Redis), sleeps ``sleep_s``, returns a value."""

    def loader(key: Any) -> Any:
        counter.hincrby(count_key, str(key), 1)
        time.sleep(sleep_s)
        return f"value of {key} loaded at {time.time():.6f}"

    return loader


def make_cache(url: str, namespace: str, cache_kw: dict[str, Any]) -> Any:
    from tiercache import TieredCache

    cache = TieredCache(url, namespace=namespace, **cache_kw)
    if not cache.wait_ready(10.0):
        cache.close()
        raise RuntimeError(f"TieredCache {namespace!r}: listener not ready")
    return cache


class _Row:
    """One row of the table in this process: its clients and its waiting caller threads."""

    def __init__(self, url: str, spec: dict[str, Any]) -> None:
        import redis

        from tiercache.stampede import SingleFlight

        self.spec = spec
        self.counter = redis.Redis.from_url(url, **CLIENT_KW)
        loader = make_loader(self.counter, spec["count_key"], spec["loader_s"])
        ttl_ms = int(spec["ttl"] * 1000)
        prefix = spec["namespace"] + ":"
        self.cache: Any = None
        self.client: Any = None
        mode = spec["mode"]
        if mode in ("aside", "sf_aside"):
            client = self.client = redis.Redis.from_url(url, **CLIENT_KW)
            flights = SingleFlight()

            def load_and_set(key: str) -> Any:
                value = loader(key)
                client.set(prefix + key, value, px=ttl_ms)
                return value

            def get(key: str) -> Any:  # plain cache-aside: GET, else load + SET
                value = client.get(prefix + key)
                if value is not None:
                    return value
                if mode == "aside":
                    return load_and_set(key)
                return flights.run(key, lambda: load_and_set(key), wait=30.0)

        else:  # "tiered": get_or_load (single-flight, lease, SWR and XFetch as configured)
            cache = self.cache = make_cache(url, spec["namespace"], spec["cache_kw"])
            ttl = spec["ttl"]

            def get(key: str) -> Any:
                return cache.get_or_load(key, loader, ttl=ttl)

        self.get = get
        self.go_event = threading.Event()
        self.times = {"start": 0.0, "end": 0.0}
        self.lat: list[list[int]] = []
        self.errors: list[str] = []
        self.waiting = threading.Semaphore(0)
        self.threads = [
            threading.Thread(target=self._caller, args=(i,), name=f"caller-{i}", daemon=True)
            for i in range(spec["threads"])
        ]
        for t in self.threads:
            t.start()
        for _ in self.threads:  # every caller is waiting for the start
            self.waiting.acquire(timeout=30.0)

    def _caller(self, index: int) -> None:
        lat: list[int] = []
        self.lat.append(lat)
        self.waiting.release()
        self.go_event.wait()
        delay = self.times["start"] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        keys, get, clock = self.spec["keys"], self.get, time.perf_counter_ns
        try:
            if self.spec["workload"] == "cold":
                for key in keys:
                    t0 = clock()
                    get(key)
                    lat.append(clock() - t0)
            else:  # hot: round-robin, paced, until the end of the window
                end, pace, n = self.times["end"], self.spec["pace_s"], len(keys)
                i = index * 7  # callers start on different keys
                while time.monotonic() < end:
                    key = keys[i % n]
                    i += 1
                    t0 = clock()
                    get(key)
                    lat.append(clock() - t0)
                    time.sleep(pace)
        except Exception as exc:  # reported with the row
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def go(self, start_at: float, end_at: float) -> dict[str, Any]:
        self.times["start"], self.times["end"] = start_at, end_at
        self.go_event.set()
        limit = max(end_at, start_at) + CALL_TIMEOUT / 2
        for t in self.threads:
            t.join(max(0.1, limit - time.monotonic()))
        stuck = sum(t.is_alive() for t in self.threads)
        stats = {}
        if self.cache is not None:
            self.cache.close()  # waits for running background refreshes (they are counted)
            stats = self.cache.stats()
        if self.client is not None:
            self.client.close()
        self.counter.close()
        return {
            "lat": [x for lat in self.lat for x in lat],
            "errors": self.errors[:3],
            "n_errors": len(self.errors),
            "stuck": stuck,
            "stats": {k: v for k, v in stats.items() if isinstance(v, int)},
        }


def _worker_main(conn: Any, url: str) -> None:
    row: _Row | None = None
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "close":
                break
            try:
                if cmd == "prepare":
                    row = _Row(url, args[0])
                    conn.send("ready")
                elif cmd == "go":
                    assert row is not None, "go before prepare"
                    out, row = row.go(*args), None
                    conn.send(out)
                else:
                    conn.send(ValueError(f"unknown command {cmd!r}"))
            except Exception as exc:
                conn.send(RuntimeError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class Worker:
    """A worker process: ``call(cmd, *args)`` sends a command and returns its reply."""

    def __init__(self, url: str, index: int) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=_worker_main, args=(child, url), name=f"bench-stampede-{index}", daemon=True
        )
        self.proc.start()
        child.close()

    def send(self, cmd: str, *args: Any) -> None:
        self.conn.send((cmd, *args))

    def reply(self, timeout: float = CALL_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"stampede worker pid={self.proc.pid} did not answer in {timeout}s")
        out = self.conn.recv()
        if isinstance(out, Exception):
            raise out
        return out

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(JOIN_TIMEOUT)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(JOIN_TIMEOUT)
        self.conn.close()

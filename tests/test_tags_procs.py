"""Tags and namespace generations across OS processes (issue 10, part B), on a real Redis.

``test_invalidate_a_tag_of_10k_keys_under_load``: 10 000 keys carry one tag (9 000 seeded, the
rest loaded, all loaded again after the change); worker processes
(tests/tag_procs.py) read them through a loader and write some of them while the test changes
the origin's epoch and calls ``invalidate_tag``. Checked: every worker applies the invalidation
(within a deadline; the time it took is printed, never asserted); after that no worker reads a
value of the old epoch (seeded, or loaded before the change: a fill that raced must not
resurrect); writes that began after the call returned are not lost; and a fresh process finds
no old value among the 10 000 keys.

``test_bump_namespace_reaches_a_process_whose_pubsub_was_killed``: a worker process holds the
old value locally; ``CLIENT KILL TYPE pubsub`` cuts every listener, then the namespace is bumped.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests import tag_procs
from tests.history import CacheProcess
from tests.servers import RedisServer, wait_until
from tiercache.tiered import TieredCache

OPTIONS: dict[str, Any] = {
    "health_interval": 0.5,
    "health_timeout": 5.0,  # a starved listener on a busy machine must not flap
    "startup_timeout": 10.0,
    "local_maxsize": 20_000,
}


def _run(server: RedisServer, keys: int, workers: int, seconds: float) -> None:
    ctl = server.client()
    ctl.set("ctl:epoch", 0)
    url = server.url
    t0 = time.monotonic()
    with TieredCache(url, namespace=tag_procs.NAMESPACE, ttl=300.0, **OPTIONS) as cache:

        def seed(i: int) -> None:
            cache.set(tag_procs.key_of(i), ("seed", i, 0), tags=(tag_procs.TAG,))

        with ThreadPoolExecutor(4) as pool:  # every tenth key is left to the loaders
            list(pool.map(seed, (i for i in range(keys) if i % 10)))
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        deadline = time.time() + seconds + 120.0
        procs = [
            ctx.Process(
                target=tag_procs.worker,
                args=(w, url, keys, workers, deadline, OPTIONS, out),
                daemon=True,
            )
            for w in range(workers)
        ]
        for p in procs:
            p.start()
        results: dict[int, dict[str, Any]] = {}
        try:
            t1 = time.monotonic()
            wait_until(lambda: ctl.llen("ctl:ready") == workers, 90, interval=0.05)
            t2 = time.monotonic()
            time.sleep(seconds / 3)  # reads and writes of the old epoch
            ctl.set("ctl:epoch", 1)  # the origin changes, then its writer invalidates the tag
            called = time.time()
            started = time.perf_counter()
            cache.invalidate_tag(tag_procs.TAG)
            took = time.perf_counter() - started
            returned = time.time()
            fence = int(ctl.hget(cache._keys.tag(0, tag_procs.TAG.encode()), "i"))
            ctl.set("ctl:fence", fence)
            wait_until(
                lambda: ctl.llen("ctl:applied") == workers,
                30,
                interval=0.01,
                message="every worker applied the invalidation",
            )
            time.sleep(seconds * 2 / 3)  # reads and writes after it
            ctl.set("ctl:stop", 1)
            for _ in procs:
                wid, result = out.get(timeout=60)
                results[wid] = result
        finally:
            ctl.set("ctl:stop", 1)
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)
    violations = [v for r in results.values() for v in r["violations"]]
    t3 = time.monotonic()
    arrivals = [
        round((r["applied_wall"] - returned) * 1000, 2) if r["applied_wall"] else None
        for r in results.values()
    ]
    print(
        f"\ninvalidate_tag of {keys} keys: {took * 1000:.2f} ms; applied by the {workers} "
        f"processes at {arrivals} ms after it returned (call to return: "
        f"{(returned - called) * 1000:.2f} ms); seed {t1 - t0:.1f} s, start {t2 - t1:.1f} s, "
        f"run {t3 - t2:.1f} s; "
        f"reads {sum(r['reads'] for r in results.values())} "
        f"(after: {sum(r['after_reads'] for r in results.values())}), "
        f"writes {sum(r['writes'] for r in results.values())}, stale fills rejected "
        f"{sum(r['stats'].get('stale_fills_rejected', 0) for r in results.values())}"
    )
    assert not violations, violations[:10]
    assert all(r["applied"] and r["after_reads"] > 0 for r in results.values())
    # A fresh process: no value of the old epoch anywhere, every write after the fence there.
    with TieredCache(url, namespace=tag_procs.NAMESPACE, ttl=300.0, **OPTIONS) as fresh:
        values = fresh.get_many([tag_procs.key_of(i) for i in range(keys)])
        old = {k: v for k, v in values.items() if v[0] == "seed" or v == ("load", v[1], 0)}
        assert not old, list(old.items())[:10]
        for r in results.values():
            for key, value in r["last_written"].items():
                assert values.get(key) == value, (key, value, values.get(key))
    ctl.close()


def test_invalidate_a_tag_of_10k_keys_under_load(redis_server: RedisServer) -> None:
    _run(redis_server, keys=10_000, workers=2, seconds=2.0)


@pytest.mark.slow
def test_invalidate_a_tag_of_10k_keys_under_load_long(redis_server: RedisServer) -> None:
    _run(redis_server, keys=10_000, workers=4, seconds=20.0)


def test_bump_namespace_reaches_a_process_whose_pubsub_was_killed(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    worker = CacheProcess("ns-worker")
    try:
        with TieredCache(redis_server.url, namespace="nsprocs", ttl=60.0, **OPTIONS) as a:
            worker.open(redis_server.url, namespace="nsprocs", ttl=60.0, **OPTIONS)
            a["k"] = "old"
            assert worker.call("get", "k") == "old"
            assert worker.call("entry", "k")[0] == "old"  # held in its local tier
            killed = admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            assert killed >= 2  # a's listener and the worker's
            generation = a.bump_namespace()
            # The worker sees its channel fail, resyncs (replay or generation read): the old
            # value goes; then it serves the new generation only.
            took = worker.call("read_until", "k", None, 20.0)
            assert took is not None, "the worker kept serving the old generation"
            stats = worker.call("stats")
            assert stats["generation"] == generation
            assert stats["disconnects"] >= 1
            a["k"] = "new"
            assert worker.call("read_until", "k", "new", 20.0) is not None
            assert [worker.call("get", "k") for _ in range(20)] == ["new"] * 20
    finally:
        worker.terminate()
        admin.close()
